"""rules.rdns: PTR presence and forward confirmation against a real dnsmasq."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import HostPort, validate
from gateway.plugins import Services
from gateway.records import Failed, Session, Transaction
from gateway.resolver import Resolver
from rules import rdns
from rules.rdns import ReverseDns
from tests.support.dns import dns_servers, envelope_dns, envelope_records  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def world(envelope_dns):
    return envelope_dns


def build(server, timeout=1.0):
    cfg = validate({}, rdns.SECTIONS)
    return ReverseDns.from_config(cfg, Services(None, resolver=Resolver([HostPort(server.host, server.port)],
                                                                         timeout=timeout)))


def run(check, ip, trusted=False):
    return asyncio.run(check.check(Transaction(Session("Q", ip, trusted=trusted))))


def symbols(records):
    return [(r.symbol, r.detail) for r in records]


def test_no_ptr_scores(world):
    assert symbols(run(build(world), "192.0.2.66")) == [("RDNS_NONE", "192.0.2.66")]


def test_ptr_not_pointing_back_scores(world):
    assert symbols(run(build(world), "192.0.2.40")) == [("RDNS_MISMATCH", "192.0.2.40 -> unrelated.other.test")]


def test_forward_confirmed_passes(world):
    t = Transaction(Session("Q", "192.0.2.30"))
    assert asyncio.run(build(world).check(t)) == []
    assert t.state["rdns"] == "mx1.sender.test"
    assert run(build(world), "192.0.2.41") == []


def test_ipv6(world):
    assert run(build(world), "2001:db8::30") == []
    assert symbols(run(build(world), "2001:db8::99"))[0][0] == "RDNS_NONE"


def test_trusted_clients_are_not_checked(world):
    assert run(build(world), "192.0.2.66", trusted=True) == []


def test_dns_down_is_failed_not_scored(dns_servers):  # noqa: F811
    server = dns_servers.dnsmasq(envelope_records())
    check = build(server, timeout=0.5)
    server.stop()
    [r] = run(check, "192.0.2.66")
    assert isinstance(r, Failed)


def test_loopback_only_when_asked(world):
    assert run(build(world), "127.0.0.9") == []
    cfg = validate({"rdns": {"check_loopback": True}}, rdns.SECTIONS)
    check = ReverseDns.from_config(cfg, Services(None, resolver=Resolver([HostPort(world.host, world.port)],
                                                                          timeout=1.0)))
    assert symbols(run(check, "127.0.0.9")) == [("RDNS_NONE", "127.0.0.9")]
