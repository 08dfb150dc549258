"""The ESMTP front door driven with bytes over StringTransport, time with Clock."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from gateway.config import validate
from gateway.headers import Finisher
from gateway.pipeline import Pipeline
from gateway.plugins import Check
from gateway.records import Result, Stage
from gateway.runtime import Runtime
from gateway.smtp import GatewayFactory
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


def make_config(**server):
    data = {
        "server": {"hostname": "mx.example.test", "max_message_size": 2000, "max_recipients": 3,
                   "max_connections_per_ip": 2, "idle_timeout": 60, **server},
        "relay": {"domains": ["example.test"], "trusted_networks": ["10.0.0.0/8"]},
        "spam": {"threshold": 5.0, "reject_threshold": 15.0},
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
    def __init__(self, checks=(Gtube(),), peer="192.0.2.10", **server):
        config = make_config(**server)
        self.runtime = Runtime(config, Pipeline(list(checks)), Scorer.from_config(config),
                               Finisher(config.server.hostname, config.spam.subject_tag),
                               frozenset(config.relay.domains),
                               tuple(ipaddress.ip_network(n) for n in config.relay.trusted_networks))
        self.clock = task.Clock()
        self.queued = []
        self.factory = GatewayFactory(self.runtime, self.clock, enqueue=self._enqueue, quarantine=self._enqueue)
        self.peer = peer

    def _enqueue(self, entry, data, *verdict):
        self.queued.append((entry, data))
        return defer.succeed(entry.queue_id)

    def connect(self):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", self.peer, 40000),
                                    hostAddress=IPv4Address("TCP", "192.0.2.1", 25))
        proto.makeConnection(transport)
        return Client(proto, transport)


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
