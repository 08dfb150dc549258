"""gateway.delivery against real downstream SMTP servers on loopback.

Downstreams: the aiosmtpd ``Sink`` (tests/support/sink.py) and postfix's
``smtp-sink``; MX routing through a fake resolver object and once through a
real dnsmasq.  The Deliverer runs on Twisted's asyncio reactor; each test
drives the loop until the delivery's Deferred fires.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest


def _asyncio_reactor():
    """The gateway runs on Twisted's asyncio reactor (dnspython needs it).  It
    must be installed before anything imports twisted.mail.smtp, which pulls
    in the default reactor at import time: hence this runs before the imports."""
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    from twisted.internet import reactor
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        pytest.fail("another reactor was installed first; install the asyncio reactor in tests/conftest.py")
    return reactor


_asyncio_reactor()

from twisted.internet import threads  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from gateway.config import HostPort, parse_route  # noqa: E402
from gateway.delivery import DEFERRED, FAILED, SENT, Deliverer, Outcome, Timeouts, wire_form  # noqa: E402
from gateway.resolver import NOANSWER, NXDOMAIN, OK, TIMEOUT, Lookup, Resolver  # noqa: E402
from tests.support.dns import Records, dns_servers  # noqa: E402,F401  (fixture)
from tests.support.ports import free_port  # noqa: E402
from tests.support.programs import require_program  # noqa: E402
from tests.support.sink import Sink, sink  # noqa: E402,F401  (fixture)

HOSTNAME = "gw.mailgate.test"
MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@example.test\r\n"
    b"Subject: delivery test\r\n"
    b"Message-ID: <1@sender.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"Bye.\r\n"
)


# -- running Twisted code from pytest ----------------------------------------------


@pytest.fixture
def reactor():
    r = _asyncio_reactor()
    # asyncio.run() elsewhere in the session unsets the current loop; dnspython
    # tasks (gateway.pipeline.as_deferred) need it to be the reactor's loop
    asyncio.set_event_loop(r._asyncioEventloop)
    return r


@pytest.fixture
def run(reactor):
    loop = reactor._asyncioEventloop

    def run(d, timeout: float = 20.0):
        return loop.run_until_complete(asyncio.wait_for(d.asFuture(loop), timeout))

    return run


@pytest.fixture
def run_in_thread(reactor):
    pool = ThreadPool(1, 2, name="test-delivery")
    pool.start()
    yield lambda f, *a, **kw: threads.deferToThreadPool(reactor, pool, f, *a, **kw)
    pool.stop()


def deliverer(reactor, routes, resolver=None, **kw) -> Deliverer:
    kw.setdefault("timeouts", Timeouts(connect=5))
    return Deliverer(reactor, resolver, {k: parse_route(v) for k, v in routes.items()}, HOSTNAME, **kw)


class FakeResolver:
    """mx()/addresses() as gateway.resolver.Resolver answers them, from tables."""

    def __init__(self, mx=None, addresses=None):
        self._mx = mx or {}
        self._addresses = addresses or {}
        self.asked: list[tuple[str, str]] = []

    async def mx(self, domain):
        self.asked.append(("MX", domain))
        found = self._mx.get(domain)
        if isinstance(found, str):  # a status
            return Lookup(domain, "MX", found)
        if found is None:
            return Lookup(domain, "MX", NOANSWER if domain in self._addresses else NXDOMAIN)
        return Lookup(domain, "MX", OK, tuple(found), 60)

    async def addresses(self, host):
        self.asked.append(("A", host))
        return list(self._addresses.get(host, []))


def closed_port(host: str = "127.0.0.1") -> int:
    """A port where nothing listens (connection refused)."""
    return free_port(host)


@pytest.mark.parametrize("data,wire", [
    (b"", b""),
    (b".", b".."),
    (b"a\n.b\r\n..c\n", b"a\r\n..b\r\n...c\r\n"),
    (b"x\r\n.\r\n", b"x\r\n..\r\n"),
    (b"bare\rcr\n.", b"bare\rcr\r\n.."),
])
def test_wire_form_crlf_and_dot_stuffing(data, wire):
    assert wire_form(data) == wire


# -- plain SMTP delivery to the aiosmtpd sink ------------------------------------------


def test_sent_to_literal_route_byte_for_byte(reactor, run, sink):
    d = deliverer(reactor, {"*": f"smtp:{sink.address}"})
    outcomes = run(d.deliver("Q1", "alice@sender.test", ["bob@example.test", "carol@example.test"], MESSAGE))

    assert [(o.recipient, o.status, o.code) for o in outcomes] == [
        ("bob@example.test", SENT, 250), ("carol@example.test", SENT, 250)]
    assert outcomes[0].reply.startswith("2.0.0 OK queued as SINK1")
    assert outcomes[0].relay == f"127.0.0.1[127.0.0.1]:{sink.port}"
    assert len(sink.messages) == 1, "several recipients of one next hop share one transaction"
    got = sink.messages[0]
    assert got.data == MESSAGE  # dot-stuffed on the wire, unstuffed by the server
    assert got.mail_from == "alice@sender.test"
    assert got.rcpt_tos == ["bob@example.test", "carol@example.test"]
    assert got.helo == HOSTNAME
    assert f"SIZE={len(wire_form(MESSAGE))}" in got.mail_options


def test_bare_lf_becomes_crlf_and_8bit_is_declared(reactor, run, sink):
    data = "Subject: caf\u00e9\n\nna\u00efve body\n.\n".encode("utf-8")
    outcomes = run(deliverer(reactor, {"*": f"smtp:{sink.address}"}).deliver("Q2", "a@s.test", ["b@x.test"], data))
    assert outcomes[0].status == SENT
    assert sink.messages[0].data == data.replace(b"\n", b"\r\n")
    assert "BODY=8BITMIME" in sink.messages[0].mail_options


def test_large_message_prepared_off_the_reactor(reactor, run, run_in_thread, sink):
    body = b"".join(b"%06d ....:....1....:....2....:....3....:....4....:....5....:....6\n" % i for i in range(8000))
    data = b"Subject: big\n\n" + body + b".\n"
    calls = []

    def counting(f, *a, **kw):
        calls.append(f.__name__)
        return run_in_thread(f, *a, **kw)

    d = deliverer(reactor, {"*": f"smtp:{sink.address}"}, run_in_thread=counting)
    (o,) = run(d.deliver("Q2B", "a@s.test", ["b@x.test"], data))
    assert o.status == SENT
    assert calls == ["wire_form"]
    assert sink.messages[0].data == data.replace(b"\n", b"\r\n")


def test_null_sender_is_mail_from_empty(reactor, run, sink):
    outcomes = run(deliverer(reactor, {"*": f"smtp:{sink.address}"}).deliver("Q3", "", ["b@x.test"], MESSAGE))
    assert outcomes[0].status == SENT
    assert sink.messages[0].mail_from == ""


def test_4xx_at_rcpt_is_deferred(reactor, run, sink):
    sink.rcpt_reply = "451 4.3.0 try later"
    outcomes = run(deliverer(reactor, {"*": f"smtp:{sink.address}"}).deliver("Q4", "a@s.test", ["b@x.test"], MESSAGE))
    assert outcomes == [Outcome("b@x.test", DEFERRED, 451, "4.3.0 try later", f"127.0.0.1[127.0.0.1]:{sink.port}")]
    assert outcomes[0].remote and outcomes[0].enhanced == "4.3.0"
    assert sink.messages == []


def test_4xx_at_end_of_data_defers_every_recipient(reactor, run, sink):
    sink.data_reply = "452 4.3.1 insufficient system storage"
    outcomes = run(deliverer(reactor, {"*": f"smtp:{sink.address}"}).deliver(
        "Q5", "a@s.test", ["b@x.test", "c@x.test"], MESSAGE))
    assert [(o.status, o.code, o.enhanced) for o in outcomes] == [(DEFERRED, 452, "4.3.1")] * 2


def test_5xx_for_one_of_two_recipients(reactor, run):
    with Sink(known_users={"bob@example.test"}) as s:
        outcomes = run(deliverer(reactor, {"*": f"smtp:{s.address}"}).deliver(
            "Q6", "a@s.test", ["nobody@example.test", "bob@example.test"], MESSAGE))
        assert [(o.recipient, o.status, o.code) for o in outcomes] == [
            ("nobody@example.test", FAILED, 550), ("bob@example.test", SENT, 250)]
        assert outcomes[0].enhanced == "5.1.1"
        assert "User unknown" in outcomes[0].reply
        assert [m.rcpt_tos for m in s.messages] == [["bob@example.test"]]


def test_5xx_at_data_fails_everyone(reactor, run, sink):
    sink.data_reply = "554 5.7.1 no"
    outcomes = run(deliverer(reactor, {"*": f"smtp:{sink.address}"}).deliver(
        "Q7", "a@s.test", ["b@x.test", "c@x.test"], MESSAGE))
    assert [(o.status, o.code, o.reply) for o in outcomes] == [(FAILED, 554, "5.7.1 no")] * 2


def test_5xx_at_mail_from_fails_everyone(reactor, run, sink):
    sink.mail_reply = "553 5.7.1 sender refused"
    outcomes = run(deliverer(reactor, {"*": f"smtp:{sink.address}"}).deliver("Q8", "a@s.test", ["b@x.test"], MESSAGE))
    assert [(o.status, o.code, o.enhanced) for o in outcomes] == [(FAILED, 553, "5.7.1")]


def test_connection_refused_is_deferred(reactor, run):
    port = closed_port()
    outcomes = run(deliverer(reactor, {"*": f"smtp:[127.0.0.1]:{port}"}).deliver("Q9", "a@s.test", ["b@x.test"], MESSAGE))
    (o,) = outcomes
    assert (o.status, o.code, o.enhanced) == (DEFERRED, 451, "4.4.1")
    assert f"127.0.0.1[127.0.0.1]:{port}" in o.reply and "refused" in o.reply.lower()


def test_silent_server_times_out_and_is_deferred(reactor, run):
    # accepts TCP connections (the kernel does) but never says a word
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        port = silent.getsockname()[1]
        d = deliverer(reactor, {"*": f"smtp:[127.0.0.1]:{port}"}, timeouts=Timeouts.every_command(0.5, connect=5))
        (o,) = run(d.deliver("Q10", "a@s.test", ["b@x.test"], MESSAGE))
    assert o.status == DEFERRED
    assert "timeout" in o.reply.lower()


def test_starttls_used_when_offered(reactor, run):
    with Sink(tls=True) as s:
        (o,) = run(deliverer(reactor, {"*": f"smtp:{s.address}"}).deliver("Q11", "a@s.test", ["b@x.test"], MESSAGE))
        assert o.status == SENT and o.tls is True  # the outcome says so: DeliveryAttempted tells it
        assert s.messages[0].tls is True
        assert s.messages[0].data == MESSAGE
        assert s.helos == [HOSTNAME, HOSTNAME]  # EHLO again after STARTTLS


def test_no_starttls_when_disabled_or_not_offered(reactor, run, sink):
    with Sink(tls=True) as s:
        d = deliverer(reactor, {"*": f"smtp:{s.address}"}, tls_client_context_factory=False)
        (o,) = run(d.deliver("Q12", "a@s.test", ["b@x.test"], MESSAGE))
        assert o.status == SENT and o.tls is False
        assert s.messages[0].tls is False
    assert run(deliverer(reactor, {"*": f"smtp:{sink.address}"}).deliver(
        "Q13", "a@s.test", ["b@x.test"], MESSAGE))[0].status == SENT
    assert sink.messages[0].tls is False


def test_failed_tls_handshake_falls_back_to_clear_text(reactor, run, caplog):
    from twisted.internet.ssl import optionsForClientTLS

    with Sink(tls=True) as s, caplog.at_level(logging.INFO, logger="mailgate.delivery"):
        # a verifying context cannot accept the sink's self-signed certificate
        d = deliverer(reactor, {"*": f"smtp:{s.address}"}, tls_client_context_factory=optionsForClientTLS("sink.test"))
        (o,) = run(d.deliver("Q15", "a@s.test", ["b@x.test"], MESSAGE))
        assert o.status == SENT
        assert [m.tls for m in s.messages] == [False]
        assert s.helos == [HOSTNAME, HOSTNAME]  # the TLS connection, then the clear-text one
    assert any("event=tls_failed retry=cleartext" in r.getMessage() for r in caplog.records)


def test_refused_starttls_falls_back_to_clear_text(reactor, run):
    with Sink(tls=True, starttls_reply="454 4.7.0 TLS not available due to local problem") as s:
        (o,) = run(deliverer(reactor, {"*": f"smtp:{s.address}"}).deliver("Q16", "a@s.test", ["b@x.test"], MESSAGE))
        assert o.status == SENT
        assert [m.tls for m in s.messages] == [False]


def test_recipients_grouped_per_route(reactor, run):
    with Sink() as one, Sink() as two:
        d = deliverer(reactor, {"one.test": f"smtp:{one.address}", ".two.test": f"smtp:{two.address}",
                                "*": f"smtp:[127.0.0.1]:{closed_port()}"})
        rcpts = ["a@one.test", "b@sub.two.test", "c@elsewhere.test", "d@ONE.test"]
        outcomes = run(d.deliver("Q14", "s@s.test", rcpts, MESSAGE))
        assert [o.recipient for o in outcomes] == rcpts
        assert [o.status for o in outcomes] == [SENT, SENT, DEFERRED, SENT]
        assert [m.rcpt_tos for m in one.messages] == [["a@one.test", "d@ONE.test"]]
        assert [m.rcpt_tos for m in two.messages] == [["b@sub.two.test"]]


def test_ipv6_literal_route(reactor, run):
    try:
        s = Sink(host="::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        (o,) = run(deliverer(reactor, {"*": f"smtp:[::1]:{s.port}"}).deliver("Q17", "a@s.test", ["b@x.test"], MESSAGE))
        assert (o.status, o.relay) == (SENT, f"::1[::1]:{s.port}")
        assert s.messages[0].data == MESSAGE
    finally:
        s.stop()


def test_each_attempt_is_told_as_an_event_and_logged_as_admins_grep_it(reactor, run, caplog, tmp_path):
    """The queue manager over a real Deliverer and a real downstream: the
    attempt is one DeliveryAttempted (the host, per-recipient code and text,
    TLS, delay), the refused recipient's bounce is one Bounced (suppressed:
    the null sender), and the log subscriber writes the familiar lines."""
    from twisted.internet import defer

    from gateway.config import QueueSettings
    from gateway.events import Bounced, DeliveryAttempted, EventSink, LogLine
    from gateway.queue import QueueManager
    from gateway.spool import QueueEntry, RecipientState, Spool

    events, done = [], defer.Deferred()

    def collect(event):
        events.append(event)
        if isinstance(event, Bounced) and not done.called:
            done.callback(None)

    with Sink(tls=True, known_users={"ok@x.test"}) as s, caplog.at_level(logging.INFO, logger="mailgate"):
        q = QueueManager(Spool(str(tmp_path)), deliverer(reactor, {"*": f"smtp:{s.address}"}), reactor,
                         lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw), QueueSettings(), HOSTNAME,
                         events=EventSink([collect, LogLine()]))
        arrival = time.time() - 5
        q.enqueue(QueueEntry("QLOG", "", [RecipientState("ok@x.test"), RecipientState("no@x.test")], arrival),
                  MESSAGE)
        run(done)
        run(q.stop())
    (attempt,) = [e for e in events if isinstance(e, DeliveryAttempted)]
    assert attempt.queue_id == "QLOG" and attempt.next_hop == f"127.0.0.1[127.0.0.1]:{s.port}"
    assert attempt.tls is True and attempt.route == f"smtp:[127.0.0.1]:{s.port}" and 5 <= attempt.delay < 60
    by_rcpt = {o.recipient: o for o in attempt.outcomes}
    assert (by_rcpt["ok@x.test"].status, by_rcpt["ok@x.test"].code) == (SENT, 250)
    assert (by_rcpt["no@x.test"].status, by_rcpt["no@x.test"].code) == (FAILED, 550)
    assert "User unknown" in by_rcpt["no@x.test"].reply
    (bounced,) = [e for e in events if isinstance(e, Bounced)]
    assert bounced.recipients == ("no@x.test",) and bounced.bounce_id == ""  # no DSN to the null sender
    lines = [r.getMessage() for r in caplog.records if r.name == "mailgate.delivery"]
    sent = next(line for line in lines if "to=ok@x.test" in line)
    refused = next(line for line in lines if "to=no@x.test" in line)
    assert sent.startswith(f"queue_id=QLOG to=ok@x.test relay=127.0.0.1[127.0.0.1]:{s.port} status=sent code=250 ")
    assert sent.endswith(" tls=yes") and " delay=" in sent
    assert "status=bounced code=550" in refused and 'reply="5.1.1 <no@x.test>' in refused
    assert "queue_id=QLOG bounce=suppressed sender=<>" in caplog.text


# -- MX routing (fake resolver object) -----------------------------------------------


def test_mx_in_preference_order_next_mx_after_refusal(reactor, run):
    port = free_port("127.0.0.3")
    with Sink(host="127.0.0.3", port=port) as backup:
        resolver = FakeResolver(
            mx={"example.test": ["20 backup.example.test", "10 primary.example.test"]},
            addresses={"primary.example.test": ["127.0.0.2"], "backup.example.test": ["127.0.0.3"]},
        )
        d = deliverer(reactor, {"*": "mx"}, resolver, smtp_port=port)  # nothing listens on 127.0.0.2
        (o,) = run(d.deliver("Q20", "a@s.test", ["bob@example.test"], MESSAGE))
        assert (o.status, o.relay) == (SENT, f"backup.example.test[127.0.0.3]:{port}")
        assert backup.messages[0].rcpt_tos == ["bob@example.test"]
        assert resolver.asked[0] == ("MX", "example.test")


def test_next_mx_after_4xx_greeting(reactor, run):
    port = free_port("127.0.0.2")
    with Sink(host="127.0.0.2", port=port, greeting="421 4.3.2 busy, try later") as busy, \
         Sink(host="127.0.0.3", port=port) as backup:
        resolver = FakeResolver(mx={"example.test": ["10 mx1.example.test", "20 mx2.example.test"]},
                                addresses={"mx1.example.test": ["127.0.0.2"], "mx2.example.test": ["127.0.0.3"]})
        d = deliverer(reactor, {"*": "mx"}, resolver, smtp_port=port)
        (o,) = run(d.deliver("Q21", "a@s.test", ["bob@example.test"], MESSAGE))
        assert o.status == SENT and o.relay.startswith("mx2.example.test[127.0.0.3]")
        assert busy.messages == [] and len(backup.messages) == 1


def test_4xx_recipient_goes_on_to_next_mx_5xx_does_not(reactor, run):
    port = free_port("127.0.0.2")
    with Sink(host="127.0.0.2", port=port, rcpt_reply={"soft@example.test": "450 4.2.0 mailbox busy"},
              known_users={"soft@example.test", "ok@example.test"}) as first, \
         Sink(host="127.0.0.3", port=port) as second:
        resolver = FakeResolver(mx={"example.test": ["10 mx1.example.test", "20 mx2.example.test"]},
                                addresses={"mx1.example.test": ["127.0.0.2"], "mx2.example.test": ["127.0.0.3"]})
        d = deliverer(reactor, {"*": "mx"}, resolver, smtp_port=port)
        rcpts = ["ok@example.test", "soft@example.test", "hard@example.test"]
        outcomes = run(d.deliver("Q22", "a@s.test", rcpts, MESSAGE))
        assert [(o.status, o.relay.split("[")[0]) for o in outcomes] == [
            (SENT, "mx1.example.test"), (SENT, "mx2.example.test"), (FAILED, "mx1.example.test")]
        assert [m.rcpt_tos for m in first.messages] == [["ok@example.test"]]
        assert [m.rcpt_tos for m in second.messages] == [["soft@example.test"]]


def test_5xx_greeting_after_a_soft_refusal_does_not_bounce(reactor, run):
    port = free_port("127.0.0.2")
    resolver = FakeResolver(mx={"example.test": ["10 mx1.example.test", "20 mx2.example.test"],
                                "blocked.test": ["10 mx2.example.test"]},
                            addresses={"mx1.example.test": ["127.0.0.2"], "mx2.example.test": ["127.0.0.3"]})
    with Sink(host="127.0.0.2", port=port, rcpt_reply="450 4.2.0 mailbox busy"), \
         Sink(host="127.0.0.3", port=port, greeting="554 5.7.1 you are blocked"):
        d = deliverer(reactor, {"*": "mx"}, resolver, smtp_port=port)
        soft, blocked = run(d.deliver("Q29", "a@s.test", ["bob@example.test", "eve@blocked.test"], MESSAGE))
    assert (soft.status, soft.code, soft.relay.split("[")[0]) == (DEFERRED, 450, "mx1.example.test")
    # the only host refusing service at the greeting is final
    assert (blocked.status, blocked.code, blocked.enhanced) == (FAILED, 554, "5.7.1")


def test_all_mx_down_is_deferred_with_last_reason(reactor, run):
    port = free_port("127.0.0.2")
    resolver = FakeResolver(mx={"example.test": ["10 mx1.example.test", "20 mx2.example.test"]},
                            addresses={"mx1.example.test": ["127.0.0.2"], "mx2.example.test": ["127.0.0.3"]})
    (o,) = run(deliverer(reactor, {"*": "mx"}, resolver, smtp_port=port).deliver(
        "Q23", "a@s.test", ["bob@example.test"], MESSAGE))
    assert (o.status, o.enhanced) == (DEFERRED, "4.4.1")
    assert "mx2.example.test[127.0.0.3]" in o.reply


def test_no_mx_falls_back_to_address_records(reactor, run, sink):
    resolver = FakeResolver(addresses={"example.test": ["127.0.0.1"]})  # NOANSWER for MX
    (o,) = run(deliverer(reactor, {"*": "mx"}, resolver, smtp_port=sink.port).deliver(
        "Q24", "a@s.test", ["bob@example.test"], MESSAGE))
    assert (o.status, o.relay) == (SENT, f"example.test[127.0.0.1]:{sink.port}")


def test_dns_outcomes(reactor, run):
    resolver = FakeResolver(mx={"slow.test": TIMEOUT, "nomail.test": ["0 ."]},
                            addresses={"noaddr.test": []})
    d = deliverer(reactor, {"*": "mx"}, resolver)
    outcomes = run(d.deliver("Q25", "a@s.test", ["a@missing.test", "b@slow.test", "c@nomail.test", "postmaster"],
                             MESSAGE))
    assert [(o.status, o.enhanced) for o in outcomes] == [
        (FAILED, "5.1.2"), (DEFERRED, "4.4.3"), (FAILED, "5.1.10"), (FAILED, "5.1.3")]
    assert all(not o.remote for o in outcomes)


def test_mx_pointing_at_ourselves_is_not_used(reactor, run):
    resolver = FakeResolver(mx={"example.test": [f"10 {HOSTNAME}"]}, addresses={HOSTNAME: ["127.0.0.1"]})
    (o,) = run(deliverer(reactor, {"*": "mx"}, resolver).deliver("Q26", "a@s.test", ["b@example.test"], MESSAGE))
    assert (o.status, o.enhanced) == (FAILED, "5.4.6")


def test_smtp_route_without_brackets_looks_up_mx_of_the_host(reactor, run, sink):
    resolver = FakeResolver(mx={"relay.corp.test": ["10 exchange.corp.test"]},
                            addresses={"exchange.corp.test": ["127.0.0.1"]})
    d = deliverer(reactor, {"*": f"smtp:relay.corp.test:{sink.port}"}, resolver)
    (o,) = run(d.deliver("Q27", "a@s.test", ["bob@anything.test"], MESSAGE))
    assert (o.status, o.relay) == (SENT, f"exchange.corp.test[127.0.0.1]:{sink.port}")
    assert ("MX", "relay.corp.test") in resolver.asked and ("MX", "anything.test") not in resolver.asked


def test_bracketed_route_name_resolves_address_without_mx(reactor, run, sink):
    resolver = FakeResolver(addresses={"exchange.corp.test": ["127.0.0.1"]})
    (o,) = run(deliverer(reactor, {"*": f"smtp:[exchange.corp.test]:{sink.port}"}, resolver).deliver(
        "Q28", "a@s.test", ["bob@x.test"], MESSAGE))
    assert o.status == SENT
    assert all(kind == "A" for kind, _ in resolver.asked)


# -- Maildir ----------------------------------------------------------------------------


def test_local_route_delivers_into_maildir(reactor, run, run_in_thread, tmp_path):
    box = tmp_path / "mail"
    d = deliverer(reactor, {"*": f"local:{box}"}, run_in_thread=run_in_thread)
    outcomes = run(d.deliver("Q30", "alice@sender.test", ["bob@example.test", "carol@example.test"], MESSAGE))
    assert [o.status for o in outcomes] == [SENT, SENT]
    files = sorted(glob.glob(str(box / "new" / "*")))
    assert len(files) == 2
    texts = [open(f, "rb").read() for f in files]
    assert {t.split(b"\n")[1] for t in texts} == {b"Delivered-To: bob@example.test", b"Delivered-To: carol@example.test"}
    assert all(t.startswith(b"Return-Path: <alice@sender.test>\n") for t in texts)
    assert all(t.endswith(MESSAGE.replace(b"\r\n", b"\n")) for t in texts)


def test_unwritable_maildir_is_deferred(reactor, run, run_in_thread, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    d = deliverer(reactor, {"*": f"local:{blocker}/box"}, run_in_thread=run_in_thread)
    (o,) = run(d.deliver("Q31", "a@s.test", ["b@x.test"], MESSAGE))
    assert (o.status, o.code) == (DEFERRED, 451)
    assert "cannot create Maildir" in o.reply


# -- postfix smtp-sink ---------------------------------------------------------------------


class SmtpSink:
    """postfix's smtp-sink on loopback, dumping each transaction into a directory."""

    def __init__(self, *options: str):
        self.program = require_program("smtp-sink")
        self.port = free_port()
        # runs as nobody when we are root: its dump directory must be reachable
        self.dir = tempfile.mkdtemp(prefix="mailgate-smtp-sink-")
        os.chmod(self.dir, 0o777)
        cmd = [self.program, "-d", f"{self.dir}/%H%M%S.", *options]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{self.port}", "64"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("smtp-sink did not start")
                time.sleep(0.02)

    def dumps(self) -> list[bytes]:
        return [open(p, "rb").read() for p in sorted(glob.glob(f"{self.dir}/*"))]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def smtp_sink():
    started = []

    def start(*options):
        s = SmtpSink(*options)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_delivers_to_postfix_smtp_sink(reactor, run, smtp_sink):
    s = smtp_sink()
    outcomes = run(deliverer(reactor, {"*": f"smtp:[127.0.0.1]:{s.port}"}).deliver(
        "Q40", "", ["bob@example.test", "carol@example.test"], MESSAGE))
    assert [o.status for o in outcomes] == [SENT, SENT]
    deadline = time.monotonic() + 5
    while not s.dumps() and time.monotonic() < deadline:
        time.sleep(0.02)
    (dump,) = s.dumps()
    assert b"X-Mail-Args: <>" in dump.replace(b"\r\n", b"\n")
    assert b"X-Rcpt-Args: <bob@example.test>" in dump and b"X-Rcpt-Args: <carol@example.test>" in dump
    # the dump is the envelope as X- headers, the message, and an empty line
    assert dump.replace(b"\r\n", b"\n").endswith(b"\n" + MESSAGE.replace(b"\r\n", b"\n") + b"\n")


def test_smtp_sink_refusing_helo_and_ehlo_fails_without_looping(reactor, run, smtp_sink):
    s = smtp_sink("-f", "EHLO,HELO")
    (o,) = run(deliverer(reactor, {"*": f"smtp:[127.0.0.1]:{s.port}"}).deliver("Q41", "a@s.test", ["b@x.test"], MESSAGE),
               timeout=10)
    assert (o.status, o.code) == (FAILED, 500)


def test_smtp_sink_dropping_the_connection_after_data_is_deferred(reactor, run, smtp_sink):
    s = smtp_sink("-q", ".")
    (o,) = run(deliverer(reactor, {"*": f"smtp:[127.0.0.1]:{s.port}"}).deliver("Q42", "a@s.test", ["b@x.test"], MESSAGE))
    assert (o.status, o.enhanced) == (DEFERRED, "4.4.2")
    assert "lost connection" in o.reply


def test_smtp_sink_soft_reject_at_rcpt(reactor, run, smtp_sink):
    s = smtp_sink("-r", "RCPT")
    (o,) = run(deliverer(reactor, {"*": f"smtp:[127.0.0.1]:{s.port}"}).deliver("Q43", "a@s.test", ["b@x.test"], MESSAGE))
    assert (o.status, o.code, o.enhanced) == (DEFERRED, 450, "4.3.0")


# -- real DNS (dnsmasq on loopback) ------------------------------------------------------


def test_mx_route_through_real_dns(reactor, run, dns_servers):  # noqa: F811
    port = free_port("127.0.0.2")
    records = (Records(ttl=60)
               .mx("example.test", "mx1.example.test", 10)
               .mx("example.test", "mx2.example.test", 20)
               .a("mx1.example.test", "127.0.0.4")  # nothing listens there
               .a("mx2.example.test", "127.0.0.2")
               .a("plain.test", "127.0.0.2"))
    dns = dns_servers.dnsmasq(records)
    resolver = Resolver([HostPort(dns.host, dns.port)], timeout=2.0)
    with Sink(host="127.0.0.2", port=port) as s:
        d = deliverer(reactor, {"*": "mx"}, resolver, smtp_port=port)
        outcomes = run(d.deliver("Q50", "a@s.test", ["bob@example.test", "x@nowhere.test", "y@plain.test"], MESSAGE))
        assert [(o.status, o.relay.split(":")[0]) for o in outcomes] == [
            (SENT, "mx2.example.test[127.0.0.2]"), (FAILED, ""), (SENT, "plain.test[127.0.0.2]")]
        assert outcomes[1].enhanced == "5.1.2"
        assert sorted(r for m in s.messages for r in m.rcpt_tos) == ["bob@example.test", "y@plain.test"]

    dns.stop()  # DNS down: "could not look up" defers, it never bounces
    slow = deliverer(reactor, {"*": "mx"}, Resolver([HostPort(dns.host, dns.port)], timeout=0.5), smtp_port=port)
    (o,) = run(slow.deliver("Q51", "a@s.test", ["bob@example.test"], MESSAGE))
    assert (o.status, o.enhanced) == (DEFERRED, "4.4.3")
    assert "timeout" in o.reply


# -- per-phase deadlines and SMTPUTF8, scripted server over StringTransport + task.Clock ----------


class ScriptedReactor:
    """A task.Clock that records connectTCP: the test plays the server."""

    def __init__(self):
        from twisted.internet import task

        self.clock = task.Clock()
        self.callLater = self.clock.callLater
        self.seconds = self.clock.seconds
        self.advance = self.clock.advance
        self.connections = []

    def connectTCP(self, host, port, factory, timeout=30):
        self.connections.append((host, port, factory, timeout))

    def server(self):
        """Connect the last client to a StringTransport; returns (protocol, transport)."""
        from twisted.internet.testing import StringTransport

        factory = self.connections[-1][2]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


PHASES = Timeouts(connect=7, helo=10, mail=20, rcpt=30, data_init=40, data_xfer=50, data_done=60)


def scripted(recipients=("b@x.test",), sender="a@s.test", smtputf8=False, timeouts=PHASES, message=None):
    r = ScriptedReactor()
    d = Deliverer(r, None, {"*": parse_route("smtp:[192.0.2.1]:25")}, HOSTNAME, tls_client_context_factory=False,
                  timeouts=timeouts)
    result = d.deliver("QT", sender, list(recipients), message or MESSAGE, smtputf8=smtputf8)
    proto, transport = r.server()
    return r, result, proto, transport


def said(transport) -> list[bytes]:
    lines = transport.value().split(b"\r\n")
    transport.clear()
    return [line for line in lines if line]


def body_sent(proto, transport):
    """What a socket draining the body would do: ask the sender for each chunk."""
    while transport.producer is not None:
        transport.producer.resumeProducing()


# how far into the session the server answers, before it falls silent
_UNTIL = {
    "the greeting": [],
    "the reply to EHLO": [b"220 mx ESMTP"],
    "the reply to MAIL FROM": [b"220 mx ESMTP", b"250 mx"],
    "the reply to RCPT TO": [b"220 mx ESMTP", b"250 mx", b"250 2.1.0 ok"],
    "the reply to DATA": [b"220 mx ESMTP", b"250 mx", b"250 2.1.0 ok", b"250 2.1.5 ok"],
    "the reply to end of data": [b"220 mx ESMTP", b"250 mx", b"250 2.1.0 ok", b"250 2.1.5 ok", b"354 go"],
}


@pytest.mark.parametrize("phase,limit", [
    ("the greeting", 10), ("the reply to EHLO", 10), ("the reply to MAIL FROM", 20),
    ("the reply to RCPT TO", 30), ("the reply to DATA", 40), ("the reply to end of data", 60),
])
def test_each_phase_has_its_own_deadline(phase, limit):
    r, result, proto, transport = scripted()
    assert r.connections[0][3] == 7  # the connect timeout goes to connectTCP
    for line in _UNTIL[phase]:
        proto.dataReceived(line + b"\r\n")
    if phase == "the reply to end of data":
        body_sent(proto, transport)
    r.advance(limit - 0.5)
    assert not result.called, "the deadline of this phase, not a shorter one"
    r.advance(1)
    (o,) = result.result
    assert (o.status, o.code) == (DEFERRED, 451)
    assert f"timeout after {limit}s waiting for {phase}" in o.reply and not o.remote


def test_body_chunks_have_a_deadline_each():
    r, result, proto, transport = scripted()
    for line in _UNTIL["the reply to end of data"]:
        proto.dataReceived(line + b"\r\n")
    assert transport.producer is not None  # the body is on its way
    transport.producer.resumeProducing()
    r.advance(49)
    assert not result.called
    r.advance(2)  # the peer stopped taking the body
    (o,) = result.result
    assert o.status == DEFERRED and "timeout after 50s waiting for the message body to be taken" in o.reply


def test_a_server_that_answers_in_time_is_never_cut_off():
    r, result, proto, transport = scripted()
    for line in _UNTIL["the reply to end of data"]:
        r.advance(9)  # just inside every deadline, 54 s in all: more than the greeting's 10 s
        proto.dataReceived(line + b"\r\n")
    body_sent(proto, transport)
    r.advance(59)
    proto.dataReceived(b"250 2.0.0 queued\r\n")
    assert [(o.status, o.code) for o in result.result] == [(SENT, 250)]


def test_smtputf8_used_when_needed_and_offered():
    r, result, proto, transport = scripted(recipients=["j\u00f6rg@x.test"])
    proto.dataReceived(b"220 mx ESMTP\r\n")
    said(transport)
    proto.dataReceived(b"250-mx\r\n250-SMTPUTF8\r\n250 8BITMIME\r\n")
    (mail,) = said(transport)
    assert mail.startswith(b"MAIL FROM:<a@s.test> SMTPUTF8")
    proto.dataReceived(b"250 ok\r\n")
    assert said(transport) == ["RCPT TO:<j\u00f6rg@x.test>".encode()]


def test_smtputf8_not_sent_when_nothing_needs_it():
    r, result, proto, transport = scripted()
    proto.dataReceived(b"220 mx ESMTP\r\n250-mx\r\n250 SMTPUTF8\r\n")
    assert b"SMTPUTF8" not in said(transport)[-1]


@pytest.mark.parametrize("sender,recipient,flag", [
    ("a@s.test", "j\u00f6rg@x.test", False),  # a non-ASCII recipient
    ("j\u00f6rg@s.test", "b@x.test", False),  # a non-ASCII sender
    ("a@s.test", "b@x.test", True),  # SMTPUTF8 from the client, and UTF-8 in the headers
])
def test_smtputf8_needed_but_not_offered_fails_with_5_6_7(sender, recipient, flag):
    message = "Subject: Grüße\r\n\r\nbody\r\n".encode() if flag else MESSAGE
    r, result, proto, transport = scripted(recipients=[recipient], sender=sender, smtputf8=flag, message=message)
    proto.dataReceived(b"220 mx ESMTP\r\n250-mx\r\n250 8BITMIME\r\n")
    assert said(transport)[-1] == b"QUIT"  # no MAIL FROM: no downgrade (RFC 6531 3.2)
    (o,) = result.result
    assert (o.status, o.code, o.enhanced) == (FAILED, 550, "5.6.7")
    assert o.reply == "5.6.7 SMTPUTF8 not supported by next hop 192.0.2.1[192.0.2.1]:25"


def test_an_ascii_message_that_came_with_smtputf8_goes_without_it():
    r, result, proto, transport = scripted(smtputf8=True)
    proto.dataReceived(b"220 mx ESMTP\r\n250 mx\r\n")
    assert said(transport)[-1] == b"MAIL FROM:<a@s.test>"


def test_without_smtputf8_only_the_recipients_needing_it_fail():
    r, result, proto, transport = scripted(recipients=["j\u00f6rg@x.test", "b@x.test"])
    proto.dataReceived(b"220 mx ESMTP\r\n250 mx\r\n")
    assert said(transport)[-1] == b"MAIL FROM:<a@s.test>"  # no SMTPUTF8: the sender is ASCII
    proto.dataReceived(b"250 ok\r\n")
    assert said(transport) == [b"RCPT TO:<b@x.test>"]
    proto.dataReceived(b"250 ok\r\n354 go\r\n")
    body_sent(proto, transport)
    proto.dataReceived(b"250 2.0.0 queued\r\n")
    utf8, ascii_ = result.result
    assert (utf8.status, utf8.enhanced) == (FAILED, "5.6.7")
    assert (ascii_.status, ascii_.code) == (SENT, 250)


def test_destination_names_the_next_hop():
    d = deliverer(None, {"corp.test": "smtp:[10.0.0.5]:25", "*": "mx"})
    assert d.destination("a@Corp.Test") == "smtp:[10.0.0.5]:25"
    assert d.destination("a@Example.Test.") == "mx:example.test"
    assert d.destination("b@example.test") == d.destination("c@EXAMPLE.test")


def test_timeouts_from_queue_settings():
    from gateway.config import QueueSettings

    t = Timeouts.from_settings(QueueSettings(helo_timeout="2m", data_done_timeout="15m"))
    assert (t.connect, t.helo, t.mail, t.data_init, t.data_done) == (30, 120, 300, 120, 900)


# -- SMTPUTF8 against real servers ------------------------------------------------------


def test_non_ascii_recipient_relayed_with_smtputf8(reactor, run, sink):
    # aiosmtpd offers SMTPUTF8
    (o,) = run(deliverer(reactor, {"*": f"smtp:{sink.address}"}).deliver(
        "QU1", "a@s.test", ["j\u00f6rg@x.test"], MESSAGE))
    assert o.status == SENT
    (got,) = sink.messages
    assert got.rcpt_tos == ["j\u00f6rg@x.test"] and "SMTPUTF8" in got.mail_options


def test_smtputf8_message_to_a_server_without_it_bounces(reactor, run, smtp_sink):
    s = smtp_sink()  # postfix's smtp-sink does not offer SMTPUTF8
    outcomes = run(deliverer(reactor, {"*": f"smtp:[127.0.0.1]:{s.port}"}).deliver(
        "QU2", "a@s.test", ["j\u00f6rg@x.test", "b@x.test"], MESSAGE, smtputf8=True))
    # the ASCII recipient of an ASCII message goes without SMTPUTF8; the other cannot
    assert [(o.status, o.code) for o in outcomes] == [(FAILED, 550), (SENT, 250)]
    assert outcomes[0].enhanced == "5.6.7" and "SMTPUTF8 not supported by next hop" in outcomes[0].reply
