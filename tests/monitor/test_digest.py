"""Quarantine digests (monitor/digest.py): the HMAC links and the mail queued through the spool."""

from __future__ import annotations

import email
import email.policy

import pytest

from gateway.spool import Spool
from monitor.digest import (LinkError, build_digest, next_run, pending_by_recipient, send_digests, sign,
                            verify)
from tests.monitor.memory_store import MemoryStore
from tests.monitor.test_actions import quarantined

KEY = "0123456789abcdef0123"
NOW = 1_800_000_000.0


def test_a_signed_link_verifies_for_its_action_until_it_expires():
    token = sign(KEY, "release", "0000000000AAAA01", "bob@example.test", NOW + 60)
    link = verify(KEY, token, "release", NOW)
    assert (link.action, link.queue_id, link.recipient, link.expires) == \
        ("release", "0000000000AAAA01", "bob@example.test", NOW + 60)
    assert "@" not in token  # the address is encoded, not a path or query separator


def test_an_expired_link_is_refused():
    token = sign(KEY, "release", "Q1", "bob@example.test", NOW)
    with pytest.raises(LinkError, match="expired") as e:
        verify(KEY, token, "release", NOW)
    assert e.value.reason == "expired"


@pytest.mark.parametrize("change", [
    lambda t: t.replace("Q1", "Q2", 1),  # another message
    lambda t: t.replace(t.split(".")[3], str(int(t.split(".")[3]) + 86400)),  # a longer life
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # the signature
    lambda t: t.replace("release", "notspam", 1),  # the action inside the token
    lambda t: t.split(".", 1)[1],  # cut short
    lambda t: t + ".x",
])
def test_a_tampered_link_is_refused(change):
    token = sign(KEY, "release", "Q1", "bob@example.test", NOW + 3600)
    with pytest.raises(LinkError) as e:
        verify(KEY, change(token), "release", NOW)
    assert e.value.reason == "tampered"


def test_a_link_signed_with_another_key_is_refused():
    token = sign("another-key-of-16+", "release", "Q1", "bob@example.test", NOW + 3600)
    with pytest.raises(LinkError) as e:
        verify(KEY, token, "release", NOW)
    assert e.value.reason == "tampered"


def test_a_link_used_for_another_action_is_refused():
    token = sign(KEY, "release", "Q1", "bob@example.test", NOW + 3600)
    with pytest.raises(LinkError, match="for 'release', not 'notspam'") as e:
        verify(KEY, token, "notspam", NOW)
    assert e.value.reason == "wrong action"
    with pytest.raises(ValueError):
        sign(KEY, "delete", "Q1", "bob@example.test", NOW)


def item(qid, subject="cheap pills", expires=NOW + 86400):
    return {"queue_id": qid, "ts": NOW - 10, "subject": subject, "sender": "s@sender.test",
            "recipients": ["a@example.test"], "score": 12.0, "symbols": ["GTUBE"], "reason": "score",
            "expires": expires}


def test_the_digest_lists_each_item_with_working_links_and_escapes_its_text():
    raw = build_digest("a@example.test", [item("Q1", "<script>x</script>")], sender="postmaster@mx.test",
                       hostname="mx.test", base_url="https://mx.test:8025", key=KEY, now=NOW)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["To"] == "a@example.test" and msg["Auto-Submitted"] == "auto-generated"
    assert msg["Subject"] == "Quarantine digest: 1 message(s) held for you"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "Subject: <script>x</script>" in text  # plain text: shown as is
    assert "<script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    url = next(line.split(": ", 1)[1].strip() for line in text.splitlines() if line.startswith("Not spam:"))
    assert url.startswith("https://mx.test:8025/digest/notspam/")
    link = verify(KEY, url.rsplit("/", 1)[1], "notspam", NOW)
    assert (link.queue_id, link.recipient, link.expires) == ("Q1", "a@example.test", NOW + 86400)


def test_send_digests_queues_one_per_recipient_through_the_spool(tmp_path):
    spool = Spool(str(tmp_path / "queue"))
    store = MemoryStore()
    q1 = quarantined(spool, "0000000000AAAA01", rcpts=("a@example.test", "b@example.test"))
    q2 = quarantined(spool, "0000000000AAAA02", rcpts=("a@example.test",))
    gone = "0000000000AAAA03"  # in the store's index, but released meanwhile
    old = "0000000000AAAA04"
    quarantined(spool, old)
    for qid in (q1, q2, gone):
        store.quarantine[qid] = item(qid)
    store.quarantine[old] = item(old, expires=NOW - 1)
    meta = spool.quarantine_meta(q1)
    spool.quarantine_store(q1, spool.quarantine_read(q1), dict(meta, released_to=["b@example.test"]))
    events, woken = [], []
    sent = send_digests(store, spool, key=KEY, base_url="http://127.0.0.1:8025", sender="postmaster@mx.test",
                        hostname="mx.test", emit=events.append, now=NOW, wake=lambda: woken.append(1))
    assert [r for r, _ in sent] == ["a@example.test"]  # b's copy was released: nothing held for b
    (entry,) = spool.entries()
    assert entry.sender == "" and [r.address for r in entry.recipients] == ["a@example.test"]
    assert entry.bounce_of  # ours, like a DSN: never bounced
    msg = email.message_from_bytes(spool.read(entry.queue_id), policy=email.policy.default)
    assert msg["Subject"] == "Quarantine digest: 2 message(s) held for you"
    assert msg.get_body(("plain",)).get_content().count("/digest/release/") == 2
    assert woken == [1] and events[0].action == "digest_sent" and events[0].target == "a@example.test"


def test_pending_by_recipient_skips_expired_and_gone_items(tmp_path):
    spool = Spool(str(tmp_path / "queue"))
    qid = quarantined(spool)
    assert pending_by_recipient([item(qid)], spool, NOW) == {"a@example.test": [item(qid)]}
    assert pending_by_recipient([item(qid, expires=NOW)], spool, NOW) == {}
    assert pending_by_recipient([item("0000000000FFFF01")], spool, NOW) == {}


def test_next_run_is_the_next_time_of_day_utc():
    day = 1_800_057_600.0  # a midnight UTC
    assert next_run(day + 3600, "07:00", 86400) == day + 7 * 3600
    assert next_run(day + 8 * 3600, "07:00", 86400) == day + 86400 + 7 * 3600
    assert next_run(day + 8 * 3600, "07:00", 3600) == day + 9 * 3600  # hourly from 07:00


def test_mailgate_run_sends_digests_whose_link_releases_the_message(mailgate, sink):
    """End to end: a real `mailgate run` quarantines GTUBE, mails bob a digest
    through its own queue to the downstream sink, and the link in it, posted
    without any login, delivers bob's message without our tag."""
    import time
    import urllib.request

    from rules.gtube import GTUBE
    from tests.support.ports import free_port

    web_port = free_port()
    at = time.strftime("%H:%M", time.gmtime())  # this minute: the first digest comes within the interval
    gw = mailgate("[spam]\nquarantine_threshold = 500\nreject_threshold = 5000\n",
                  web=f'listen = "127.0.0.1:{web_port}"\ndigest_key = "{KEY}"\ndigest_interval = "2s"\n'
                      f'digest_at = "{at}"\npublic_url = "http://127.0.0.1:{web_port}"')
    with gw.smtp() as s:
        s.sendmail("promo@sender.test", ["bob@example.test"],
                   b"From: promo@sender.test\r\nTo: bob@example.test\r\nSubject: cheap watches\r\n\r\n" + GTUBE + b"\r\n")
    assert sink.wait_for(1, timeout=60), gw.log()
    digest = email.message_from_bytes(sink.messages[0].data, policy=email.policy.default)
    assert digest["Subject"] == "Quarantine digest: 1 message(s) held for you" and sink.messages[0].mail_from == ""
    text = digest.get_body(("plain",)).get_content()
    assert "Subject: cheap watches" in text
    url = next(line.split(": ", 1)[1].strip() for line in text.splitlines() if line.startswith("Release:"))
    assert url.startswith(f"http://127.0.0.1:{web_port}/digest/release/")
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=30) as resp:
        assert "It is on its way to bob@example.test" in resp.read().decode()

    def released():
        return [m for m in sink.messages if b"X-MailGate-Released: by bob@example.test" in m.data]

    deadline = time.monotonic() + 30
    while not released() and time.monotonic() < deadline:
        time.sleep(0.2)
    (msg,) = released()
    assert b"Subject: cheap watches\r\n" in msg.data and b"X-Spam-Flag" not in msg.data
    assert "digest:bob@example.test" in gw.log() and "/digest/release/(token)" in gw.log()  # never the token
