"""The ESMTP protocol: bytes in, commands out; typed outcomes in, replies out.

It speaks SMTP and nothing else.  Judging and committing are the
transaction runner's (``gateway/transaction.py``); what happened is told by
the runner's events, and by this module's own two: ``ConnectionOpened``
once a client is admitted and ``ConnectionClosed`` (with why) when it goes.
It logs only what concerns its own operation, never facts about mail.
What this module owns:

- Input is one bounded buffer consumed by offset, never by copying the rest
  (a 2 MiB pipelined flood costs linear time, not quadratic).  A command
  line is searched for only within its length limit, DATA only from where
  the last search stopped.
- Commands are handled one at a time, in order, even when a check answers
  later (RFC 2920).  While one waits, at most ``MAX_BACKLOG`` octets are
  buffered; then the socket is not read until the backlog drains, and the
  kernel's window pushes back on the client.  The same happens while the
  client does not read our replies (we are the transport's producer).
- One reactor turn handles at most ``COMMANDS_PER_TURN`` commands of a
  client, so a client that pipelines thousands of NOOPs in one write shares
  the reactor with the others instead of holding it.
- Every limit is a deadline (Postfix's smtpd_per_request_deadline): a
  command must be complete within ``idle_timeout`` of the previous reply
  however its bytes trickle in; DATA within ``idle_timeout`` plus one second
  per ``min_data_rate`` octets; a session within ``max_session_time``.
- STARTTLS forgets everything learned before it (RFC 3207 4.2), including
  AUTH, and discards anything pipelined after it (CVE-2011-0411).
- AUTH (RFC 4954) with our own SASL parsing (``gateway/sasl.py``), lines of
  up to 12,288 octets, a delay before each 535, a failure limit per
  connection and one per client address.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
import unicodedata
from typing import Callable, Optional

from twisted.cred import error as cred_error
from twisted.internet import defer, interfaces, protocol
from twisted.mail import smtp as twisted_smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import address as addr
from gateway import sasl
from gateway.errors import Reject, Reply, TempFail
from gateway.events import ConnectionClosed, ConnectionOpened, default_sink
from gateway.records import Envelope, Recipient, Session, Stage, Transaction
from gateway.spool import new_queue_id
from gateway.transaction import TransactionRunner

log = logging.getLogger("mailgate.smtp")

MAX_COMMAND_LINE = 1000  # octets including CRLF, RFC 5321 4.5.3.1.4
MAX_AUTH_LINE = 12288  # RFC 4954 4: an AUTH command or response line
MAX_BAD_COMMANDS = 20  # then 421, as Postfix's smtpd_hard_error_limit
MAX_BACKLOG = 32 * 1024  # unanswered pipelined input we hold before we stop reading
COMMANDS_PER_TURN = 50  # then the next client gets the reactor
DATA_SLACK = 4096  # room over max_message_size for our Received header and dot-stuffing
# Past COALESCE_AFTER octets of DATA, a read smaller than COALESCE_BELOW
# pauses reading for as long as the client, at the rate it has sent so far,
# takes to send COALESCE_GATHER octets (at most COALESCE_MAX seconds), so that
# the kernel gathers its next segments into one read.  A client that dribbles
# a big message in tiny writes then costs a few hundred reads, not one per
# write (each costs the reactor tens of microseconds).  What gathers is never
# more than half the socket's receive buffer as the kernel sizes it now (it
# starts at 128 KiB and grows with autotuning), so the buffer never fills and
# no sender is slowed; a message of ordinary size never waits.  128 KiB: the
# 8 MiB dribble of `make bench` (400-byte writes) costs 1.17x the CPU of one
# write with it, 1.50x with 60 KiB and 1.9x with 48 KiB, and the sender's wall
# time is the same for all three.
COALESCE_AFTER = 64 * 1024
COALESCE_BELOW = 8192
COALESCE_GATHER = 128 * 1024
COALESCE_MAX = 0.1

# Reply texts used in more than one place; codes per RFC 5321 / 3463.
BAD_SEQUENCE_HELO = Reject(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_MAIL = Reject(503, "5.5.1", "Error: need MAIL command")
NESTED_MAIL = Reject(503, "5.5.1", "Error: nested MAIL command")
NO_RECIPIENTS = Reject(554, "5.5.1", "Error: no valid recipients")
UNKNOWN_COMMAND = Reject(500, "5.5.1", "Error: command not recognized")
LINE_TOO_LONG = Reject(500, "5.5.2", "Error: line too long")
BARE_LF = Reject(500, "5.5.2", "Error: bare <LF> received")
NUL_IN_COMMAND = Reject(500, "5.5.2", "Error: NUL character in command")
NOT_UTF8 = Reject(501, "5.5.2", "Error: non-UTF-8 characters in command")
TOO_MANY_RECIPIENTS = TempFail(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reject(552, "5.3.4", "Error: message size exceeds fixed limit")
BAD_SENDER = Reject(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reject(501, "5.1.3", "Bad recipient address syntax")
NEEDS_SMTPUTF8 = Reject(553, "5.6.7", "Error: non-ASCII address requires the SMTPUTF8 parameter")
TOO_MANY_CONNECTIONS = TempFail(421, "4.7.0", "Error: too many connections, try again later")
TOO_MANY_ERRORS = TempFail(421, "4.7.0", "Error: too many errors")
IDLE_TIMEOUT = TempFail(421, "4.4.2", "Error: timeout exceeded")
SESSION_TOO_LONG = TempFail(421, "4.4.2", "Error: session time limit exceeded")
SHUTTING_DOWN = TempFail(421, "4.3.2", "Service shutting down, try again later")
INTERNAL_ERROR = TempFail(451, "4.3.0", "Internal error, try again later")
OK = Reply(250, "2.0.0", "Ok")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_NOT_AVAILABLE = TempFail(454, "4.7.0", "TLS not available")
ENCRYPTION_REQUIRED = Reject(538, "5.7.11", "Encryption required for requested authentication mechanism")
UNSUPPORTED_MECHANISM = Reject(504, "5.5.4", "Error: unsupported authentication mechanism")
ALREADY_AUTHENTICATED = Reject(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reject(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_ABORTED = Reject(501, "5.7.0", "Authentication aborted")
AUTH_NOT_BASE64 = Reject(501, "5.5.2", "Error: cannot decode response")
AUTH_FAILED = Reject(535, "5.7.8", "Error: authentication failed")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_UNAVAILABLE = TempFail(454, "4.7.0", "Temporary authentication failure")

_HTTP_VERBS = {b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS"}

COMMAND, DATA, AUTH, CLOSED = "COMMAND", "DATA", "AUTH", "CLOSED"


def _unstuff(content: bytes) -> bytes:
    """DATA as sent -> the message: dot-stuffing undone, NULs dropped, bare CR/LF made CRLF."""
    if content.startswith(b".") or b"\n." in content:
        if content.startswith(b".."):
            content = content[1:]
        content = content.replace(b"\r\n..", b"\r\n.")
    if b"\x00" in content:
        content = content.replace(b"\x00", b"")
    crlf = content.count(b"\r\n")
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return content


def helo_name(text: str) -> Optional[str]:
    """The first word of a HELO/EHLO argument, or None if there is none.

    Words are split at ASCII space only: a Unicode space (U+00A0, U+2003) or a
    control character is not a separator but a sign of a broken or hostile
    client, and the argument is refused.
    """
    name = text.strip(" ").split(" ", 1)[0]
    if not name or any(unicodedata.category(ch)[0] in "CZ" for ch in name):
        return None
    return name


@implementer(interfaces.IPushProducer)
class SMTPServer(protocol.Protocol):
    """One per connection.  ``factory`` is the ``GatewayFactory``."""

    def __init__(self, factory: "GatewayFactory"):
        self.factory = factory
        self.clock = factory.reactor
        self.runtime = factory.runtime  # a snapshot: a reload never changes a session midway
        self.portal = factory.portal
        self.tls_context = factory.tls_context
        self.runner = TransactionRunner(self.runtime, self.clock, factory, factory.events)
        server = self.runtime.config.server
        self.host = server.hostname
        self.timeout = server.idle_timeout
        self.mode = COMMAND
        self._buf = bytearray()
        self._pos = 0  # input before this offset is consumed
        self._skipping_long_line = False
        self._data = bytearray()
        self._data_oversize = False
        self._data_started = 0.0
        self._busy = False  # a command waits for its outcome; later input waits its turn
        self._in_process = False
        self._pauses: set[str] = set()  # "consumer" (our replies back up), "turn" (fairness)
        self._reading_paused = False
        self._coalesce_call = None  # reading paused while small DATA segments gather
        self._turn_call = None
        self._deadline: Optional[float] = None
        self._deadline_call = None
        self._session_call = None
        self._greet_call = None
        self._greeted = False
        self._early_talker = False
        self._bad_commands = 0
        self._auth_failures = 0
        self._mechanism = None
        self.session: Optional[Session] = None
        self._txn: Optional[Transaction] = None  # from MAIL to the end of DATA or RSET
        self._pre_mail: defer.Deferred = defer.succeed(None)
        self._conn_state: dict = {}  # what connect/helo checks learned (e.g. the verified rDNS name)
        self._admitted = False
        self._close_reason = ""  # why we ended the connection ("" when the client did)

    # --- connection ----------------------------------------------------------

    def connectionMade(self):
        peer, local = self.transport.getPeer(), self.transport.getHost()
        self.session = Session(
            queue_id=new_queue_id(), peer_ip=str(getattr(peer, "host", "")),
            peer_port=int(getattr(peer, "port", 0) or 0), local_ip=str(getattr(local, "host", "")),
            local_port=int(getattr(local, "port", 0) or 0),
        )
        self.session.trusted = self.runtime.is_trusted(self.session.ip)
        if not self.factory.admit(self):
            self._send(TOO_MANY_CONNECTIONS)
            self._close()
            return
        self._admitted = True
        self.factory.events.emit(ConnectionOpened(self.session, self.clock.seconds()))
        self.transport.registerProducer(self, True)
        self._session_call = self.clock.callLater(self.runtime.config.server.max_session_time, self._too_long)
        connect = self.runner.run_stage(Stage.CONNECT, Transaction(self.session, state=self._conn_state))
        connect.addCallback(self.session.results.extend)
        self._pre_mail = connect
        pause = self.runtime.config.server.greet_pause
        if pause > 0:
            self._greet_call = self.clock.callLater(pause, self._greet)
            self._expect_input()
        else:
            self._greet()

    def _greet(self):
        self._greet_call = None
        if self._early_talker:
            self._send(self.runtime.scorer.refusals["early_talker"])
            self._close("early talker")
            return
        self._greeted = True
        self._send(Reply(220, "", f"{self.host} ESMTP MailGate"))
        self._expect_input()
        self._process()

    def connectionLost(self, reason=protocol.connectionDone):
        why = self._close_reason or ("lost during DATA" if self.mode == DATA else "lost")
        self.mode = CLOSED
        self._buf, self._pos, self._data = bytearray(), 0, bytearray()
        self._deadline = None
        for call in (self._greet_call, self._deadline_call, self._session_call, self._turn_call,
                     self._coalesce_call):
            if call is not None and call.active():
                call.cancel()
        if self.session is not None:
            self.session.closed = True
            self.factory.release(self)
            if self._admitted:
                self._admitted = False
                self.factory.events.emit(ConnectionClosed(self.session, self.clock.seconds(), why,
                                                          self._auth_failures))

    def _close(self, reason: str = ""):
        """End the connection from our side; ``reason`` is what ConnectionClosed will say."""
        if not self._close_reason:
            self._close_reason = reason
        self.mode = CLOSED
        self._deadline = None
        self.transport.loseConnection()

    # --- deadlines -----------------------------------------------------------

    def _expect_input(self):
        """The client owes us a command, or its message after the 354: within idle_timeout.

        One timer, moved lazily: a later deadline is noticed when the timer
        fires, so the per-chunk cost in DATA is an assignment.
        """
        self._deadline = self.clock.seconds() + self.timeout
        if self._deadline_call is None or not self._deadline_call.active():
            # a timer already set fires no later than this deadline: it re-arms for the rest then
            self._deadline_call = self.clock.callLater(self.timeout, self._deadline_due)

    def _deadline_due(self):
        self._deadline_call = None
        if self._deadline is None or self.mode == CLOSED:
            return
        left = self._deadline - self.clock.seconds()
        if left > 0:
            self._deadline_call = self.clock.callLater(left, self._deadline_due)
            return
        phase = "DATA" if self.mode == DATA else "command"
        self._send(IDLE_TIMEOUT)
        self._close(f"timeout: {phase}")

    def _too_long(self):
        self._session_call = None
        if self.mode == CLOSED:
            return
        self._send(SESSION_TOO_LONG)
        self._close("timeout: session")

    # --- flow control --------------------------------------------------------

    def pauseProducing(self):
        """The transport's write buffer is full: the client is not reading our replies."""
        self._pauses.add("consumer")
        self._update_reading()

    def resumeProducing(self):
        self._pauses.discard("consumer")
        self._process()

    def stopProducing(self):
        pass  # connectionLost follows

    def _backlog(self) -> int:
        return len(self._buf) - self._pos

    def _update_reading(self):
        if self.mode == CLOSED or self.transport is None:
            return
        pause = bool(self._pauses) or self._backlog() > MAX_BACKLOG or self._coalesce_call is not None
        if pause != self._reading_paused:
            self._reading_paused = pause
            (self.transport.pauseProducing if pause else self.transport.resumeProducing)()

    def _yield_turn(self):
        self._pauses.add("turn")
        self._turn_call = self.clock.callLater(0, self._next_turn)

    def _next_turn(self):
        self._turn_call = None
        self._pauses.discard("turn")
        self._process()

    # --- replies -------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        if self.transport is None or self.mode == CLOSED:
            return
        self.transport.writeSequence([line + b"\r\n" for line in reply.lines()])

    def _error(self, reply: Reply) -> None:
        self._bad_commands += 1
        if self._bad_commands >= MAX_BAD_COMMANDS:
            self._send(TOO_MANY_ERRORS)
            self._close("too many errors")
        else:
            self._send(reply)

    # --- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes):
        if self.mode == CLOSED:
            return
        if not self._greeted:
            self._early_talker = True
        self._buf += data
        if self.mode == DATA:
            # Postfix's smtpd_min_data_rate: each octet buys 1/rate seconds more
            self._deadline += len(data) / self.runtime.config.server.min_data_rate
            if len(data) < COALESCE_BELOW and len(self._data) > COALESCE_AFTER and self._coalesce_call is None:
                self._coalesce_call = self.clock.callLater(self._coalesce_for(), self._coalesced)
        self._process()

    def _coalesce_for(self) -> float:
        elapsed = self.clock.seconds() - self._data_started
        rate = len(self._data) / elapsed if elapsed > 0 else float("inf")
        return min(COALESCE_MAX, min(COALESCE_GATHER, self._receive_buffer() // 2) / rate)

    def _receive_buffer(self) -> int:
        """The socket's receive buffer now (SO_RCVBUF follows the kernel's autotuning)."""
        try:
            return self.transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except (AttributeError, OSError):  # a transport without a socket (tests): only the constant bounds it
            return 2 * COALESCE_GATHER

    def _coalesced(self):
        self._coalesce_call = None
        self._update_reading()

    def _process(self):
        """Handle buffered input, one command at a time, a bounded number per turn."""
        if self._in_process:
            return  # the loop is already running further up the stack
        self._in_process = True
        try:
            budget = COMMANDS_PER_TURN
            while self._ready() and self._step():
                budget -= 1
                if budget == 0:
                    if self._backlog() and self.mode != CLOSED:
                        self._yield_turn()
                    break
        finally:
            self._in_process = False
        self._compact()
        self._update_reading()

    def _ready(self) -> bool:
        return (self._greeted and not self._busy and not self._pauses and self.mode != CLOSED
                and self._pos < len(self._buf))

    def _compact(self):
        if self._pos and (self._pos == len(self._buf) or self._pos > MAX_BACKLOG):
            del self._buf[:self._pos]
            self._pos = 0

    def _step(self) -> bool:
        """Consume one command line or one piece of DATA; False when more input is needed."""
        if self.mode == DATA:
            return self._data_step()
        buf, pos = self._buf, self._pos
        if self._skipping_long_line:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                self._pos = len(buf)
                return False
            self._pos, self._skipping_long_line = end + 2, False
            return True
        limit = MAX_AUTH_LINE if self.mode == AUTH or buf[pos:pos + 5].upper() == b"AUTH " else MAX_COMMAND_LINE
        end = buf.find(b"\r\n", pos, pos + limit)
        if end < 0:
            if len(buf) - pos >= limit:
                # skip to the line's end; its CR may be the window's last octet
                self._pos, self._skipping_long_line = pos + limit - 1, True
                self._error(LINE_TOO_LONG)
                self._expect_input()
                return True
            return False
        line = bytes(buf[pos:end])
        self._pos = end + 2
        if self.mode == AUTH:
            self._auth_response(line.strip())
        else:
            self._command(line)
        if not self._busy and self.mode != DATA:
            self._expect_input()
        return True

    def _command(self, line: bytes) -> None:
        if b"\x00" in line:
            return self._error(NUL_IN_COMMAND)
        if b"\n" in line or b"\r" in line:
            return self._error(BARE_LF)
        verb, _, rest = line.strip(b" ").partition(b" ")
        verb = verb.upper()
        if verb in _HTTP_VERBS or verb.endswith(b":"):
            # a web browser or proxy talking to us: cross-protocol abuse
            return self._close(f"non-SMTP command {verb[:20].decode('ascii', 'replace')}")
        handler = getattr(self, "smtp_" + verb.decode("ascii"), None) if verb.isalpha() and verb.isascii() \
            else None
        if handler is None:
            return self._error(UNKNOWN_COMMAND)
        try:
            text = rest.strip(b" ").decode("utf-8")
        except UnicodeDecodeError:
            return self._error(NOT_UTF8)
        try:
            result = handler(text)
        except Exception:
            log.exception("queue_id=%s command=%s failed", self.session.queue_id, verb.decode())
            self._send(INTERNAL_ERROR)
            return
        if isinstance(result, defer.Deferred):
            self._wait_for(result)

    def _wait_for(self, d: defer.Deferred) -> None:
        """Later input waits until ``d`` has answered; its failure is a 451."""
        self._busy = True
        self._deadline = None  # our side is working: the client owes nothing meanwhile
        d.addErrback(self._internal_error)
        d.addBoth(self._unbusy)

    def _internal_error(self, failure: Failure):
        qid = self.envelope.queue_id if self.envelope else self.session.queue_id
        log.error("queue_id=%s error=%s", qid, failure.getErrorMessage(),
                  exc_info=(failure.type, failure.value, failure.getTracebackObject()))
        self._send(INTERNAL_ERROR)

    def _unbusy(self, _):
        self._busy = False  # (never in DATA: the message is judged after it ends)
        if self.mode == CLOSED:
            return
        self._expect_input()
        self._process()

    # --- session commands ------------------------------------------------------

    def _extensions(self) -> list[str]:
        cfg = self.runtime.config.server
        ext = ["PIPELINING", f"SIZE {cfg.max_message_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self.session.tls:
            ext.append("STARTTLS")
        mechs = self._auth_mechanisms()
        if mechs and self.session.auth_user is None:
            ext.append("AUTH " + " ".join(mechs))
        return ext

    def _auth_allowed_here(self) -> bool:
        policy = self.runtime.config.auth.allow_without_tls
        return self.session.tls or policy == "always" or (policy == "loopback" and self.session.is_loopback)

    def _auth_mechanisms(self) -> list[str]:
        if self.portal is None or not self._auth_allowed_here():
            return []
        return list(sasl.MECHANISMS)

    def _hello(self, text: str, esmtp: bool):
        name = helo_name(text)
        if name is None:
            return self._error(Reject(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
        self._reset_transaction()
        self.session.helo, self.session.esmtp = name, esmtp
        helo = self.runner.run_stage(Stage.HELO, Transaction(self.session, state=self._conn_state))
        helo.addCallback(self._helo_judged)
        self._pre_mail = defer.gatherResults([self._pre_mail, helo])
        if esmtp:
            lines = [f"{self.host} Hello {name} [{self.session.peer_ip}]"] + self._extensions()
            self._send(Reply(250, "", "\n".join(lines)))
        else:
            self._send(Reply(250, "", self.host))

    def _helo_judged(self, records):
        # a repeated HELO/EHLO (every STARTTLS client sends two) replaces what the previous one earned
        self.session.helo_results = list(records)

    def smtp_HELO(self, text):
        return self._hello(text, esmtp=False)

    def smtp_EHLO(self, text):
        return self._hello(text, esmtp=True)

    def smtp_NOOP(self, text):
        self._send(OK)

    def smtp_RSET(self, text):
        self._reset_transaction()
        self._send(OK)

    def smtp_QUIT(self, text):
        self._send(Reply(221, "2.0.0", "Bye"))
        self._close("quit")

    def smtp_VRFY(self, text):
        self._send(Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery"))

    def smtp_EXPN(self, text):
        self._send(Reject(502, "5.5.1", "Error: command not implemented"))

    smtp_BDAT = smtp_ETRN = smtp_TURN = smtp_EXPN

    def smtp_HELP(self, text):
        self._send(Reply(214, "2.0.0", "See RFC 5321"))

    def smtp_STARTTLS(self, text):
        if self.tls_context is None or self.session.tls:
            return self._send(TLS_NOT_AVAILABLE if self.tls_context is None else
                              Reject(503, "5.5.1", "Error: TLS already active"))
        if text:
            return self._send(Reject(501, "5.5.4", "Syntax: STARTTLS"))
        self._send(READY_FOR_TLS)
        # RFC 3207 4.2 and CVE-2011-0411: discard anything pipelined after
        # STARTTLS and forget everything the client told us before it
        self._buf, self._pos = bytearray(), 0
        self.transport.startTLS(self.tls_context)
        self.session.tls = True
        self.session.helo, self.session.esmtp, self.session.helo_results = None, False, []
        self.session.auth_user = None
        self._reset_transaction()

    # --- AUTH ----------------------------------------------------------------

    def smtp_AUTH(self, text):
        if self.session.helo is None or not self.session.esmtp:
            return self._send(BAD_SEQUENCE_HELO)
        if self.session.auth_user is not None:
            return self._send(ALREADY_AUTHENTICATED)
        if self.envelope is not None:
            return self._send(AUTH_IN_TRANSACTION)
        name, _, initial = text.partition(" ")
        name = name.upper()
        if self.portal is None or name not in sasl.MECHANISMS:
            return self._send(UNSUPPORTED_MECHANISM)
        if not self._auth_allowed_here():
            return self._send(ENCRYPTION_REQUIRED)
        d = self.factory.auth_guard.blocked(self.session.ip, self.runtime.config.auth)
        return d.addCallback(self._auth_start, name, initial.strip(" "))

    def _auth_start(self, blocked: bool, name: str, initial: str):
        if blocked:
            log.info("queue_id=%s client=%s auth=refused (too many failures from this address)",
                     self.session.queue_id, self.session.peer_ip)
            self._send(sasl.CLIENT_BLOCKED)
            return self._close("auth blocked")
        self._mechanism = sasl.new_mechanism(name, self.host)
        if not initial:
            return self._auth_step(None)
        if initial == "=":  # RFC 4954 4: an empty initial response
            return self._auth_step(b"")
        decoded = self._decode_response(initial.encode("ascii", "replace"))
        return None if decoded is None else self._auth_step(decoded)

    def _auth_response(self, line: bytes) -> None:
        """A line in answer to our 334 challenge."""
        if line == b"*":
            self._end_auth()
            return self._send(AUTH_ABORTED)
        decoded = self._decode_response(line)
        if decoded is not None:
            self._auth_step(decoded)

    def _decode_response(self, data: bytes) -> Optional[bytes]:
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._end_auth()
            self._error(AUTH_NOT_BASE64)
            return None

    def _auth_step(self, response: Optional[bytes]):
        try:
            step = self._mechanism.step(response)
        except sasl.SaslError as e:
            self._end_auth()
            return self._error(e.reply)
        if isinstance(step, sasl.Challenge):
            self.mode = AUTH
            return self._send(Reply(334, "", base64.b64encode(step.data).decode("ascii")))
        self._end_auth()
        d = defer.maybeDeferred(self.portal.login, step, None, twisted_smtp.IMessageDelivery)
        d.addCallbacks(self._authenticated, self._auth_failed)
        if not self._busy:  # a response line; an initial response is inside AUTH's own wait
            self._wait_for(d)
        return d

    def _end_auth(self):
        self._mechanism = None
        if self.mode == AUTH:
            self.mode = COMMAND

    def _authenticated(self, login):
        _iface, avatar, _logout = login
        # the user is a fact of the session: ConnectionClosed and the message lines carry it
        self.session.auth_user = getattr(avatar, "username", str(avatar))
        self._send(AUTH_OK)

    def _auth_failed(self, failure):
        if not failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            log.error("queue_id=%s client=%s auth=error %s", self.session.queue_id, self.session.peer_ip,
                      failure.getErrorMessage())
            return self._send(AUTH_UNAVAILABLE)
        self._auth_failures += 1
        log.info("queue_id=%s client=%s auth=failed failures=%d", self.session.queue_id, self.session.peer_ip,
                 self._auth_failures)
        settings = self.runtime.config.auth
        counted = self.factory.auth_guard.failed(self.session.ip, settings)
        counted.addErrback(lambda f: log.error("queue_id=%s auth failure count not stored: %s",
                                               self.session.queue_id, f.getErrorMessage()))
        delayed = defer.Deferred()
        self.clock.callLater(settings.failure_delay, delayed.callback, None)
        return delayed.addCallback(self._auth_failure_answered, settings.max_failures)

    def _auth_failure_answered(self, _, max_failures: int):
        self._send(AUTH_FAILED)
        if self._auth_failures >= max_failures:
            self._send(sasl.TOO_MANY_FAILURES)
            self._close("too many auth failures")

    # --- transaction commands --------------------------------------------------

    def _parse_path(self, text: str, keyword: str, bad_address: Reply, utf8: bool,
                    postmaster_domain: Optional[str] = None):
        """The path of MAIL FROM / RCPT TO, or None once the error is answered."""
        try:
            return addr.parse_path(text, keyword, allow_null=keyword == "FROM", utf8=utf8,
                                   postmaster_domain=postmaster_domain)
        except addr.AddressError as e:
            what = str(e)
            if what == "syntax":
                verb = "MAIL" if keyword == "FROM" else "RCPT"
                self._error(Reject(501, "5.5.4", f"Syntax: {verb} {keyword}:<address>"))
            elif what.startswith("parameter"):
                self._send(Reject(555, "5.5.4", f"Unsupported option: {what[10:]}"))
            elif what == "needs SMTPUTF8":
                self._error(NEEDS_SMTPUTF8)
            else:
                self._error(bad_address)
            return None

    def smtp_MAIL(self, text):
        if self.session.helo is None:
            return self._send(BAD_SEQUENCE_HELO)
        if self.envelope is not None:
            return self._send(NESTED_MAIL)
        path = self._parse_path(text, "FROM", BAD_SENDER, utf8=self.session.esmtp)
        if path is None:
            return None
        reply = self._mail_params(path.params)
        if reply is None and not path.address.isascii() and "SMTPUTF8" not in path.params:
            reply = NEEDS_SMTPUTF8
        if reply is not None:
            return self._send(reply)
        self.session.transactions += 1
        qid = self.session.queue_id if self.session.transactions == 1 else new_queue_id()
        self._txn = Transaction(self.session, Envelope(queue_id=qid, sender=path.address, sender_params=path.params,
                                                       smtputf8="SMTPUTF8" in path.params))
        d = self._pre_mail.addCallback(lambda _: self.runner.judge_mail(self._txn))
        self._pre_mail = defer.succeed(None)
        return d.addCallback(self._mail_judged)

    def _mail_params(self, params: dict) -> Optional[Reply]:
        for key, value in params.items():
            if key == "SIZE":
                if not (value or "").isdigit():
                    return Reject(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.runtime.config.server.max_message_size:
                    return MESSAGE_TOO_BIG
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return Reject(501, "5.5.4", "Unsupported BODY type")
            elif key == "SMTPUTF8":
                if value is not None or not self.session.esmtp:
                    return Reject(501, "5.5.4", "Bad SMTPUTF8 parameter")
            elif key != "AUTH":
                return Reject(555, "5.5.4", f"Unsupported option: {key}")
        return None

    def _mail_judged(self, refusal: Optional[Reply]):
        if refusal is not None:
            self._reset_transaction()
            return self._send(refusal)
        self._send(Reply(250, "2.1.0", "Ok"))

    def _postmaster_domain(self) -> str:
        domains = self.runtime.config.relay.domains
        return domains[0] if domains else self.host

    def smtp_RCPT(self, text):
        if self.envelope is None:
            return self._send(BAD_SEQUENCE_MAIL)
        path = self._parse_path(text, "TO", BAD_RECIPIENT, utf8=self.envelope.smtputf8,
                                postmaster_domain=self._postmaster_domain())
        if path is None:
            return None
        if path.params:
            return self._send(Reject(555, "5.5.4", f"Unsupported option: {next(iter(path.params))}"))
        if len(self.envelope.recipients) >= self.runtime.config.server.max_recipients:
            return self._send(TOO_MANY_RECIPIENTS)
        mailbox = path.mailbox
        if path.had_route or not addr.relay_allowed(mailbox, self.runtime.local_domains, self.session.may_relay):
            if not (path.had_route and self.session.may_relay):
                denied = Reject(554, "5.7.1", f"<{mailbox.address}>: Relay access denied")
                return self._send(self.runner.refuse(self.session, self.envelope, denied, "rcpt", mailbox.address))
        rcpt = Recipient(mailbox.address, mailbox.domain)
        envelope = self.envelope
        txn = Transaction(self.session, envelope, rcpt=rcpt, state=self._txn.state)
        return self.runner.judge_rcpt(txn).addCallback(self._rcpt_judged, envelope, rcpt)

    def _rcpt_judged(self, refusal: Optional[Reply], envelope: Envelope, rcpt: Recipient):
        if refusal is not None:
            return self._send(refusal)
        envelope.recipients.append(rcpt)
        self._send(Reply(250, "2.1.5", "Ok"))

    def smtp_DATA(self, text):
        if self.envelope is None:
            return self._send(BAD_SEQUENCE_MAIL)
        if not self.envelope.recipients:
            return self._send(NO_RECIPIENTS)
        if text:
            return self._send(Reject(501, "5.5.4", "Syntax: DATA"))
        self.mode = DATA
        # the terminator is CRLF.CRLF; a CRLF in front lets ".\r\n" end an empty message
        self._data, self._data_oversize = bytearray(b"\r\n"), False
        self._data_started = self.clock.seconds()
        self._send(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))
        self._expect_input()
        return None

    # --- DATA ----------------------------------------------------------------

    def _data_step(self) -> bool:
        """Move input into the message until the terminator.  True when it was found."""
        data = self._data
        searched = max(0, len(data) - 4)  # the terminator may straddle the previous chunk
        with memoryview(self._buf) as view:
            data += view[self._pos:]
        self._pos = len(self._buf)
        end = data.find(b"\r\n.\r\n", searched)
        if end < 0:
            if len(data) > self.runtime.config.server.max_message_size + DATA_SLACK:
                # too big: keep reading, but only the tail that may hold the start of the terminator
                self._data_oversize = True
                del data[:-4]
            return False
        # what followed the terminator is the next pipelined command: read on at once
        if self._coalesce_call is not None:
            self._coalesce_call.cancel()
            self._coalesce_call = None
        self._pos -= len(data) - (end + 5)
        content = bytes(memoryview(data)[2:end + 2])
        self._data = bytearray()
        self.mode = COMMAND
        self._wait_for(defer.maybeDeferred(self._message_received, content).addBoth(self._after_message))
        return True

    def _after_message(self, result):
        self._reset_transaction()
        return result

    def _message_received(self, content: bytes):
        txn = self._txn
        oversize = self._data_oversize or len(content) > self.runtime.config.server.max_message_size
        if oversize:
            return self._send(self.runner.refuse(self.session, txn.envelope, MESSAGE_TOO_BIG, "data"))
        self.runner.message(txn, _unstuff(content), self._conn_state.get("rdns"))
        d = self.runner.judge(txn)
        d.addCallback(lambda verdict: self.runner.commit(txn, verdict))
        return d.addCallback(self._committed)

    def _committed(self, reply: Optional[Reply]):
        if reply is not None:
            self._send(reply)

    @property
    def envelope(self) -> Optional[Envelope]:
        return self._txn.envelope if self._txn is not None else None

    def _reset_transaction(self):
        self._txn = None


class GatewayFactory(protocol.ServerFactory):
    """Shared by all connections: the current runtime, limits and the queue.

    A reload swaps ``runtime``, ``portal`` and ``tls_context``; each session
    keeps those it started with.
    """

    noisy = False

    def __init__(self, runtime, reactor, enqueue: Callable, quarantine: Callable, auth_guard,
                 portal=None, tls_context=None, events=None):
        self.runtime = runtime
        self.reactor = reactor
        self.enqueue = enqueue  # (QueueEntry, bytes) -> Deferred, fires once durable
        self.quarantine = quarantine  # (QueueEntry, bytes, Verdict) -> Deferred
        self.portal = portal
        self.tls_context = tls_context
        self.auth_guard = auth_guard  # sasl.AuthGuard: failures per client address
        self.events = events if events is not None else default_sink()
        self.connections: set[SMTPServer] = set()
        self.per_ip: dict[str, int] = {}

    def buildProtocol(self, addr_):
        return SMTPServer(self)

    def admit(self, p: SMTPServer) -> bool:
        server = p.runtime.config.server
        ip = str(p.session.ip)
        if len(self.connections) >= server.max_connections or self.per_ip.get(ip, 0) >= server.max_connections_per_ip:
            log.info("client=%s refused=too many connections (total=%d from_ip=%d)", ip,
                     len(self.connections), self.per_ip.get(ip, 0))
            return False
        self.connections.add(p)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, p: SMTPServer) -> None:
        if p in self.connections:
            self.connections.discard(p)
            ip = str(p.session.ip)
            n = self.per_ip.get(ip, 1) - 1
            if n <= 0:
                self.per_ip.pop(ip, None)
            else:
                self.per_ip[ip] = n

