"""Runs the checks of one stage and collects what they report.

Checks of a stage run concurrently (DNS lookups overlap); their records come
back in check order.  An exception from a check becomes ``Failed(severity=
"error")`` after it is logged with the queue id: the decider turns that into
451 4.3.0, never a silent accept and never a dead process.

Every stage has a deadline: a check that has not answered in time is
cancelled and becomes ``Failed(severity="tempfail")``, so a hung DNS server,
rule thread or scanner costs the client one 451, not its session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Mapping, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

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


class Pipeline:
    """``deadlines`` maps a stage to seconds (``[checks.deadlines]``); ``clock``
    is the reactor that times them.  Without deadlines nothing is timed."""

    def __init__(self, checks: Iterable[Check], deadlines: Optional[Mapping[Stage, float]] = None, clock=None):
        self.by_stage: dict[Stage, list[Check]] = {s: [] for s in Stage}
        for c in checks:
            self.by_stage[c.stage].append(c)
        if deadlines and clock is None:
            raise ValueError("stage deadlines need a clock")
        self.deadlines = dict(deadlines or {})
        self.clock = clock

    @classmethod
    def from_config(cls, checks: Iterable[Check], config, clock) -> "Pipeline":
        d = config.checks.deadlines
        return cls(checks, {Stage.CONNECT: d.connect, Stage.HELO: d.helo, Stage.MAIL: d.mail,
                            Stage.RCPT: d.rcpt, Stage.DATA: d.data}, clock)

    @property
    def checks(self) -> list[Check]:
        return [c for s in Stage for c in self.by_stage[s]]

    def has(self, stage: Stage) -> bool:
        return bool(self.by_stage[stage])

    def run(self, stage: Stage, txn: Transaction) -> defer.Deferred:
        """Fires with the list of Result/Failed records of this stage."""
        checks = self.by_stage[stage]
        if not checks:
            return defer.succeed([])
        ds = [self._run_one(c, txn) for c in checks]
        return defer.gatherResults(ds).addCallback(lambda lists: [r for rs in lists for r in rs])

    def _run_one(self, check: Check, txn: Transaction) -> defer.Deferred:
        try:
            d = as_deferred(check.check(txn))
        except Exception:
            d = defer.fail(Failure())
        deadline = self.deadlines.get(check.stage)
        if deadline is not None and not d.called:
            d.addTimeout(deadline, self.clock, onTimeoutCancel=lambda _, timeout: self._late(check, txn, timeout))
        d.addCallbacks(self._records, self._crashed, errbackArgs=(check, txn))
        return d

    @staticmethod
    def _late(check: Check, txn: Transaction, timeout: float) -> Failed:
        log.warning("queue_id=%s check=%s timeout=no answer within %gs", txn.queue_id, check.name, timeout)
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
