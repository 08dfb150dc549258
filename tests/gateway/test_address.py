"""RFC 5321 path parsing and the relay decision."""

import pytest

from gateway.address import AddressError, Mailbox, parse_mailbox, parse_path, relay_allowed

OURS = {"example.test"}


def test_plain_and_null_paths():
    p = parse_path("FROM:<Alice@Sender.Test>", "FROM", allow_null=True)
    assert p.mailbox == Mailbox("Alice", "sender.test") and p.params == {}
    assert parse_path("FROM:<>", "FROM", allow_null=True).mailbox is None
    with pytest.raises(AddressError):
        parse_path("TO:<>", "TO", allow_null=False)


def test_lenient_forms_real_clients_send():
    assert parse_path("FROM: <a@b.test>", "FROM", True).address == "a@b.test"
    assert parse_path("FROM:a@b.test SIZE=10", "FROM", True).params == {"SIZE": "10"}


def test_parameters_are_parsed_and_upper_cased():
    p = parse_path("FROM:<a@b.test> size=100 BODY=8BITMIME", "FROM", True)
    assert p.params == {"SIZE": "100", "BODY": "8BITMIME"}


def test_source_route_is_dropped_but_remembered():
    p = parse_path("TO:<@relay.test,@other.test:user@final.test>", "TO", False)
    assert p.mailbox.address == "user@final.test" and p.had_route


@pytest.mark.parametrize("bad", ["a b@c.test", "a@@c.test", "a@c..test", "@c.test", "a@", "a@-c.test",
                                 "a@[300.1.1.1]", "user@other@c.test", "x" * 65 + "@c.test"])
def test_bad_mailboxes(bad):
    with pytest.raises(AddressError):
        parse_mailbox(bad)


def test_literals_and_quoted_locals():
    assert parse_mailbox("a@[192.0.2.1]").is_literal
    assert parse_mailbox("a@[IPv6:2001:db8::1]").domain == "[ipv6:2001:db8::1]"
    m = parse_mailbox('"john doe"@c.test')
    assert m.unquoted_local == "john doe"


def test_trailing_dot_and_case_are_normalised():
    assert parse_mailbox("A@Example.TEST.").domain == "example.test"


@pytest.mark.parametrize("rcpt,allowed", [
    ("bob@example.test", True), ("bob@other.test", False), ("user%other.test@example.test", False),
    ("other.test!user@example.test", False), ('"user@other.test"@example.test', False),
    ("user@[192.0.2.1]", False), ("bob@sub.example.test", False),
])
def test_relay_for_outside_clients(rcpt, allowed):
    assert relay_allowed(parse_mailbox(rcpt), OURS, may_relay=False) is allowed


def test_trusted_clients_may_relay_anywhere():
    assert relay_allowed(parse_mailbox("x@other.test"), OURS, may_relay=True)


def test_utf8_addresses_need_smtputf8_and_keep_a_label_domains():
    with pytest.raises(AddressError, match="needs SMTPUTF8"):
        parse_path("TO:<ü@example.test>", "TO", allow_null=False)
    path = parse_path("TO:<ü@exämple.test>", "TO", allow_null=False, utf8=True)
    assert path.mailbox.local == "ü" and path.mailbox.domain == "xn--exmple-cua.test"
    with pytest.raises(AddressError):
        parse_path("TO:<ü ü@example.test>", "TO", allow_null=False, utf8=True)
    with pytest.raises(AddressError, match="too long"):
        parse_path("TO:<" + "ü" * 33 + "@example.test>", "TO", allow_null=False, utf8=True)  # 66 octets


def test_postmaster_without_domain_is_the_postmaster_of_the_given_domain():
    path = parse_path("TO:<postmaster>", "TO", allow_null=False, postmaster_domain="example.test")
    assert path.address == "postmaster@example.test"
    with pytest.raises(AddressError):
        parse_path("TO:<postmaster>", "TO", allow_null=False)
    with pytest.raises(AddressError):
        parse_path("TO:<webmaster>", "TO", allow_null=False, postmaster_domain="example.test")
