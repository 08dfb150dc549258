"""The queue manager: what is spooled gets delivered, retried, or bounced.

The spool on disk is the single source of truth: every attempt re-reads the
envelope, so `mailgate queue hold/delete` from another process takes effect
at the next attempt.  Temporary failures retry with exponential backoff
between ``queue.retry_min`` and ``queue.retry_max`` until ``queue.lifetime``,
then bounce; permanent failures bounce at once (never to the null sender,
never a bounce of a bounce).
"""

from __future__ import annotations

import logging
from email.utils import formatdate
from typing import Any, Callable

from twisted.internet import defer

from gateway.spool import FAILED, PENDING, SENT, QueueEntry, RecipientState, Spool, new_queue_id

log = logging.getLogger("mailgate.queue")


class QueueManager:
    def __init__(self, spool: Spool, deliverer, reactor, run_in_thread: Callable, settings, hostname: str,
                 bounce_builder=None, clean_tmp: bool = True):
        self.spool = spool
        self.deliverer = deliverer
        self.reactor = reactor
        self.run_in_thread = run_in_thread
        self.settings = settings
        self.hostname = hostname
        if bounce_builder is None:
            from gateway import dsn

            bounce_builder = dsn
        self.dsn = bounce_builder
        self.semaphore = defer.DeferredSemaphore(settings.delivery_concurrency)
        self.timers: dict[str, Any] = {}
        self.in_flight: dict[str, defer.Deferred] = {}
        self.fresh: dict[str, bytes] = {}  # bytes of just-queued messages: no re-read
        self.stopping = False
        self.clean_tmp = clean_tmp  # False when another process writes the spool

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
        """Resume everything in the spool."""
        d = self.run_in_thread(self.spool.recover, self.clean_tmp)

        def resume(entries):
            now = self.reactor.seconds()
            for e in entries:
                if not e.held:
                    self.schedule(e.queue_id, max(0.0, e.next_try - now))
            log.info("queue resumed=%d", len(entries))
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
        for t in self.timers.values():
            if t.active():
                t.cancel()
        self.timers.clear()
        return defer.DeferredList(list(self.in_flight.values()), consumeErrors=True)

    # --- one attempt -----------------------------------------------------------

    def _due(self, queue_id: str) -> None:
        self.timers.pop(queue_id, None)
        if queue_id in self.in_flight or self.stopping:
            return
        d = self.semaphore.run(self._attempt, queue_id)
        self.in_flight[queue_id] = d
        d.addErrback(lambda f: log.error("queue_id=%s attempt_error=%r", queue_id, f.getErrorMessage(),
                                         exc_info=(f.type, f.value, f.getTracebackObject())))
        d.addBoth(self._finished, queue_id)

    def _finished(self, _, queue_id: str) -> None:
        self.in_flight.pop(queue_id, None)

    @defer.inlineCallbacks
    def _attempt(self, queue_id: str):
        data = self.fresh.pop(queue_id, None)
        entry = yield self.run_in_thread(self.spool.entry, queue_id)
        if entry is None or entry.held or not entry.pending:
            return  # deleted, held or finished meanwhile
        if data is None:
            data = yield self.run_in_thread(self.spool.read, queue_id)
        pending = [r.address for r in entry.pending]
        outcomes = yield self.deliverer.deliver(queue_id, entry.sender, pending, data, arrival=entry.arrival)
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
        if bounced:
            yield self._bounce(entry, bounced, data)
        if still:
            backoff = min(self.settings.retry_max, self.settings.retry_min * (2 ** (entry.attempts - 1)))
            entry.next_try = now + backoff
            entry.last_error = still[0].reply
            kept = yield self.run_in_thread(self._save, entry, True)
            if kept:
                log.info("queue_id=%s deferred=%d next_try_in=%ds attempts=%d", queue_id, len(still),
                         int(backoff), entry.attempts)
                self.schedule(queue_id, backoff)
        else:
            yield self.run_in_thread(self._save, entry, False)
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
        if entry.bounce_of or not self.dsn.should_bounce(entry.sender):
            log.info("queue_id=%s bounce=suppressed sender=<%s>", entry.queue_id, entry.sender)
            return defer.succeed(None)
        body = self.dsn.make_bounce(entry.queue_id, entry.sender, failed, self.hostname, original,
                                    formatdate(entry.arrival))
        bounce = QueueEntry(
            queue_id=new_queue_id(), sender="", recipients=[RecipientState(entry.sender)],
            arrival=self.reactor.seconds(), client="127.0.0.1", helo=self.hostname, size=len(body),
            bounce_of=entry.queue_id,
        )
        log.info("queue_id=%s bounce_id=%s to=<%s>", entry.queue_id, bounce.queue_id, entry.sender)
        return self.enqueue(bounce, body)


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
