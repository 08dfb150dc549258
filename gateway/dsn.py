"""Delivery status notifications: the bounce sent to a sender (RFC 3464).

``make_bounce`` builds a ``multipart/report; report-type=delivery-status``
message with three parts: a text a person can read, the machine-readable
``message/delivery-status`` (one block per failed recipient), and the
original's header block as ``text/rfc822-headers`` (headers only: the body
may be large, and a bounce should not carry the content back, spam or
virus included).

The bounce must be sent with the null sender (``MAIL FROM:<>``, RFC 5321
4.5.5) so that it can never bounce in turn, and only when ``should_bounce``
says the original sender can take one: never to the null sender or to a
MAILER-DAEMON, which is how bounce loops start.
"""

from __future__ import annotations

import datetime
import email.policy
import email.utils
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from typing import Iterable, Optional, Union

from gateway.delivery import FAILED, Outcome, enhanced_status

BOUNCE_SENDER = ""  # the envelope sender of every bounce: the null sender

_POLICY = email.policy.SMTP.clone(max_line_length=998)
_DAEMONS = {"mailer-daemon", "mailer_daemon", "mail-daemon"}

DateLike = Union[datetime.datetime, float, int, str]


def should_bounce(sender: str) -> bool:
    """False for the null sender and MAILER-DAEMON style senders."""
    address = (sender or "").strip().strip("<>").strip()
    if not address:
        return False
    local = address.rpartition("@")[0] if "@" in address else address
    return local.strip('"').lower() not in _DAEMONS


def _when(value: Optional[DateLike]) -> datetime.datetime:
    if value is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if isinstance(value, str):  # an RFC 5322 date, as email.utils.formatdate writes it
        try:
            value = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            raise ValueError(f"not an RFC 5322 date: {value!r}") from None
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)
    return datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc)


def _header_block(original: bytes) -> str:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = original.find(sep)
        if end >= 0:
            block = original[:end]
            break
    else:
        block = original
    # lines as the wire had them; the generator writes CRLF
    return block.replace(b"\r\n", b"\n").decode("utf-8", "replace") + "\n"


def _fields(*pairs: tuple[str, str]) -> Message:
    block = Message(policy=email.policy.compat32)
    for name, value in pairs:
        block[name] = value
    return block


# Outcomes are read by attribute: anything shaped like delivery.Outcome will do
# (recipient, code, reply; relay and remote when a remote server answered).


def _remote(outcome) -> bool:
    return bool(getattr(outcome, "remote", False))


def _status(outcome) -> str:
    return enhanced_status(outcome.code or 0, outcome.reply or "", getattr(outcome, "status", FAILED))


def _diagnostic(outcome) -> str:
    if _remote(outcome):
        return f"smtp; {outcome.code} {outcome.reply}"
    return f"x-mailgate; {outcome.reply}"


def _human_text(reporting_mta: str, failed: list[Outcome]) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. Its headers are attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
    ]
    for o in failed:
        if _remote(o):
            lines.append(f"<{o.recipient}>: host {o.relay} said: {o.code} {o.reply}")
        else:
            lines.append(f"<{o.recipient}>: {o.reply}")
    return "\n".join(lines) + "\n"


def make_bounce(
    queue_id: str,
    original_sender: str,
    failed: Iterable[Outcome],
    reporting_mta: str,
    original: bytes,
    arrival_date: DateLike,
    now: Optional[DateLike] = None,
) -> bytes:
    """The bounce message (CRLF line ends) telling ``original_sender`` that
    the ``failed`` recipients will not get the message ``original``."""
    failed = list(failed)
    if not failed:
        raise ValueError("a bounce needs at least one failed recipient")
    if not should_bounce(original_sender):
        raise ValueError(f"no bounce is sent to {original_sender or '<>'} (loop prevention)")
    sent_at = _when(now)
    arrived = _when(arrival_date)

    report = MIMEMultipart("report", report_type="delivery-status", policy=_POLICY)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{original_sender}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.format_datetime(sent_at)
    report["Message-ID"] = email.utils.make_msgid(idstring=queue_id, domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report.preamble = "This is a MIME-encapsulated message."

    human = _human_text(reporting_mta, failed)
    report.attach(MIMEText(human, "plain", "us-ascii" if human.isascii() else "utf-8"))

    status = MIMENonMultipart("message", "delivery-status")
    blocks = [
        _fields(
            ("Reporting-MTA", f"dns; {reporting_mta}"),
            ("X-MailGate-Queue-ID", queue_id),
            ("Arrival-Date", email.utils.format_datetime(arrived)),
        )
    ]
    for o in failed:
        pairs = [
            ("Final-Recipient", f"rfc822; {o.recipient}"),
            ("Action", "failed"),
            ("Status", _status(o)),
        ]
        relay = getattr(o, "relay", "")
        if _remote(o) and relay:
            pairs.append(("Remote-MTA", f"dns; {relay.split('[', 1)[0]}"))
        pairs += [("Diagnostic-Code", _diagnostic(o)), ("Last-Attempt-Date", email.utils.format_datetime(sent_at))]
        blocks.append(_fields(*pairs))
    status.set_payload(blocks)
    report.attach(status)

    headers = MIMENonMultipart("text", "rfc822-headers")
    text = _header_block(original)
    if text.isascii():
        headers.set_payload(text)
    else:
        headers.set_payload(text, charset="utf-8")
    report.attach(headers)
    for part in report.get_payload():
        del part["MIME-Version"]  # belongs on the top level only

    return report.as_bytes(policy=_POLICY)
