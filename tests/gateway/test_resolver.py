"""gateway.resolver against real DNS servers on loopback (dnsmasq + rbldnsd)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.config import DnsSettings, HostPort
from gateway.resolver import NOANSWER, NXDOMAIN, OK, SERVFAIL, TIMEOUT, Resolver
from tests.support.dns import ZEN_IP4SET, Records, dns_servers  # noqa: F401  (fixture)

RECORDS = (
    Records(ttl=120)
    .a("mail.example.test", "192.0.2.25")
    .aaaa("mail.example.test", "2001:db8::25")
    .mx("example.test", "mail.example.test", 10)
    .mx("example.test", "backup.example.test", 5)
    .a("backup.example.test", "192.0.2.26")
    .ptr("192.0.2.40", "unrelated.other.test")
    .txt("sel._domainkey.sender.test", "v=DKIM1; k=rsa; p=" + "A" * 600)
    .cname("www.example.test", "mail.example.test")
)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def dns(dns_servers):  # noqa: F811
    rbl = dns_servers.rbldnsd({"zen.test": ("ip4set", ZEN_IP4SET)})
    return dns_servers.dnsmasq(RECORDS, forward={"zen.test": rbl})


def resolver_for(server, timeout=1.0, **kw):
    return Resolver([HostPort(server.host, server.port)], timeout=timeout, **kw)


def run(coro):
    return asyncio.run(coro)


def test_outcomes_are_distinct(dns):
    r = resolver_for(dns)

    async def go():
        return await asyncio.gather(
            r.query("mail.example.test", "A"),
            r.query("nothing.example.test", "A"),
            r.query("example.test", "A"),
            r.query("elsewhere.invalid-tld-refused", "A"),  # dnsmasq refuses: SERVFAIL for us
        )

    ok, nx, noans, refused = run(go())
    assert (ok.status, ok.records) == (OK, ("192.0.2.25",))
    assert nx.status == NXDOMAIN and nx.missing and not nx.failed
    assert noans.status == NOANSWER and noans.missing
    assert refused.status == SERVFAIL and refused.failed


def test_mx_sorted_and_addresses_and_ptr(dns):
    r = resolver_for(dns)

    async def go():
        return (await r.mx("example.test"), await r.addresses("mail.example.test"),
                await r.ptr("192.0.2.40"), await r.ptr("192.0.2.25"), await r.addresses("nothing.example.test"))

    mx, addrs, ptr_other, ptr_mail, none = run(go())
    assert mx.records == ("5 backup.example.test.", "10 mail.example.test.")
    assert addrs == ["192.0.2.25", "2001:db8::25"]
    assert ptr_other.records == ("unrelated.other.test.",)
    assert ptr_mail.records == ("mail.example.test.",)
    assert none == []


def test_long_txt_comes_back_as_several_strings(dns):
    lookup = run(resolver_for(dns).query("sel._domainkey.sender.test", "TXT"))
    assert lookup.ok
    text = lookup.records[0]
    assert text.count('" "') == 2  # 618 bytes: 255 + 255 + 108
    assert text.replace('" "', "").strip('"').endswith("A" * 50)


def test_cname_is_followed(dns):
    lookup = run(resolver_for(dns).query("www.example.test", "A"))
    assert lookup.records == ("192.0.2.25",)


def test_dnsbl_through_forwarder(dns):
    r = resolver_for(dns)
    listed = run(r.query("7.100.51.198.zen.test", "A"))
    clean = run(r.query("1.0.0.127.zen.test", "A"))
    assert listed.records == ("127.0.0.4",)
    assert clean.status == NXDOMAIN


def test_cache_respects_ttl_including_negative_answers(dns):
    clock = FakeClock()
    r = resolver_for(dns, clock=clock)
    run(r.query("mail.example.test", "A"))
    run(r.query("nothing.example.test", "A"))
    assert r.queries == 2
    run(r.query("MAIL.example.test.", "a"))  # same key after normalising
    run(r.query("nothing.example.test", "A"))
    assert r.queries == 2
    clock.now += 121  # past the 120 s record TTL, and past the 60 s negative default
    run(r.query("mail.example.test", "A"))
    run(r.query("nothing.example.test", "A"))
    assert r.queries == 4


def test_cache_is_bounded(dns):
    r = resolver_for(dns, cache_size=2)
    for name in ("mail.example.test", "backup.example.test", "www.example.test"):
        run(r.query(name, "A"))
    run(r.query("mail.example.test", "A"))  # evicted (least recently used)
    assert r.queries == 4


def test_concurrent_identical_queries_share_one_lookup(dns):
    r = resolver_for(dns)

    async def go():
        return await asyncio.gather(*(r.query("mail.example.test", "A") for _ in range(5)))

    results = run(go())
    assert {x.records for x in results} == {("192.0.2.25",)}
    assert r.queries == 1


def test_server_down_is_timeout_within_the_limit(dns):
    r = resolver_for(dns, timeout=0.5)
    dns.stop()
    t0 = time.monotonic()
    lookup = run(r.query("mail.example.test", "A"))
    elapsed = time.monotonic() - t0
    assert lookup.status in (TIMEOUT, SERVFAIL) and lookup.failed
    assert elapsed < 1.5
    dns.start()
    clock_free = resolver_for(dns)
    assert run(clock_free.query("mail.example.test", "A")).ok


def test_failures_are_cached_only_briefly(dns):
    clock = FakeClock()
    r = resolver_for(dns, timeout=0.3, clock=clock)
    dns.stop()
    assert run(r.query("mail.example.test", "A")).failed
    dns.start()
    assert run(r.query("mail.example.test", "A")).failed  # still the cached failure
    clock.now += 6
    assert run(r.query("mail.example.test", "A")).ok


def test_from_config_uses_explicit_nameservers(dns):
    settings = DnsSettings(nameservers=[dns.nameserver], timeout=1.0, cache_size=10)
    r = Resolver.from_config(settings)
    assert run(r.query("mail.example.test", "A")).ok
    assert r.cache_size == 10


def test_bad_name_is_an_outcome_not_an_exception(dns):
    r = resolver_for(dns)
    lookup = run(r.query("a" * 70 + ".example.test", "A"))  # label longer than 63
    assert lookup.failed
    assert run(r.query("", "A")).status in (SERVFAIL, NXDOMAIN, NOANSWER, OK)


def test_a_waiter_survives_the_sender_giving_up(dns):
    r = resolver_for(dns)

    async def go():
        first = asyncio.ensure_future(r.query("mail.example.test", "A"))
        await asyncio.sleep(0)  # the first query is on the wire
        second = asyncio.ensure_future(r.query("mail.example.test", "A"))
        await asyncio.sleep(0)
        first.cancel()
        return await second

    assert run(go()).records == ("192.0.2.25",)
    assert r.queries == 2  # it joined the first lookup, then asked again itself
