"""rules.sender: sender domain existence and the one-recipient rule for bounces."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import HostPort, validate
from gateway.plugins import Services
from gateway.records import Envelope, Failed, Recipient, Session, Transaction
from gateway.resolver import Resolver
from rules import sender
from rules.sender import NullSenderRecipients, SenderDomain
from tests.support.dns import dns_servers, envelope_dns, envelope_records  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def world(envelope_dns):
    return envelope_dns


def build(server, cls=SenderDomain, timeout=1.0, **section):
    cfg = validate({"sender": section}, sender.SECTIONS)
    return cls.from_config(cfg, Services(None, resolver=Resolver([HostPort(server.host, server.port)],
                                                                  timeout=timeout)))


def txn(mail_from, auth=None):
    return Transaction(Session("Q", "192.0.2.66", auth_user=auth), Envelope("Q", mail_from))


def run(check, t):
    out = check.check(t)
    return asyncio.run(out) if asyncio.iscoroutine(out) else out


@pytest.mark.parametrize("domain", ["sender.test", "aonly.test", "v6only.test", "SENDER.test."])
def test_existing_domains_pass(world, domain):
    assert run(build(world), txn(f"a@{domain}")) == []


@pytest.mark.parametrize("domain,why", [("ghost.test", "no such domain"), ("nomx.test", "no MX, A or AAAA")])
def test_unknown_domain_refused(world, domain, why):
    [r] = run(build(world), txn(f"a@{domain}"))
    assert (r.symbol, r.refuse, r.detail) == ("SENDER_DOMAIN_UNKNOWN", "sender_domain", f"{domain} ({why})")


def test_null_mx_refused(world):
    [r] = run(build(world), txn("a@nullmx.test"))
    assert (r.symbol, r.refuse) == ("SENDER_NULL_MX", "sender_domain")


def test_configurable_to_score_instead(world):
    [r] = run(build(world, reject_unknown_domain=False), txn("a@ghost.test"))
    assert r.refuse is None and r.score > 0


def test_null_sender_literals_and_relay_clients_are_not_checked(world):
    c = build(world)
    assert run(c, txn("")) == []
    assert run(c, txn("a@[192.0.2.1]")) == []
    assert run(c, txn("a@ghost.test", auth="alice")) == []


def test_dns_down_never_refuses(dns_servers):  # noqa: F811
    server = dns_servers.dnsmasq(envelope_records())
    c = build(server, timeout=0.5)
    server.stop()
    [r] = run(c, txn("a@ghost.test"))
    assert isinstance(r, Failed)


def _with_rcpts(mail_from, n_before, auth=None):
    t = txn(mail_from, auth)
    t.envelope.recipients = [Recipient(f"u{i}@example.test", "example.test") for i in range(n_before)]
    t.rcpt = Recipient("next@example.test", "example.test")
    return t


def test_null_sender_second_recipient_refused(world):
    c = build(world, NullSenderRecipients)
    assert run(c, _with_rcpts("", 0)) == []
    [r] = run(c, _with_rcpts("", 1))
    assert (r.symbol, r.refuse) == ("NULL_SENDER_MULTI_RCPT", "policy")


def test_null_sender_rule_counts_the_current_recipient_once(world):
    c = build(world, NullSenderRecipients)
    t = _with_rcpts("", 0)
    t.envelope.recipients.append(t.rcpt)  # the gateway may list it already
    assert run(c, t) == []


def test_ordinary_senders_and_limit_setting(world):
    assert run(build(world, NullSenderRecipients), _with_rcpts("a@sender.test", 5)) == []
    assert run(build(world, NullSenderRecipients, null_sender_max_recipients=3), _with_rcpts("", 2)) == []
    assert run(build(world, NullSenderRecipients), _with_rcpts("", 3, auth="alice")) == []
