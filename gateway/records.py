"""The records that flow forward through a session.

``Session`` lives as long as a connection, ``Envelope`` as long as one mail
transaction, ``Message`` holds the received bytes plus a parsed view made
once.  Checks read these and return ``Result`` objects; nothing here writes
an SMTP reply.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from functools import cached_property
from typing import Any, Optional

from gateway.mime import MAX_MIME_DEPTH, MimePart, parse_mime


class Stage(str, enum.Enum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Action(str, enum.Enum):
    ACCEPT = "accept"
    TAG = "tag"
    QUARANTINE = "quarantine"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class Result:
    """One piece of evidence from a check.

    ``refuse`` is a policy hint, not a reply: a check that is configured to
    refuse outright names *why* (a key of ``rules.scoring.REFUSALS``, such as
    ``"blocklist"`` or ``"virus"``) and the decider picks the SMTP reply.
    ``header`` is a header the check wants on the delivered message (for
    instance Authentication-Results); the finisher adds it.
    """

    symbol: str
    score: float = 0.0
    detail: str = ""
    refuse: Optional[str] = None
    header: Optional[tuple[str, str]] = None
    # the symbol's declared one-line meaning (gateway.plugins.Symbol), filled
    # in by the decider: the same evidence whether or not it is known
    description: str = field(default="", compare=False)


@dataclass(frozen=True)
class Failed:
    """A check that could not check: neither clean nor guilty."""

    check: str
    reason: str
    # what the failure means for the message: "none" (adds nothing, e.g. a DNS
    # timeout) or "tempfail" (e.g. the virus scanner is down)
    severity: str = "none"


@dataclass
class Session:
    """One per connection."""

    queue_id: str
    peer_ip: str
    peer_port: int = 0
    local_ip: str = ""
    local_port: int = 0
    helo: Optional[str] = None
    esmtp: bool = False
    tls: bool = False
    auth_user: Optional[str] = None
    trusted: bool = False  # client is in relay.trusted_networks
    results: list = field(default_factory=list)  # connect-stage results
    helo_results: list = field(default_factory=list)  # the latest HELO/EHLO's; a new one replaces them
    transactions: int = 0
    closed: bool = False  # the client has gone: nothing may be committed for it any more

    @cached_property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        addr = ipaddress.ip_address(self.peer_ip.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            return addr.ipv4_mapped
        return addr

    @property
    def connection_results(self) -> list:
        """What the connection earned before any transaction: connect and the latest HELO."""
        return self.results + self.helo_results

    @property
    def may_relay(self) -> bool:
        return self.trusted or self.auth_user is not None

    @property
    def is_loopback(self) -> bool:
        return self.ip.is_loopback


@dataclass
class Recipient:
    address: str  # as given, without angle brackets
    domain: str  # lower-case, trailing dot removed
    results: list = field(default_factory=list)


@dataclass
class Envelope:
    """One per mail transaction (MAIL FROM to end of DATA or RSET)."""

    queue_id: str
    sender: str  # "" for the null sender
    sender_params: dict = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    results: list = field(default_factory=list)  # mail-stage results
    size: int = 0
    smtputf8: bool = False  # MAIL FROM carried SMTPUTF8 (RFC 6531): delivery needs a next hop that offers it

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower().rstrip(".") if "@" in self.sender else ""


class Message:
    """The received bytes and a parsed view made once, on first use."""

    def __init__(self, raw: bytes, max_mime_depth: int = MAX_MIME_DEPTH):
        self.raw = raw
        self.max_mime_depth = max_mime_depth

    @cached_property
    def parsed(self) -> MimePart:
        return parse_mime(self.raw, self.max_mime_depth)

    def prepare(self) -> None:
        """Makes the views every content check shares (a pool thread calls this)."""
        self.mime_truncated  # noqa: B018 - computing the cached property (and the parse) is the point
        self.subject  # noqa: B018 - and what the log line and the tracking store name it by
        self.message_id  # noqa: B018

    @cached_property
    def mime_truncated(self) -> bool:
        """Some part nests deeper than ``max_mime_depth``: the parsed view
        holds it as opaque bytes, so no check saw inside it."""
        return any(p.opaque for p in self.parsed.walk())

    def _field(self, name: bytes) -> Optional[str]:
        """The first top-level header field ``name``, unfolded, or None.

        Read from the header block with one regex rather than from the
        parsed view: the log line and the tracking store name every message,
        also where no content check made the parsed view, and the email
        parser would cost several hundred microseconds on the reactor for
        two fields.  Bytes that are not UTF-8 read as U+FFFD."""
        m = re.search(rb"^" + name + rb"[ \t]*:(.*(?:\r?\n[ \t].*)*)", self.header_block, re.I | re.M)
        if m is None:
            return None
        return " ".join(m.group(1).decode("utf-8", "replace").split())

    @cached_property
    def message_id(self) -> str:
        """The Message-ID as sent (with its angle brackets), "" when there is none."""
        return self._field(b"message-id") or ""

    @cached_property
    def subject(self) -> str:
        """The Subject, RFC 2047 encoded words decoded; "" when there is none."""
        value = self._field(b"subject") or ""
        if "=?" not in value:
            return value
        try:
            return str(make_header(decode_header(value)))
        except (ValueError, LookupError, UnicodeError, HeaderParseError):
            return value  # a broken encoded word or an unknown charset: as sent

    @cached_property
    def header_block(self) -> bytes:
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            end = self.raw.find(b"\n\n")
        return self.raw if end < 0 else self.raw[:end]

    def __len__(self) -> int:
        return len(self.raw)


@dataclass
class Transaction:
    """What a check sees: the session, the envelope, and at DATA the message.

    ``rcpt`` is the recipient under judgement at the RCPT stage.
    ``state`` is scratch space that checks of one transaction may share
    (for instance the DKIM verifier leaves the signing domain for DMARC).
    """

    session: Session
    envelope: Optional[Envelope] = None
    message: Optional[Message] = None
    rcpt: Optional[Recipient] = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id if self.envelope else self.session.queue_id


@dataclass
class Verdict:
    action: Action
    score: float
    required: float
    results: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    reply: Any = None  # errors.Reject / errors.TempFail for refusals

    @property
    def symbols(self) -> list[str]:
        return sorted({r.symbol for r in self.results})

    @property
    def is_spam(self) -> bool:
        return self.score >= self.required
