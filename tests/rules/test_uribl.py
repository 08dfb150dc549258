"""URI blocklists: link extraction, registered domains, lookups in rbldnsd."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import HostPort
from gateway.records import Envelope, Failed, Message, Result, Session, Transaction
from gateway.resolver import Resolver
from rules.sa.uris import extract, host_of, registered_domain
from rules.uribl import Uribl, UriblSettings, UriblZone, message_domains, symbols_for
from tests.support.dns import dns_servers  # noqa: F401  (fixture)

DBL = """\
evil.test :127.0.1.2:spam domain
phish.test :127.0.1.4:phish domain
refused.test :127.255.255.254:query refused
"""

MESSAGE = (
    b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hi\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=XX\r\n\r\n"
    b"--XX\r\nContent-Type: text/plain\r\n\r\n"
    b"Go to hxxp://login.phish[.]test/account now, or www.good.test.\r\n"
    b"--XX\r\nContent-Type: text/html\r\n\r\n"
    b"<p>Cheap <a href=\"http://paypal.com@www.shop.evil.test/x?y=1\">paypal</a>"
    b"<a href=\"https://refused.test/\">x</a></p>\r\n--XX--\r\n"
)


@pytest.mark.parametrize("host,domain", [
    ("www.shop.example.co.uk", "example.co.uk"),
    ("a.b.evil.test", "evil.test"),  # unknown TLD: the list's default rule
    ("foo.blogspot.com", "foo.blogspot.com"),  # a private public suffix
    ("192.0.2.7", "192.0.2.7"),
])
def test_registered_domain_is_public_suffix_aware(host, domain):
    assert registered_domain(host) == domain


@pytest.mark.parametrize("uri,host", [
    ("http://paypal.com@evil.test/login", "evil.test"),
    ("http://%65vil.test/", "evil.test"),
    ("http://3221225994/", "192.0.2.10"),
    ("http://0xC0.0.2.10/", "192.0.2.10"),
    ("https://EVIL.test:8443/a", "evil.test"),
    ("mailto:x@evil.test?subject=a", "evil.test"),
])
def test_host_of_undoes_obfuscation(uri, host):
    assert host_of(uri) == host


def test_extract_finds_obfuscated_and_schemeless_links():
    found = extract(["see hxxp://bad[.]test/x and www.plain.test and evil(dot)test/promo "
                     "and http:\\\\back.test/"])
    hosts = {host_of(u) for u in found}
    assert {"bad.test", "www.plain.test", "back.test"} <= hosts
    assert "evil.test" in hosts


def test_message_domains_from_text_and_html_bounded():
    everything = message_domains(MESSAGE)
    assert sorted(everything) == ["evil.test", "good.test", "phish.test", "refused.test"]
    assert message_domains(MESSAGE, limit=2) == everything[:2]
    assert "good.test" not in message_domains(MESSAGE, skip=["good.test"])


def test_return_codes_map_to_symbols():
    zone = UriblZone(zone="multi.test", codes={"mask:4": "URIBL_WS", "mask:8": "URIBL_PH"})
    assert symbols_for(zone, ("127.0.0.12",)) == ["URIBL_WS", "URIBL_PH"]
    assert symbols_for(zone, ("127.0.0.2",)) == ["URIBL_MULTI_TEST"]
    assert symbols_for(zone, ("127.255.255.254",)) == []
    assert symbols_for(zone, ("192.0.2.1",)) == []


def _txn(raw: bytes) -> Transaction:
    return Transaction(Session("Q1", "192.0.2.1"), Envelope("Q1", "a@sender.test"), Message(raw))


def _check(server, **kw) -> Uribl:
    zone = UriblZone(zone="dbl.test", symbol="URIBL_DBL", score=2.5,
                     codes={"127.0.1.2": "URIBL_DBL_SPAM", "127.0.1.4": "URIBL_DBL_PHISH"})
    settings = UriblSettings(zones=[zone], **kw)
    return Uribl(settings, Resolver([HostPort(server.host, server.port)], timeout=1.0))


def test_listed_domains_are_found_in_rbldnsd(dns_servers):
    rbl = dns_servers.rbldnsd({"dbl.test": ("dnset", DBL)})
    check = _check(rbl)
    txn = _txn(MESSAGE)
    results = asyncio.run(check.check(txn))
    scored = {(r.symbol, r.detail) for r in results if isinstance(r, Result)}
    assert scored == {("URIBL_DBL_PHISH", "phish.test listed in dbl.test"),
                      ("URIBL_DBL_SPAM", "evil.test listed in dbl.test")}
    assert all(r.score == 2.5 for r in results)
    assert txn.state["uribl"] == {"phish.test": ["URIBL_DBL_PHISH"], "evil.test": ["URIBL_DBL_SPAM"]}
    assert not [r for r in results if isinstance(r, Failed)]


def test_blocklist_down_is_a_failure_not_a_listing(dns_servers):
    rbl = dns_servers.rbldnsd({"dbl.test": ("dnset", DBL)})
    check = _check(rbl, timeout=3.0)
    rbl.stop()
    results = asyncio.run(check.check(_txn(MESSAGE)))
    assert [type(r) for r in results] == [Failed]


def test_message_without_links_makes_no_lookups(dns_servers):
    rbl = dns_servers.rbldnsd({"dbl.test": ("dnset", DBL)})
    check = _check(rbl)
    assert asyncio.run(check.check(_txn(b"Subject: x\r\n\r\nno links here\r\n"))) == []
    assert check.resolver.queries == 0


def test_bad_code_map_is_refused():
    with pytest.raises(ValueError):
        UriblZone(zone="dbl.test", codes={"mask:999": "X"})
    with pytest.raises(ValueError):
        UriblZone(zone="dbl.test", codes={"127.0.1.2": "lower case"})
