"""rules.dnsbl against real rbldnsd zones behind dnsmasq on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.config import HostPort, validate
from gateway.plugins import Services
from gateway.records import Envelope, Failed, Recipient, Result, Session, Transaction
from gateway.resolver import Resolver
from rules import dnsbl, lists
from rules.dnsbl import Dnsbl, DnsblReject
from tests.support.dns import ZEN_IP4SET, DnsServers, Records, dns_servers  # noqa: F401

ZONES = {
    "zen.test": ("ip4set", ZEN_IP4SET + "127.0.0.3\n198.51.100.10 :10.0.0.1:hijacked resolver\n"),
    "bl.test": ("ip4set", ":127.0.0.2:Blocked $\n127.0.0.2\n127.0.0.3\n192.0.2.66\n"),
    "multi.test": ("ip4set", "192.0.2.66 :127.0.0.6:two lists\n"),
    "wl.test": ("ip4set", "127.0.0.3 :127.0.0.2:known good\n"),
    "zen6.test": ("ip6trie", "2001:db8::66 :127.0.0.2:v6 listed\n"),
}

ZEN = {"zone": "zen.test", "score": 3.5,
       "codes": {"127.0.0.4": {"symbol": "ZEN_XBL", "score": 4.0},
                 "127.0.0.10": {"symbol": "ZEN_PBL", "score": 1.5}}}
BL = {"zone": "bl.test", "score": 3.0}
MULTI = {"zone": "multi.test", "score": 1.0,
         "bits": {"2": {"symbol": "MULTI_A", "score": 2.0}, "4": {"symbol": "MULTI_B"}}}
WL = {"zone": "wl.test", "score": -5.0, "symbol": "DNSWL"}
ZEN6 = {"zone": "zen6.test", "score": 2.0}


def start_world(servers):
    rbl = servers.rbldnsd(ZONES)
    return servers.dnsmasq(Records().local("example.test"), forward={z: rbl for z in ZONES}), rbl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    servers = DnsServers(tmp_path_factory.mktemp("dns"))
    try:
        yield start_world(servers)[0]
    finally:
        servers.close()


def build(server, cls, timeout=2.0, resolver_timeout=1.0, **rbl):
    cfg = validate({"rbl": {"timeout": timeout, **rbl}}, {**dnsbl.SECTIONS, **lists.SECTIONS})
    resolver = Resolver([HostPort(server.host, server.port)], timeout=resolver_timeout)
    return cls.from_config(cfg, Services(reactor=None, resolver=resolver))


def txn(ip, trusted=False, auth=None):
    session = Session(queue_id="Q", peer_ip=ip, trusted=trusted, auth_user=auth)
    return Transaction(session, Envelope("Q", "a@sender.test"), rcpt=Recipient("bob@example.test", "example.test"))


def run(check, t):
    return asyncio.run(check.check(t))


def results(records):
    return sorted((r.symbol, r.score) for r in records if isinstance(r, Result))


def test_listings_map_return_codes_to_sub_symbols(world):
    c = build(world, Dnsbl, zones=[ZEN, BL])
    assert results(run(c, txn("198.51.100.7"))) == [("ZEN_XBL", 4.0)]
    assert results(run(c, txn("198.51.100.8"))) == [("ZEN_PBL", 1.5)]
    # an unmapped code falls back to the zone's own symbol and score
    assert results(run(c, txn("192.0.2.66"))) == [("RBL_BL_TEST", 3.0), ("RBL_ZEN_TEST", 3.5)]


def test_unlisted_client_gets_nothing(world):
    c = build(world, Dnsbl, zones=[ZEN, BL, MULTI, ZEN6])
    assert run(c, txn("192.0.2.1")) == []
    assert run(c, txn("127.0.0.1")) == []  # RFC 5782 test point: never listed


def test_bitmask_answers(world):
    c = build(world, Dnsbl, zones=[MULTI])
    assert results(run(c, txn("192.0.2.66"))) == [("MULTI_A", 2.0), ("MULTI_B", 1.0)]


def test_error_codes_and_foreign_answers_are_failures_never_listings(world):
    c = build(world, Dnsbl, zones=[ZEN])
    [err] = run(c, txn("198.51.100.9"))
    assert isinstance(err, Failed) and "127.255.255.254" in err.reason
    [odd] = run(c, txn("198.51.100.10"))
    assert isinstance(odd, Failed) and "10.0.0.1" in odd.reason


def test_ipv6_client_uses_nibble_form(world):
    c = build(world, Dnsbl, zones=[ZEN6, {**ZEN, "ipv6": False}])
    assert results(run(c, txn("2001:db8::66"))) == [("RBL_ZEN6_TEST", 2.0)]
    assert run(c, txn("2001:db8::67")) == []


def test_dnswl_gives_a_negative_score(world):
    c = build(world, Dnsbl, zones=[WL])
    assert results(run(c, txn("127.0.0.3"))) == [("DNSWL", -5.0)]


def test_not_for_trusted_or_authenticated(world):
    c = build(world, Dnsbl, zones=[ZEN])
    assert run(c, txn("192.0.2.66", trusted=True)) == []
    assert run(c, txn("192.0.2.66", auth="alice")) == []


def test_reject_count_refuses_with_zone_names(world):
    c = build(world, DnsblReject, zones=[ZEN, BL], reject_count=2)
    [r] = run(c, txn("192.0.2.66"))
    assert (r.refuse, r.detail) == ("rbl", "zen.test, bl.test")
    assert run(c, txn("198.51.100.7")) == []  # one zone only
    assert run(c, txn("192.0.2.1")) == []


def test_reject_spares_dnswl_allow_lists_and_relay_clients(world):
    c = build(world, DnsblReject, zones=[ZEN, BL, WL], reject_count=2)
    assert run(c, txn("127.0.0.3")) == []  # on zen and bl, but on the DNSWL too
    assert run(c, txn("127.0.0.2"))[0].refuse == "rbl"
    assert run(c, txn("127.0.0.2", auth="alice")) == []
    cfg = validate({"rbl": {"zones": [ZEN, BL], "reject_count": 1}, "lists": {"allow_ips": ["127.0.0.2"]}},
                   {**dnsbl.SECTIONS, **lists.SECTIONS})
    allowed = DnsblReject.from_config(cfg, Services(reactor=None, resolver=Resolver(
        [HostPort(world.host, world.port)], timeout=1.0)))
    assert run(allowed, txn("127.0.0.2")) == []


def test_zero_score_and_reject_false_zones_do_not_count(world):
    c = build(world, DnsblReject, reject_count=1,
              zones=[{**ZEN, "codes": {"127.0.0.10": {"symbol": "ZEN_PBL", "score": 0.0}}},
                     {**BL, "reject": False}])
    assert run(c, txn("198.51.100.8")) == []  # PBL mapped to 0
    assert run(c, txn("198.51.100.7"))[0].detail == "zen.test"
    assert run(c, txn("127.0.0.2"))[0].detail == "zen.test"  # bl.test listed it but does not count


def test_reject_off_by_default(world):
    assert build(world, DnsblReject, zones=[ZEN]) is None
    assert build(world, Dnsbl) is None


def test_rbldnsd_down_means_failed_not_listed_and_bounded(dns_servers):  # noqa: F811
    dns, rbl = start_world(dns_servers)
    score = build(dns, Dnsbl, timeout=1.0, resolver_timeout=3.0, zones=[ZEN, BL, MULTI])
    reject = build(dns, DnsblReject, timeout=1.0, resolver_timeout=3.0, zones=[ZEN, BL], reject_count=1)
    rbl.stop()
    t0 = time.monotonic()
    out = run(score, txn("192.0.2.66"))
    elapsed = time.monotonic() - t0
    assert out and all(isinstance(r, Failed) for r in out)
    assert len(out) == 3
    assert elapsed < 2.5  # the [rbl] timeout bounds all zones together, not each
    assert run(reject, txn("192.0.2.66")) == []


def test_dns_server_down_no_refusal(dns_servers):  # noqa: F811
    dns, _ = start_world(dns_servers)
    reject = build(dns, DnsblReject, timeout=1.0, resolver_timeout=0.5, zones=[ZEN, BL], reject_count=1)
    dns.stop()
    assert run(reject, txn("192.0.2.66")) == []
    dns.start()
    reject = build(dns, DnsblReject, timeout=1.0, resolver_timeout=0.5, zones=[ZEN, BL], reject_count=1)
    assert run(reject, txn("192.0.2.66"))[0].refuse == "rbl"


@pytest.mark.parametrize("zone,problem", [
    ({"zone": "x.test", "codes": {"not-an-ip": {"symbol": "X"}}}, "not-an-ip"),
    ({"zone": "x.test", "bits": {"3": {"symbol": "X"}}}, "bit 3"),
    ({"zone": "x.test", "symbol": "lower"}, "symbol"),
    ({"zone": "bad zone"}, "domain"),
])
def test_bad_zone_settings_are_refused(zone, problem):
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match=problem):
        validate({"rbl": {"zones": [zone]}}, dnsbl.SECTIONS)


# --- end to end through `mailgate run` -----------------------------------------

E2E_RBL = """
[rbl]
zones = [ { zone = "zen.test", score = 3.5 }, { zone = "bl.test", score = 3.0 } ]
reject_count = 2
timeout = 1.5
"""
HAM = b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


E2E_ZONES = {
    "zen.test": ("ip4set", ":127.0.0.2:Listed $\n127.0.0.2\n127.0.0.5\n127.0.0.4 :127.0.0.4:Exploited host $\n"),
    "bl.test": ("ip4set", ":127.0.0.2:Blocked $\n127.0.0.2\n127.0.0.5\n"),
}


def send_from(gw, source):
    with gw.smtp(source_address=source) as c:
        c.ehlo("client.sender.test")
        return c.sendmail("alice@sender.test", ["bob@example.test"], HAM)


def test_e2e_reject_count_through_mailgate_run(dns_servers, mailgate, sink):  # noqa: F811
    from tests.support.gateway import default_records

    rbl = dns_servers.rbldnsd(E2E_ZONES)
    dns = dns_servers.dnsmasq(default_records(), forward={z: rbl for z in E2E_ZONES})
    gw = mailgate(E2E_RBL, dns=dns.nameserver)
    # a client on both zones: refused at RCPT, naming the zones
    with gw.smtp(source_address="127.0.0.2") as c:
        c.ehlo("client.sender.test")
        assert c.mail("alice@sender.test")[0] == 250
        code, text = c.rcpt("bob@example.test")
        assert code == 554 and b"5.7.1" in text and b"zen.test, bl.test" in text
    # an unlisted client passes untouched
    assert send_from(gw, "127.0.0.1") == {}
    assert sink.wait_for(1)
    assert b"RBL_" not in sink.messages[0].data
    # one zone is below reject_count: accepted, carrying the zone's score
    assert send_from(gw, "127.0.0.4") == {}
    assert sink.wait_for(2)
    assert b"RBL_ZEN_TEST=3.5" in sink.messages[1].data
    # the DNSBL server goes down: a listed client not yet in any cache is not refused
    rbl.stop()
    assert send_from(gw, "127.0.0.5") == {}
    assert sink.wait_for(3)


def test_reject_reuses_what_the_mail_stage_found(dns_servers):  # noqa: F811
    dns, rbl = start_world(dns_servers)
    score = build(dns, Dnsbl, timeout=1.0, resolver_timeout=3.0, zones=[ZEN, BL])
    reject = build(dns, DnsblReject, timeout=1.0, resolver_timeout=3.0, zones=[ZEN, BL], reject_count=2)
    t = txn("192.0.2.66")
    assert len(results(asyncio.run(score.check(t)))) == 2
    rbl.stop()  # asking again now would fail: the answer must come from the MAIL stage
    assert asyncio.run(reject.check(t))[0].refuse == "rbl"
    other = txn("192.0.2.66")
    assert asyncio.run(reject.check(other)) == []  # a transaction without MAIL-stage results asks itself


def test_listings_are_shared_with_content_rules(world):
    t = txn("198.51.100.7")
    asyncio.run(build(world, Dnsbl, zones=[ZEN, BL]).check(t))
    assert t.state["dnsbl"] == {"zen.test": {"a": ["127.0.0.4"], "txt": []}}


def test_code_symbol_shorthand_takes_the_zone_score(world):
    c = build(world, Dnsbl, zones=[{"zone": "zen.test", "score": 2.0, "codes": {"127.0.0.4": "ZEN_XBL"}}])
    assert results(run(c, txn("198.51.100.7"))) == [("ZEN_XBL", 2.0)]
