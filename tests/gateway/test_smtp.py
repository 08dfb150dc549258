"""The ESMTP front door driven with bytes over StringTransport, time with Clock."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from gateway.config import validate
from gateway.events import ConnectionClosed, ConnectionOpened, EventSink, LogLine, MessageAnswered, StageRefused
from gateway.headers import Finisher
from gateway.pipeline import Pipeline
from gateway.plugins import Check
from gateway.records import Result, Stage
from gateway.runtime import Runtime
from gateway.sasl import AuthGuard
from gateway.smtp import GatewayFactory
from gateway.store import MemoryStore
from rules.gtube import GTUBE, Gtube
from rules.scoring import Scorer

GREETING = b"220 "
OK = b"250 "
OK_MAIL = b"250 2.1.0"
OK_RCPT = b"250 2.1.5"
START_DATA = b"354 "
QUEUED = b"250 2.0.0 Ok: queued as"
BAD_SEQUENCE = b"503 5.5.1"
NO_VALID_RCPT = b"554 5.5.1"
UNKNOWN = b"500 5.5.1"
TOO_LONG = b"500 5.5.2"
BAD_RCPT_SYNTAX = b"501 5.1.3"
BAD_SENDER_SYNTAX = b"501 5.1.7"
TOO_BIG = b"552 5.3.4"
TOO_MANY_RCPTS = b"452 4.5.3"
RELAY_DENIED = b"554 5.7.1"
SPAM_REFUSED = b"554 5.7.1 Message refused as spam"
TOO_MANY_CONN = b"421 4.7.0"
TIMEOUT = b"421 4.4.2"
INTERNAL = b"451 4.3.0"

HAM = (b"From: a@sender.test\r\nTo: bob@example.test\r\nSubject: hello\r\n"
       b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\nHi Bob.\r\n")


def make_config(auth=None, **server):
    data = {
        "server": {"hostname": "mx.example.test", "max_message_size": 2000, "max_recipients": 3,
                   "max_connections_per_ip": 2, "idle_timeout": 60, **server},
        "relay": {"domains": ["example.test"], "trusted_networks": ["10.0.0.0/8"]},
        "spam": {"threshold": 5.0, "reject_threshold": 15.0},
        "auth": auth or {},
    }
    return validate(data, {})


class Boom(Check):
    name, stage = "boom", Stage.DATA

    def check(self, txn):
        raise RuntimeError("check exploded")


class SlowRcpt(Check):
    """Answers later, out of order: the second recipient's answer comes first."""

    name, stage = "slow_rcpt", Stage.RCPT

    def __init__(self):
        self.pending = []

    def check(self, txn):
        d = defer.Deferred()
        self.pending.append((txn.rcpt.address, d))
        return d


class Harness:
    def __init__(self, checks=(Gtube(),), peer="192.0.2.10", auth=None, deadlines=None, **server):
        config = make_config(auth=auth, **server)
        self.clock = task.Clock()
        pipeline = Pipeline(list(checks), deadlines, self.clock if deadlines else None)
        self.runtime = Runtime(config, pipeline, Scorer.from_config(config),
                               Finisher(config.server.hostname, config.spam.subject_tag),
                               frozenset(config.relay.domains),
                               tuple(ipaddress.ip_network(n) for n in config.relay.trusted_networks))
        self.queued = []
        # the failure count per address in a memory store on the test's clock; its
        # coroutines finish at once, so ensureDeferred runs them without a loop
        self.store = MemoryStore(clock=self.clock.seconds)
        self.events = []  # everything told, beside the log line
        self.factory = GatewayFactory(self.runtime, self.clock, enqueue=self._enqueue, quarantine=self._enqueue,
                                      auth_guard=AuthGuard(self.store, defer.ensureDeferred),
                                      events=EventSink([self.events.append, LogLine()]))
        self.peer = peer

    def _enqueue(self, entry, data, *verdict):
        self.queued.append((entry, data))
        return defer.succeed(entry.queue_id)

    def connect(self, peer=None):
        proto = self.factory.buildProtocol(None)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer or self.peer, 40000),
                                       hostAddress=IPv4Address("TCP", "192.0.2.1", 25))
        proto.makeConnection(transport)
        return Client(proto, transport)


class TLSStringTransport(StringTransport):
    """StringTransport that records STARTTLS instead of negotiating it."""

    tls_started_with = None

    def startTLS(self, context):
        self.tls_started_with = context


class Client:
    def __init__(self, proto, transport):
        self.proto, self.transport = proto, transport

    def send(self, data: bytes) -> list[bytes]:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.replies()

    def replies(self) -> list[bytes]:
        return [l for l in self.transport.value().split(b"\r\n") if l]

    def cmd(self, line: bytes) -> bytes:
        replies = self.send(line + b"\r\n")
        return replies[-1] if replies else b""

    def transaction(self, rcpts=(b"bob@example.test",), body=HAM, sender=b"a@sender.test") -> bytes:
        assert self.cmd(b"MAIL FROM:<" + sender + b">").startswith(OK_MAIL)
        for r in rcpts:
            assert self.cmd(b"RCPT TO:<" + r + b">").startswith(OK_RCPT)
        assert self.cmd(b"DATA").startswith(START_DATA)
        return self.send(body + b".\r\n")[-1]


@pytest.fixture
def h():
    return Harness()


@pytest.fixture
def c(h):
    client = h.connect()
    assert client.transport.value().startswith(GREETING)
    assert client.cmd(b"EHLO client.sender.test").startswith(b"250 ")
    return client


def test_ehlo_offers_the_extensions(h):
    client = h.connect()
    replies = client.send(b"EHLO client.sender.test\r\n")
    assert replies[0].startswith(b"250-mx.example.test")
    assert {b"250-PIPELINING", b"250-SIZE 2000", b"250-8BITMIME", b"250 ENHANCEDSTATUSCODES"} <= set(replies)
    assert not any(b"AUTH" in r or b"STARTTLS" in r for r in replies)  # no users file, no certificate


def test_ham_is_queued_with_our_received_header_and_unchanged_body(h, c):
    assert c.transaction().startswith(QUEUED)
    entry, data = h.queued[0]
    assert data.startswith(b"Received: from client.sender.test ([192.0.2.10])")
    assert entry.queue_id.encode() in data.split(b"\r\n\r\n")[0]
    assert data.endswith(b"\r\n\r\nHi Bob.\r\n")
    assert b"X-Spam-Status: No, score=0.0 required=5.0" in data
    assert entry.sender == "a@sender.test" and [r.address for r in entry.recipients] == ["bob@example.test"]


def test_gtube_is_refused_and_nothing_queued(h, c):
    body = HAM.replace(b"Hi Bob.", GTUBE)
    assert c.transaction(body=body).startswith(SPAM_REFUSED)
    assert h.queued == []


def test_mail_before_helo_is_a_bad_sequence(h):
    client = h.connect()
    assert client.cmd(b"MAIL FROM:<a@sender.test>").startswith(BAD_SEQUENCE)


def test_rcpt_before_mail_and_data_before_rcpt(c):
    assert c.cmd(b"RCPT TO:<bob@example.test>").startswith(BAD_SEQUENCE)
    assert c.cmd(b"DATA").startswith(BAD_SEQUENCE)
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(OK_MAIL)
    assert c.cmd(b"DATA").startswith(NO_VALID_RCPT)
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(BAD_SEQUENCE)  # nested MAIL


def test_unknown_command(c):
    assert c.cmd(b"FROB x").startswith(UNKNOWN)


def test_command_line_over_1000_octets(c):
    assert c.cmd(b"NOOP " + b"x" * 1000).startswith(TOO_LONG)
    # a line that never ends is cut off too, and the session goes on
    assert c.send(b"NOOP " + b"y" * 3000)[-1].startswith(TOO_LONG)
    assert c.send(b"rest of that long line\r\n") == []  # skipped, not taken as a command
    assert c.cmd(b"NOOP").startswith(b"250 2.0.0")


def test_bad_address_syntax(c):
    assert c.cmd(b"MAIL FROM:<a b@sender.test>").startswith(BAD_SENDER_SYNTAX)
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(OK_MAIL)
    for bad in (b"<bob@@example.test>", b"<bob>", b"<bob@exa mple.test>", b"<user@other.test@example.test>",
                b"<bob@[999.1.1.1]>"):
        assert c.cmd(b"RCPT TO:" + bad).startswith(BAD_RCPT_SYNTAX), bad


def test_size_parameter_too_big_at_mail(c):
    assert c.cmd(b"MAIL FROM:<a@sender.test> SIZE=999999").startswith(TOO_BIG)
    assert c.cmd(b"MAIL FROM:<a@sender.test> SIZE=100").startswith(OK_MAIL)


def test_data_over_max_size_is_refused_and_not_queued(h, c):
    body = HAM + b"x" * 70 + b"\r\n" * 1 + (b"y" * 76 + b"\r\n") * 60
    assert c.transaction(body=body).startswith(TOO_BIG)
    assert h.queued == []
    assert c.transaction().startswith(QUEUED)  # the session still works


def test_too_many_recipients(c):
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(OK_MAIL)
    for i in range(3):
        assert c.cmd(b"RCPT TO:<u%d@example.test>" % i).startswith(OK_RCPT)
    assert c.cmd(b"RCPT TO:<u9@example.test>").startswith(TOO_MANY_RCPTS)


@pytest.mark.parametrize("rcpt", [
    b"<user@other.test>", b"<user%other.test@example.test>", b"<other.test!user@example.test>",
    b'<"user@other.test"@example.test>', b"<@example.test:user@other.test>", b"<user@other.test.>",
    b"<user@[192.0.2.1]>", b"<USER@OTHER.TEST>", b"<user@example.test.other.test>",
])
def test_open_relay_tricks_are_refused(c, rcpt):
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(OK_MAIL)
    assert c.cmd(b"RCPT TO:" + rcpt).startswith(RELAY_DENIED)


def test_our_domain_mixed_case_and_trailing_dot_is_ours(h, c):
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(OK_MAIL)
    assert c.cmd(b"RCPT TO:<Bob@EXAMPLE.test.>").startswith(OK_RCPT)


def test_trusted_network_may_relay():
    h = Harness(peer="10.1.2.3")
    c = h.connect()
    c.cmd(b"EHLO exchange.example.test")
    assert c.transaction(rcpts=(b"someone@other.test",)).startswith(QUEUED)


def test_nul_and_bare_lf_in_commands(c):
    assert c.cmd(b"NOOP\x00").startswith(TOO_LONG)
    assert c.cmd(b"NOOP\nMAIL FROM:<a@b.test>").startswith(TOO_LONG)


def test_bare_lf_and_nul_in_data_are_normalised(h, c):
    body = HAM.replace(b"Hi Bob.\r\n", b"line one\nline.\n.\nnul\x00here\r\n")
    assert c.transaction(body=body).startswith(QUEUED)
    data = h.queued[0][1]
    assert b"line one\r\nline.\r\n.\r\nnulhere\r\n" in data
    assert b"\x00" not in data


def test_dot_stuffing_is_undone(h, c):
    body = HAM.replace(b"Hi Bob.\r\n", b"..leading dot\r\n...\r\n")
    c.transaction(body=body)
    assert h.queued[0][1].endswith(b"\r\n\r\n.leading dot\r\n..\r\n")


def test_pipelined_recipients_are_answered_in_order():
    slow = SlowRcpt()
    h = Harness(checks=[slow])
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    c.transport.clear()
    c.proto.dataReceived(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<one@example.test>\r\n"
                         b"RCPT TO:<two@example.test>\r\nDATA\r\n")
    assert c.replies() == [b"250 2.1.0 Ok"]
    assert [a for a, _ in slow.pending] == ["one@example.test"]  # the second waits its turn
    slow.pending[0][1].callback([Result("ONE", 0.1)])
    slow.pending[1][1].callback([Result("TWO", 0.1)])
    assert [r[:9] for r in c.replies()] == [b"250 2.1.0", b"250 2.1.5", b"250 2.1.5", b"354 End d"]


def test_connection_limit_per_ip(h):
    first, _second = h.connect(), h.connect()
    third = h.connect()
    assert third.transport.value().startswith(TOO_MANY_CONN)
    assert third.transport.disconnecting
    first.proto.connectionLost(None)
    fourth = h.connect()
    assert fourth.transport.value().startswith(GREETING)


def test_idle_timeout_closes_with_421(h):
    c = h.connect()
    h.clock.advance(61)
    assert c.replies()[-1].startswith(TIMEOUT)
    assert c.transport.disconnecting


def test_disconnect_mid_data_queues_nothing(h, c):
    c.cmd(b"MAIL FROM:<a@sender.test>")
    c.cmd(b"RCPT TO:<bob@example.test>")
    c.cmd(b"DATA")
    c.send(HAM[:40])
    c.proto.connectionLost(None)
    assert h.queued == []


def test_a_check_that_raises_gives_451_and_queues_nothing():
    h = Harness(checks=[Boom()])
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    assert c.transaction().startswith(INTERNAL)
    assert h.queued == []


def test_early_talker_is_refused():
    h = Harness(greet_pause=2)
    c = h.connect()
    assert c.transport.value() == b""
    c.proto.dataReceived(b"EHLO spammer\r\n")
    h.clock.advance(2)
    assert c.replies()[-1].startswith(b"554 5.5.0")
    patient = h.connect()
    h.clock.advance(2)
    assert patient.transport.value().startswith(GREETING)


def test_http_request_is_dropped(h):
    c = h.connect()
    c.send(b"GET / HTTP/1.1\r\n")
    assert c.transport.disconnecting


def test_rset_clears_the_transaction(c):
    c.cmd(b"MAIL FROM:<a@sender.test>")
    assert c.cmd(b"RSET").startswith(b"250 2.0.0")
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(OK_MAIL)


def test_null_sender_is_accepted(h, c):
    assert c.transaction(sender=b"").startswith(QUEUED)
    assert h.queued[0][0].sender == ""


def test_a_spool_that_cannot_write_gives_451_not_250(h, c):
    def disk_full(entry, data, *verdict):
        return defer.fail(OSError(28, "No space left on device"))

    h.factory.enqueue = disk_full
    assert c.transaction().startswith(b"451 4.3.0 Error: queue file write error")
    h.factory.enqueue = h._enqueue
    assert c.transaction().startswith(QUEUED)  # the session goes on


# --- hardening (issue 10) -------------------------------------------------------

import base64  # noqa: E402

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from twisted.cred import checkers, portal as cred_portal  # noqa: E402
from twisted.mail import smtp as twisted_smtp  # noqa: E402

from gateway import smtp as protocol_module  # noqa: E402
from gateway.auth import AuthUser  # noqa: E402

AUTH_OK = b"235 2.7.0"
AUTH_FAILED = b"535 5.7.8"
AUTH_MALFORMED = b"501 5.5.2"
NEED_TLS = b"538 5.7.11"
AUTH_CLOSED = b"421 4.7.0"
BAD_HELO = b"501 5.5.4"
NEEDS_UTF8 = b"553 5.6.7"
TEMPFAIL = b"451 4.3.0"
TLS_READY = b"220 2.0.0"


class Never(Check):
    """A check that never answers, as behind a DNS server that drops queries."""

    def __init__(self, stage, name="never"):
        self.stage, self.name, self.calls = stage, name, 0

    def check(self, txn):
        self.calls += 1
        return defer.Deferred()


class Later(Check):
    """A check whose answer the test gives when it likes."""

    def __init__(self, stage, name="later"):
        self.stage, self.name, self.pending = stage, name, []

    def check(self, txn):
        d = defer.Deferred()
        self.pending.append(d)
        return d


class HeloScore(Check):
    name, stage = "helo_score", Stage.HELO

    def check(self, txn):
        return [Result("HELO_X", 3.0)]


class _Realm:
    def requestAvatar(self, avatar_id, mind, *interfaces):
        name = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        return twisted_smtp.IMessageDelivery, AuthUser(name), lambda: None


def with_auth(h):
    users = checkers.InMemoryUsernamePasswordDatabaseDontUse(alice=b"s3cret")
    h.factory.portal = cred_portal.Portal(_Realm(), [users])
    return h


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def plain(user=b"alice", password=b"s3cret") -> bytes:
    return b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + password)


def auth_harness(peer="127.0.0.1", **auth):
    h = with_auth(Harness(peer=peer, auth={"failure_delay": 1.0, **auth}))
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    return h, c


def test_a_pipelined_flood_behind_a_slow_check_stops_reading_at_the_backlog_cap():
    slow = Later(Stage.MAIL)
    h = Harness(checks=[slow])
    c = h.connect()
    c.cmd(b"EHLO flood.sender.test")
    c.transport.clear()
    c.proto.dataReceived(b"MAIL FROM:<x@never-answers.test>\r\n")
    chunk = b"NOOP\r\n" * (64 * 1024 // 6)
    reads = 0
    while c.transport.producerState != "paused" and reads < 10:
        c.proto.dataReceived(chunk)  # a real transport stops calling this once paused
        reads += 1
    assert c.transport.producerState == "paused" and reads == 1
    assert c.replies() == []  # everything waits for the MAIL check, in order
    slow.pending[0].callback([])
    replies = c.replies()
    assert replies[0].startswith(OK_MAIL)
    # one turn answers a bounded number of commands, then yields the reactor to other clients
    assert len(replies) - 1 == protocol_module.COMMANDS_PER_TURN
    assert c.proto._turn_call.active() and c.transport.producerState == "paused"
    h.clock.advance(0)  # the next turns (Clock runs them all; a reactor serves others in between)
    assert len(c.replies()) == 1 + len(chunk) // 6 and c.transport.producerState == "producing"
    assert c.cmd(b"NOOP").startswith(b"250 2.0.0")


def test_a_line_that_never_ends_is_not_kept_in_memory(c):
    for _ in range(20):
        c.proto.dataReceived(b"x" * 1024 * 1024)
        assert len(c.proto._buf) < 2 * 1024 * 1024
    assert c.send(b"\r\n") == []  # the end of the long line: skipped with it, not answered
    assert c.cmd(b"NOOP").startswith(b"250 2.0.0")


def test_dribbled_data_arrives_intact(h, c):
    c.cmd(b"MAIL FROM:<a@sender.test>")
    c.cmd(b"RCPT TO:<bob@example.test>")
    c.cmd(b"DATA")
    body = HAM + b".\r\n"
    for i in range(0, len(body), 7):  # the terminator straddles the chunks
        c.proto.dataReceived(body[i:i + 7])
    assert c.replies()[-1].startswith(QUEUED)
    assert h.queued[0][1].endswith(b"\r\n\r\nHi Bob.\r\n")


def in_data(h):
    """A client of ``h`` that has had its 354."""
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    c.cmd(b"MAIL FROM:<a@sender.test>")
    c.cmd(b"RCPT TO:<bob@example.test>")
    assert c.cmd(b"DATA").startswith(START_DATA)
    return c


def test_small_data_reads_pause_reading_so_the_kernel_gathers_the_next():
    h = Harness(max_message_size=200_000)
    c = in_data(h)
    c.proto.dataReceived(HAM[:400])
    assert c.transport.producerState == "producing"  # an ordinary message's small reads never wait
    h.clock.advance(1.0)
    c.proto.dataReceived(HAM[400:] + b"x" * protocol_module.COALESCE_AFTER + b"\r\n")  # 64 KiB in a second
    c.proto.dataReceived(b"y" * 400)
    assert c.transport.producerState == "paused"
    h.clock.advance(protocol_module.COALESCE_MAX)  # at 64 KiB/s 128 KiB take 2 s; no pause is that long
    assert c.transport.producerState == "producing"
    c.proto.dataReceived(b"x" * protocol_module.COALESCE_BELOW + b"\r\n")  # a big read: no pause
    assert c.transport.producerState == "producing"
    c.proto.dataReceived(b"the end\r\n.\r\n")  # small, but the end of DATA: the next command is read at once
    assert c.replies()[-1].startswith(QUEUED) and c.transport.producerState == "producing"


def test_a_fast_sender_waits_only_as_long_as_it_takes_to_send_what_gathers():
    h = Harness(max_message_size=2_000_000)
    c = in_data(h)
    c.proto.dataReceived(HAM + b"x" * 1_000_000 + b"\r\n")
    h.clock.advance(0.1)  # 1 MB in 0.1 s: 10 MB/s
    c.proto.dataReceived(b"y" * 400)
    assert c.transport.producerState == "paused"
    h.clock.advance(0.012)
    assert c.transport.producerState == "paused"
    h.clock.advance(0.002)  # 128 KiB at 10 MB/s: 13.1 ms
    assert c.transport.producerState == "producing"


class _SmallBufferSocket:
    def getsockopt(self, level, name):
        assert (level, name) == (socket.SOL_SOCKET, socket.SO_RCVBUF)
        return 16384


def test_what_gathers_during_a_pause_never_fills_the_socket_receive_buffer():
    h = Harness(max_message_size=2_000_000)
    c = in_data(h)
    c.transport.getHandle = _SmallBufferSocket
    c.proto.dataReceived(HAM + b"x" * 1_000_000 + b"\r\n")
    h.clock.advance(0.1)  # 10 MB/s
    c.proto.dataReceived(b"y" * 400)
    assert c.transport.producerState == "paused"
    h.clock.advance(0.001)  # half of 16 KiB at 10 MB/s: 0.8 ms
    assert c.transport.producerState == "producing"


def test_commands_pipelined_after_the_end_of_data_are_answered_in_order(h, c):
    c.cmd(b"MAIL FROM:<a@sender.test>")
    c.cmd(b"RCPT TO:<bob@example.test>")
    c.cmd(b"DATA")
    replies = c.send(HAM + b".\r\nMAIL FROM:<b@sender.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                     + HAM + b".\r\nQUIT\r\n")
    assert [r[:9] for r in replies] == [b"250 2.0.0", b"250 2.1.0", b"250 2.1.5", b"354 End d", b"250 2.0.0",
                                        b"221 2.0.0"]
    assert len(h.queued) == 2


def test_an_empty_message_ends_at_once(h, c):
    c.cmd(b"MAIL FROM:<a@sender.test>")
    c.cmd(b"RCPT TO:<bob@example.test>")
    c.cmd(b"DATA")
    assert c.send(b".\r\n")[-1].startswith(QUEUED)


def test_a_client_that_does_not_read_its_replies_is_not_read_either(c):
    c.proto.pauseProducing()  # what the transport does when its write buffer is full
    c.transport.clear()
    c.proto.dataReceived(b"NOOP\r\n" * 10)
    assert c.replies() == [] and c.transport.producerState == "paused"
    c.proto.resumeProducing()
    assert len(c.replies()) == 10 and c.transport.producerState == "producing"


def test_slowloris_in_command_mode_is_cut_at_the_deadline(h):
    c = h.connect()
    for byte in b"EHLO a-rather-long-name.slow.sender.test\r\n":
        c.proto.dataReceived(bytes([byte]))
        h.clock.advance(3)  # each byte in time, the line never complete in time
        if c.transport.disconnecting:
            break
    assert c.transport.disconnecting and c.replies()[-1].startswith(TIMEOUT)
    assert h.clock.seconds() <= 63


def test_slowloris_in_data_is_cut_at_the_deadline(h, c):
    c.cmd(b"MAIL FROM:<a@sender.test>")
    c.cmd(b"RCPT TO:<bob@example.test>")
    c.cmd(b"DATA")
    start = h.clock.seconds()
    while not c.transport.disconnecting and h.clock.seconds() - start < 600:
        c.proto.dataReceived(b"x")
        h.clock.advance(3)
    assert c.replies()[-1].startswith(TIMEOUT)
    assert h.clock.seconds() - start <= 63  # 60 s plus 1/500 s for each octet
    assert h.queued == []


def test_data_at_the_minimum_rate_may_take_longer_than_the_timeout():
    h = Harness(max_message_size=200_000)
    c = in_data(h)
    c.proto.dataReceived(HAM)
    for _ in range(120):  # 120 s at 600 octets a second: over the 60 s timeout, above 500 B/s
        c.proto.dataReceived(b"y" * 598 + b"\r\n")
        h.clock.advance(1)
    assert not c.transport.disconnecting
    assert c.send(b".\r\n")[-1].startswith(QUEUED)


def test_a_session_has_a_lifetime_however_busy_it_keeps():
    h = Harness(max_session_time=100)
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    while not c.transport.disconnecting and h.clock.seconds() < 200:
        c.cmd(b"NOOP")
        h.clock.advance(10)
    assert h.clock.seconds() == 100 and c.replies()[-1].startswith(b"421 4.4.2")


def test_a_check_past_its_deadline_is_a_tempfail_not_a_hung_session():
    hung = Never(Stage.RCPT)
    h = Harness(checks=[hung], deadlines={Stage.RCPT: 5.0})
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    c.cmd(b"MAIL FROM:<a@sender.test>")
    assert c.cmd(b"RCPT TO:<bob@example.test>") == b""
    h.clock.advance(5)
    assert c.replies()[-1].startswith(TEMPFAIL)
    assert c.cmd(b"NOOP").startswith(b"250 2.0.0")


@pytest.mark.parametrize("arg", [b"\xc2\xa0", b"\xe2\x80\x83", b"\x1c", b"\xc2\xa0 x", b"a\xe2\x80\x83b"])
def test_ehlo_with_a_unicode_space_or_control_is_a_syntax_error(h, arg):
    c = h.connect()
    assert c.cmd(b"EHLO " + arg).startswith(BAD_HELO)
    assert c.cmd(b"HELO " + arg).startswith(BAD_HELO)
    assert c.cmd(b"EHLO ok.sender.test").startswith(b"250 ")


def test_a_second_ehlo_replaces_the_first_ones_results_and_counts_them_once():
    h = Harness(checks=[HeloScore()])
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    c.cmd(b"EHLO client.sender.test")
    assert c.transaction().startswith(QUEUED)
    status = [l for l in h.queued[0][1].split(b"\r\n") if l.startswith(b"X-Spam-Status")][0]
    assert status.count(b"HELO_X=3") == 1


def test_no_message_is_spooled_for_a_client_that_left_during_its_checks():
    slow = Later(Stage.DATA)
    h = Harness(checks=[slow])
    c = in_data(h)
    c.send(HAM + b".\r\n")
    c.proto.connectionLost(None)
    slow.pending[0].callback([])
    assert h.queued == []


def test_postmaster_without_a_domain_is_accepted(h, c):
    assert c.transaction(rcpts=(b"Postmaster",)).startswith(QUEUED)
    assert [r.address for r in h.queued[0][0].recipients] == ["Postmaster@example.test"]


def test_smtputf8_is_offered_and_takes_utf8_addresses(h):
    c = h.connect()
    assert b"250-SMTPUTF8" in c.send(b"EHLO client.sender.test\r\n")
    assert c.cmd("MAIL FROM:<jörg@sender.test> SMTPUTF8".encode()).startswith(OK_MAIL)
    assert c.cmd("RCPT TO:<ü@example.test>".encode()).startswith(OK_RCPT)
    assert c.cmd(b"DATA").startswith(START_DATA)
    assert c.send(HAM + b".\r\n")[-1].startswith(QUEUED)
    entry, data = h.queued[0]
    assert entry.smtputf8 and entry.recipients[0].address == "ü@example.test"
    assert b" with UTF8SMTP id " in data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")


def test_a_utf8_address_without_smtputf8_is_refused_with_5_6_7(c):
    assert c.cmd("MAIL FROM:<jörg@sender.test>".encode()).startswith(NEEDS_UTF8)
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(OK_MAIL)
    assert c.cmd("RCPT TO:<ü@example.test>".encode()).startswith(NEEDS_UTF8)


# --- AUTH ---------------------------------------------------------------------------


def test_auth_plain_and_relaying(h):
    h, c = auth_harness()
    assert c.cmd(plain()).startswith(AUTH_OK)
    assert c.cmd(b"MAIL FROM:<alice@example.test>").startswith(OK_MAIL)
    assert c.cmd(b"RCPT TO:<someone@other.test>").startswith(OK_RCPT)


def test_auth_login_and_cram_md5_exchanges():
    import hmac

    h, c = auth_harness()
    assert c.cmd(b"AUTH LOGIN") == b"334 " + b64(b"Username:")
    assert c.cmd(b64(b"alice")) == b"334 " + b64(b"Password:")
    assert c.cmd(b64(b"s3cret")).startswith(AUTH_OK)
    h, c = auth_harness()
    challenge = base64.b64decode(c.cmd(b"AUTH CRAM-MD5")[4:])
    digest = hmac.new(b"s3cret", challenge, "md5").hexdigest().encode()
    assert c.cmd(b64(b"alice " + digest)).startswith(AUTH_OK)


def test_a_wrong_password_is_answered_after_the_failure_delay_and_three_close_the_session():
    h, c = auth_harness()
    for attempt in range(3):
        assert c.cmd(plain(password=b"wrong")) == b""  # nothing yet: the delay
        assert c.cmd(b"NOOP") == b""  # pipelined commands wait behind it
        h.clock.advance(1.0)
        replies = c.replies()
        assert replies[0].startswith(AUTH_FAILED)
        if attempt < 2:
            assert replies[1].startswith(b"250 2.0.0")
    assert replies[-1].startswith(AUTH_CLOSED) and c.transport.disconnecting


def test_a_client_address_that_failed_too_often_is_refused_on_new_connections():
    h, c = auth_harness(max_failures=10, max_client_failures=4)
    for _ in range(4):
        c.cmd(plain(password=b"wrong"))
        h.clock.advance(1.0)
    other = h.connect()
    other.cmd(b"EHLO client.sender.test")
    assert other.cmd(plain()).startswith(AUTH_CLOSED) and other.transport.disconnecting
    for gone in (c, other):
        gone.proto.connectionLost(None)
    h.clock.advance(3601)  # the window has passed
    third = h.connect()
    third.cmd(b"EHLO client.sender.test")
    assert third.cmd(plain()).startswith(AUTH_OK)


def test_starttls_forgets_auth_and_relaying_needs_a_new_auth():
    h, c = auth_harness()
    h.factory.tls_context = object()
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    assert c.cmd(plain()).startswith(AUTH_OK)
    assert c.send(b"STARTTLS\r\nMAIL FROM:<smuggled@x.test>\r\n") == [b"220 2.0.0 Ready to start TLS"]
    assert c.transport.tls_started_with is h.factory.tls_context
    assert c.cmd(b"MAIL FROM:<a@sender.test>").startswith(BAD_SEQUENCE)  # HELO forgotten too
    replies = c.send(b"EHLO client.sender.test\r\n")
    assert b"250 AUTH PLAIN LOGIN CRAM-MD5" in replies and b"250-STARTTLS" not in replies
    assert c.cmd(b"MAIL FROM:<alice@example.test>").startswith(OK_MAIL)
    assert c.cmd(b"RCPT TO:<someone@other.test>").startswith(RELAY_DENIED)


def test_no_mechanism_is_offered_to_a_remote_client_before_tls():
    h, c = auth_harness(peer="192.0.2.10")
    assert not any(b"AUTH" in r for r in c.send(b"EHLO client.sender.test\r\n"))
    for mech in (b"PLAIN", b"LOGIN", b"CRAM-MD5"):
        assert c.cmd(b"AUTH " + mech).startswith(NEED_TLS)


@pytest.mark.parametrize("exchange", [
    [b"AUTH PLAIN", b64(b"no-nuls-at-all")],
    [b"AUTH PLAIN", b64(b"\0alice\0s3cret\0extra")],
    [b"AUTH PLAIN " + b64(b"a\0b")],
    [b"AUTH PLAIN", b64(b"\0\xff\xfe\0s3cret")],
    [b"AUTH CRAM-MD5", b64(b"alice-without-a-space")],
    [b"AUTH CRAM-MD5", b64(b"alice nothex")],
    [b"AUTH CRAM-MD5 " + b64(b"initial")],
    [b"AUTH LOGIN", b64(b"\xff")],
    [b"AUTH PLAIN", b"!!!not base64!!!"],
    [b"AUTH PLAIN !!!"],
])
def test_malformed_sasl_is_a_501_and_the_session_goes_on(exchange):
    h, c = auth_harness()
    for line in exchange:
        reply = c.cmd(line)
    assert reply.startswith(AUTH_MALFORMED)
    assert c.proto.mode == protocol_module.COMMAND
    assert c.cmd(b"NOOP").startswith(b"250 2.0.0")
    assert c.cmd(plain()).startswith(AUTH_OK)


def test_auth_lines_may_be_as_long_as_rfc_4954_allows():
    h, c = auth_harness()
    long_password = b"p" * 8000
    assert c.cmd(plain(password=long_password)) == b""  # not "line too long": checked, then refused
    h.clock.advance(1.0)
    assert c.replies()[-1].startswith(AUTH_FAILED)
    assert c.cmd(b"AUTH PLAIN") == b"334 "
    assert c.cmd(b64(b"\0alice\0" + long_password)) == b""
    h.clock.advance(1.0)
    assert c.replies()[-1].startswith(AUTH_FAILED)


def test_a_checker_that_breaks_is_a_temporary_failure_not_a_535():
    from twisted.cred import credentials

    from zope.interface import implementer

    @implementer(checkers.ICredentialsChecker)
    class Broken:
        credentialInterfaces = (credentials.IUsernamePassword,)

        def requestAvatarId(self, creds):
            return defer.fail(OSError("users database unreachable"))

    h, c = auth_harness()
    h.factory.portal = cred_portal.Portal(_Realm(), [Broken()])
    c = h.connect()
    c.cmd(b"EHLO client.sender.test")
    assert c.cmd(plain()).startswith(b"454 4.7.0")
    assert c.proto._auth_failures == 0 and c.cmd(b"NOOP").startswith(b"250 2.0.0")


def test_a_store_that_cannot_count_failures_still_answers_535(caplog):
    import logging

    h, c = auth_harness()

    async def broken_incr(key, ttl, amount=1):
        raise OSError("store down")

    h.store.incr = broken_incr
    with caplog.at_level(logging.ERROR, logger="mailgate.smtp"):
        c.cmd(plain(password=b"wrong"))
        h.clock.advance(1.0)
    assert c.replies()[-1].startswith(AUTH_FAILED)
    assert "auth failure count not stored: store down" in caplog.text


def test_auth_abort(h):
    h, c = auth_harness()
    assert c.cmd(b"AUTH LOGIN").startswith(b"334 ")
    assert c.cmd(b"*").startswith(b"501 5.7.0")
    assert c.cmd(plain()).startswith(AUTH_OK)


# --- fuzz -----------------------------------------------------------------------------

_REPLY_LINE = __import__("re").compile(rb"^[2-5]\d\d[ -]")
_WORDS = [b"EHLO x.test", b"HELO", b"MAIL FROM:<a@sender.test>", b"MAIL FROM:<>", b"RCPT TO:<bob@example.test>",
          b"RCPT TO:<postmaster>", b"DATA", b".", b"RSET", b"NOOP", b"AUTH PLAIN", b"AUTH LOGIN", b"STARTTLS",
          b"QUIT", b"VRFY bob", b"\x00", b"\r", b"\n", b"\xc2\xa0", b"\xff", b"SIZE=9999999", b"BODY=8BITMIME",
          b"SMTPUTF8", b"AUTH CRAM-MD5", b"=", b"*", b"AAAA", b" ", b":", b"<", b">"]
_chunks = st.lists(st.one_of(st.sampled_from(_WORDS), st.binary(max_size=40)), max_size=25).map(
    lambda parts: b"\r\n".join(parts) + b"\r\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(_chunks, min_size=1, max_size=4), split=st.integers(min_value=1, max_value=64))
def test_fuzzed_commands_get_valid_replies_and_the_session_still_answers(chunks, split):
    h = with_auth(Harness(peer="127.0.0.1", auth={"failure_delay": 0.0}))
    c = h.connect()
    c.transport.clear()
    for chunk in chunks:
        for i in range(0, len(chunk), split):
            c.proto.dataReceived(chunk[i:i + split])
        h.clock.advance(0)
    for line in c.transport.value().split(b"\r\n")[:-1]:
        assert _REPLY_LINE.match(line), line
    if c.transport.disconnecting:
        return  # QUIT, too many errors, or a non-SMTP client: a definite end
    c.transport.clear()
    c.proto.dataReceived(b"\r\n.\r\nRSET\r\n*\r\nNOOP\r\n")  # out of DATA or AUTH, whichever it was in
    h.clock.advance(0)
    assert any(r.startswith(b"250 2.0.0 Ok") for r in c.replies()[-2:]) or c.transport.disconnecting


# --- what the protocol tells: a connection opened and how it ended -------------------


def closed(h):
    return [e for e in h.events if isinstance(e, ConnectionClosed)]


def test_a_connection_is_told_when_admitted_and_when_it_quits(h):
    c = h.connect()
    (opened,) = [e for e in h.events if isinstance(e, ConnectionOpened)]
    assert opened.session is c.proto.session and opened.session.peer_ip == "192.0.2.10"
    c.cmd(b"EHLO client.sender.test")
    assert closed(h) == []
    assert c.cmd(b"QUIT").startswith(b"221 ")
    c.proto.connectionLost()
    (end,) = closed(h)
    assert end.reason == "quit" and end.session.helo == "client.sender.test" and end.session.tls is False
    assert end.session.auth_user is None and end.auth_failures == 0


def test_a_client_refused_for_too_many_connections_is_never_told_as_a_connection():
    h = Harness()
    clients = [h.connect() for _ in range(3)]  # max_connections_per_ip = 2
    assert clients[2].transport.value().startswith(TOO_MANY_CONN)
    clients[2].proto.connectionLost()
    assert len([e for e in h.events if isinstance(e, ConnectionOpened)]) == 2 and closed(h) == []


def test_how_a_connection_ended_is_its_reason(h, caplog):
    import logging

    idle = h.connect()
    in_data_client = in_data(h)
    h.clock.advance(60)  # both past the idle timeout: one in a command, one in DATA
    for c in (idle, in_data_client):
        c.proto.connectionLost()
    lost = h.connect()
    lost.cmd(b"EHLO client.sender.test")
    lost.cmd(b"MAIL FROM:<a@sender.test>")
    lost.cmd(b"RCPT TO:<bob@example.test>")
    lost.cmd(b"DATA")
    with caplog.at_level(logging.INFO, logger="mailgate.smtp"):
        lost.proto.connectionLost()
    assert [e.reason for e in closed(h)] == ["timeout: command", "timeout: DATA", "lost during DATA"]
    assert "lost connection during DATA; nothing queued" in caplog.text  # the log subscriber's line, as before


def test_the_auth_user_and_failures_are_in_the_closed_event():
    h, c = auth_harness(max_failures=5)
    c.cmd(plain(password=b"wrong"))
    h.clock.advance(1.0)
    assert c.cmd(plain()).startswith(AUTH_OK)
    c.cmd(b"QUIT")
    c.proto.connectionLost()
    (end,) = closed(h)
    assert end.session.auth_user == "alice" and end.auth_failures == 1 and end.reason == "quit"


def test_refusals_name_the_queue_id(h, c):
    denied = c.cmd(b"MAIL FROM:<a@sender.test>") and c.cmd(b"RCPT TO:<x@elsewhere.test>")
    qid = c.proto.envelope.queue_id
    assert denied == f"554 5.7.1 <x@elsewhere.test>: Relay access denied (queue id {qid})".encode()
    c.cmd(b"RCPT TO:<bob@example.test>")
    c.cmd(b"DATA")
    spam = c.send(HAM.replace(b"Hi Bob.", GTUBE) + b".\r\n")[-1]
    assert spam == f"554 5.7.1 Message refused as spam (queue id {qid})".encode()
    refused = [e for e in h.events if isinstance(e, StageRefused)]
    assert refused[0].reply.text.endswith(f"(queue id {qid})") and refused[0].rcpt == "x@elsewhere.test"
    (answered,) = [e for e in h.events if isinstance(e, MessageAnswered)]
    assert str(answered.reply).encode() == spam and answered.message.message_id == "<1@sender.test>"
