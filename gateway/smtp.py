"""The ESMTP front door, built on Twisted's ``twisted.mail.smtp.ESMTP``.

Twisted's class gives us the transport plumbing, the idle timeout
(``TimeoutMixin``), STARTTLS and the SASL challengers.  We take over command
dispatch so that:

- commands are handled strictly one at a time, in order, even when the
  client pipelines and a check answers asynchronously (RFC 2920);
- every reply carries an enhanced status code (RFC 3463), and this module is
  the one place where typed outcomes become reply lines;
- the message is judged at end of DATA and 250 is sent only once it is
  durably spooled.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import Callable, Optional

from twisted.cred import error as cred_error
from twisted.internet import defer, protocol
from twisted.mail import smtp
from twisted.python.failure import Failure

from gateway import address as addr
from gateway.errors import Reject, Reply, TempFail
from gateway.headers import received_header
from gateway.records import Action, Envelope, Message, Recipient, Result, Session, Stage, Transaction
from gateway.spool import QueueEntry, RecipientState, new_queue_id

log = logging.getLogger("mailgate.smtp")
msglog = logging.getLogger("mailgate.message")

MAX_COMMAND_LINE = 1000  # octets including CRLF, RFC 5321 4.5.3.1.4
MAX_BAD_COMMANDS = 20  # then 421, as Postfix's smtpd_hard_error_limit

# Reply texts used in more than one place; codes per RFC 5321 / 3463.
BAD_SEQUENCE_HELO = Reject(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_MAIL = Reject(503, "5.5.1", "Error: need MAIL command")
NESTED_MAIL = Reject(503, "5.5.1", "Error: nested MAIL command")
NO_RECIPIENTS = Reject(554, "5.5.1", "Error: no valid recipients")
UNKNOWN_COMMAND = Reject(500, "5.5.1", "Error: command not recognized")
LINE_TOO_LONG = Reject(500, "5.5.2", "Error: line too long")
BARE_LF = Reject(500, "5.5.2", "Error: bare <LF> received")
NUL_IN_COMMAND = Reject(500, "5.5.2", "Error: NUL character in command")
TOO_MANY_RECIPIENTS = TempFail(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reject(552, "5.3.4", "Error: message size exceeds fixed limit")
RELAY_DENIED = Reject(554, "5.7.1", "Relay access denied")
BAD_SENDER = Reject(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reject(501, "5.1.3", "Bad recipient address syntax")
TOO_MANY_CONNECTIONS = TempFail(421, "4.7.0", "Error: too many connections, try again later")
TOO_MANY_ERRORS = TempFail(421, "4.7.0", "Error: too many errors")
IDLE_TIMEOUT = TempFail(421, "4.4.2", "Error: timeout exceeded")
SHUTTING_DOWN = TempFail(421, "4.3.2", "Service shutting down, try again later")
SPOOL_TROUBLE = TempFail(451, "4.3.0", "Error: queue file write error, try again later")
INTERNAL_ERROR = TempFail(451, "4.3.0", "Internal error, try again later")
ENCRYPTION_REQUIRED = Reject(538, "5.7.11", "Encryption required for requested authentication mechanism")

# Twisted's STARTTLS/AUTH code calls sendCode itself; these are the enhanced
# codes its replies deserve.
_TWISTED_CODES = {220: "2.0.0", 235: "2.7.0", 454: "4.7.0", 501: "5.5.4", 503: "5.5.1",
                  504: "5.5.4", 535: "5.7.8", 451: "4.3.0"}
_ENHANCED = re.compile(rb"^\d\.\d{1,3}\.\d{1,3}( |$)")
_HTTP_VERBS = {b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS"}
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")

COMMAND, DATA, AUTH, CLOSED = "COMMAND", "DATA", "AUTH", "CLOSED"


class GatewaySMTP(smtp.ESMTP):
    """One per connection.  ``factory`` is the ``GatewayFactory``."""

    def __init__(self, factory: "GatewayFactory"):
        super().__init__(chal=dict(factory.challengers), contextFactory=factory.tls_context)
        self.factory = factory
        self.callLater = factory.reactor.callLater  # TimeoutMixin's clock: injectable
        self.portal = factory.portal
        self.runtime = factory.runtime  # a snapshot: a reload never changes a session midway
        self.host = self.runtime.config.server.hostname.encode()
        self.timeout = self.runtime.config.server.idle_timeout
        self.mode = COMMAND
        self._buf = b""
        self._busy = False
        self._in_process = False
        self._greeted = False
        self._early_talker = False
        self._skipping_long_line = False
        self._data_oversize = False
        self._bad_commands = 0
        self.session: Optional[Session] = None
        self.envelope: Optional[Envelope] = None
        self._txn: Optional[Transaction] = None
        self._pre_mail: defer.Deferred = defer.succeed(None)
        self._greet_call = None
        self._conn_state: dict = {}  # what connect/helo checks learned (e.g. the verified rDNS name)

    # --- connection ----------------------------------------------------------

    def connectionMade(self):
        peer, local = self.transport.getPeer(), self.transport.getHost()
        self.canStartTLS = self.ctx is not None and hasattr(self.transport, "startTLS")
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
        self.setTimeout(self.timeout)
        connect = self._run_stage(Stage.CONNECT, Transaction(self.session, state=self._conn_state))
        connect.addCallback(self.session.results.extend)
        self._pre_mail = connect
        pause = self.runtime.config.server.greet_pause
        if pause > 0:
            self._greet_call = self.factory.reactor.callLater(pause, self._greet)
        else:
            self._greet()

    def _greet(self):
        self._greet_call = None
        if self._early_talker:
            log.info("queue_id=%s client=%s early_talker=yes", self.session.queue_id, self.session.peer_ip)
            self._send(self.runtime.scorer.refusals["early_talker"])
            self._close()
            return
        self._greeted = True
        self.sendLine(b"220 " + self.host + b" ESMTP MailGate")
        self._process()

    def connectionLost(self, reason=protocol.connectionDone):
        self.setTimeout(None)
        if self._greet_call is not None and self._greet_call.active():
            self._greet_call.cancel()
        if self.mode == DATA:
            log.info("queue_id=%s client=%s lost connection during DATA; nothing queued",
                     self.envelope.queue_id if self.envelope else "-", self.session.peer_ip)
        self.mode = CLOSED
        self._buf = b""
        self.factory.release(self)

    def timeoutConnection(self):
        self._send(IDLE_TIMEOUT)
        self._close()

    def _close(self):
        self.mode = CLOSED
        self.transport.loseConnection()

    # --- replies -------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        if self.transport is None or self.transport.disconnecting and self.mode == CLOSED:
            return
        self.transport.writeSequence([line + b"\r\n" for line in reply.lines()])

    def sendCode(self, code, message=b""):
        """Twisted's own STARTTLS/AUTH replies, given enhanced codes."""
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        enhanced = "" if code == 334 or _ENHANCED.match(message if isinstance(message, bytes) else b"") else \
            _TWISTED_CODES.get(code, f"{code // 100}.0.0")
        self._send(Reply(code, enhanced, text))

    # --- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes):
        if self.mode == CLOSED:
            return
        self.resetTimeout()
        if not self._greeted:
            self._early_talker = True
            self._buf += data
            return
        self._buf += data
        self._process()

    def _process(self):
        """Handle buffered input, one command at a time."""
        if self._in_process:
            return  # the loop below is already running further up the stack
        self._in_process = True
        try:
            self._process_loop()
        finally:
            self._in_process = False

    def _process_loop(self):
        while not self._busy and self.mode != CLOSED and self._buf:
            if self.mode == DATA:
                if not self._data_chunk():
                    return
                continue
            idx = self._buf.find(b"\r\n")
            if self._skipping_long_line:
                if idx < 0:
                    self._buf = b""
                    return
                self._buf = self._buf[idx + 2:]
                self._skipping_long_line = False
                continue
            if idx < 0:
                if len(self._buf) > MAX_COMMAND_LINE:
                    self._buf = b""
                    self._skipping_long_line = True
                    self._error(LINE_TOO_LONG)
                return
            line, self._buf = self._buf[:idx], self._buf[idx + 2:]
            if len(line) + 2 > MAX_COMMAND_LINE:
                self._error(LINE_TOO_LONG)
                continue
            if self.mode == AUTH:
                self.state_AUTH(line.strip())
                continue
            self._command(line)

    def _error(self, reply: Reply) -> None:
        self._bad_commands += 1
        if self._bad_commands >= MAX_BAD_COMMANDS:
            self._send(TOO_MANY_ERRORS)
            self._close()
        else:
            self._send(reply)

    def _command(self, line: bytes) -> None:
        if b"\x00" in line:
            return self._error(NUL_IN_COMMAND)
        if b"\n" in line or b"\r" in line:
            return self._error(BARE_LF)
        verb, _, rest = line.strip().partition(b" ")
        verb = verb.upper()
        if verb in _HTTP_VERBS or verb.endswith(b":"):
            # a web browser or proxy talking to us: cross-protocol abuse
            log.info("client=%s dropped=non-SMTP command %r", self.session.peer_ip, verb[:20])
            return self._close()
        handler = getattr(self, "smtp_" + verb.decode("ascii", "replace"), None)
        if handler is None:
            return self._error(UNKNOWN_COMMAND)
        try:
            text = rest.strip().decode("utf-8")
        except UnicodeDecodeError:
            return self._error(Reject(501, "5.5.2", "Error: non-UTF-8 characters in command"))
        try:
            result = handler(text)
        except Exception:
            log.exception("queue_id=%s command=%s failed", self.session.queue_id, verb)
            self._send(INTERNAL_ERROR)
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(self._internal_error)
            result.addBoth(self._unbusy)

    def _internal_error(self, failure: Failure):
        qid = self.envelope.queue_id if self.envelope else self.session.queue_id
        log.error("queue_id=%s error=%s", qid, failure.getErrorMessage(),
                  exc_info=(failure.type, failure.value, failure.getTracebackObject()))
        self._send(INTERNAL_ERROR)

    def _unbusy(self, _):
        self._busy = False
        if self.mode != CLOSED:
            self._process()

    # --- commands --------------------------------------------------------------

    def _extensions(self) -> list[str]:
        cfg = self.runtime.config.server
        ext = ["PIPELINING", f"SIZE {cfg.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.canStartTLS and not self.startedTLS:
            ext.append("STARTTLS")
        mechs = self._auth_mechanisms()
        if mechs and not self.authenticated:
            ext.append("AUTH " + " ".join(mechs))
        return ext

    def _auth_mechanisms(self) -> list[str]:
        if self.portal is None:
            return []
        plain_ok = self.startedTLS or self.session.is_loopback
        return [m for m in ("PLAIN", "LOGIN", "CRAM-MD5")
                if m.encode() in self.challengers and (plain_ok or m == "CRAM-MD5")]

    def _hello(self, text: str, esmtp: bool):
        if not text:
            return self._send(Reject(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
        self._reset_transaction()
        self.session.helo, self.session.esmtp = text.split()[0], esmtp
        helo = self._run_stage(Stage.HELO, Transaction(self.session, state=self._conn_state))
        helo.addCallback(self._helo_results)
        self._pre_mail = defer.gatherResults([self._pre_mail, helo])
        if esmtp:
            lines = [f"{self.host.decode()} Hello {text.split()[0]} [{self.session.peer_ip}]"] + self._extensions()
            self.transport.writeSequence(
                [f"250{'-' if i < len(lines) - 1 else ' '}{l}\r\n".encode() for i, l in enumerate(lines)]
            )
        else:
            self.sendLine(b"250 " + self.host)

    def _helo_results(self, records):
        # a repeated HELO replaces what the previous one earned
        self.session.results = [r for r in self.session.results if getattr(r, "_stage", None) != "helo"]
        self.session.results.extend(records)

    def smtp_HELO(self, text):
        return self._hello(text, esmtp=False)

    def smtp_EHLO(self, text):
        return self._hello(text, esmtp=True)

    def smtp_NOOP(self, text):
        self._send(Reply(250, "2.0.0", "Ok"))

    def smtp_RSET(self, text):
        self._reset_transaction()
        self._send(Reply(250, "2.0.0", "Ok"))

    def smtp_QUIT(self, text):
        self._send(Reply(221, "2.0.0", "Bye"))
        self._close()

    def smtp_VRFY(self, text):
        self._send(Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery"))

    def smtp_EXPN(self, text):
        self._send(Reject(502, "5.5.1", "Error: command not implemented"))

    smtp_BDAT = smtp_ETRN = smtp_TURN = smtp_EXPN

    def smtp_HELP(self, text):
        self._send(Reply(214, "2.0.0", "See RFC 5321"))

    def smtp_STARTTLS(self, text):
        if not self.canStartTLS or self.startedTLS:
            return self.ext_STARTTLS(text.encode())
        if text:
            return self._send(Reject(501, "5.5.4", "Syntax: STARTTLS"))
        # RFC 3207 4.2 and CVE-2011-0411: discard anything pipelined after
        # STARTTLS and forget everything learned before it.
        self._buf = b""
        self.ext_STARTTLS(b"")
        self.session.tls = True
        self.session.helo = None
        self._reset_transaction()

    def smtp_AUTH(self, text):
        if self.session.helo is None or not self.session.esmtp:
            return self._send(BAD_SEQUENCE_HELO)
        if self.envelope is not None:
            return self._send(Reject(503, "5.5.1", "Error: MAIL transaction in progress"))
        mech = text.split(" ", 1)[0].upper()
        if mech in ("PLAIN", "LOGIN") and not (self.startedTLS or self.session.is_loopback):
            return self._send(ENCRYPTION_REQUIRED)
        if mech not in self._auth_mechanisms():
            if self.authenticated:
                return self.ext_AUTH(text.encode())
            return self._send(Reject(504, "5.5.4", "Error: unsupported authentication mechanism"))
        self.ext_AUTH(text.encode())

    def state_AUTH(self, response):
        """Twisted's challenge/response step, with the login made awaitable
        so that pipelined commands wait for its outcome."""
        if self.portal is None:
            self.mode = COMMAND
            return self.sendCode(454, b"Temporary authentication failure")
        if response is None:
            return self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
        if response == b"*":
            self.mode = COMMAND
            return self._send(Reject(501, "5.7.0", "Authentication aborted"))
        try:
            decoded = base64.b64decode(response, validate=True)
        except (TypeError, binascii.Error):
            self.mode = COMMAND
            return self._send(Reject(501, "5.5.2", "Cannot decode response"))
        self.challenger.setResponse(decoded)
        if self.challenger.moreChallenges():
            return self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
        self.mode = COMMAND
        self._busy = True
        d = self.portal.login(self.challenger, None, smtp.IMessageDelivery)
        d.addCallbacks(self._authenticated, self._auth_failed)
        d.addBoth(self._unbusy)

    def _authenticated(self, login):
        _iface, avatar, _logout = login
        self.authenticated = True
        self.session.auth_user = getattr(avatar, "username", str(avatar))
        log.info("queue_id=%s client=%s auth=%s", self.session.queue_id, self.session.peer_ip,
                 self.session.auth_user)
        self._send(Reply(235, "2.7.0", "Authentication successful"))

    def _auth_failed(self, failure):
        if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            log.info("queue_id=%s client=%s auth=failed", self.session.queue_id, self.session.peer_ip)
            self._send(Reject(535, "5.7.8", "Error: authentication failed"))
        else:
            self._internal_error(failure)

    def _parse_path(self, text: str, keyword: str, bad_address: Reply):
        """The path of MAIL FROM / RCPT TO, or None once the error is answered."""
        try:
            return addr.parse_path(text, keyword, allow_null=keyword == "FROM")
        except addr.AddressError as e:
            what = str(e)
            if what == "syntax":
                verb = "MAIL" if keyword == "FROM" else "RCPT"
                self._error(Reject(501, "5.5.4", f"Syntax: {verb} {keyword}:<address>"))
            elif what.startswith("parameter"):
                self._send(Reject(555, "5.5.4", f"Unsupported option: {what[10:]}"))
            else:
                self._error(bad_address)
            return None

    def smtp_MAIL(self, text):
        if self.session.helo is None:
            return self._send(BAD_SEQUENCE_HELO)
        if self.envelope is not None:
            return self._send(NESTED_MAIL)
        path = self._parse_path(text, "FROM", BAD_SENDER)
        if path is None:
            return
        reply = self._mail_params(path.params)
        if reply is not None:
            return self._send(reply)
        self.session.transactions += 1
        qid = self.session.queue_id if self.session.transactions == 1 else new_queue_id()
        envelope = Envelope(queue_id=qid, sender=path.address, sender_params=path.params)
        self.envelope = envelope
        self._txn = Transaction(self.session, envelope)
        d = self._pre_mail.addCallback(lambda _: self._run_stage(Stage.MAIL, self._txn))
        self._pre_mail = defer.succeed(None)
        return d.addCallback(self._mail_judged, envelope)

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
            elif key != "AUTH":
                return Reject(555, "5.5.4", f"Unsupported option: {key}")
        return None

    def _mail_judged(self, records, envelope):
        envelope.results.extend(records)
        reply = self.runtime.scorer.decide_stage(records)
        if reply is not None:
            self._log_refusal(envelope, reply, "mail")
            self._reset_transaction()
            return self._send(reply)
        self._send(Reply(250, "2.1.0", "Ok"))

    def smtp_RCPT(self, text):
        if self.envelope is None:
            return self._send(BAD_SEQUENCE_MAIL)
        path = self._parse_path(text, "TO", BAD_RECIPIENT)
        if path is None:
            return
        if path.params:
            return self._send(Reject(555, "5.5.4", f"Unsupported option: {next(iter(path.params))}"))
        if len(self.envelope.recipients) >= self.runtime.config.server.max_recipients:
            return self._send(TOO_MANY_RECIPIENTS)
        mailbox = path.mailbox
        if path.had_route or not addr.relay_allowed(mailbox, self.runtime.local_domains, self.session.may_relay):
            if not (path.had_route and self.session.may_relay):
                self._log_refusal(self.envelope, RELAY_DENIED, "rcpt", mailbox.address)
                return self._send(Reject(554, "5.7.1", f"<{mailbox.address}>: Relay access denied"))
        rcpt = Recipient(mailbox.address, mailbox.domain)
        envelope = self.envelope
        txn = Transaction(self.session, envelope, rcpt=rcpt, state=self._txn.state)
        return self._run_stage(Stage.RCPT, txn).addCallback(self._rcpt_judged, envelope, rcpt)

    def _rcpt_judged(self, records, envelope, rcpt):
        if envelope is not self.envelope:  # RSET meanwhile: cannot happen while busy, but be safe
            return
        rcpt.results.extend(records)
        reply = self.runtime.scorer.decide_stage(list(self.session.results) + records)
        if reply is not None:
            self._log_refusal(envelope, reply, "rcpt", rcpt.address)
            return self._send(Reply(reply.code, reply.enhanced, f"<{rcpt.address}>: {reply.text}"))
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
        self._data_oversize = False
        self._data_start = True
        self._send(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))

    # --- DATA ----------------------------------------------------------------

    def _data_chunk(self) -> bool:
        """Look for the end of data in the buffer.  True when it was found."""
        buf = self._buf
        if self._data_start and buf.startswith(b".\r\n"):
            content, rest = b"", buf[3:]
        else:
            end = buf.find(b"\r\n.\r\n")
            if end < 0:
                if len(buf) > self.runtime.config.server.max_message_size + 4096:
                    # too big: keep reading, but only the tail that may hold
                    # the start of the terminator
                    self._data_oversize = True
                    self._data_start = False
                    self._buf = buf[-4:]
                return False
            content, rest = buf[: end + 2], buf[end + 5:]
        self._buf = rest
        self.mode = COMMAND
        oversize = self._data_oversize or len(content) > self.runtime.config.server.max_message_size
        self._busy = True
        d = defer.maybeDeferred(self._message_received, content, oversize)
        d.addErrback(self._internal_error)
        d.addBoth(self._after_message)
        d.addBoth(self._unbusy)
        return True

    def _after_message(self, _):
        self._reset_transaction()

    @staticmethod
    def _unstuff(content: bytes) -> bytes:
        if b"\n." in content or content.startswith(b"."):
            if content.startswith(b".."):
                content = content[1:]
            content = content.replace(b"\r\n..", b"\r\n.")
        if b"\x00" in content:
            content = content.replace(b"\x00", b"")
        if b"\r" in content.replace(b"\r\n", b"") or b"\n" in content.replace(b"\r\n", b""):
            content = _BARE_NEWLINE.sub(b"\r\n", content)
        return content

    def _message_received(self, content: bytes, oversize: bool):
        envelope = self.envelope
        if oversize:
            self._log_refusal(envelope, MESSAGE_TOO_BIG, "data")
            return self._send(MESSAGE_TOO_BIG)
        content = self._unstuff(content)
        envelope.size = len(content)
        rcpt = envelope.recipients[0].address if len(envelope.recipients) == 1 else None
        proto = ("ESMTP" if self.session.esmtp else "SMTP") + ("S" if self.session.tls else "") + \
            ("A" if self.session.auth_user else "")
        received = received_header(self.session.helo, self._conn_state.get("rdns"), self.session.peer_ip,
                                   self.host.decode(),
                                   envelope.queue_id, proto, rcpt, now=self.factory.reactor.seconds())
        message = Message(received + content)
        self._txn.message = message
        d = self._run_stage(Stage.DATA, self._txn)
        return d.addCallback(self._judged, envelope, message)

    def _all_records(self, envelope: Envelope, data_records: list) -> list:
        seen, rcpt_records = set(), []
        for r in envelope.recipients:
            for rec in r.results:
                key = getattr(rec, "symbol", None) or id(rec)
                if key not in seen:
                    seen.add(key)
                    rcpt_records.append(rec)
        return list(self.session.results) + list(envelope.results) + rcpt_records + list(data_records)

    def _judged(self, data_records, envelope, message):
        verdict = self.runtime.scorer.decide(self._all_records(envelope, data_records))
        self._after_verdict(verdict)
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            self._log_message(envelope, verdict, verdict.reply)
            return self._send(verdict.reply)
        extra = [r.header for r in verdict.results if isinstance(r, Result) and r.header]
        finished = self.runtime.finisher.finish(message.raw, verdict, extra, tag_subject=not self.session.may_relay)
        entry = QueueEntry(
            queue_id=envelope.queue_id, sender=envelope.sender,
            recipients=[RecipientState(r.address) for r in envelope.recipients],
            arrival=self.factory.reactor.seconds(), client=self.session.peer_ip,
            helo=self.session.helo or "", size=len(finished),
            verdict={"score": verdict.score, "action": verdict.action.value, "symbols": verdict.symbols},
        )
        if verdict.action == Action.QUARANTINE:
            d = self.factory.quarantine(entry, finished, verdict)
        else:
            d = self.factory.enqueue(entry, finished)
        return d.addCallbacks(self._queued, self._spool_failed, callbackArgs=(envelope, verdict),
                              errbackArgs=(envelope, verdict))

    def _after_verdict(self, verdict) -> None:
        """Checks that learn from the final verdict (Bayes autolearn) see it here;
        what they do never changes this message's reply."""
        txn = self._txn
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

    def _queued(self, _, envelope, verdict):
        reply = Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}")
        self._log_message(envelope, verdict, reply)
        self._send(reply)

    def _spool_failed(self, failure, envelope, verdict):
        log.error("queue_id=%s spool_error=%r", envelope.queue_id, failure.getErrorMessage())
        self._log_message(envelope, verdict, SPOOL_TROUBLE)
        self._send(SPOOL_TROUBLE)

    # --- helpers ---------------------------------------------------------------

    def _run_stage(self, stage: Stage, txn: Transaction) -> defer.Deferred:
        pipeline = self.runtime.pipeline
        if not pipeline.has(stage):
            return defer.succeed([])
        return pipeline.run(stage, txn)

    def _reset_transaction(self):
        self.envelope = None
        self._txn = None

    def _log_refusal(self, envelope, reply: Reply, stage: str, rcpt: str = "") -> None:
        msglog.info(
            "queue_id=%s client=%s helo=%s from=<%s>%s stage=%s action=refused reply=\"%s\"",
            envelope.queue_id if envelope else self.session.queue_id, self.session.peer_ip,
            self.session.helo or "-", envelope.sender if envelope else "", f" to=<{rcpt}>" if rcpt else "",
            stage, reply,
        )

    def _log_message(self, envelope, verdict, reply: Reply) -> None:
        failures = ",".join(f"{f.check}:{f.reason}" for f in verdict.failures)
        msglog.info(
            "queue_id=%s client=%s helo=%s from=<%s> to=%s size=%d score=%.1f symbols=%s action=%s"
            "%s reply=\"%s\"",
            envelope.queue_id, self.session.peer_ip, self.session.helo or "-", envelope.sender,
            ",".join(f"<{r.address}>" for r in envelope.recipients), envelope.size, verdict.score,
            ",".join(verdict.symbols) or "-", verdict.action.value,
            f" failed={failures}" if failures else "", reply,
        )


class GatewayFactory(protocol.ServerFactory):
    """Shared by all connections: the current runtime, limits and the queue."""

    noisy = False

    def __init__(self, runtime, reactor, enqueue: Callable, quarantine: Callable,
                 portal=None, challengers=None, tls_context=None):
        self.runtime = runtime
        self.reactor = reactor
        self.enqueue = enqueue  # (QueueEntry, bytes) -> Deferred, fires once durable
        self.quarantine = quarantine  # (QueueEntry, bytes, Verdict) -> Deferred
        self.portal = portal
        self.challengers = challengers or {}
        self.tls_context = tls_context
        self.connections: set[GatewaySMTP] = set()
        self.per_ip: dict[str, int] = {}

    def buildProtocol(self, addr_):
        p = GatewaySMTP(self)
        return p

    def admit(self, p: GatewaySMTP) -> bool:
        server = p.runtime.config.server
        ip = str(p.session.ip)
        if len(self.connections) >= server.max_connections or self.per_ip.get(ip, 0) >= server.max_connections_per_ip:
            log.info("client=%s refused=too many connections (total=%d from_ip=%d)", ip,
                     len(self.connections), self.per_ip.get(ip, 0))
            return False
        self.connections.add(p)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return True

    def release(self, p: GatewaySMTP) -> None:
        if p in self.connections:
            self.connections.discard(p)
            ip = str(p.session.ip)
            n = self.per_ip.get(ip, 1) - 1
            if n <= 0:
                self.per_ip.pop(ip, None)
            else:
                self.per_ip[ip] = n
