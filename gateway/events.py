"""Facts as typed events, each with one writer.

The transaction runner says what happened to a transaction (refused at a
stage, judged and answered, dropped because its client left); subscribers
turn that into a log line today and into metrics and the tracking store
later.  Writers never format log lines themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from gateway.errors import Reply
from gateway.records import Envelope, Session, Verdict

msglog = logging.getLogger("mailgate.message")


@dataclass(frozen=True)
class StageRefused:
    """A MAIL or RCPT (or DATA-size) refusal before any verdict."""

    session: Session
    envelope: Optional[Envelope]
    stage: str
    reply: Reply
    rcpt: str = ""


@dataclass(frozen=True)
class MessageAnswered:
    """The end of DATA: the verdict and the reply the client was given."""

    session: Session
    envelope: Envelope
    verdict: Verdict
    reply: Reply


@dataclass(frozen=True)
class ClientGone:
    """The client left before its message was committed: nothing was queued."""

    session: Session
    envelope: Envelope
    verdict: Verdict


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


def log_line(event) -> None:
    """The one ``key=value`` line per message (and per refusal)."""
    s = event.session
    if isinstance(event, StageRefused):
        env = event.envelope
        msglog.info(
            "queue_id=%s client=%s helo=%s from=<%s>%s stage=%s action=refused reply=\"%s\"",
            env.queue_id if env else s.queue_id, s.peer_ip, s.helo or "-", env.sender if env else "",
            f" to=<{event.rcpt}>" if event.rcpt else "", event.stage, event.reply,
        )
    elif isinstance(event, (MessageAnswered, ClientGone)):
        env, verdict = event.envelope, event.verdict
        failures = ",".join(f"{f.check}:{f.reason}" for f in verdict.failures)
        reply = f' reply="{event.reply}"' if isinstance(event, MessageAnswered) else \
            " dropped=client disconnected before the reply; nothing queued"
        msglog.info(
            "queue_id=%s client=%s helo=%s from=<%s> to=%s size=%d score=%.1f symbols=%s action=%s%s%s",
            env.queue_id, s.peer_ip, s.helo or "-", env.sender,
            ",".join(f"<{r.address}>" for r in env.recipients), env.size, verdict.score,
            ",".join(verdict.symbols) or "-", verdict.action.value,
            f" failed={failures}" if failures else "", reply,
        )


def default_sink() -> EventSink:
    return EventSink([log_line])
