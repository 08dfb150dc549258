"""Facts as typed events, each with one writer.

The protocol says when a connection opens and closes; the transaction
runner what each stage judged, what a message was answered, and that it was
spooled or quarantined; the queue manager each delivery attempt, deferral
and bounce; the service layer (web console, CLI) each admin action.
Subscribers turn them into the ``key=value`` log line (``LogLine``, here),
the metrics and the tracking store (the monitor).  Writers never format log
lines themselves, and nothing but a subscriber writes those three.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from gateway.errors import Reply
from gateway.records import Envelope, Message, Session, Verdict

msglog = logging.getLogger("mailgate.message")
deliverylog = logging.getLogger("mailgate.delivery")  # one line per recipient per attempt, as before
smtplog = logging.getLogger("mailgate.smtp")  # how a connection ended, when it was not a plain QUIT
queuelog = logging.getLogger("mailgate.queue")
adminlog = logging.getLogger("mailgate.admin")

SUBJECT_MAX = 200  # characters of the Subject in the log line
_CONTROLS = {c: " " for c in (*range(32), 127)}  # CR, LF, TAB, ESC... -> space (str.translate: one C loop)


@dataclass(frozen=True)
class StageRefused:
    """A MAIL or RCPT (or DATA-size) refusal before any verdict."""

    session: Session
    envelope: Optional[Envelope]
    stage: str
    reply: Reply
    rcpt: str = ""
    ts: float = 0.0


@dataclass(frozen=True)
class MessageAnswered:
    """The end of DATA: the verdict (every symbol with its points and its
    declared description: ``verdict.results``), the action and the reply
    the client was given.  ``message`` gives the Message-ID and Subject
    (``message.message_id``, ``message.subject``) without parsing again."""

    session: Session
    envelope: Envelope
    verdict: Verdict
    reply: Reply
    message: Optional[Message] = None
    ts: float = 0.0


@dataclass(frozen=True)
class ClientGone:
    """The client left before its message was committed: nothing was queued."""

    session: Session
    envelope: Envelope
    verdict: Verdict
    message: Optional[Message] = None
    ts: float = 0.0


@dataclass(frozen=True)
class ConnectionOpened:
    """A client connected (after the connection limits let it in)."""

    session: Session
    ts: float


@dataclass(frozen=True)
class ConnectionClosed:
    """A connection ended: who it was (HELO, TLS, AUTH user) and why it ended."""

    session: Session
    ts: float
    # "quit", "lost", "lost during DATA", "timeout: command", "timeout: DATA",
    # "timeout: session", "too many errors", "too many auth failures",
    # "auth blocked", "early talker", "non-SMTP command ...", "shutdown"
    reason: str = ""
    auth_failures: int = 0


@dataclass(frozen=True)
class CheckTiming:
    check: str
    seconds: float


@dataclass(frozen=True)
class StageJudged:
    """One stage's checks ran: the records they returned and what each cost."""

    session: Session
    envelope: Optional[Envelope]
    stage: str
    records: tuple
    timings: tuple  # of CheckTiming, one per check of the stage, in check order
    ts: float
    rcpt: str = ""  # the recipient judged, at the RCPT stage
    seconds: float = 0.0  # the whole stage, start to last answer (or its deadline)


# --- what happened to a message after it was committed (plain data: the
# --- delivery process emits these too, and the tracking store keeps them) ---

@dataclass(frozen=True)
class Spooled:
    queue_id: str
    ts: float
    size: int = 0


@dataclass(frozen=True)
class Quarantined:
    queue_id: str
    ts: float
    reason: str  # "score", "virus", "banned", a symbol...
    expires: float = 0.0


@dataclass(frozen=True)
class RecipientOutcome:
    recipient: str
    status: str  # "sent", "deferred", "bounced"
    code: int
    reply: str


@dataclass(frozen=True)
class DeliveryAttempted:
    """One attempt to one next hop for some of a message's recipients."""

    queue_id: str
    ts: float
    next_hop: str  # the route or MX host:port tried ("none" when nothing was tried)
    outcomes: tuple  # of RecipientOutcome
    tls: bool = False
    delay: float = 0.0  # seconds since arrival
    route: str = ""


@dataclass(frozen=True)
class Deferred:
    queue_id: str
    ts: float
    recipients: tuple
    next_try: float
    attempts: int
    reason: str


@dataclass(frozen=True)
class Bounced:
    queue_id: str
    ts: float
    recipients: tuple
    reason: str
    bounce_id: str = ""  # the DSN's own queue id; "" when suppressed
    sender: str = ""  # whom the DSN goes to (the original envelope sender)


@dataclass(frozen=True)
class Released:
    """A quarantined message was put back on the queue."""

    queue_id: str
    ts: float
    by: str  # "web:alice", "cli:root", "digest:bob@example.com"
    learned_ham: bool = False


@dataclass(frozen=True)
class Deleted:
    queue_id: str
    ts: float
    by: str
    where: str  # "quarantine" or "queue"


@dataclass(frozen=True)
class Learned:
    queue_id: str
    ts: float
    by: str
    label: str  # "spam" or "ham"


@dataclass(frozen=True)
class AdminAction:
    """Any action of an admin (web or CLI), with who did it; the audit trail."""

    ts: float
    actor: str  # "web:alice", "cli:root"
    action: str  # "release", "delete", "hold", "flush", "login", "login_failed", ...
    target: str = ""  # queue id, user name...
    detail: str = ""
    source_ip: str = ""


class EventSink:
    """Fans each event out to its subscribers; a failing subscriber is logged, never raised."""

    def __init__(self, subscribers: Optional[list[Callable]] = None):
        self.subscribers = list(subscribers or [])

    def emit(self, event) -> None:
        for subscriber in self.subscribers:
            try:
                subscriber(event)
            except Exception:
                logging.getLogger("mailgate.events").exception("subscriber %r failed on %s",
                                                               subscriber, type(event).__name__)


def quote(text: str, limit: int = SUBJECT_MAX) -> str:
    """A header value as one safe ``key="..."`` value: control characters
    (CR, LF, tabs, ESC...) become spaces, runs of white space one space,
    backslash and double quote are escaped, at most ``limit`` characters."""
    text = " ".join(text[:limit * 4].translate(_CONTROLS).split())  # a huge header costs no more than a long one
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text.replace("\\", "\\\\").replace('"', '\\"')


class LogLine:
    """The log subscriber: the one ``key=value`` line per message (and per
    refusal), per recipient per delivery attempt, per deferral and bounce,
    per admin action, and a line for a connection that ended badly.  The
    texts are those the gateway always wrote, so admins' greps keep working.

    ``subject``: add the message's Subject (``[log] subject``; off where a
    subject is personal data the log must not keep).
    """

    def __init__(self, subject: bool = True):
        self.subject = subject

    def __call__(self, event) -> None:
        handler = self._HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    # --- the receiving side ----------------------------------------------------

    def _refused(self, event: StageRefused) -> None:
        s, env = event.session, event.envelope
        msglog.info(
            "queue_id=%s client=%s helo=%s from=<%s>%s stage=%s action=refused reply=\"%s\"",
            env.queue_id if env else s.queue_id, s.peer_ip, s.helo or "-", env.sender if env else "",
            f" to=<{event.rcpt}>" if event.rcpt else "", event.stage, event.reply,
        )

    def _message(self, event) -> None:
        s, env, verdict, message = event.session, event.envelope, event.verdict, event.message
        failures = ",".join(f"{f.check}:{f.reason}" for f in verdict.failures)
        reply = f' reply="{event.reply}"' if isinstance(event, MessageAnswered) else \
            " dropped=client disconnected before the reply; nothing queued"
        about = ""
        if message is not None:
            about = f' message_id="{quote(message.message_id)}"'
            if self.subject:
                about += f' subject="{quote(message.subject)}"'
        msglog.info(
            "queue_id=%s client=%s helo=%s%s from=<%s> to=%s size=%d%s score=%.1f symbols=%s action=%s%s%s",
            env.queue_id, s.peer_ip, s.helo or "-", f" auth={s.auth_user}" if s.auth_user else "", env.sender,
            ",".join(f"<{r.address}>" for r in env.recipients), env.size, about, verdict.score,
            ",".join(verdict.symbols) or "-", verdict.action.value,
            f" failed={failures}" if failures else "", reply,
        )

    def _closed(self, event: ConnectionClosed) -> None:
        s, reason = event.session, event.reason
        if reason in ("quit", "lost", "shutdown"):
            return  # the ordinary end: the message lines said what happened
        if reason.startswith("timeout: "):
            smtplog.info("queue_id=%s client=%s timeout=%s", s.queue_id, s.peer_ip, reason[9:])
        elif reason == "lost during DATA":
            smtplog.info("queue_id=%s client=%s lost connection during DATA; nothing queued", s.queue_id, s.peer_ip)
        elif reason == "early talker":
            smtplog.info("queue_id=%s client=%s early_talker=yes", s.queue_id, s.peer_ip)
        else:
            smtplog.info('queue_id=%s client=%s helo=%s disconnect="%s"', s.queue_id, s.peer_ip, s.helo or "-",
                         quote(reason))

    # --- the delivering side -------------------------------------------------------

    def _attempted(self, event: DeliveryAttempted) -> None:
        tried = event.next_hop and event.next_hop != "none"
        for o in event.outcomes:
            status = "bounced" if o.status == "failed" else o.status
            deliverylog.info('queue_id=%s to=%s relay=%s status=%s code=%s reply="%s" delay=%.2f tls=%s%s',
                             event.queue_id, o.recipient, event.next_hop or "none", status, o.code,
                             o.reply.replace("\\", "\\\\").replace('"', '\\"'), event.delay,
                             "yes" if event.tls else "no",
                             "" if tried or not event.route else f" next_hop={event.route}")

    def _deferred(self, event: Deferred) -> None:
        queuelog.info("queue_id=%s deferred=%d next_try_in=%ds attempts=%d", event.queue_id, len(event.recipients),
                      int(round(event.next_try - event.ts)), event.attempts)

    def _bounced(self, event: Bounced) -> None:
        if event.bounce_id:
            queuelog.info("queue_id=%s bounce_id=%s to=<%s>", event.queue_id, event.bounce_id, event.sender)
        else:
            queuelog.info("queue_id=%s bounce=suppressed sender=<%s>", event.queue_id, event.sender)

    # --- what admins did --------------------------------------------------------

    def _admin(self, event: AdminAction) -> None:
        adminlog.info('actor=%s action=%s target=%s%s%s', event.actor, event.action, event.target or "-",
                      f' detail="{quote(event.detail)}"' if event.detail else "",
                      f" source_ip={event.source_ip}" if event.source_ip else "")

    _HANDLERS = {
        StageRefused: _refused, MessageAnswered: _message, ClientGone: _message, ConnectionClosed: _closed,
        DeliveryAttempted: _attempted, Deferred: _deferred, Bounced: _bounced, AdminAction: _admin,
    }


def default_sink(subject: bool = True) -> EventSink:
    """The log line alone: what runs when nothing else was given (tests, tools).
    The service builds the real sink from the config (``gateway.service.build_sink``)."""
    return EventSink([LogLine(subject)])
