"""rules.recipients: static lists, a real slapd, and SMTP callouts to a real downstream."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gateway.config import validate
from gateway.errors import ConfigError
from gateway.plugins import Services
from gateway.records import Envelope, Failed, Recipient, Session, Transaction
from gateway.store import MemoryStore
from rules import recipients
from rules.recipients import RecipientVerify
from tests.support.ldap import Slapd, slapd_server  # noqa: F401
from tests.support.ports import free_port
from tests.support.sink import Sink


def build(section, routes=None, domains=("example.test", "other.test"), store=None):
    data = {"relay": {"domains": list(domains)}, "server": {"hostname": "gw.example.test"},
            "recipients": section}
    if routes:
        data["routes"] = routes
    cfg = validate(data, recipients.SECTIONS)
    return RecipientVerify.from_config(cfg, Services(None, store=store if store is not None else MemoryStore()))


def run(check, address, auth=None):
    t = Transaction(Session("Q", "192.0.2.66", auth_user=auth), Envelope("Q", "a@sender.test"),
                    rcpt=Recipient(address, address.rpartition("@")[2].lower()))
    return asyncio.run(check.check(t))


def outcome(records):
    return [(r.symbol, r.refuse) if hasattr(r, "refuse") else ("FAILED", None) for r in records]


UNKNOWN = [("RCPT_UNKNOWN", "unknown_user")]
UNVERIFIED = [("RCPT_UNVERIFIED", "callout")]

# --- static ----------------------------------------------------------------


@pytest.fixture
def static_check(tmp_path):
    users = tmp_path / "example.txt"
    users.write_text("# staff\nalice\nBob@Example.test   # full address\n")
    everyone = tmp_path / "other.txt"
    everyone.write_text("@other.test\n")
    return build({"verify": "static", "recipient_delimiter": "+",
                  "static_files": {"example.test": str(users), "other.test": str(everyone)}})


def test_static_known_users_pass(static_check):
    for a in ("alice@example.test", "ALICE@example.test", "bob@example.test", "alice+news@example.test",
              "anyone@other.test"):
        assert run(static_check, a) == [], a


def test_static_unknown_user_refused(static_check):
    assert outcome(run(static_check, "mallory@example.test")) == UNKNOWN


def test_only_relay_domains_are_verified(static_check):
    assert run(static_check, "mallory@elsewhere.test") == []


def test_static_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        build({"verify": "static", "static_files": {"example.test": str(tmp_path / "absent")}})


def test_static_needs_files():
    with pytest.raises(ConfigError, match="static_files"):
        build({"verify": "static"})


def test_per_domain_methods(tmp_path):
    users = tmp_path / "u.txt"
    users.write_text("alice@example.test\n")
    c = build({"verify": "none", "verify_by_domain": {"example.test": "static"},
               "static_files": {"*": str(users)}})
    assert outcome(run(c, "x@example.test")) == UNKNOWN
    assert run(c, "x@other.test") == []


def test_nothing_to_verify_switches_off():
    assert build({}) is None


# --- LDAP -------------------------------------------------------------------


def ldap_section(server, **extra):
    return {"verify": "ldap", "ldap": {"url": server.url, "base": server.base, "bind_dn": server.bind_dn,
                                       "password": server.password, "timeout": 2.0, **extra}}


def test_ldap_mail_and_proxy_addresses(slapd_server):  # noqa: F811
    c = build(ldap_section(slapd_server))
    for a in ("alice@example.test", "ally@example.test", "Carol@Example.test", "bob@example.test"):
        assert run(c, a) == [], a
    assert outcome(run(c, "nobody@example.test")) == UNKNOWN
    c.close()


def test_ldap_filter_input_is_escaped(slapd_server):  # noqa: F811
    c = build(ldap_section(slapd_server))
    assert outcome(run(c, "*@example.test")) == UNKNOWN  # not a wildcard search
    c.close()


def test_ldap_answers_are_cached(slapd_server):  # noqa: F811
    c = build(ldap_section(slapd_server))
    assert run(c, "alice@example.test") == []
    assert outcome(run(c, "nobody@example.test")) == UNKNOWN
    slapd_server.stop()
    assert run(c, "alice@example.test") == []
    assert outcome(run(c, "nobody@example.test")) == UNKNOWN
    c.close()


def test_ldap_down_tempfails_never_accepts(slapd_server):  # noqa: F811
    c = build(ldap_section(slapd_server))
    assert run(c, "alice@example.test") == []  # a live connection, then the server goes away
    slapd_server.stop()
    t0 = time.monotonic()
    assert outcome(run(c, "bob@example.test")) == UNVERIFIED
    assert time.monotonic() - t0 < 6
    slapd_server.start()
    assert run(c, "bob@example.test") == []  # reconnects
    c.close()


def test_ldap_bad_credentials_tempfail(slapd_server):  # noqa: F811
    section = ldap_section(slapd_server)
    section["ldap"]["password"] = "wrong"
    c = build(section)
    assert outcome(run(c, "alice@example.test")) == UNVERIFIED
    c.close()


def test_ldap_on_error_accept(slapd_server, tmp_path):  # noqa: F811
    pw = tmp_path / "pw"
    pw.write_text(slapd_server.password + "\n")
    section = ldap_section(slapd_server, password="", password_file=str(pw))
    section["on_error"] = "accept"
    c = build(section)
    assert outcome(run(c, "nobody@example.test")) == UNKNOWN  # the password file works
    slapd_server.stop()
    [r] = run(c, "bob@example.test")
    assert isinstance(r, Failed)
    c.close()


def test_ldap_needs_url_and_base():
    with pytest.raises(ConfigError, match="ldap.url"):
        build({"verify": "ldap"})


# --- SMTP callout -------------------------------------------------------------


@pytest.fixture
def downstream():
    s = Sink(known_users={"alice@example.test", "bob@example.test"}).start()
    try:
        yield s
    finally:
        s.stop()


def callout_check(port, store=None, **callout):
    return build({"verify": "callout", "callout": {"timeout": 2.0, **callout}},
                 routes={"example.test": f"smtp:[127.0.0.1]:{port}", "*": "mx"},
                 domains=("example.test",), store=store)


def test_callout_known_and_unknown(downstream):
    c = callout_check(downstream.port)
    assert run(c, "alice@example.test") == []
    assert outcome(run(c, "mallory@example.test")) == UNKNOWN
    assert downstream.helos[-1] == "gw.example.test"
    assert downstream.messages == []  # a probe never sends DATA


def test_callout_caches_both_answers(downstream):
    c = callout_check(downstream.port)
    assert run(c, "alice@example.test") == []
    assert outcome(run(c, "mallory@example.test")) == UNKNOWN
    probes = len(downstream.helos)
    downstream.stop()
    assert run(c, "alice@example.test") == []
    assert outcome(run(c, "mallory@example.test")) == UNKNOWN
    assert len(downstream.helos) == probes


def test_callout_negative_cache_expires_sooner(downstream):
    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now

    clock = Clock()
    c = callout_check(downstream.port, store=MemoryStore(clock=clock), cache_negative="10m")
    assert outcome(run(c, "carol@example.test")) == UNKNOWN
    downstream.known_users.add("carol@example.test")
    assert outcome(run(c, "carol@example.test")) == UNKNOWN
    clock.now += 601
    assert run(c, "carol@example.test") == []


def test_callout_downstream_down_tempfails(downstream):
    c = callout_check(downstream.port)
    downstream.stop()
    assert outcome(run(c, "alice@example.test")) == UNVERIFIED


def test_callout_temporary_reply_tempfails_and_is_not_cached(downstream):
    c = callout_check(downstream.port)
    downstream.rcpt_reply = "451 4.3.0 try later"
    assert outcome(run(c, "alice@example.test")) == UNVERIFIED
    downstream.rcpt_reply = None
    assert run(c, "alice@example.test") == []


def test_callout_silent_downstream_times_out_and_tempfails():
    # a server that accepts the connection and never greets
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(5)
        c = callout_check(port, timeout=0.5)
        t0 = time.monotonic()
        assert outcome(run(c, "alice@example.test")) == UNVERIFIED
        assert time.monotonic() - t0 < 3


def test_callout_needs_an_smtp_route():
    with pytest.raises(ConfigError, match="smtp: route"):
        build({"verify": "callout"}, routes={"*": "mx"}, domains=("example.test",))


# --- end to end through `mailgate run` -------------------------------------------


def test_e2e_unknown_user_gets_550_511_by_callout(mailgate, sink):
    sink.known_users = {"bob@example.test"}
    gw = mailgate('[recipients]\nverify = "callout"\n[recipients.callout]\ntimeout = 5.0\n')
    with gw.smtp() as c:
        c.ehlo("client.sender.test")
        assert c.mail("alice@sender.test")[0] == 250
        code, text = c.rcpt("nobody@example.test")
        assert code == 550 and text.startswith(b"5.1.1")
        assert c.rcpt("bob@example.test")[0] == 250
        assert c.data(b"Subject: hi\r\n\r\nhello\r\n")[0] == 250
    assert sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ["bob@example.test"]
    # the downstream goes away: known answers come from the cache, new ones tempfail
    sink.stop()
    with gw.smtp() as c:
        c.ehlo("client.sender.test")
        assert c.mail("alice@sender.test")[0] == 250
        assert c.rcpt("nobody@example.test")[0] == 550
        assert c.rcpt("bob@example.test")[0] == 250
        code, text = c.rcpt("carol@example.test")
        assert code == 451 and text.startswith(b"4.4.3")
