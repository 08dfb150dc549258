"""Final delivery into a Maildir (the ``local:PATH`` route).

Follows the Maildir contract (https://cr.yp.to/proto/maildir.html): the
message is written under ``tmp/`` with a name no other delivery can pick,
fsync'ed, then renamed into ``new/`` and the directory fsync'ed, so a reader
never sees half a message and a crash never loses one we reported delivered.

The file gets ``Return-Path:`` (the envelope sender, ``<>`` for the null
sender) and ``Delivered-To:`` (the recipient) on top, as an MTA's local
delivery agent does, and is stored with Unix line ends (LF), the convention
every Maildir reader (Dovecot, mutt, Python's ``mailbox``) expects; CRLF
from the wire is converted.

Everything here blocks (disk I/O, fsync): call it through a thread pool,
never on the reactor.  ``gateway.delivery.Deliverer`` does.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import secrets
import socket
import time
from typing import Optional

from gateway.errors import MailGateError
from gateway.spool import fsync_dir as _fsync_dir

_counter = itertools.count(1)


class MaildirError(MailGateError):
    """The message could not be stored; ``temporary`` says whether to retry."""

    def __init__(self, message: str, temporary: bool = True, enhanced: str = "4.3.0"):
        super().__init__(message)
        self.temporary = temporary
        self.enhanced = enhanced


class DeliveryLoop(MaildirError):
    """The message already carries our Delivered-To for this recipient."""

    def __init__(self, recipient: str):
        super().__init__(f"mail forwarding loop for {recipient}", temporary=False, enhanced="5.4.6")


def _safe_hostname(hostname: str) -> str:
    # the spec reserves "/" and ":" in names; it encodes them as octal escapes
    return hostname.replace("/", r"\057").replace(":", r"\072")


def unique_name(hostname: Optional[str] = None, now: Optional[float] = None) -> str:
    """``<sec>.M<usec>P<pid>Q<n>R<random>.<host>``: unique across processes,
    threads, hosts and clock steps (the random part covers pid reuse)."""
    now = time.time() if now is None else now
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    host = _safe_hostname(hostname or socket.gethostname() or "localhost")
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(8)}.{host}"


def _to_lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


_DELIVERED_TO = re.compile(rb"^delivered-to:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)


def _header_block(data: bytes) -> bytes:
    end = data.find(b"\n\n")
    return data if end < 0 else data[: end + 1]


def already_delivered_to(data: bytes, recipient: str) -> bool:
    """True when the headers carry ``Delivered-To: recipient`` (a loop)."""
    wanted = recipient.strip().lower().encode("utf-8", "replace")
    return any(m.group(1).strip(b"<>").lower() == wanted for m in _DELIVERED_TO.finditer(_header_block(data)))


def ensure_maildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)



def deliver(path: str, recipient: str, sender: str, data: bytes, hostname: Optional[str] = None) -> str:
    """Store one copy of ``data`` for ``recipient`` in the Maildir at ``path``.

    Returns the path of the new file.  Raises ``MaildirError`` (temporary
    unless it is a loop) with a readable reason; never a bare OSError.
    """
    body = _to_lf(data)
    if already_delivered_to(body, recipient):
        raise DeliveryLoop(recipient)
    head = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode("utf-8", "replace")
    try:
        ensure_maildir(path)
    except OSError as e:
        raise MaildirError(f"cannot create Maildir {path}: {e.strerror}", enhanced=_enhanced(e)) from None
    name = unique_name(hostname)
    tmp = os.path.join(path, "tmp", name)
    final = os.path.join(path, "new", name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(head)
                f.write(body)
                f.flush()
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        _fsync_dir(os.path.join(path, "new"))
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise MaildirError(f"cannot write to Maildir {path}: {e.strerror}", enhanced=_enhanced(e)) from None
    return final


def _enhanced(e: OSError) -> str:
    # RFC 3463: 4.3.1 "mail system full"; anything else is a local error
    return "4.3.1" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "4.3.0"
