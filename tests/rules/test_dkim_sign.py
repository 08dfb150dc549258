"""Outbound DKIM signing: signed mail verifies against a real DNS server."""

from __future__ import annotations

import dkim
import pytest

from gateway.config import HostPort
from gateway.errors import ConfigError
from gateway.records import Envelope, Failed, Message, Session, Transaction
from rules.dkim_sign import (
    DkimKey,
    DkimSign,
    DkimSignSettings,
    generate_key,
    key_for,
    read_key,
    txt_record,
    write_key,
)
from rules.sender_auth import BlockingDns
from tests.support.dns import Records, dns_servers  # noqa: F401  (fixture)

RAW = (b"Received: from ex.example.test by mx.gateway.test\r\n"
       b"From: Alice <alice@sales.example.test>\r\nTo: bob@partner.test\r\nSubject: offer\r\n"
       b"Date: Sat, 28 Nov 2026 19:00:00 +0000\r\nMessage-ID: <2@example.test>\r\n\r\n"
       b"Here is the offer.\r\n")


@pytest.fixture(scope="module")
def keypair():
    return generate_key(1024)


@pytest.fixture
def signer(tmp_path, keypair):
    pem, _ = keypair
    path = tmp_path / "example.test.sel.key"
    write_key(str(path), pem)
    settings = DkimSignSettings(domains={"example.test": DkimKey(selector="sel", key_file=str(path))})
    return DkimSign(settings, {"example.test": read_key(str(path))})


def _txn(raw=RAW, trusted=True, auth=None) -> Transaction:
    session = Session("Q1", "10.0.0.5", trusted=trusted, auth_user=auth)
    return Transaction(session, Envelope("Q1", "alice@sales.example.test"), Message(raw))


def test_relay_client_mail_is_signed_and_verifies(dns_servers, signer, keypair):
    _, public = keypair
    server = dns_servers.dnsmasq(Records().txt("sel._domainkey.example.test", f"v=DKIM1; k=rsa; p={public}"))
    [result] = signer.check(_txn())
    assert result.symbol == "DKIM_SIGNED" and result.score == 0 and "d=example.test" in result.detail
    name, value = result.header
    assert name == "DKIM-Signature" and "d=example.test" in value and "s=sel" in value
    signed = f"{name}: {value}\r\n".encode() + RAW
    lookup = BlockingDns([HostPort(server.host, server.port)])
    assert dkim.verify(signed, dnsfunc=lambda n, timeout=5: lookup.txt(n.decode().rstrip("."))[0])
    tampered = signed.replace(b"Here is the offer.", b"Here is another offer.")
    assert not dkim.verify(tampered, dnsfunc=lambda n, timeout=5: lookup.txt(n.decode().rstrip("."))[0])


def test_authenticated_clients_are_signed_too(signer):
    assert signer.check(_txn(trusted=False, auth="alice"))[0].header[0] == "DKIM-Signature"


def test_inbound_mail_and_unknown_domains_are_not_signed(signer):
    assert signer.check(_txn(trusted=False)) == []
    other = RAW.replace(b"alice@sales.example.test", b"carol@elsewhere.test")
    assert signer.check(_txn(other)) == []


def test_key_for_picks_the_nearest_parent():
    domains = {"example.test": "parent", "sales.example.test": "child"}
    assert key_for(domains, "sales.example.test") == ("sales.example.test", "child")
    assert key_for(domains, "eu.example.test") == ("example.test", "parent")
    assert key_for(domains, "example.org") is None


def test_unreadable_or_bad_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        read_key(str(tmp_path / "missing.key"))
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM"):
        read_key(str(bad))


def test_settings_validate_selector_and_canonicalization():
    with pytest.raises(ValueError):
        DkimKey(selector="bad selector", key_file="x")
    with pytest.raises(ValueError):
        DkimSignSettings(canonicalization="loose/loose")
    with pytest.raises(ValueError):
        DkimSignSettings(headers=["Subject"])


def test_txt_record_splits_long_keys(keypair):
    line = txt_record("example.test", "sel", "A" * 600)
    assert line.startswith("sel._domainkey.example.test. IN TXT (")
    strings = [s for s in line.split('"')[1::2]]
    assert all(len(s) <= 255 for s in strings) and "".join(strings) == "v=DKIM1; k=rsa; p=" + "A" * 600


def test_signing_failure_is_reported_not_raised(signer):
    signer.keys["example.test"] = b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"
    [r] = signer.check(_txn())
    assert isinstance(r, Failed)


def test_e2e_outbound_mail_from_a_trusted_network_leaves_signed(mailgate, sink, tmp_path, keypair):
    from tests.rules.test_sender_auth import only_checks

    pem, public = keypair
    key = tmp_path / "example.test.sel.key"
    write_key(str(key), pem)
    gw = mailgate(trusted=["127.0.0.0/8"],
                  extra_toml=f'[dkim_sign.domains."example.test"]\nselector = "sel"\nkey_file = "{key}"\n'
                             + only_checks("dkim_sign"))
    raw = (b"From: Alice <alice@sales.example.test>\r\nTo: carol@partner.test\r\nSubject: quote\r\n"
           b"Date: Sat, 28 Nov 2026 19:00:00 +0000\r\nMessage-ID: <3@example.test>\r\n\r\n"
           b"The quote you asked for.\r\n.leading dot stays\r\n")
    with gw.smtp() as smtp:
        smtp.sendmail("alice@sales.example.test", ["carol@partner.test"], raw)
    sink.wait_for(1, timeout=20)
    delivered = sink.messages[0].data
    assert b"DKIM-Signature:" in delivered and b"d=example.test" in delivered
    txt = f"v=DKIM1; k=rsa; p={public}".encode()
    assert dkim.verify(delivered, dnsfunc=lambda name, timeout=5: txt if name == b"sel._domainkey.example.test." else None)


def test_the_from_domain_survives_deeply_nested_comments():
    from rules.dkim_sign import from_domain

    deep = "(" * 2000 + ")" * 2000
    assert from_domain(Message(f"From: alice@sales.example.test {deep}\r\n\r\nhi\r\n".encode()).parsed) \
        == "sales.example.test"
