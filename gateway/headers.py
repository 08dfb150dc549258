"""The finisher: our verdict headers on the message bytes, nothing else changed.

Works on the raw header block rather than re-serialising a parsed message, so
a ham message leaves exactly as it came but for the headers we add.  Headers
that claim to be ours (``X-Spam-*``, an ``Authentication-Results`` naming our
host) are removed first because anyone on the Internet can send them.
"""

from __future__ import annotations

import re
import time
import datetime
from email.utils import format_datetime
from typing import Iterable, Optional

from gateway.records import Verdict

_FIELD_START = re.compile(rb"^[!-9;-~]+:")  # a header field name then colon
_AUTHSERV = re.compile(rb"^\s*([^\s;]+)")


def split_message(raw: bytes) -> tuple[list[bytes], bytes]:
    """-> (header fields, each with its continuation lines and CRLFs; the rest)."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        head, body = raw, b""
        if not head.endswith(b"\r\n"):
            head += b"\r\n"
    else:
        head, body = raw[: end + 2], raw[end + 2 :]
    fields: list[bytes] = []
    for line in head.split(b"\r\n")[:-1]:
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields, body


def field_name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def field_value(field: bytes) -> bytes:
    return field.split(b":", 1)[1] if b":" in field else b""


def fold(name: str, items: Iterable[str], sep: str = ",", width: int = 76) -> bytes:
    """name: item,item,... folded onto continuation lines at ``width``."""
    out, line = [], f"{name}:"
    items = list(items)
    for i, item in enumerate(items):
        piece = item + (sep if i < len(items) - 1 else "")
        if len(line) + 1 + len(piece) > width and line.strip() != f"{name}:":
            out.append(line)
            line = "\t" + piece
        else:
            line += (" " if line.endswith(":") else "") + piece
    out.append(line)
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")


def received_header(
    helo: Optional[str],
    rdns: Optional[str],
    peer_ip: str,
    hostname: str,
    queue_id: str,
    protocol: str,
    recipient: Optional[str],
    now: Optional[float] = None,
) -> bytes:
    ip = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    lines = [
        # "from HELO (RDNS [IP])": the form SpamAssassin and admins parse;
        # RDNS only when forward-confirmed, so it can be trusted
        f"Received: from {helo or 'unknown'} ({rdns + ' ' if rdns else ''}[{ip}])",
        f"\tby {hostname} (MailGate) with {protocol} id {queue_id}",
    ]
    if recipient:
        lines.append(f"\tfor <{recipient}>;")
    else:
        lines[-1] += ";"
    when = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    lines.append(f"\t{format_datetime(when)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


class Finisher:
    def __init__(self, hostname: str, subject_tag: str = "SPAM*** %s"):
        self.hostname = hostname.encode().lower()
        self.subject_tag = subject_tag
        self.tag_prefix = subject_tag.split("%s", 1)[0].strip().encode()

    def _forged(self, field: bytes) -> bool:
        name = field_name(field)
        if name.startswith(b"x-spam-"):
            return True
        if name == b"authentication-results":
            m = _AUTHSERV.match(field_value(field))
            return bool(m) and m.group(1).lower().rstrip(b";") == self.hostname
        if name == b"x-virus-scanned":
            return True
        return False

    def tag_subject(self, fields: list[bytes]) -> list[bytes]:
        for i, f in enumerate(fields):
            if field_name(f) == b"subject":
                value = field_value(f)
                if value.strip().startswith(self.tag_prefix):
                    return fields  # tagged once, never SPAM*** SPAM***
                text = value.strip(b" \t").rstrip(b"\r\n")
                new = self.subject_tag.encode("utf-8").replace(b"%s", text, 1)
                fields[i] = f.split(b":", 1)[0] + b": " + new + b"\r\n"
                return fields
        fields.append(b"Subject: " + self.subject_tag.replace("%s", "").encode("utf-8").rstrip() + b"\r\n")
        return fields

    def spam_headers(self, verdict: Verdict) -> list[bytes]:
        spam = verdict.is_spam
        score = f"{verdict.score:.1f}"
        tests = [f"{r.symbol}={r.score:g}" for r in sorted(verdict.results, key=lambda r: -abs(r.score))]
        status_items = [f"{'Yes' if spam else 'No'}", f"score={score}", f"required={verdict.required:.1f}"]
        out = []
        if spam:
            out.append(b"X-Spam-Flag: YES\r\n")
        out.append(f"X-Spam-Score: {score}\r\n".encode())
        out.append(f"X-Spam-Level: {'*' * max(0, min(50, int(verdict.score)))}\r\n".encode())
        head = f"{status_items[0]}, {status_items[1]} {status_items[2]} tests="
        out.append(fold("X-Spam-Status", [head + (tests[0] if tests else "none")] + tests[1:]))
        return out

    def finish(self, raw: bytes, verdict: Verdict, extra: Iterable[tuple[str, str]] = (),
               tag_subject: bool = True) -> bytes:
        """Our Received stays first; then check headers; then the spam headers.

        ``tag_subject=False`` for outbound mail: rewriting our own users'
        subjects would break the DKIM signature we just made for them."""
        fields, body = split_message(raw)
        received = fields[:1] if fields and field_name(fields[0]) == b"received" else []
        rest = [f for f in fields[len(received):] if not self._forged(f)]
        if verdict.is_spam and tag_subject:
            rest = self.tag_subject(rest)
        added = [f"{n}: {v}\r\n".encode("utf-8", "replace") for n, v in extra]
        return b"".join(received + added + self.spam_headers(verdict) + rest) + body
