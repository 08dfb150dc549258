"""Quarantine digests: one mail per recipient listing what is held for them,
with one-click "release" and "not spam" links.

A link carries its own authority: ``action.queue_id.recipient.expires``
signed with HMAC-SHA256 under ``[web] digest_key``.  It is valid until the
quarantined item expires, for that one action on that one recipient's copy,
and needs no login.  A link whose signature does not match (tampered, or
signed with another key), that is used for another action than it was made
for, or that has expired is refused with the reason.

The digest goes out through the gateway's own spool, as its DSNs do
(``gateway/queue.py`` ``_bounce``): a ``QueueEntry`` stored with
``Spool.store``, delivered by the queue like any other message.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import html
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Callable, Iterable, Optional

from gateway.spool import QueueEntry, RecipientState, Spool, new_queue_id

ACTIONS = ("release", "notspam")  # notspam = release and learn as ham


class LinkError(ValueError):
    """A digest link refused: ``reason`` is one of tampered, wrong action, expired."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Link:
    action: str
    queue_id: str
    recipient: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, payload: str) -> str:
    return _b64(hmac.new(key.encode("utf-8"), payload.encode("ascii"), hashlib.sha256).digest())


def sign(key: str, action: str, queue_id: str, recipient: str, expires: float) -> str:
    if action not in ACTIONS:
        raise ValueError(f"digest action must be one of {', '.join(ACTIONS)}")
    payload = f"{action}.{queue_id}.{_b64(recipient.encode('utf-8'))}.{int(expires)}"
    return f"{payload}.{_mac(key, payload)}"


def verify(key: str, token: str, action: str, now: float) -> Link:
    """The link ``token`` grants, if it is genuine, for ``action``, and not expired."""
    parts = token.split(".")
    if len(parts) != 5:
        raise LinkError("tampered", "this link is damaged (cut short or changed)")
    payload, mac = ".".join(parts[:4]), parts[4]
    if not hmac.compare_digest(_mac(key, payload).encode(), mac.encode("ascii", "replace")):
        raise LinkError("tampered", "this link is not one we signed (changed, or from another gateway)")
    signed_action, queue_id, rcpt, expires = parts[:4]
    if signed_action != action:
        raise LinkError("wrong action", f"this link is for {signed_action!r}, not {action!r}")
    try:
        recipient = _unb64(rcpt).decode("utf-8")
        until = float(expires)
    except (binascii.Error, UnicodeDecodeError, ValueError):  # signed, so only a bug makes this
        raise LinkError("tampered", "this link is damaged") from None
    if now >= until:
        raise LinkError("expired", "this link has expired: the message has left the quarantine")
    return Link(action, queue_id, recipient, until)


def link_url(base_url: str, key: str, action: str, item: dict, recipient: str) -> str:
    return f"{base_url}/digest/{action}/{sign(key, action, item['queue_id'], recipient, item['expires'])}"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def build_digest(recipient: str, items: list[dict], *, sender: str, hostname: str, base_url: str, key: str,
                 now: float) -> bytes:
    """The digest mail for one recipient: a plain text part and an HTML part
    whose every value is escaped (subjects and senders are the spammer's text)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"Quarantine digest: {len(items)} message(s) held for you"
    msg["Date"] = format_datetime(datetime.datetime.fromtimestamp(now, datetime.timezone.utc))
    msg["Message-ID"] = make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to this
    lines = [f"These messages to {recipient} were held as probable spam. To get one delivered,",
             "open its release link; \"not spam\" also teaches the filter.", ""]
    rows = []
    for it in items:
        release = link_url(base_url, key, "release", it, recipient)
        notspam = link_url(base_url, key, "notspam", it, recipient)
        lines += [f"From:    {it.get('sender') or '<>'}", f"Subject: {it.get('subject') or '(no subject)'}",
                  f"Score:   {float(it.get('score') or 0):.1f}    held until {_when(it['expires'])}",
                  f"Release:  {release}", f"Not spam: {notspam}", ""]
        rows.append("<tr><td>{}</td><td>{}</td><td>{:.1f}</td><td><a href=\"{}\">release</a> · "
                    "<a href=\"{}\">not spam</a></td></tr>".format(
                        html.escape(it.get("sender") or "<>"), html.escape(it.get("subject") or "(no subject)"),
                        float(it.get("score") or 0), html.escape(release), html.escape(notspam)))
    msg.set_content("\r\n".join(lines))
    msg.add_alternative(
        "<!doctype html><html><body><p>These messages to {} were held as probable spam.</p>"
        "<table border=\"1\" cellpadding=\"4\"><tr><th>From</th><th>Subject</th><th>Score</th><th></th></tr>"
        "{}</table></body></html>".format(html.escape(recipient), "".join(rows)), subtype="html")
    return msg.as_bytes()


def pending_by_recipient(items: Iterable[dict], spool: Spool, now: float) -> dict[str, list[dict]]:
    """Store items still held in the spool and not expired, per recipient not yet released to."""
    out: dict[str, list[dict]] = {}
    for it in items:
        if not it.get("expires") or it["expires"] <= now:
            continue
        meta = spool.quarantine_meta(it["queue_id"])
        if meta is None:
            continue  # released or deleted since the store last heard
        released = set(meta.get("released_to") or [])
        for rcpt in meta.get("recipients") or it.get("recipients") or []:
            if rcpt not in released:
                out.setdefault(rcpt, []).append(it)
    return out


def all_items(store, page: int = 500) -> list[dict]:
    items, offset = [], 0
    while True:
        batch = store.quarantine_items(limit=page, offset=offset)
        items.extend(batch)
        if len(batch) < page:
            return items
        offset += page


def send_digests(store, spool: Spool, *, key: str, base_url: str, sender: str, hostname: str,
                 emit: Callable[[object], None], now: Optional[float] = None,
                 wake: Callable[[], None] = lambda: None) -> list[tuple[str, str]]:
    """Queue one digest per recipient with mail held; -> [(recipient, digest queue id)].  Blocks."""
    from gateway.events import AdminAction

    now = time.time() if now is None else now
    sent = []
    for rcpt, items in sorted(pending_by_recipient(all_items(store), spool, now).items()):
        body = build_digest(rcpt, items, sender=sender, hostname=hostname, base_url=base_url, key=key, now=now)
        entry = QueueEntry(queue_id=new_queue_id(now), sender="", recipients=[RecipientState(rcpt)],
                           arrival=now, client="127.0.0.1", helo=hostname, size=len(body),
                           # a digest is ours, like a DSN: a failure to deliver it is never bounced
                           bounce_of="digest")
        spool.store(entry, body)
        sent.append((rcpt, entry.queue_id))
        emit(AdminAction(ts=now, actor="digest", action="digest_sent", target=rcpt,
                         detail=f"{len(items)} item(s), queue id {entry.queue_id}"))
    if sent:
        wake()
    return sent


def next_run(now: float, at: str, interval: float) -> float:
    """The first digest time after ``now``: today's (UTC) ``at`` or the next
    one, stepping by ``interval`` from it."""
    hh, mm = (int(x) for x in at.split(":"))
    day = now - (now % 86400)
    first = day + hh * 3600 + mm * 60
    while first <= now:
        first += interval
    return first
