"""The finisher: verdict headers on the raw bytes, nothing else changed."""

from gateway.headers import Finisher, fold, received_header, split_message
from gateway.records import Action, Result, Verdict

RAW = (b"Received: from x ([192.0.2.1])\r\n\tby mx.example.test (MailGate) with ESMTP id Q1;\r\n\tdate\r\n"
       b"From: a@sender.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\nX-Spam-Flag: YES\r\nX-SPAM-Score: -99\r\n"
       b"Authentication-Results: mx.example.test; spf=pass (forged)\r\n"
       b"Authentication-Results: other.example; spf=fail\r\n\r\nbody\r\n")


def verdict(score, *results):
    return Verdict(Action.TAG if score >= 5 else Action.ACCEPT, score, 5.0, list(results))


def test_spam_is_tagged_once_and_forged_headers_removed():
    f = Finisher("mx.example.test")
    out = f.finish(RAW, verdict(7.3, Result("BAYES_99", 3.5), Result("RBL", 3.8)))
    head, body = out.split(b"\r\n\r\n", 1)
    assert body == b"body\r\n"
    assert head.startswith(b"Received: from x")
    assert b"Subject: SPAM*** =?utf-8?q?caf=C3=A9?=" in head
    assert head.count(b"X-Spam-Flag: YES") == 1 and b"-99" not in head
    assert b"spf=pass (forged)" not in head and b"other.example; spf=fail" in head
    assert b"X-Spam-Status: Yes, score=7.3 required=5.0 tests=RBL=3.8,BAYES_99=3.5" in head
    assert b"X-Spam-Level: *******\r\n" in head
    again = f.finish(out, verdict(7.3, Result("BAYES_99", 3.5)))
    assert again.count(b"SPAM***") == 1


def test_ham_gets_status_but_no_flag_and_no_tag():
    out = Finisher("mx.example.test").finish(RAW, verdict(1.0, Result("X", 1.0)))
    assert b"X-Spam-Flag" not in out and b"SPAM***" not in out
    assert b"X-Spam-Status: No, score=1.0 required=5.0 tests=X=1" in out


def test_missing_subject_gets_the_tag_alone():
    raw = b"From: a@b.test\r\n\r\nx\r\n"
    out = Finisher("h.test", "[SPAM] %s").finish(raw, verdict(6))
    assert b"Subject: [SPAM]\r\n" in out


def test_check_headers_are_added_after_received():
    out = Finisher("h.test").finish(RAW, verdict(0), [("Authentication-Results", "h.test; dkim=pass")])
    fields, _ = split_message(out)
    assert fields[1] == b"Authentication-Results: h.test; dkim=pass\r\n"


def test_long_status_is_folded():
    text = fold("X-Spam-Status", ["Yes, score=1 tests=" + "A" * 30] + ["SYMBOL_%d=1" % i for i in range(20)])
    assert all(len(line) <= 78 for line in text.split(b"\r\n"))
    assert text.count(b"\r\n\t") >= 2


def test_received_header_names_queue_id_and_recipient():
    h = received_header("client.test", None, "2001:db8::1", "mx.example.test", "ABC123", "ESMTPS", "bob@example.test",
                        now=0)
    assert h.startswith(b"Received: from client.test ([IPv6:2001:db8::1])\r\n\tby mx.example.test (MailGate) "
                        b"with ESMTPS id ABC123\r\n\tfor <bob@example.test>;\r\n\tThu, 01 Jan 1970 00:00:00 +0000")


def test_received_header_carries_the_confirmed_reverse_name():
    h = received_header("helo.test", "mail.client.test", "192.0.2.1", "mx.example.test", "Q", "ESMTP", None, now=0)
    assert h.startswith(b"Received: from helo.test (mail.client.test [192.0.2.1])\r\n")


def test_outbound_spam_keeps_its_subject_for_its_dkim_signature():
    out = Finisher("mx.example.test").finish(RAW, verdict(9.0), tag_subject=False)
    assert b"SPAM***" not in out and b"X-Spam-Flag: YES" in out
