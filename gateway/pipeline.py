"""Runs the checks of one stage and collects what they report.

Checks of a stage run concurrently (DNS lookups overlap); their records come
back in check order.  An exception from a check becomes ``Failed(severity=
"error")`` after it is logged with the queue id: the decider turns that into
451 4.3.0, never a silent accept and never a dead process.

Every stage has a deadline: a check that has not answered in time is
cancelled and becomes ``Failed(severity="tempfail")``, so a hung DNS server,
rule thread or scanner costs the client one 451, not its session.

``run_timed`` also says how long each check took (``CheckTiming``, by the
injected ``timer``): an inline check from its start to its answer, a
blocking one inside the pool trip (so the wait for a free thread is not
charged to it), a late one until the deadline gave up on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from gateway.events import CheckTiming
from gateway.plugins import Check
from gateway.records import Failed, Result, Stage, Transaction

log = logging.getLogger("mailgate.pipeline")


def as_deferred(value) -> defer.Deferred:
    """A check's return value (records, Deferred or coroutine) as a Deferred."""
    if isinstance(value, defer.Deferred):
        return value
    if asyncio.iscoroutine(value):
        # dnspython's async resolver needs a real asyncio task (see DESIGN.md)
        return defer.Deferred.fromFuture(asyncio.ensure_future(value))
    return defer.succeed(value)


async def in_thread(run_in_thread, fn, *args):
    """Run a blocking call in the gateway's thread pool and await it from a check's coroutine."""
    loop = asyncio.get_running_loop()
    if run_in_thread is None:
        return await loop.run_in_executor(None, fn, *args)
    d = run_in_thread(fn, *args)
    if hasattr(d, "asFuture"):  # a Twisted Deferred from deferToThread
        return await d.asFuture(loop)
    return await d


@dataclass(frozen=True)
class StageRun:
    """What one stage's checks said, and what they cost."""

    records: list
    timings: tuple  # of CheckTiming, in check order
    seconds: float  # the whole stage


NOTHING_RUN = StageRun([], (), 0.0)


class Pipeline:
    """The checks of each stage, how long a stage may take, and where blocking work runs.

    ``deadlines`` maps a stage to seconds (``[checks.deadlines]``); ``clock``
    is the reactor that times them.  Without deadlines nothing is timed.

    Checks marked ``blocking`` (CPU work on the message) run in
    ``run_in_thread``, all of a stage's in one call, after the message's
    parsed view is made there: one trip to the pool per stage, not one per
    check, and nothing of it on the reactor.  Without ``run_in_thread`` (unit
    tests, nothing else) they run inline.
    """

    def __init__(self, checks: Iterable[Check], deadlines: Optional[Mapping[Stage, float]] = None, clock=None,
                 run_in_thread: Optional[Callable] = None, timer: Callable[[], float] = time.perf_counter):
        self.by_stage: dict[Stage, list[Check]] = {s: [] for s in Stage}
        for c in checks:
            self.by_stage[c.stage].append(c)
        # which of a stage's checks go to the pool and which start here: decided once
        self._blocking = {s: [c for c in cs if c.blocking] for s, cs in self.by_stage.items()}
        self._inline = {s: [c for c in cs if not c.blocking] for s, cs in self.by_stage.items()}
        if deadlines and clock is None:
            raise ValueError("stage deadlines need a clock")
        self.deadlines = dict(deadlines or {})
        self.clock = clock
        self.run_in_thread = run_in_thread or defer.maybeDeferred
        # durations only, read from any thread: a monotonic clock, not the reactor's wall clock
        self.timer = timer

    @classmethod
    def from_config(cls, checks: Iterable[Check], config, services) -> "Pipeline":
        d = config.checks.deadlines
        return cls(checks, {Stage.CONNECT: d.connect, Stage.HELO: d.helo, Stage.MAIL: d.mail,
                            Stage.RCPT: d.rcpt, Stage.DATA: d.data}, services.reactor, services.run_in_thread)

    @property
    def checks(self) -> list[Check]:
        return [c for s in Stage for c in self.by_stage[s]]

    def run(self, stage: Stage, txn: Transaction) -> defer.Deferred:
        """Fires with the list of Result/Failed records of this stage, in check order."""
        return self.run_timed(stage, txn).addCallback(lambda run: run.records)

    def has_checks(self, stage: Stage) -> bool:
        return bool(self.by_stage[stage])

    def run_timed(self, stage: Stage, txn: Transaction) -> defer.Deferred:
        """Fires with the stage's ``StageRun``: its records in check order and each check's time."""
        checks = self.by_stage[stage]
        if not checks:
            return defer.succeed(NOTHING_RUN)
        started = self.timer()
        blocking = self._blocking[stage]
        # the pool's share first: the parse starts while the others are set going
        waits = [self.run_in_thread(self._run_blocking, blocking, txn, self.timer)] if blocking else []
        waits += [self._start(c, txn) for c in self._inline[stage]]
        timer = self._arm(stage, waits)
        gathered = defer.gatherResults([d.addErrback(self._cancelled) for d in waits], consumeErrors=True)
        gathered.addBoth(self._disarm, timer)
        return gathered.addCallback(self._in_order, checks, started)

    @staticmethod
    def _run_blocking(checks: list[Check], txn: Transaction, timer: Callable[[], float]) -> dict:
        """In a pool thread: the parsed view, then each blocking check in turn,
        each timed on its own (the parse is charged to none of them)."""
        if txn.message is not None:
            txn.message.prepare()
        answers = {}
        for c in checks:
            t0 = timer()
            try:
                records = Pipeline._records(c.check(txn))
            except Exception:
                records = Pipeline._crashed(Failure(), c, txn)
            answers[c.name] = (records, timer() - t0)
        return answers

    def _start(self, check: Check, txn: Transaction) -> defer.Deferred:
        t0 = self.timer()
        try:
            d = as_deferred(check.check(txn))
        except Exception:
            d = defer.fail(Failure())
        return d.addCallbacks(lambda v: {check.name: (self._records(v), self.timer() - t0)}, self._failed,
                              errbackArgs=(check, txn, t0))

    def _failed(self, failure: Failure, check: Check, txn: Transaction, t0: float):
        if failure.check(defer.CancelledError):
            return failure  # the stage's deadline: _cancelled answers for it
        return {check.name: (self._crashed(failure, check, txn), self.timer() - t0)}

    def _arm(self, stage: Stage, waits: list):
        """One timer for the stage: past its deadline every check still out is cancelled."""
        deadline = self.deadlines.get(stage)
        if deadline is None or all(d.called for d in waits):
            return None

        def expire():
            for d in waits:
                if not d.called:
                    d.cancel()

        return self.clock.callLater(deadline, expire)

    @staticmethod
    def _disarm(result, timer):
        if timer is not None and timer.active():
            timer.cancel()
        return result

    @staticmethod
    def _cancelled(failure: Failure) -> dict:
        """A wait cancelled at the stage's deadline answers nothing: its checks are late."""
        failure.trap(defer.CancelledError)
        return {}

    def _in_order(self, answered: list[dict], checks: list[Check], started: float) -> StageRun:
        merged: dict[str, tuple] = {}
        for answers in answered:
            merged.update(answers)
        elapsed = self.timer() - started
        out, timings = [], []
        for c in checks:
            if c.name in merged:
                records, seconds = merged[c.name]
            else:  # late: it cost the whole wait until the deadline gave up on it
                records, seconds = [self._late(c, self.deadlines[c.stage])], elapsed
            out.extend(records)
            timings.append(CheckTiming(c.name, seconds))
        return StageRun(out, tuple(timings), elapsed)

    @staticmethod
    def _late(check: Check, timeout: float) -> Failed:
        log.warning("check=%s timeout=no answer within %gs", check.name, timeout)
        return Failed(check.name, f"no answer within {timeout:g}s", severity="tempfail")

    @staticmethod
    def _records(value) -> list:
        if value is None:
            return []
        if isinstance(value, (Result, Failed)):
            return [value]
        return list(value)

    @staticmethod
    def _crashed(failure: Failure, check: Check, txn: Transaction) -> list:
        log.error(
            "queue_id=%s check=%s error=%r", txn.queue_id, check.name, failure.getErrorMessage(),
            exc_info=(failure.type, failure.value, failure.getTracebackObject()),
        )
        return [Failed(check.name, f"internal error: {failure.getErrorMessage()}", severity="error")]

    def close(self) -> None:
        for c in self.checks:
            try:
                c.close()
            except Exception:
                log.exception("check=%s close failed", c.name)
