"""The transaction runner: judges each stage and commits accepted messages.

The protocol (``gateway/smtp.py``) hands it records and gets typed outcomes
back: a refusal ``Reply`` or ``None`` for MAIL and RCPT, a ``Verdict`` for
DATA, and from ``commit`` the reply that the message earned.  It never
writes to the wire; what happened is told as events (``gateway/events.py``).

``commit`` spools only for a client that is still connected: a client that
left while a slow check ran will retry, and spooling its copy too would
deliver the message twice (Postfix's smtpd likewise never commits for a
lost client).

Every refusal names the transaction's queue id (``554 5.7.1 Message refused
as spam (queue id 0661C5...)``), the id of our log line, the Received header
and the tracking store, so a sender can quote it and the admin find it.
"""

from __future__ import annotations

import logging
from typing import Optional
from twisted.internet import defer

from gateway.errors import Reply, TempFail
from gateway.events import ClientGone, MessageAnswered, Quarantined, Spooled, StageJudged, StageRefused
from gateway.headers import received_header
from gateway.records import Action, Message, Result, Session, Stage, Transaction, Verdict
from rules.scoring import QUARANTINE
from gateway.spool import QueueEntry, RecipientState

log = logging.getLogger("mailgate.transaction")

SPOOL_TROUBLE = TempFail(451, "4.3.0", "Error: queue file write error, try again later")


def naming(reply: Reply, queue_id: str) -> Reply:
    """The refusal as decided, with the queue id at the end of its text."""
    if not queue_id or reply.code < 400:
        return reply
    return type(reply)(reply.code, reply.enhanced, f"{reply.text} (queue id {queue_id})")


class TransactionRunner:
    """One per session, over the runtime snapshot the session started with.

    ``queue`` has ``enqueue(entry, data)`` and ``quarantine(entry, data,
    verdict)``, each a Deferred that fires once the message is durable.
    """

    def __init__(self, runtime, clock, queue, events):
        self.runtime = runtime
        self.clock = clock
        self.queue = queue
        self.events = events

    # --- stages before DATA ------------------------------------------------------

    def run_stage(self, stage: Stage, txn: Transaction) -> defer.Deferred:
        """The records of one stage's checks (bounded by the stage's deadline);
        what they found and what each cost is told as ``StageJudged``."""
        pipeline = self.runtime.pipeline
        if not pipeline.has_checks(stage):
            return defer.succeed([])

        def judged(run):
            self.events.emit(StageJudged(txn.session, txn.envelope, stage.value, tuple(run.records), run.timings,
                                         self.clock.seconds(), txn.rcpt.address if txn.rcpt else "",
                                         run.seconds))
            return run.records

        return pipeline.run_timed(stage, txn).addCallback(judged)

    def judge_mail(self, txn: Transaction) -> defer.Deferred:
        """Fires with a refusal Reply, or None when MAIL FROM is accepted."""
        def judged(records):
            txn.envelope.results.extend(records)
            reply = self.runtime.scorer.decide_stage(records)
            if reply is not None:
                reply = naming(reply, txn.envelope.queue_id)
                self.refused(txn.session, txn.envelope, reply, "mail")
            return reply

        return self.run_stage(Stage.MAIL, txn).addCallback(judged)

    def judge_rcpt(self, txn: Transaction) -> defer.Deferred:
        """Fires with a refusal Reply naming the recipient, or None."""
        rcpt = txn.rcpt

        def judged(records):
            rcpt.results.extend(records)
            session = txn.session
            reply = self.runtime.scorer.decide_stage(session.connection_results + records)
            if reply is None:
                return None
            reply = naming(type(reply)(reply.code, reply.enhanced, f"<{rcpt.address}>: {reply.text}"),
                           txn.envelope.queue_id)
            self.refused(session, txn.envelope, reply, "rcpt", rcpt.address)
            return reply

        return self.run_stage(Stage.RCPT, txn).addCallback(judged)

    def refused(self, session: Session, envelope, reply: Reply, stage: str, rcpt: str = "") -> None:
        self.events.emit(StageRefused(session, envelope, stage, reply, rcpt, self.clock.seconds()))

    def refuse(self, session: Session, envelope, reply: Reply, stage: str, rcpt: str = "") -> Reply:
        """A refusal the protocol itself made (relay denied, too big): named
        by the queue id like the decider's, told, and returned for the wire."""
        reply = naming(reply, envelope.queue_id if envelope is not None else "")
        self.refused(session, envelope, reply, stage, rcpt)
        return reply

    # --- DATA ----------------------------------------------------------------------

    def message(self, txn: Transaction, content: bytes, rdns: Optional[str]) -> Message:
        """The received bytes with our Received header (naming the client's
        verified reverse DNS name, when a connect check found one): what the
        DATA checks see."""
        session, envelope = txn.session, txn.envelope
        envelope.size = len(content)
        rcpt = envelope.recipients[0].address if len(envelope.recipients) == 1 else None
        # RFC 3848 (ESMTP, ESMTPS, ESMTPA, ESMTPSA) and RFC 6531 3.7.3 (UTF8SMTP, UTF8SMTPS, ...)
        proto = ("UTF8SMTP" if envelope.smtputf8 else "ESMTP" if session.esmtp else "SMTP") + \
            ("S" if session.tls else "") + ("A" if session.auth_user else "")
        received = received_header(session.helo, rdns, session.peer_ip,
                                   self.runtime.config.server.hostname, envelope.queue_id, proto, rcpt,
                                   now=self.clock.seconds())
        txn.message = Message(received + content, self.runtime.config.server.max_mime_depth)
        return txn.message

    def judge(self, txn: Transaction) -> defer.Deferred:
        """Runs the DATA stage and fires with the Verdict on everything the transaction earned.

        (The pipeline makes the message's parsed view in the thread pool,
        before the content checks that read it.)
        """
        def decide(data_records):
            verdict = self.runtime.scorer.decide(self._all_records(txn, data_records))
            self._after_verdict(txn, verdict)
            return verdict

        return self.run_stage(Stage.DATA, txn).addCallback(decide)

    @staticmethod
    def _all_records(txn: Transaction, data_records: list) -> list:
        session, envelope = txn.session, txn.envelope
        seen, rcpt_records = set(), []
        for r in envelope.recipients:
            for rec in r.results:
                key = getattr(rec, "symbol", None) or id(rec)
                if key not in seen:
                    seen.add(key)
                    rcpt_records.append(rec)
        return session.connection_results + list(envelope.results) + rcpt_records + list(data_records)

    def _after_verdict(self, txn: Transaction, verdict: Verdict) -> None:
        """Checks that learn from the final verdict (Bayes autolearn) see it here;
        what they do never changes this message's reply."""
        for check in self.runtime.pipeline.by_stage[Stage.DATA]:
            hook = getattr(check, "after_verdict", None)
            if hook is None:
                continue
            try:
                d = hook(txn, verdict)
            except Exception:
                log.exception("queue_id=%s check=%s after_verdict failed", txn.queue_id, check.name)
                continue
            if isinstance(d, defer.Deferred):
                d.addErrback(lambda f, name=check.name: log.error(
                    "queue_id=%s check=%s after_verdict failed: %s", txn.queue_id, name, f.getErrorMessage()))

    def commit(self, txn: Transaction, verdict: Verdict) -> defer.Deferred:
        """Fires with the reply the message earned, or None for a client that left.

        A refusal is answered as decided; anything else is finished (headers,
        subject tag), then spooled or quarantined, and 250 only once durable.
        """
        session, envelope = txn.session, txn.envelope
        if session.closed:
            self.events.emit(ClientGone(session, envelope, verdict, txn.message, self.clock.seconds()))
            return defer.succeed(None)
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            return defer.succeed(self._answered(txn, verdict, naming(verdict.reply, envelope.queue_id)))
        extra = [r.header for r in verdict.results if isinstance(r, Result) and r.header]
        finished = self.runtime.finisher.finish(txn.message.raw, verdict, extra,
                                                tag_subject=not session.may_relay)
        entry = self._queue_entry(txn, verdict, len(finished))
        if verdict.action == Action.QUARANTINE:
            d = self.queue.quarantine(entry, finished, verdict)
        else:
            d = self.queue.enqueue(entry, finished)
        return d.addCallbacks(self._durable, self._spool_failed, callbackArgs=(txn, verdict, len(finished)),
                              errbackArgs=(txn, verdict))

    def _durable(self, _, txn: Transaction, verdict: Verdict, size: int) -> Reply:
        queue_id, now = txn.envelope.queue_id, self.clock.seconds()
        if verdict.action == Action.QUARANTINE:
            self.events.emit(Quarantined(queue_id, now, quarantine_reason(verdict)))
        else:
            self.events.emit(Spooled(queue_id, now, size))
        return self._answered(txn, verdict, Reply(250, "2.0.0", f"Ok: queued as {queue_id}"))

    def _queue_entry(self, txn: Transaction, verdict: Verdict, size: int) -> QueueEntry:
        session, envelope = txn.session, txn.envelope
        return QueueEntry(
            queue_id=envelope.queue_id, sender=envelope.sender,
            recipients=[RecipientState(r.address) for r in envelope.recipients],
            arrival=self.clock.seconds(), client=session.peer_ip, helo=session.helo or "", size=size,
            verdict={"score": verdict.score, "action": verdict.action.value, "symbols": verdict.symbols},
            smtputf8=envelope.smtputf8,
        )

    def _spool_failed(self, failure, txn: Transaction, verdict: Verdict) -> Reply:
        log.error("queue_id=%s spool_error=%r", txn.queue_id, failure.getErrorMessage())
        return self._answered(txn, verdict, naming(SPOOL_TROUBLE, txn.envelope.queue_id))

    def _answered(self, txn: Transaction, verdict: Verdict, reply: Reply) -> Reply:
        self.events.emit(MessageAnswered(txn.session, txn.envelope, verdict, reply, txn.message,
                                         self.clock.seconds()))
        return reply


def quarantine_reason(verdict: Verdict) -> str:
    """Why a message went to quarantine: the symbol that asked for it (a
    virus with ``on_infected = "quarantine"``, say), else its score."""
    asked = [r.symbol for r in verdict.results if r.refuse == QUARANTINE]
    return asked[0] if asked else "score"

