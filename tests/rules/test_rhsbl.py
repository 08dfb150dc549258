"""rules.rhsbl: the sender domain in domain blocklists served by a real rbldnsd."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import HostPort, validate
from gateway.plugins import Services
from gateway.records import Envelope, Failed, Result, Session, Transaction
from gateway.resolver import Resolver
from rules import rhsbl
from rules.rhsbl import Rhsbl
from tests.support.dns import DnsServers, dns_servers  # noqa: F401

DBL = """\
:127.0.1.2:Spam domain $
spammer.example
*.phish.example :127.0.1.4:Phishing domain $
refused.example :127.255.255.254:public resolver
weird.example :192.0.2.1:hijacked
"""
ZONE = {"zone": "dbl.test", "score": 2.5,
        "codes": {"127.0.1.4": {"symbol": "DBL_PHISH", "score": 6.0}}}


def start(servers):
    rbl = servers.rbldnsd({"dbl.test": ("dnset", DBL)})
    return servers.dnsmasq(forward={"dbl.test": rbl}), rbl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    servers = DnsServers(tmp_path_factory.mktemp("dns"))
    try:
        yield start(servers)[0]
    finally:
        servers.close()


def build(server, timeout=2.0, resolver_timeout=1.0, zones=(ZONE,)):
    cfg = validate({"rhsbl": {"zones": list(zones), "timeout": timeout}}, rhsbl.SECTIONS)
    return Rhsbl.from_config(cfg, Services(None, resolver=Resolver([HostPort(server.host, server.port)],
                                                                    timeout=resolver_timeout)))


def run(check, mail_from, auth=None):
    return asyncio.run(check.check(Transaction(Session("Q", "192.0.2.66", auth_user=auth),
                                               Envelope("Q", mail_from))))


def test_listed_domain_scores(world):
    [r] = run(build(world), "boss@spammer.example")
    assert (r.symbol, r.score, r.detail) == ("RHSBL_DBL_TEST", 2.5, "dbl.test=127.0.1.2")


def test_code_map_and_wildcards(world):
    [r] = run(build(world), "x@login.phish.example")
    assert (r.symbol, r.score) == ("DBL_PHISH", 6.0)


def test_clean_domain_null_sender_and_relay_clients(world):
    c = build(world)
    assert run(c, "a@sender.test") == []
    assert run(c, "") == []
    assert run(c, "a@[192.0.2.1]") == []
    assert run(c, "boss@spammer.example", auth="alice") == []


def test_error_and_foreign_answers_fail(world):
    [r] = run(build(world), "a@refused.example")
    assert isinstance(r, Failed) and "127.255.255.254" in r.reason
    [r] = run(build(world), "a@weird.example")
    assert isinstance(r, Failed) and not isinstance(r, Result)


def test_strict_answers_setting(world):
    c = build(world, zones=[{**ZONE, "answers": ["127.0.0.0/24"]}])
    assert isinstance(run(c, "boss@spammer.example")[0], Failed)


def test_server_down_is_failed(dns_servers):  # noqa: F811
    dns, rbl = start(dns_servers)
    c = build(dns, timeout=1.0, resolver_timeout=3.0)
    rbl.stop()
    [r] = run(c, "boss@spammer.example")
    assert isinstance(r, Failed)
