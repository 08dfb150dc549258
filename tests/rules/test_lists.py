"""rules.lists: IP, sender and recipient block/allow lists, inline and from files."""

from __future__ import annotations

import pytest

from gateway.config import validate
from gateway.errors import ConfigError
from gateway.plugins import Services
from gateway.records import Envelope, Recipient, Session, Transaction
from rules import lists
from rules.lists import AccessLists, IpLists, ListsSettings, RecipientAllowList, SenderLists, access_lists


def config(**section):
    return validate({"lists": section}, lists.SECTIONS)


def services():
    return Services(reactor=None)


def txn(ip="192.0.2.66", sender="someone@sender.test", rcpt="alice@example.test"):
    session = Session(queue_id="Q1", peer_ip=ip)
    env = Envelope(queue_id="Q1", sender=sender)
    r = Recipient(rcpt, rcpt.rpartition("@")[2]) if rcpt else None
    return Transaction(session=session, envelope=env, rcpt=r)


def test_ip_block_refuses_ipv4_and_ipv6_cidrs():
    c = IpLists.from_config(config(block_ips=["192.0.2.0/24", "2001:db8:bad::/48", "198.51.100.7"]), services())
    [r] = c.check(txn("192.0.2.66"))
    assert (r.symbol, r.refuse, r.detail) == ("IP_BLOCKLISTED", "blocklist", "192.0.2.0/24")
    assert c.check(txn("2001:db8:bad:1::5"))[0].refuse == "blocklist"
    assert c.check(txn("::ffff:198.51.100.7"))[0].detail == "198.51.100.7/32"  # mapped address unwrapped
    assert c.check(txn("198.51.100.8")) == []
    assert c.check(txn("2001:db8:bad0::1")) == []


def test_ip_allow_adds_the_allow_score_and_block_wins():
    c = IpLists.from_config(config(allow_ips=["192.0.2.0/24"], block_ips=["192.0.2.66"], allow_score=-50),
                            services())
    [r] = c.check(txn("192.0.2.67"))
    assert (r.symbol, r.score, r.refuse) == ("IP_ALLOWLISTED", -50, None)
    assert c.check(txn("192.0.2.66"))[0].refuse == "blocklist"


def test_sender_patterns():
    c = SenderLists.from_config(config(block_senders=["@usa.com", "spam@other.test", "*.spam.example"]),
                                services())
    assert c.check(txn(sender="Anyone@USA.com"))[0].detail == "@usa.com"
    assert c.check(txn(sender="spam@other.test"))[0].refuse == "blocklist"
    assert c.check(txn(sender="ham@other.test")) == []
    assert c.check(txn(sender="x@deep.mail.spam.example"))[0].detail == "*.spam.example"
    assert c.check(txn(sender="x@spam.example")) == []  # *. is subdomains only
    assert c.check(txn(sender="x@notusa.com")) == []
    assert c.check(txn(sender="")) == []


def test_null_sender_only_by_explicit_entry():
    c = SenderLists.from_config(config(allow_senders=["<>"]), services())
    assert c.check(txn(sender=""))[0].symbol == "SENDER_ALLOWLISTED"
    assert c.check(txn(sender="a@b.test")) == []


def test_recipient_allow_list():
    c = RecipientAllowList.from_config(config(allow_recipients=["abuse@example.test", "@postmaster.test"]),
                                       services())
    [r] = c.check(txn(rcpt="Abuse@example.test"))
    assert (r.symbol, r.score) == ("RCPT_ALLOWLISTED", -100.0)
    assert c.check(txn(rcpt="bob@example.test")) == []


def test_lists_from_files_with_comments(tmp_path):
    ips = tmp_path / "block_ips.txt"
    ips.write_text("# spammers\n203.0.113.0/24   # a whole range\n\n2001:db8::1\n")
    senders = tmp_path / "senders.txt"
    senders.write_text("@bulk.test\n  # nothing\n")
    cfg = config(block_ips_files=[str(ips)], allow_senders_files=[str(senders)])
    c = IpLists.from_config(cfg, services())
    assert c.check(txn("203.0.113.9"))[0].refuse == "blocklist"
    assert c.check(txn("2001:db8::1"))[0].refuse == "blocklist"
    assert c.check(txn("192.0.2.1")) == []
    s = SenderLists.from_config(cfg, services())
    assert s.check(txn(sender="news@bulk.test"))[0].symbol == "SENDER_ALLOWLISTED"


def test_file_changes_are_seen_by_a_new_config(tmp_path):
    f = tmp_path / "ips.txt"
    f.write_text("192.0.2.1\n")
    svc = services()
    first = IpLists.from_config(config(block_ips_files=[str(f)]), svc)
    f.write_text("192.0.2.2\n")
    reloaded = IpLists.from_config(config(block_ips_files=[str(f)]), svc)  # what SIGHUP does
    assert first.check(txn("192.0.2.1")) and not reloaded.check(txn("192.0.2.1"))
    assert reloaded.check(txn("192.0.2.2"))


def test_bad_file_line_names_file_and_line(tmp_path):
    f = tmp_path / "ips.txt"
    f.write_text("192.0.2.1\nnot-an-ip\n")
    with pytest.raises(ConfigError, match=r"ips.txt:2"):
        IpLists.from_config(config(block_ips_files=[str(f)]), services())


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        AccessLists(ListsSettings(block_senders_files=[str(tmp_path / "absent")]))


@pytest.mark.parametrize("key,value", [("block_ips", "192.0.2.300"), ("block_senders", "a b@c.test"),
                                       ("allow_senders", "*.x*.test"), ("allow_recipients", "a@")])
def test_bad_inline_entries_are_refused_at_load(key, value):
    with pytest.raises(ConfigError, match=f"lists.{key}"):
        config(**{key: [value]})


def test_unused_lists_switch_their_checks_off():
    cfg = config()
    assert IpLists.from_config(cfg, services()) is None
    assert SenderLists.from_config(cfg, services()) is None
    assert RecipientAllowList.from_config(cfg, services()) is None


def test_allowed_names_the_reason_and_is_shared():
    svc = services()
    cfg = config(allow_ips=["10.0.0.0/8"], allow_senders=["@friend.test"], allow_recipients=["abuse@example.test"])
    lists_ = access_lists(cfg, svc)
    assert access_lists(cfg, svc) is lists_
    assert lists_.allowed(txn("10.1.2.3")) == "client 10.0.0.0/8"
    assert lists_.allowed(txn(sender="a@friend.test")) == "sender @friend.test"
    assert lists_.allowed(txn(rcpt="abuse@example.test")) == "recipient abuse@example.test"
    assert lists_.allowed(txn()) is None
