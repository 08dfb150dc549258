"""Delivery of one spooled message to its next hops, with per-recipient outcomes.

``Deliverer.deliver(queue_id, sender, recipients, data)`` fires with one
``Outcome`` per recipient, in the order given:

- ``sent``: the next hop took it (2xx after DATA), or it is in the Maildir;
- ``deferred``: try again later (a 4xx, connection trouble, a DNS failure);
- ``failed``: permanent (a 5xx, a domain that does not exist): bounce it.

It never raises and never blocks the reactor; the queue manager decides
about retries, lifetimes and bounces (``gateway.dsn``).

Routing (``[routes]`` in the config, ``gateway.config.route_for``):

- ``smtp:[host]:port``: that host (an IP, or a name resolved to A/AAAA), no MX
  lookup, as in Postfix;
- ``smtp:host:port``: the MX hosts of ``host`` on that port, else its A/AAAA;
- ``mx``: the MX hosts of the recipient domain on port 25 in preference
  order (equal preferences in random order, RFC 5321 5.1), else the domain's
  own A/AAAA when it has no MX (NOANSWER).  NXDOMAIN fails the recipients
  with 5.1.2, a null MX (RFC 7505) with 5.1.10, a DNS timeout defers them;
  an MX naming our own hostname drops it and every worse one (no loops);
- ``local:PATH``: one copy per recipient into the Maildir (``gateway.maildir``)
  in a thread.

Recipients are grouped per next hop: one connection per (route, message),
every recipient of the group in one transaction.  When a host cannot be
reached, refuses at the greeting or EHLO, or answers 4xx for some
recipients, those recipients go on to the next address (at most
``MAX_ADDRESSES`` per group, like Postfix's smtp_mx_address_limit); a 5xx
is final at once.

TLS is opportunistic: when the server offers STARTTLS it is used with a
context that does NOT verify the certificate (RFC 7435: encryption against
passive listeners; an unauthenticated channel is still better than clear
text, and most MX certificates would not verify anyway).  If the TLS
handshake fails, the same host is tried once more in clear text, as
Postfix's "may" level does.  Pass ``tls_client_context_factory=False`` to
never use STARTTLS, or a context factory of your own (for instance one that
verifies) to replace the default.

Every phase of a session has its own deadline (``Timeouts``, from ``[queue]``:
connect, greeting/EHLO/STARTTLS, MAIL, each RCPT, DATA, each chunk of the
body, end of data; RFC 5321 4.5.3.2's values by default), not one idle timer;
the deferral reason names the phase that ran out.  How many sessions run at
once, per next hop and in all, and which next hops are dead, is the queue
manager's business (``gateway.queue.Destinations``): ``destination(rcpt)``
tells it which next hop a recipient goes to.

SMTPUTF8 (RFC 6531): when the client sent the SMTPUTF8 parameter
(``deliver(smtputf8=True)``) or the sender is not ASCII, the whole
transaction needs it; otherwise only the recipients that are not ASCII do.
When the next hop offers SMTPUTF8, MAIL FROM carries it; when it does not,
what needs it fails at once with 550 5.6.7 (no downgrade, no other MX: the
queue manager bounces it) and the rest is delivered as usual.

Collaborators are injected: the reactor, the resolver (``mx()``/``addresses()``
coroutines, run through ``gateway.pipeline.as_deferred``, so the asyncio
reactor must be installed), ``run_in_thread`` for the Maildir writes and for
preparing large messages, and ``smtp_port`` (25) for "mx" next hops, which
tests point at a free port.

What became of each recipient is the queue manager's to tell
(``DeliveryAttempted`` in ``gateway.events``; its log subscriber writes the
familiar line per recipient per attempt on "mailgate.delivery")::

    queue_id=Q to=rcpt@x relay=mx.x[192.0.2.1]:25 status=sent code=250 reply="2.0.0 Ok" delay=0.12 tls=yes

This module logs only about its own operation (a TLS handshake that failed,
a host that refused the session, an internal error).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import random
import re
from dataclasses import dataclass, field
from io import BytesIO
from typing import Callable, Optional

from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from gateway import maildir
from gateway.config import Route, route_for
from gateway.pipeline import as_deferred
from gateway.resolver import NXDOMAIN, Lookup

log = logging.getLogger("mailgate.delivery")

SENT = "sent"
DEFERRED = "deferred"
FAILED = "failed"

MAX_ADDRESSES = 5  # next-hop addresses tried per group and attempt
WIRE_FORM_IN_THREAD = 256 * 1024  # bytes; above this the CRLF/dot pass leaves the reactor
# RSET and QUIT come after the outcome is known: waiting long for their reply
# would only hold a socket
QUIT_TIMEOUT = 30.0

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in one delivery attempt.

    ``reply`` is the text after the code (``"5.1.1 <x@y>: User unknown"``).
    ``relay`` names the host that answered (``mx.x[192.0.2.1]:25``); it is
    empty when MailGate decided itself (DNS said no such domain, a Maildir).
    """

    recipient: str
    status: str  # SENT | DEFERRED | FAILED
    code: int
    reply: str
    relay: str = ""
    remote: bool = field(default=False, compare=False)  # the reply came from a remote SMTP server
    tls: bool = field(default=False, compare=False)  # the session that gave this reply was encrypted

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status: from the reply when it has one, else from the code class."""
        return enhanced_status(self.code, self.reply, self.status)


def enhanced_status(code: int, reply: str, status: str = "") -> str:
    """``"5.1.1"`` from ``"5.1.1 user unknown"``; when the reply has none, the
    class of the code decides.  A failed recipient with a transient code ran
    out of queue lifetime: 4.4.7 (delivery time expired)."""
    m = _ENHANCED.match(reply or "")
    if m and (not code or str(code)[0] == m.group(1)):
        return m.group(0)
    if 200 <= code < 300:
        return "2.0.0"
    if 400 <= code < 500 or (status == DEFERRED and not code):
        return "4.4.7" if status == FAILED else "4.0.0"
    return "5.0.0"


@dataclass(frozen=True)
class Timeouts:
    """How long each phase of an SMTP client session may take, in seconds.

    The defaults are RFC 5321 4.5.3.2's (and Postfix's smtp_*_timeout): a
    deadline per phase rather than one idle timer, so a server that hangs
    after the greeting is given up on when that phase's time is over.
    ``data_xfer`` bounds each chunk of the body, not the whole body: a big
    message on a slow link is not cut off while it moves.
    """

    connect: float = 30.0
    helo: float = 300.0  # the greeting, EHLO/HELO and STARTTLS (with its handshake)
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0  # DATA to 354
    data_xfer: float = 180.0  # each chunk of the body
    data_done: float = 600.0  # the final "." to its reply
    quit: float = QUIT_TIMEOUT

    @classmethod
    def from_settings(cls, queue) -> "Timeouts":
        """From ``[queue]`` (``gateway.config.QueueSettings``)."""
        return cls(connect=queue.connect_timeout, helo=queue.helo_timeout, mail=queue.mail_timeout,
                   rcpt=queue.rcpt_timeout, data_init=queue.data_init_timeout,
                   data_xfer=queue.data_xfer_timeout, data_done=queue.data_done_timeout)

    @classmethod
    def every_command(cls, seconds: float, connect: float = 30.0) -> "Timeouts":
        """One limit for every phase (tests)."""
        return cls(connect, seconds, seconds, seconds, seconds, seconds, seconds, min(seconds, QUIT_TIMEOUT))

    def for_command(self, line: bytes) -> tuple[float, str]:
        """The deadline for the reply to the command ``line``, and the phase's name for errors."""
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO", b"STAR"):
            return self.helo, line.split(None, 1)[0].decode("ascii", "replace").upper()
        if verb == b"MAIL":
            return self.mail, "MAIL FROM"
        if verb == b"RCPT":
            return self.rcpt, "RCPT TO"
        if verb == b"DATA":
            return self.data_init, "DATA"
        if line in (b".", b"\r\n."):
            return self.data_done, "end of data"
        return self.quit, line.split(None, 1)[0].decode("ascii", "replace").upper() if line.strip() else "reply"


def _header_block(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end]


def _needs_smtputf8(address: str) -> bool:
    """RFC 6531: an address that is not ASCII can only be sent with SMTPUTF8."""
    return not address.isascii()


def classify(code: int) -> str:
    if 200 <= code < 300:
        return SENT
    if 500 <= code < 600:
        return FAILED
    return DEFERRED  # 4xx, and anything a broken server says


@dataclass(frozen=True)
class _Hop:
    name: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.name}[{self.ip}]:{self.port}"


@dataclass
class _Problem:
    """Why a group has no next hop (or lost one): applies to every recipient."""

    status: str
    code: int
    reply: str
    relay: str = ""
    remote: bool = False

    def outcome(self, recipient: str) -> Outcome:
        return Outcome(recipient, self.status, self.code, self.reply, self.relay, self.remote)


@dataclass
class _Session:
    """What one SMTP connection produced."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)  # per recipient when a transaction ran
    problem: Optional[_Problem] = None  # otherwise why the session failed
    tls_failed: bool = False  # the TLS handshake broke: retry in clear text
    tls: bool = False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def wire_form(data: bytes) -> bytes:
    """CRLF line ends and dot-stuffing (RFC 5321 4.5.2), done once per message."""
    # bytes.count/replace rather than regular expressions: this runs on the
    # reactor, and a 10 MB message must not stall it
    if data.count(b"\n") != data.count(b"\r\n"):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if b"\n." in data:
        data = data.replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data


def _text(resp) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return " ".join(str(resp).split())


@functools.cache
def _client_classes():
    """The Twisted SMTP client classes, made on first use: twisted.mail.smtp
    installs the default reactor when imported, so importing this module
    (for ``Outcome``, say) must not import it before the service has
    installed the asyncio reactor."""
    from twisted.mail import smtp

    class _Address(smtp.Address):
        """An envelope address sent exactly as given: Twisted's parser would
        rewrite or refuse valid addresses (quoted local parts, no domain)."""

        def __init__(self, raw: str):
            self.raw = raw
            self.addrstr = raw.encode("utf-8")
            self.local, _, self.domain = self.addrstr.rpartition(b"@")

        def __bytes__(self) -> bytes:
            return self.addrstr

        def __str__(self) -> str:
            return self.raw


    class _DeliveryClient(smtp.ESMTPClient):
        """One connection, one transaction, then QUIT."""

        def __init__(self, attempt: "_Attempt"):
            super().__init__(secret=None, contextFactory=attempt.tls_context, identity=attempt.hostname)
            self.attempt = attempt
            self.timeout = attempt.timeouts.helo  # until the greeting; then per command (sendLine)
            self._phase = "the greeting"
            self._offered = False
            self._helo_refused_once = False
            self._tls_started = False
            self._tls_ok = False
            self._extensions: dict[bytes, Optional[bytes]] = {}

        # -- what to send ------------------------------------------------------
        def getMailFrom(self):
            if self._offered:
                return None  # one transaction per connection
            self._offered = True
            return _Address(self.attempt.sender)

        def getMailTo(self):
            return [_Address(r) for r in self.attempt.sendable]

        def getMailData(self):
            return BytesIO(self.attempt.wire)

        def transformChunk(self, chunk):
            # the data is already in wire form (CRLF, dot-stuffed): the base class
            # would turn CRLF into CRCRLF.  Each chunk is asked for once the
            # previous one has left, so this is a deadline per chunk
            self._phase = "the message body to be taken"
            self.setTimeout(self.attempt.timeouts.data_xfer)
            return chunk

        # -- deadlines ----------------------------------------------------------
        def sendLine(self, line):
            # every command goes out here: its reply gets that phase's deadline
            timeout, phase = self.attempt.timeouts.for_command(line)
            self._phase = f"the reply to {phase}"
            self.setTimeout(timeout)
            super().sendLine(line)

        def timeoutConnection(self):
            why = f"timeout after {self.timeOut:g}s waiting for {self._phase}"
            self.sendError(smtp.SMTPTimeoutError(-1, why.encode(), self.log.str()))

        # -- protocol hooks ----------------------------------------------------
        def connectionMade(self):
            # the message body and the final "." go out as separate writes:
            # with Nagle's algorithm the "." waits for the peer's delayed ACK
            # (40 ms on Linux), which caps one connection at ~20 messages/s
            try:
                self.transport.setTcpNoDelay(True)
            except (AttributeError, OSError):
                pass  # not a TCP transport (tests with fake transports)
            super().connectionMade()

        def esmtpState_serverConfig(self, code, resp):
            self._extensions = {}
            for line in resp.splitlines():
                parts = line.split(None, 1)
                if parts:
                    self._extensions[parts[0].upper()] = parts[1] if len(parts) > 1 else None
            if self._tlsMode:
                self._tls_ok = True  # EHLO answered through TLS: the handshake worked
            return super().esmtpState_serverConfig(code, resp)

        def esmtpState_starttls(self, code, resp):
            self._tls_started = True
            return super().esmtpState_starttls(code, resp)

        def smtpState_helo(self, code, resp):
            # the base class falls back from EHLO to HELO but would repeat HELO
            # for ever when the server refuses that too
            if self._helo_refused_once:
                return self.sendError(smtp.SMTPClientError(code, resp, self.log.str()))
            self._helo_refused_once = True
            return super().smtpState_helo(code, resp)

        def smtpState_from(self, code, resp):
            self._from = self.getMailFrom()
            self._failresponse = self.smtpTransferFailed
            if self._from is None:
                return self._disconnectFromServer()
            params = b""
            if self.attempt.utf8_recipients:
                if b"SMTPUTF8" in self._extensions:
                    params += b" SMTPUTF8"
                else:
                    # RFC 6531 3.2: no downgrade; what needs SMTPUTF8 fails here
                    self.attempt.smtputf8_refused()
                    if not self.attempt.sendable:
                        self._from = None  # no transaction: nothing for sentMail to report
                        return self._disconnectFromServer()
            if b"SIZE" in self._extensions:
                params += b" SIZE=%d" % len(self.attempt.wire)
            if self.attempt.eight_bit and b"8BITMIME" in self._extensions:
                params += b" BODY=8BITMIME"
            # written out here rather than through quoteaddr(), which would send
            # the null sender only by accident of email.utils.parseaddr
            self.sendLine(b"MAIL FROM:<" + bytes(self._from) + b">" + params)
            self._expected = [250]
            self._okresponse = self.smtpState_to

        def sentMail(self, code, resp, numOk, addresses, log):
            self.attempt.transaction_done(code, resp, numOk, addresses, self._tlsMode)

        def sendError(self, exc):
            code = getattr(exc, "code", -1)
            # a refused STARTTLS or a broken handshake: the caller retries in clear text
            tls_failed = isinstance(exc, smtp.TLSError) or (self._tls_started and not self._tls_ok)
            self.attempt.session_failed(code if isinstance(code, int) else -1, getattr(exc, "resp", str(exc)),
                                        tls_failed=tls_failed)
            super().sendError(exc)

        def connectionLost(self, reason=protocol.connectionDone):
            super().connectionLost(reason)
            self.attempt.connection_lost(reason, tls_failed=self._tls_started and not self._tls_ok)

    return smtp, _Address, _DeliveryClient


class _Attempt(protocol.ClientFactory):
    noisy = False  # one log line per attempt is ours; Twisted's start/stop lines are noise
    """One connection to one next-hop address; ``result`` fires with a ``_Session``."""

    def __init__(self, reactor, hop: _Hop, sender: str, recipients: list[str], wire: bytes, eight_bit: bool,
                 hostname: str, tls_context, timeouts: Timeouts, smtputf8: bool = False):
        self.reactor = reactor
        self.hop = hop
        self.sender = sender
        self.recipients = recipients
        self.sendable = list(recipients)  # what goes into RCPT TO
        # RFC 6531: the sender is not ASCII, or the client asked for SMTPUTF8
        # and the headers really hold UTF-8: the whole transaction needs it;
        # else only recipients that are not ASCII.  An all-ASCII message that
        # merely came with SMTPUTF8 goes without it, as Postfix sends it
        if _needs_smtputf8(sender) or (smtputf8 and not _header_block(wire).isascii()):
            self.utf8_recipients = list(recipients)
        else:
            self.utf8_recipients = [r for r in recipients if _needs_smtputf8(r)]
        self.wire = wire
        self.eight_bit = eight_bit
        self.hostname = hostname
        self.tls_context = tls_context
        self.timeouts = timeouts
        self.result: defer.Deferred = defer.Deferred()
        self._done = False
        self._refused: dict[str, Outcome] = {}  # decided before RCPT: SMTPUTF8 not offered

    def buildProtocol(self, addr):
        p = _client_classes()[2](self)
        p.factory = self
        p.callLater = self.reactor.callLater  # command timeouts on the injected reactor
        return p

    def _finish(self, session: _Session) -> None:
        if not self._done:
            self._done = True
            self.result.callback(session)

    def smtputf8_refused(self) -> None:
        """The next hop does not offer SMTPUTF8: what needs it bounces (RFC 6531 3.2, 5.6.7)."""
        reply = f"5.6.7 SMTPUTF8 not supported by next hop {self.hop}"
        for rcpt in self.utf8_recipients:
            self._refused[rcpt] = Outcome(rcpt, FAILED, 550, reply, str(self.hop))
        self.sendable = [r for r in self.sendable if r not in self._refused]
        if not self.sendable:
            self._finish(_Session(outcomes=dict(self._refused)))

    def transaction_done(self, code, resp, num_ok, addresses, tls) -> None:
        relay = str(self.hop)
        data_reply = _text(resp)
        outcomes: dict[str, Outcome] = dict(self._refused)
        for address, rcode, rresp in addresses:
            rcpt = getattr(address, "raw", None) or str(address)
            if 200 <= rcode < 300:
                outcomes[rcpt] = Outcome(rcpt, classify(code), code, data_reply, relay, True)
            else:
                outcomes[rcpt] = Outcome(rcpt, classify(rcode), rcode, _text(rresp), relay, True)
        for rcpt in self.recipients:
            # refused before any RCPT (at MAIL FROM): that reply is everyone's
            outcomes.setdefault(rcpt, Outcome(rcpt, classify(code), code, data_reply, relay, True))
        self._finish(_Session(outcomes=outcomes, tls=tls))

    def session_failed(self, code: int, resp, tls_failed: bool = False) -> None:
        text = _text(resp) or "session failed"
        if code > 0:
            problem = _Problem(classify(code) if code >= 400 else DEFERRED, code, text, str(self.hop), True)
        else:
            problem = _Problem(DEFERRED, 451, f"4.4.2 {self.hop}: {text}", str(self.hop))
        self._finish(_Session(problem=problem, tls_failed=tls_failed))

    def connection_lost(self, reason: Failure, tls_failed: bool) -> None:
        why = reason.getErrorMessage() if reason is not None else "connection closed"
        self._finish(_Session(
            problem=_Problem(DEFERRED, 451, f"4.4.2 lost connection with {self.hop}: {why}", str(self.hop)),
            tls_failed=tls_failed,
        ))

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self._finish(_Session(problem=_Problem(
            DEFERRED, 451, f"4.4.1 connect to {self.hop}: {reason.getErrorMessage()}", str(self.hop))))


def default_tls_context():
    """Opportunistic TLS: encrypt, do not verify (see the module docstring)."""
    from twisted.internet.ssl import CertificateOptions

    return CertificateOptions(verify=False)


def _default_run_in_thread(f, *args, **kwargs) -> defer.Deferred:
    from twisted.internet import threads

    return threads.deferToThread(f, *args, **kwargs)


class Deliverer:
    def __init__(
        self,
        reactor,
        resolver,
        routes: dict[str, Route],
        hostname: str,
        tls_client_context_factory=None,
        *,
        timeouts: Optional[Timeouts] = None,
        smtp_port: int = 25,
        run_in_thread: Callable[..., defer.Deferred] = _default_run_in_thread,
        max_addresses: int = MAX_ADDRESSES,
        rng: Optional[random.Random] = None,
    ):
        self.reactor = reactor
        self.resolver = resolver
        self.routes = routes
        self.hostname = hostname
        self.timeouts = timeouts or Timeouts()  # replaced as a whole on reload
        self.smtp_port = smtp_port  # of "mx" next hops (Postfix: the "smtp" service port)
        if tls_client_context_factory is None:
            tls_client_context_factory = default_tls_context()
        self.tls_context = tls_client_context_factory or None  # False: never STARTTLS
        self.run_in_thread = run_in_thread
        self.max_addresses = max_addresses
        self._rng = rng or random.Random()

    @classmethod
    def from_config(cls, config, reactor, resolver, run_in_thread, tls_client_context_factory) -> "Deliverer":
        return cls(reactor=reactor, resolver=resolver, routes=config.routes, hostname=config.server.hostname,
                   timeouts=Timeouts.from_settings(config.queue),
                   tls_client_context_factory=tls_client_context_factory, run_in_thread=run_in_thread)

    def configure(self, config, resolver) -> None:
        """A reload: the next attempts use these routes, servers and deadlines."""
        self.routes, self.resolver, self.hostname = config.routes, resolver, config.server.hostname
        self.timeouts = Timeouts.from_settings(config.queue)

    # -- the one entry point ----------------------------------------------------
    def deliver(self, queue_id: str, sender: str, recipients: list[str], data: bytes,
                arrival: Optional[float] = None, smtputf8: bool = False) -> defer.Deferred:
        """Fires with ``list[Outcome]``, one per recipient in order; never errbacks.

        ``arrival`` is accepted for callers' symmetry; the delay since arrival
        is the queue manager's to tell.  ``smtputf8``: the client sent the
        SMTPUTF8 parameter, so the next hop must offer it (non-ASCII
        addresses need it anyway).
        """
        return defer.Deferred.fromCoroutine(
            self._deliver_safely(queue_id, sender, list(recipients), data, arrival, smtputf8))

    def destination(self, recipient: str) -> str:
        """The next hop's name for per-destination limits: the route, or
        ``mx:DOMAIN`` for MX routing (Postfix's nexthop).  Recipients with
        one destination go in one transaction."""
        route, domain = self._group_key(recipient)
        return f"mx:{domain}" if route.kind == "mx" else str(route)

    def _group_key(self, recipient: str) -> tuple[Route, str]:
        domain = recipient.rpartition("@")[2].lower().rstrip(".") if "@" in recipient else ""
        route = route_for(self.routes, domain)
        return route, (domain if route.kind == "mx" else "")

    async def _deliver_safely(self, queue_id, sender, recipients, data, arrival, smtputf8) -> list[Outcome]:
        try:
            return await self._deliver(queue_id, sender, recipients, data, arrival, smtputf8)
        except Exception as e:  # a bug must defer the mail, never lose it or stall the queue
            log.exception("queue_id=%s internal error in delivery", queue_id)
            return [Outcome(r, DEFERRED, 451, f"4.3.0 internal error: {e}") for r in recipients]

    async def _deliver(self, queue_id, sender, recipients, data, arrival, smtputf8) -> list[Outcome]:
        groups: dict[tuple, list[str]] = {}
        for rcpt in recipients:
            key = self._group_key(rcpt)
            if rcpt not in groups.setdefault(key, []):
                groups[key].append(rcpt)
        if len(data) > WIRE_FORM_IN_THREAD:
            wire = await self.run_in_thread(wire_form, data)
        else:
            wire = wire_form(data)
        message = _Message(sender, data, wire, smtputf8)
        ds = [defer.Deferred.fromCoroutine(self._deliver_group(queue_id, route, domain, rcpts, message))
              for (route, domain), rcpts in groups.items()]
        results = await defer.gatherResults(ds, consumeErrors=True)
        by_rcpt: dict[str, Outcome] = {}
        for group in results:
            for outcome, tls in group:
                by_rcpt[outcome.recipient] = dataclasses.replace(outcome, tls=tls) if tls else outcome
        return [by_rcpt[r] for r in recipients]

    async def _deliver_group(self, queue_id, route: Route, domain: str, recipients: list[str],
                             message: "_Message") -> list[tuple[Outcome, bool]]:
        try:
            if route.kind == "local":
                return [(await self._deliver_local(route, rcpt, message), False) for rcpt in recipients]
            return await self._deliver_smtp(queue_id, route, domain, recipients, message)
        except Exception as e:  # a bug must defer the mail, never lose it or stall the queue
            log.exception("queue_id=%s route=%s internal error in delivery", queue_id, route)
            return [(Outcome(r, DEFERRED, 451, f"4.3.0 internal error: {e}"), False) for r in recipients]

    # -- SMTP ---------------------------------------------------------------
    async def _deliver_smtp(self, queue_id, route, domain, recipients, message) -> list[tuple[Outcome, bool]]:
        hops, problem = await self._next_hops(route, domain)
        if problem is not None:
            return [(problem.outcome(r), False) for r in recipients]
        pending = list(recipients)
        last: dict[str, Outcome] = {}
        final: dict[str, tuple[Outcome, bool]] = {}
        for i, hop in enumerate(hops):
            is_last_hop = i == len(hops) - 1
            session = await self._session(hop, message, pending, self.tls_context)
            if session.tls_failed and self.tls_context is not None:
                log.info("queue_id=%s relay=%s event=tls_failed retry=cleartext", queue_id, hop)
                session = await self._session(hop, message, pending, None)
            if session.problem is not None:
                log.info('queue_id=%s relay=%s event=session_failed code=%s reply="%s"',
                         queue_id, hop, session.problem.code, _quote(session.problem.reply))
                for r in pending:
                    # a host refusing service (5xx greeting or EHLO) does not
                    # bounce mail another host only asked us to retry
                    if not (session.problem.status == FAILED and r in last and last[r].status == DEFERRED):
                        last[r] = session.problem.outcome(r)
                continue  # that host's problem: the next MX may take it
            for r in pending:
                outcome = session.outcomes[r]
                if outcome.status == DEFERRED and not is_last_hop:
                    last[r] = outcome
                else:
                    final[r] = (outcome, session.tls)
            pending = [r for r in pending if r not in final]
            if not pending:
                break
        for r in pending:
            final[r] = (last.get(r) or Outcome(r, DEFERRED, 451, "4.4.1 no next hop could be reached"), False)
        return [final[r] for r in recipients]

    def _session(self, hop: _Hop, message: "_Message", recipients, tls_context) -> defer.Deferred:
        attempt = _Attempt(self.reactor, hop, message.sender, list(recipients), message.wire, message.eight_bit,
                           self.hostname, tls_context, self.timeouts, message.smtputf8)
        self.reactor.connectTCP(hop.ip, hop.port, attempt, timeout=self.timeouts.connect)
        return attempt.result

    async def _next_hops(self, route: Route, domain: str) -> tuple[list[_Hop], Optional[_Problem]]:
        if route.kind == "smtp" and not route.mx_lookup:
            if _is_ip(route.host):
                return [_Hop(route.host, route.host, route.port)], None
            addresses = await as_deferred(self.resolver.addresses(route.host))
            if not addresses:
                return [], _Problem(DEFERRED, 451, f"4.4.3 no address found for relay host {route.host}")
            return [_Hop(route.host, ip, route.port) for ip in addresses][: self.max_addresses], None

        target = route.host if route.kind == "smtp" else domain
        port = route.port if route.kind == "smtp" else self.smtp_port
        # a missing configured relay host is an admin's typo: wait for the fix
        # rather than bouncing; a missing recipient domain is final
        missing_is_final = route.kind == "mx"
        if not target:
            return [], _Problem(FAILED, 550, "5.1.3 recipient address has no domain")
        mx: Lookup = await as_deferred(self.resolver.mx(target))
        if mx.status == NXDOMAIN:
            if missing_is_final:
                return [], _Problem(FAILED, 550, f"5.1.2 domain {target} does not exist (NXDOMAIN)")
            return [], _Problem(DEFERRED, 451, f"4.4.3 relay host {target} does not exist (NXDOMAIN)")
        if mx.failed:
            return [], _Problem(DEFERRED, 451, f"4.4.3 MX lookup for {target} failed ({mx.status})")
        if mx.ok:
            exchanges = self._exchanges(mx.records)
            if exchanges == [(0, "")]:
                return [], _Problem(FAILED, 556, f"5.1.10 domain {target} accepts no mail (null MX)")
            mine = [pref for pref, host in exchanges if host == self.hostname.lower().rstrip(".")]
            if mine:
                exchanges = [(p, h) for p, h in exchanges if p < min(mine)]
                if not exchanges:
                    return [], _Problem(FAILED, 554, f"5.4.6 mail for {target} loops back to myself")
        else:  # NOANSWER: the domain is its own mail host (RFC 5321 5.1)
            exchanges = [(0, target)]
        hosts = [h for _, h in exchanges]
        found = await defer.gatherResults([as_deferred(self.resolver.addresses(h)) for h in hosts],
                                          consumeErrors=True)
        hops = [_Hop(h, ip, port) for h, ips in zip(hosts, found) for ip in ips]
        if not hops:
            return [], _Problem(DEFERRED, 451, f"4.4.3 no address found for the mail hosts of {target}")
        return hops[: self.max_addresses], None

    def _exchanges(self, records) -> list[tuple[int, str]]:
        """'pref host' records -> [(pref, host)], equal preferences shuffled."""
        parsed = []
        for rec in records:
            pref, _, host = rec.strip().partition(" ")
            parsed.append((int(pref), host.strip().rstrip(".").lower()))
        parsed.sort(key=lambda t: t[0])
        out: list[tuple[int, str]] = []
        for pref in sorted({p for p, _ in parsed}):
            same = [t for t in parsed if t[0] == pref]
            self._rng.shuffle(same)
            out.extend(same)
        return out

    # -- local ----------------------------------------------------------------
    async def _deliver_local(self, route: Route, rcpt: str, message: "_Message") -> Outcome:
        relay = f"local:{route.path}"
        try:
            await self.run_in_thread(maildir.deliver, route.path, rcpt, message.sender, message.data,
                                     self.hostname)
        except maildir.MaildirError as e:
            code = 451 if e.temporary else 554
            return Outcome(rcpt, DEFERRED if e.temporary else FAILED, code, f"{e.enhanced} {e}", relay)
        return Outcome(rcpt, SENT, 250, f"2.0.0 delivered to Maildir {route.path}", relay)



def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class _Message:
    """The bytes of one message in the two forms delivery needs, made once."""

    def __init__(self, sender: str, data: bytes, wire: bytes, smtputf8: bool = False):
        self.sender = sender
        self.data = data
        self.wire = wire
        self.eight_bit = not data.isascii()
        self.smtputf8 = smtputf8
