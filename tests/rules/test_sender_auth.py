"""SPF, DKIM and DMARC against a real DNS server (dnsmasq) on loopback."""

from __future__ import annotations

import dkim
import pytest

from gateway.config import HostPort
from gateway.records import Envelope, Failed, Message, Recipient, Result, Session, Transaction
from rules.dkim_sign import generate_key
from rules.sender_auth import (
    BlockingDns,
    SenderAuth,
    SenderAuthSettings,
    _spf_dispatch,
    authenticate,
    results_for,
)
from tests.support.dns import Records, dns_servers  # noqa: F401  (fixture)

HOST = "mx.gateway.test"


@pytest.fixture(scope="module")
def keypair():
    return generate_key(1024)


def _records(public: str) -> Records:
    return (Records()
            .txt("sender.test", "v=spf1 ip4:127.0.0.1 -all")
            .txt("sel._domainkey.sender.test", f"v=DKIM1; k=rsa; p={public}")
            .txt("_dmarc.sender.test", "v=DMARC1; p=reject")
            .txt("soft.test", "v=spf1 ~all")
            .txt("_dmarc.soft.test", "v=DMARC1; p=none")
            .a("mail.sender.test", "127.0.0.1"))


def _message(frm="alice@sender.test", body=b"Hello Bob,\r\n\r\nthe report is attached.\r\n") -> bytes:
    return (f"From: Alice <{frm}>\r\nTo: bob@example.test\r\nSubject: report\r\n"
            f"Date: Sat, 28 Nov 2026 19:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n\r\n").encode() + body


def _signed(pem: bytes, raw: bytes) -> bytes:
    sig = dkim.sign(raw, b"sel", b"sender.test", pem, canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + raw


def _lookup(server) -> BlockingDns:
    return BlockingDns([HostPort(server.host, server.port)], timeout=2.0)


def _txn(raw: bytes, ip="127.0.0.1", sender="alice@sender.test", trusted=False) -> Transaction:
    session = Session(queue_id="Q1", peer_ip=ip, helo="mail.sender.test", trusted=trusted)
    env = Envelope("Q1", sender, recipients=[Recipient("bob@example.test", "example.test")])
    return Transaction(session, env, Message(raw))


def test_signed_message_from_authorised_ip_passes_all_three(dns_servers, keypair):
    pem, public = keypair
    server = dns_servers.dnsmasq(_records(public))
    out = authenticate(_signed(pem, _message()), _lookup(server), HOST, "127.0.0.1",
                       "alice@sender.test", "mail.sender.test", SenderAuthSettings())
    assert (out.spf, out.dkim, out.dmarc) == ("pass", "pass", "pass")
    assert out.header.startswith(HOST + ";")
    for part in ("spf=pass", "dkim=pass", "dmarc=pass"):
        assert part in out.header
    symbols = {r.symbol for r in results_for(out, SenderAuthSettings())}
    assert symbols == {"SPF_PASS", "DKIM_VALID", "DMARC_PASS"}


def test_forged_dkim_fails_and_dmarc_reject_is_refused_when_configured(dns_servers, keypair):
    pem, public = keypair
    server = dns_servers.dnsmasq(_records(public))
    forged = _signed(pem, _message()).replace(b"the report is attached", b"pay invoice 4711 now!!")
    settings = SenderAuthSettings(refuse_dmarc_reject=True)
    check = SenderAuth(settings, lambda: _lookup(server), HOST)
    records = check.check(_txn(forged, ip="192.0.2.99"))
    by_symbol = {r.symbol: r for r in records if isinstance(r, Result)}
    assert "DKIM_INVALID" in by_symbol and by_symbol["DKIM_INVALID"].score > 0
    assert "SPF_FAIL" in by_symbol
    assert by_symbol["DMARC_FAIL_REJECT"].refuse == "dmarc"
    headers = [r.header for r in records if isinstance(r, Result) and r.header]
    assert len(headers) == 1
    name, value = headers[0]
    assert name == "Authentication-Results"
    assert value.startswith(HOST + ";") and "dkim=fail" in value and "spf=fail" in value
    assert "dmarc=fail" in value


def test_dmarc_reject_only_scores_unless_refusal_configured(dns_servers, keypair):
    pem, public = keypair
    server = dns_servers.dnsmasq(_records(public))
    check = SenderAuth(SenderAuthSettings(), lambda: _lookup(server), HOST)
    records = check.check(_txn(_message(), ip="192.0.2.99"))
    dmarc = [r for r in records if isinstance(r, Result) and r.symbol.startswith("DMARC")]
    assert [r.symbol for r in dmarc] == ["DMARC_FAIL_REJECT"] and dmarc[0].refuse is None


def test_softfail_unsigned_and_policy_none(dns_servers, keypair):
    _, public = keypair
    server = dns_servers.dnsmasq(_records(public))
    out = authenticate(_message(frm="carol@soft.test"), _lookup(server), HOST, "192.0.2.5",
                       "carol@soft.test", "h.soft.test", SenderAuthSettings())
    assert (out.spf, out.dkim, out.dmarc) == ("softfail", "none", "fail")
    symbols = {r.symbol for r in results_for(out, SenderAuthSettings())}
    assert symbols == {"SPF_SOFTFAIL", "DKIM_NONE", "DMARC_FAIL_NONE"}


def test_dns_trouble_is_temperror_without_points(dns_servers, keypair):
    pem, public = keypair
    server = dns_servers.dnsmasq(_records(public))
    lookup = BlockingDns([HostPort(server.host, server.port)], timeout=0.5)
    server.stop()
    out = authenticate(_signed(pem, _message()), lookup, HOST, "127.0.0.1", "alice@sender.test",
                       "mail.sender.test", SenderAuthSettings())
    assert out.spf == "temperror" and out.dkim == "temperror" and out.dmarc == "temperror"
    records = results_for(out, SenderAuthSettings())
    assert all(isinstance(r, Failed) for r in records)
    assert "spf=temperror" in out.header and "dkim=temperror" in out.header


def test_relay_clients_are_not_judged(dns_servers, keypair):
    _, public = keypair
    server = dns_servers.dnsmasq(_records(public))
    check = SenderAuth(SenderAuthSettings(), lambda: _lookup(server), HOST)
    assert check.check(_txn(_message(), trusted=True)) == []


def test_pyspf_never_uses_the_system_resolver_outside_a_check():
    import spf

    with pytest.raises(spf.TempError):
        _spf_dispatch("sender.test", "TXT")


def test_no_nameservers_is_dns_trouble_not_the_system_resolver():
    out = authenticate(_message(), BlockingDns([]), HOST, "127.0.0.1", "alice@sender.test",
                       "mail.sender.test", SenderAuthSettings(dkim=False, dmarc=False))
    assert out.spf == "temperror"


# --- end to end through `mailgate run` ---------------------------------------------


def only_checks(*names: str) -> str:
    """[checks] switching off every other check, so the test depends on ours only."""
    from gateway.plugins import discover

    others = sorted(set(discover().checks) - set(names))
    return "[checks]\ndisabled = [" + ", ".join(f'"{n}"' for n in others) + "]\n"


def test_e2e_forged_dkim_gets_fail_and_the_configured_points(mailgate, sink, dns_servers, keypair):
    from tests.support.gateway import default_records

    pem, public = keypair
    records = default_records()
    for name, text in (("sender.test", "v=spf1 ip4:127.0.0.1 -all"),
                       ("sel._domainkey.sender.test", f"v=DKIM1; k=rsa; p={public}"),
                       ("_dmarc.sender.test", "v=DMARC1; p=none")):
        records.txt(name, text)
    server = dns_servers.dnsmasq(records)
    gw = mailgate(extra_toml="[scores]\nDKIM_INVALID = 2.5\n" + only_checks("sender_auth"),
                  dns=server.nameserver)
    genuine = _signed(pem, _message())
    forged = genuine.replace(b"the report is attached", b"wire 9,800 EUR to the account below")
    # an Authentication-Results that claims to be ours must not survive
    forged = b"Authentication-Results: mx.gateway.test; dkim=pass header.d=sender.test\r\n" + forged
    with gw.smtp() as smtp:
        smtp.sendmail("alice@sender.test", ["bob@example.test"], forged)
        smtp.sendmail("alice@sender.test", ["bob@example.test"], genuine)
    sink.wait_for(2, timeout=20)
    # delivery order is not arrival order: tell them apart by their bodies
    datas = [m.data.replace(b"\r\n", b"\n") for m in sink.messages[:2]]
    first = next(d for d in datas if b"wire 9,800 EUR" in d)
    second = next(d for d in datas if b"wire 9,800 EUR" not in d)
    ar = [line for line in first.split(b"\n\n")[0].split(b"\n") if line.lower().startswith(b"authentication-results")]
    assert len(ar) == 1, first.decode(errors="replace")
    assert ar[0].startswith(b"Authentication-Results: mx.gateway.test;")
    assert b"dkim=fail" in ar[0] and b"spf=pass" in ar[0]
    assert b"DKIM_INVALID=2.5" in first
    assert b"dkim=pass" in second and b"DKIM_VALID" in second and b"DKIM_INVALID" not in second


def test_the_dmarc_from_domain_survives_hostile_nesting():
    from rules.sender_auth import _from_domain
    from tests.gateway.test_mime import nested

    # without a CRLF CRLF the whole message is parsed; bare LF mail has none
    assert _from_domain(nested(1000).replace(b"\r\n", b"\n")) == "sender.test"
    deep = b"From: alice@sender.test " + b"(" * 2000 + b")" * 2000 + b"\r\nSubject: x\r\n\r\nhi\r\n"
    assert _from_domain(deep) == "sender.test"
