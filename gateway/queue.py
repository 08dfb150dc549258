"""The queue manager: what is spooled gets delivered, retried, or bounced.

The spool on disk is the single source of truth: every attempt re-reads the
envelope, so `mailgate queue hold/delete` from another process takes effect
at the next attempt.  Temporary failures retry with exponential backoff
between ``queue.retry_min`` and ``queue.retry_max`` until ``queue.lifetime``,
then bounce; permanent failures bounce at once (never to the null sender,
never a bounce of a bounce).

Delivery slots are per next hop (``Destinations``), as Postfix's qmgr
schedules them: an attempt splits a message's pending recipients by
destination (``deliverer.destination(rcpt)``), and each group waits for a
slot of its own destination (``queue.destination_concurrency``) and a global
one (``queue.delivery_concurrency``).  A group waiting for a busy destination
holds no global slot, so a hung next hop costs its own slots and nobody
else's.  ``queue.destination_dead_after`` failed connections in a row mark a
destination dead for ``queue.destination_dead_time``: its groups are deferred
at once, without a slot or a connection, with a reason naming it; then one
probe at a time until one gets through.

Nothing on disk is forgotten: when recording an attempt's outcome fails (a
full disk, any OSError) the message is scheduled again anyway, and every
``queue.sweep_interval`` the spool is searched for messages with pending
recipients that are neither held, nor scheduled, nor being tried.

What happens to a message is told to the injected ``events`` sink, the only
writer of these facts: ``DeliveryAttempted`` per next hop and attempt (each
recipient's code and reply, TLS, the delay since arrival), ``Deferred`` when
some recipients wait for a retry, ``Bounced`` when a DSN goes (or would, but
is suppressed).  The log lines admins know come from its log subscriber.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Callable, Optional

from twisted.internet import defer, task
from twisted.python.failure import Failure

from gateway.delivery import DEFERRED, Outcome
from gateway.events import Bounced, Deferred, DeliveryAttempted, RecipientOutcome, default_sink
from gateway.spool import FAILED, PENDING, SENT, QueueEntry, RecipientState, Spool, new_queue_id

log = logging.getLogger("mailgate.queue")

# messages being tried or waiting for a slot at once (Postfix's
# qmgr_message_active_limit): bounds the memory of a huge queue due at once
MAX_ACTIVE_MESSAGES = 10_000
# an idle destination's failure history is dropped this long after its dead time ended
FORGET_DEAD_AFTER = 3600.0
STOPPING = object()  # what a group waiting for a slot gets when the queue stops


@dataclass
class _Destination:
    active: int = 0
    waiting: collections.deque = field(default_factory=collections.deque)
    failures: int = 0  # failed connections in a row
    last_error: str = ""
    dead_until: float = 0.0


class Destinations:
    """Delivery slots per next hop, and which next hops are dead.

    ``admit(name)`` fires with None once a slot is the caller's (it must
    ``release`` it), with the reason when the destination is dead (no slot
    taken), or with ``STOPPING``.  Waiting groups are served round robin over
    destinations, so one with thousands of messages does not make another
    wait behind them.
    """

    def __init__(self, clock, settings):
        self.clock = clock
        self._dests: dict[str, _Destination] = {}
        self._turns: collections.OrderedDict[str, None] = collections.OrderedDict()  # names with waiters
        self._active = 0
        self._pumping = False
        self._again = False
        self.configure(settings)

    def configure(self, settings) -> None:
        self.total = settings.delivery_concurrency
        self.per_destination = settings.destination_concurrency
        self.dead_after = settings.destination_dead_after
        self.dead_time = settings.destination_dead_time
        self._pump()  # higher limits take effect for those already waiting

    # --- the two calls of a delivery ------------------------------------------

    def admit(self, name: str) -> defer.Deferred:
        dest = self._dests.setdefault(name, _Destination())
        why = self.dead_reason(name)
        if why is not None:
            return defer.succeed(why)
        waiter: defer.Deferred = defer.Deferred()
        dest.waiting.append(waiter)
        self._turns[name] = None
        self._pump()
        return waiter

    def release(self, name: str, failure: Optional[str] = None, judged: bool = True) -> None:
        """The slot is free again.  ``failure``: why the next hop could not be
        reached (a failed connection); None with ``judged``: it answered.
        ``judged=False``: the attempt says nothing about the next hop."""
        dest = self._dests[name]
        dest.active -= 1
        self._active -= 1
        if judged and failure is None:
            dest.failures, dest.dead_until = 0, 0.0
        elif failure is not None:
            dest.failures += 1
            dest.last_error = failure
            if dest.failures >= self.dead_after:
                self._mark_dead(name, dest)
        self._pump()

    # --- dead next hops ------------------------------------------------------

    def dead_reason(self, name: str) -> Optional[str]:
        dest = self._dests.get(name)
        if dest is None or dest.dead_until <= self.clock.seconds():
            return None
        return (f"4.4.1 delivery to {name} suspended for {dest.dead_until - self.clock.seconds():.0f}s: "
                f"{dest.failures} failed connections in a row, last: {dest.last_error}")

    def _mark_dead(self, name: str, dest: _Destination) -> None:
        was_dead = dest.dead_until > self.clock.seconds()
        dest.dead_until = self.clock.seconds() + self.dead_time
        if not was_dead:
            log.warning('next_hop=%s status=dead for=%ds failures=%d last_error="%s"', name, self.dead_time,
                        dest.failures, dest.last_error.replace('"', "'"))
        why = self.dead_reason(name)
        waiting, dest.waiting = dest.waiting, collections.deque()
        self._turns.pop(name, None)
        for waiter in waiting:  # they wait for nothing now: deferred at once
            waiter.callback(why)

    def _limit(self, dest: _Destination) -> int:
        # past its dead time, a next hop that failed gets one probe at a time
        # until one gets through, not a burst of connections
        return 1 if dest.failures >= self.dead_after else self.per_destination

    # --- handing out slots -------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:  # a granted waiter released or asked again: go round once more
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                for name in list(self._turns):
                    if self._active >= self.total:
                        return
                    dest = self._dests[name]
                    if not dest.waiting:
                        self._turns.pop(name, None)
                        continue
                    if dest.active >= self._limit(dest):
                        continue
                    dest.active += 1
                    self._active += 1
                    waiter = dest.waiting.popleft()
                    self._turns.move_to_end(name)  # round robin: the others first next time
                    if not dest.waiting:
                        self._turns.pop(name, None)
                    self._again = True
                    waiter.callback(None)
        finally:
            self._pumping = False

    def stop(self) -> None:
        """Answer every waiting group with STOPPING: nothing new starts."""
        for name in list(self._turns):
            dest = self._dests[name]
            waiting, dest.waiting = dest.waiting, collections.deque()
            for waiter in waiting:
                waiter.callback(STOPPING)
        self._turns.clear()

    def forget_idle(self) -> None:
        """Drop what is kept about destinations nobody uses (MX domains come and go)."""
        now = self.clock.seconds()
        for name, dest in list(self._dests.items()):
            if not dest.active and not dest.waiting and dest.dead_until + FORGET_DEAD_AFTER < now:
                del self._dests[name]

    def active(self, name: str) -> int:
        dest = self._dests.get(name)
        return dest.active if dest else 0


def connection_failure(outcomes) -> Optional[str]:
    """Why a destination could not be reached, when every outcome says so:
    deferred and not a server's reply (refused, timed out, lost, no address)."""
    if outcomes and all(o.status == DEFERRED and not getattr(o, "remote", False) for o in outcomes):
        return outcomes[0].reply
    return None


class _MessageData:
    """A message's bytes, read from the spool once and only when a group needs them."""

    def __init__(self, read: Callable[[], defer.Deferred], data: Optional[bytes]):
        self._read = read
        self._data = data
        self._waiting: list[defer.Deferred] = []

    def get(self) -> defer.Deferred:
        if self._data is not None:
            return defer.succeed(self._data)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:  # the first asks the disk; the others wait for that
            self._read().addCallbacks(self._answer, self._answer)
        return d

    def _answer(self, result) -> None:
        if not isinstance(result, Failure):
            self._data = result
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(result) if isinstance(result, Failure) else d.callback(result)


class QueueManager:
    def __init__(self, spool: Spool, deliverer, reactor, run_in_thread: Callable, settings, hostname: str,
                 bounce_builder=None, clean_tmp: bool = True, events=None):
        self.spool = spool
        self.events = events if events is not None else default_sink()
        self.deliverer = deliverer
        self.reactor = reactor
        self.run_in_thread = run_in_thread
        self.destinations = Destinations(reactor, settings)
        self._sweeper: Optional[task.LoopingCall] = None
        self.settings = settings
        self.hostname = hostname
        if bounce_builder is None:
            from gateway import dsn

            bounce_builder = dsn
        self.dsn = bounce_builder
        self.active = defer.DeferredSemaphore(MAX_ACTIVE_MESSAGES)
        self.timers: dict[str, Any] = {}
        self.in_flight: dict[str, defer.Deferred] = {}
        self.fresh: dict[str, bytes] = {}  # bytes of just-queued messages: no re-read
        self.stopping = False
        self.clean_tmp = clean_tmp  # False when another process writes the spool

    @property
    def settings(self):
        return self._settings

    @settings.setter
    def settings(self, settings) -> None:
        """A reload: new limits apply to the waiting at once, a new sweep interval at the next sweep."""
        self._settings = settings
        self.destinations.configure(settings)
        if self._sweeper is not None and self._sweeper.running and self._sweeper.interval != settings.sweep_interval:
            self._sweeper.stop()
            self._start_sweeping()

    def reconfigure(self, config, resolver) -> None:
        """A reload of the whole config: limits, hostname, and the deliverer's routes, servers and deadlines."""
        self.settings = config.queue
        self.hostname = config.server.hostname
        self.deliverer.configure(config, resolver)

    # --- entry points --------------------------------------------------------

    def enqueue(self, entry: QueueEntry, data: bytes) -> defer.Deferred:
        """Fires once the message is durable; delivery starts right after."""
        d = self.run_in_thread(self.spool.store, entry, data)

        def stored(_):
            self.fresh[entry.queue_id] = data
            self.schedule(entry.queue_id, 0)
            return entry.queue_id

        return d.addCallback(stored)

    def quarantine(self, entry: QueueEntry, data: bytes, verdict) -> defer.Deferred:
        return self.run_in_thread(self.spool.quarantine_store, entry.queue_id, data,
                                  quarantine_record(entry, verdict, len(data)))

    def start(self) -> defer.Deferred:
        """Resume everything in the spool, then sweep it now and then."""
        d = self.run_in_thread(self.spool.recover, self.clean_tmp)

        def resume(entries):
            now = self.reactor.seconds()
            for e in entries:
                if not e.held:
                    self.schedule(e.queue_id, max(0.0, e.next_try - now))
            log.info("queue resumed=%d", len(entries))
            self._start_sweeping()
            return len(entries)

        return d.addCallback(resume)

    def flush(self) -> defer.Deferred:
        """Try everything now (SIGUSR1 / `mailgate queue flush`)."""
        d = self.run_in_thread(lambda: [e for e in self.spool.entries() if not e.held])
        return d.addCallback(lambda es: [self.schedule(e.queue_id, 0) for e in es])

    def schedule(self, queue_id: str, delay: float) -> None:
        if self.stopping:
            return
        old = self.timers.pop(queue_id, None)
        if old is not None and old.active():
            old.cancel()
        self.timers[queue_id] = self.reactor.callLater(delay, self._due, queue_id)

    def stop(self) -> defer.Deferred:
        """Stop scheduling; wait for attempts under way (they keep the spool right)."""
        self.stopping = True
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for t in self.timers.values():
            if t.active():
                t.cancel()
        self.timers.clear()
        self.destinations.stop()  # groups still waiting for a slot give up, untouched
        return defer.DeferredList(list(self.in_flight.values()), consumeErrors=True)

    # --- the sweep: nothing on disk is forgotten --------------------------------

    def _start_sweeping(self) -> None:
        if self.stopping:
            return
        self._sweeper = task.LoopingCall(self.sweep)
        self._sweeper.clock = self.reactor
        self._sweeper.start(self.settings.sweep_interval, now=False)

    def sweep(self) -> defer.Deferred:
        """Schedule what is in the spool with pending recipients, not held,
        and neither scheduled nor being tried: what a lost wake-up, a failed
        write or a bug would otherwise leave there until a restart.
        Never fails (the LoopingCall would stop)."""
        self.destinations.forget_idle()
        d = self.run_in_thread(lambda: [(e.queue_id, e.next_try) for e in self.spool.entries()
                                        if e.pending and not e.held])
        d.addCallback(self._schedule_forgotten)
        d.addErrback(lambda f: log.error("queue sweep failed: %s", f.getErrorMessage()))
        return d

    def _schedule_forgotten(self, found: list[tuple[str, float]]) -> int:
        now = self.reactor.seconds()
        forgotten = [(qid, next_try) for qid, next_try in found
                     if qid not in self.in_flight and not (qid in self.timers and self.timers[qid].active())]
        for qid, next_try in forgotten:
            self.schedule(qid, max(0.0, next_try - now))
        if forgotten:
            log.warning("queue sweep rescheduled=%d messages nothing was going to try (first %s)",
                        len(forgotten), forgotten[0][0])
        return len(forgotten)

    # --- one attempt -----------------------------------------------------------

    def _due(self, queue_id: str) -> None:
        self.timers.pop(queue_id, None)
        if queue_id in self.in_flight or self.stopping:
            return
        d = self.active.run(self._attempt, queue_id)
        self.in_flight[queue_id] = d
        d.addErrback(self._attempt_failed, queue_id)
        d.addBoth(self._finished, queue_id)

    def _attempt_failed(self, f: Failure, queue_id: str) -> None:
        # a bug or a broken disk: the message stays queued, so try it again
        # rather than leave it until a restart
        log.error("queue_id=%s attempt_error=%r retry_in=%ds", queue_id, f.getErrorMessage(),
                  int(self.settings.retry_min), exc_info=(f.type, f.value, f.getTracebackObject()))
        self.schedule(queue_id, self.settings.retry_min)

    def _finished(self, _, queue_id: str) -> None:
        self.in_flight.pop(queue_id, None)

    @defer.inlineCallbacks
    def _attempt(self, queue_id: str):
        data = _MessageData(lambda: self.run_in_thread(self.spool.read, queue_id), self.fresh.pop(queue_id, None))
        entry = yield self.run_in_thread(self.spool.entry, queue_id)
        if entry is None or entry.held or not entry.pending:
            return  # deleted, held or finished meanwhile
        groups: dict[str, list[str]] = {}
        for r in entry.pending:
            groups.setdefault(self.deliverer.destination(r.address), []).append(r.address)
        # every group ends before the attempt does: a retry must never overlap a group still sending
        results = yield defer.DeferredList(
            [self._deliver_group(entry, name, rcpts, data) for name, rcpts in groups.items()], consumeErrors=True)
        outcomes = [o for ok, group in results if ok and group is not None for o in group]
        errors = [f for ok, f in results if not ok]
        if not outcomes:
            if errors:
                errors[0].raiseException()  # nothing tried: _attempt_failed schedules a retry
            return  # stopping before anything was tried: the spool stays as it was
        for f in errors:  # those recipients stay pending, untouched, and are tried with the rest
            log.error("queue_id=%s group_error=%r", queue_id, f.getErrorMessage(),
                      exc_info=(f.type, f.value, f.getTracebackObject()))
        yield self._record(entry, outcomes, data)

    @defer.inlineCallbacks
    def _deliver_group(self, entry: QueueEntry, name: str, rcpts: list[str], data: _MessageData):
        """One destination's recipients: their outcomes, or None when the queue stopped first."""
        why = yield self.destinations.admit(name)
        if why is STOPPING:
            return None
        if why is not None:  # a dead next hop: deferred without a slot or a connection
            outcomes = [Outcome(r, DEFERRED, 451, why) for r in rcpts]
            self._attempted(entry, name, outcomes)
            return outcomes
        judged = False
        failure = None
        try:
            body = yield data.get()
            outcomes = yield self.deliverer.deliver(entry.queue_id, entry.sender, rcpts, body,
                                                    arrival=entry.arrival, smtputf8=entry.smtputf8)
            judged, failure = True, connection_failure(outcomes)
        finally:
            self.destinations.release(name, failure, judged)
        self._attempted(entry, name, outcomes)
        return outcomes

    def _attempted(self, entry: QueueEntry, route: str, outcomes: list) -> None:
        """One DeliveryAttempted per host that answered (and TLS or not) in this group's attempt."""
        now = self.reactor.seconds()
        by_hop: dict[tuple[str, bool], list] = {}
        for o in outcomes:
            by_hop.setdefault((o.relay or "none", o.tls), []).append(
                RecipientOutcome(o.recipient, o.status, o.code, o.reply))
        for (hop, tls), rcpts in by_hop.items():
            self.events.emit(DeliveryAttempted(entry.queue_id, now, hop, tuple(rcpts), tls,
                                               max(0.0, now - entry.arrival), route))

    @defer.inlineCallbacks
    def _record(self, entry: QueueEntry, outcomes: list, data: _MessageData):
        """Write what an attempt did; if that fails the message is tried again, never left."""
        queue_id = entry.queue_id
        now = self.reactor.seconds()
        by_rcpt = {o.recipient: o for o in outcomes}
        bounced: list = []
        for r in entry.recipients:
            o = by_rcpt.get(r.address)
            if r.status != PENDING or o is None:
                continue
            r.code, r.reply = o.code, o.reply
            if o.status == "sent":
                r.status = SENT
            elif o.status == "failed":
                r.status = FAILED
                bounced.append(o)
        entry.attempts += 1
        still = entry.pending
        if still and now - entry.arrival >= self.settings.lifetime:
            for r in still:
                r.status = FAILED
                r.reply = f"delivery time expired after {entry.attempts} attempts; last error: {r.reply}"
                bounced.append(_Expired(r.address, r.code or 451, r.reply))
            still = []
        backoff = min(self.settings.retry_max, self.settings.retry_min * (2 ** (entry.attempts - 1)))
        try:
            if bounced:
                original = yield data.get()
                yield self._bounce(entry, bounced, original)
            if still:
                entry.next_try = now + backoff
                entry.last_error = still[0].reply
                kept = yield self.run_in_thread(self._save, entry, True)
            else:
                kept = yield self.run_in_thread(self._save, entry, False)
        except OSError as e:
            # ENOSPC, EIO...: what is on disk is the state before this attempt,
            # so trying again repeats it (recipients sent now may get a
            # duplicate, which SMTP allows; a stranded message is a loss)
            log.error("queue_id=%s cannot record the attempt: %s; retry_in=%ds", queue_id, e, int(backoff))
            self.schedule(queue_id, backoff)
            return
        if still and kept:
            self.events.emit(Deferred(queue_id, now, tuple(r.address for r in still), now + backoff,
                                      entry.attempts, entry.last_error))
            self.schedule(queue_id, backoff)
        elif not still:
            log.debug("queue_id=%s removed sent=%d bounced=%d", queue_id,
                      sum(r.status == SENT for r in entry.recipients), len(bounced))

    def _save(self, entry: QueueEntry, keep: bool) -> bool:
        """Write an attempt's outcome, keeping what `mailgate queue` changed
        while it ran: a hold stays, a deleted message stays deleted.  True
        when the message is still queued."""
        with self.spool.locked(entry.queue_id) as current:
            if current is None:
                log.info("queue_id=%s deleted during the attempt", entry.queue_id)
                return False
            if not keep:
                self.spool.remove(entry.queue_id)
                return False
            entry.held = current.held
            self.spool.update(entry)
            return not entry.held

    def _bounce(self, entry: QueueEntry, failed: list, original: bytes) -> defer.Deferred:
        rcpts = tuple(o.recipient for o in failed)
        reason = failed[0].reply if failed else ""
        if entry.bounce_of or not self.dsn.should_bounce(entry.sender):
            self.events.emit(Bounced(entry.queue_id, self.reactor.seconds(), rcpts, reason, "", entry.sender))
            return defer.succeed(None)
        body = self.dsn.make_bounce(entry.queue_id, entry.sender, failed, self.hostname, original,
                                    formatdate(entry.arrival))
        bounce = QueueEntry(
            queue_id=new_queue_id(), sender="", recipients=[RecipientState(entry.sender)],
            arrival=self.reactor.seconds(), client="127.0.0.1", helo=self.hostname, size=len(body),
            bounce_of=entry.queue_id,
        )
        d = self.enqueue(bounce, body)
        # told once the DSN is durable: a bounce that failed to spool is retried, not announced
        d.addCallback(lambda _: self.events.emit(Bounced(entry.queue_id, self.reactor.seconds(), rcpts, reason,
                                                         bounce.queue_id, entry.sender)))
        return d


def quarantine_record(entry: QueueEntry, verdict, size: int) -> dict:
    """What `mailgate quarantine list/show` tells about a quarantined message."""
    return {
        "queue_id": entry.queue_id, "sender": entry.sender,
        "recipients": [r.address for r in entry.recipients], "arrival": entry.arrival,
        "client": entry.client, "helo": entry.helo, "size": size,
        "score": verdict.score, "symbols": verdict.symbols,
        "reasons": [f"{r.symbol}: {r.detail}" for r in verdict.results if r.refuse],
    }


class _Expired:
    """An outcome for a recipient whose lifetime ran out (shaped like delivery.Outcome)."""

    status = "failed"

    def __init__(self, recipient: str, code: int, reply: str):
        self.recipient, self.code, self.reply = recipient, code, reply
