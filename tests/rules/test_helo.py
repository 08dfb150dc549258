"""rules.helo: HELO syntax, literals, forged-us, FQDN and DNS checks."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import HostPort, validate
from gateway.plugins import Services
from gateway.records import Failed, Session, Transaction
from gateway.resolver import Resolver
from rules import helo, lists
from rules.helo import Helo
from tests.support.dns import dns_servers, envelope_dns, envelope_records  # noqa: F401 (fixtures)

BASE = {
    "server": {"hostname": "mx.gateway.test", "listen": ["192.0.2.25:25", "0.0.0.0:2525"]},
    "relay": {"domains": ["example.test"]},
}


@pytest.fixture(scope="module")
def world(envelope_dns):
    return envelope_dns


def build(server, timeout=1.0, lists_section=None, **section):
    data = dict(BASE, helo=section)
    if lists_section:
        data["lists"] = lists_section
    cfg = validate(data, {**helo.SECTIONS, **lists.SECTIONS})
    resolver = Resolver([HostPort(server.host, server.port)], timeout=timeout)
    return Helo.from_config(cfg, Services(None, resolver=resolver))


def run(check, name, ip="192.0.2.66", local_ip="192.0.2.25", trusted=False):
    session = Session("Q", ip, local_ip=local_ip, helo=name, trusted=trusted)
    return asyncio.run(check.check(Transaction(session)))


def outcome(records):
    return [(r.symbol, r.refuse) for r in records]


@pytest.mark.parametrize("name", ["mx1.sender.test", "MX1.Sender.Test.", "[192.0.2.66]"])
def test_good_helo_passes(world, name):
    assert run(build(world), name) == []


def test_ipv6_literal_matching_client(world):
    assert run(build(world), "[IPv6:2001:db8::66]", ip="2001:db8::66") == []
    assert outcome(run(build(world), "[IPv6:2001:db8::67]", ip="2001:db8::66")) == [
        ("HELO_LITERAL_MISMATCH", "helo")]


@pytest.mark.parametrize("name", ["", "bad_host!", "-lead.test", "a..b.test", "[300.1.1.1]", "[IPv6:zz]",
                                  "x" * 64 + ".test"])
def test_invalid_syntax_refused(world, name):
    assert outcome(run(build(world), name)) == [("HELO_INVALID", "helo")]


def test_invalid_can_score_instead(world):
    [r] = run(build(world, reject_invalid=False), "bad_host!")
    assert r.refuse is None and r.score > 0


def test_literal_must_match_client(world):
    assert outcome(run(build(world), "[198.51.100.1]")) == [("HELO_LITERAL_MISMATCH", "helo")]


@pytest.mark.parametrize("name", ["mx.gateway.test", "example.test", "[192.0.2.25]", "192.0.2.25",
                                  "[10.9.9.9]", "alias.gateway.test"])
def test_claiming_to_be_us_refused(world, name):
    # 10.9.9.9: the address the client connected to (behind NAT)
    c = build(world, our_names=["alias.gateway.test"])
    assert outcome(run(c, name, local_ip="10.9.9.9")) == [("HELO_FORGED_US", "helo")]


def test_forged_can_score_instead(world):
    [r] = run(build(world, reject_forged=False), "mx.gateway.test")
    assert (r.symbol, r.refuse) == ("HELO_FORGED_US", None) and r.score > 0


@pytest.mark.parametrize("name,symbol", [("192.0.2.66", "HELO_BARE_IP"), ("localhost", "HELO_NO_FQDN"),
                                         ("workstation", "HELO_NO_FQDN")])
def test_scored_not_refused(world, name, symbol):
    [r] = run(build(world), name)
    assert (r.symbol, r.refuse) == (symbol, None) and r.score > 0


def test_unresolvable_name_scores(world):
    [r] = run(build(world), "nohost.ghost.test")
    assert (r.symbol, r.refuse) == ("HELO_NXDOMAIN", None)
    assert run(build(world), "v6only.test") == []  # AAAA only is resolvable
    assert run(build(world, check_dns=False), "nohost.ghost.test") == []


def test_trusted_and_allow_listed_clients_are_not_checked(world):
    assert run(build(world), "mx.gateway.test", trusted=True) == []
    assert run(build(world, lists_section={"allow_ips": ["192.0.2.0/24"]}), "mx.gateway.test") == []


def test_dns_down_no_points_no_refusal(dns_servers):  # noqa: F811
    server = dns_servers.dnsmasq(envelope_records())
    c = build(server, timeout=0.5)
    server.stop()
    [r] = run(c, "nohost.ghost.test")
    assert isinstance(r, Failed)


def test_loopback_clients_only_when_asked(world):
    assert run(build(world), "localhost", ip="127.0.0.1", local_ip="127.0.0.1") == []
    assert outcome(run(build(world, check_loopback=True), "localhost", ip="127.0.0.1")) == [("HELO_NO_FQDN", None)]


def test_e2e_helo_claiming_to_be_us_is_refused_at_rcpt(mailgate, sink):
    gw = mailgate("[helo]\ncheck_loopback = true\n")
    with gw.smtp() as c:
        c.ehlo("mx.gateway.test")  # our own hostname, from a client
        assert c.mail("alice@sender.test")[0] == 250
        code, text = c.rcpt("bob@example.test")
    assert code == 554 and text.startswith(b"5.7.1")
    assert sink.messages == []
