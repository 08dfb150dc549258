"""gateway.dsn: RFC 3464 bounces that the email package parses back."""

from __future__ import annotations

import datetime
import email
import email.utils
import email.policy

import pytest

from gateway.delivery import DEFERRED, FAILED, Outcome
from gateway.dsn import BOUNCE_SENDER, make_bounce, should_bounce

ORIGINAL = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@example.test, carol@other.test\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <orig-1@sender.test>\r\n"
    b"\r\n"
    b"SECRET BODY TEXT\r\n"
)
ARRIVAL = datetime.datetime(2026, 11, 28, 10, 0, 0, tzinfo=datetime.timezone.utc)
NOW = datetime.datetime(2026, 11, 28, 10, 5, 0, tzinfo=datetime.timezone.utc)
FAILED_OUTCOMES = [
    Outcome("bob@example.test", FAILED, 550, "5.1.1 <bob@example.test>: User unknown",
            "mx.example.test[192.0.2.25]:25", remote=True),
    Outcome("carol@other.test", FAILED, 550, "5.1.2 domain other.test does not exist (NXDOMAIN)"),
]


def bounce(**kw):
    args = dict(queue_id="Q1A2B3", original_sender="alice@sender.test", failed=FAILED_OUTCOMES,
                reporting_mta="mx.mailgate.test", original=ORIGINAL, arrival_date=ARRIVAL, now=NOW)
    args.update(kw)
    return make_bounce(**args)


def parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_structure_is_multipart_report_with_three_parts():
    raw = bounce()
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    msg = parsed(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.mailgate.test"
    assert msg["To"].addresses[0].addr_spec == "alice@sender.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@mx.mailgate.test>")
    assert msg["Date"].datetime == NOW
    assert not msg.defects and all(not p.defects for p in msg.walk())


def test_delivery_status_names_each_failed_recipient_and_code():
    status = list(parsed(bounce()).iter_parts())[1]
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.mailgate.test"
    assert per_message["X-MailGate-Queue-ID"] == "Q1A2B3"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in per_recipient] == [
        ("rfc822; bob@example.test", "failed", "5.1.1"),
        ("rfc822; carol@other.test", "failed", "5.1.2"),
    ]
    assert per_recipient[0]["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.test>: User unknown"
    assert per_recipient[0]["Remote-MTA"] == "dns; mx.example.test"
    # decided here, not by a remote server: no Remote-MTA, no smtp diagnostic
    assert per_recipient[1]["Remote-MTA"] is None
    assert per_recipient[1]["Diagnostic-Code"].startswith("x-mailgate; 5.1.2 ")


def test_human_part_and_original_headers_only():
    text, _, headers = parsed(bounce()).iter_parts()
    body = text.get_content()
    assert "<bob@example.test>: host mx.example.test[192.0.2.25]:25 said: 550 5.1.1" in body
    assert "carol@other.test" in body
    original = headers.get_payload(decode=True)
    assert b"Subject: quarterly report" in original and b"Message-ID: <orig-1@sender.test>" in original
    assert b"SECRET BODY TEXT" not in bounce()


def test_status_without_enhanced_code_comes_from_the_reply_class():
    expired = Outcome("d@x.test", DEFERRED, 451, "try again later", "mx.x.test[192.0.2.9]:25", remote=True)
    plain = Outcome("e@x.test", FAILED, 554, "go away", "mx.x.test[192.0.2.9]:25", remote=True)
    blocks = list(parsed(bounce(failed=[expired, plain])).iter_parts())[1].get_payload()[1:]
    assert [b["Status"] for b in blocks] == ["4.0.0", "5.0.0"]


def test_arrival_as_epoch_seconds_and_8bit_headers():
    original = "Subject: caf\u00e9\r\n\r\nx\r\n".encode("utf-8")
    msg = parsed(bounce(arrival_date=ARRIVAL.timestamp(), original=original))
    per_message = list(msg.iter_parts())[1].get_payload()[0]
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    headers = list(msg.iter_parts())[2]
    assert "caf\u00e9" in headers.get_payload(decode=True).decode("utf-8")


@pytest.mark.parametrize("sender,expected", [
    ("alice@sender.test", True),
    ("", False),
    ("<>", False),
    ("MAILER-DAEMON@mx.other.test", False),
    ("mailer-daemon@x.test", False),
    ("MAILER-DAEMON", False),
    ("postmaster@x.test", True),
])
def test_should_bounce(sender, expected):
    assert should_bounce(sender) is expected


def test_no_bounce_for_the_null_sender_or_without_failures():
    assert BOUNCE_SENDER == ""
    with pytest.raises(ValueError):
        bounce(original_sender="")
    with pytest.raises(ValueError):
        bounce(original_sender="MAILER-DAEMON@x.test")
    with pytest.raises(ValueError):
        bounce(failed=[])


class ExpiredLike:
    """What a queue manager hands in when the queue lifetime ran out: only
    recipient, status, code and reply."""

    status = "failed"

    def __init__(self, recipient, code, reply):
        self.recipient, self.code, self.reply = recipient, code, reply


def test_expired_recipient_and_rfc5322_arrival_string():
    expired = ExpiredLike("late@x.test", 451, "delivery time expired after 9 attempts; last error: 4.4.1 refused")
    raw = bounce(failed=[expired], arrival_date=email.utils.format_datetime(ARRIVAL))
    _, status, _ = parsed(raw).iter_parts()
    per_message, block = status.get_payload()
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; late@x.test", "4.4.7")
    assert block["Diagnostic-Code"] == "x-mailgate; delivery time expired after 9 attempts; last error: 4.4.1 refused"


def test_bad_arrival_date_is_a_clear_error():
    with pytest.raises(ValueError, match="not an RFC 5322 date"):
        bounce(arrival_date="yesterday-ish")
