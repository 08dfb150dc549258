"""The event sink and the log subscriber: the lines admins grep, built from typed events."""

import logging

import pytest

from gateway.errors import Reject, Reply
from gateway.events import (AdminAction, Bounced, ClientGone, ConnectionClosed, ConnectionOpened, Deferred,
                            DeliveryAttempted, EventSink, LogLine, MessageAnswered, RecipientOutcome, StageRefused,
                            default_sink, quote)
from gateway.records import Action, Envelope, Failed, Message, Recipient, Result, Session, Verdict

RAW = (b"From: a@sender.test\r\nTo: bob@example.test\r\n"
       b"Subject: =?utf-8?q?Caf=C3=A9_=22menu=22?=\r\n\tand\r\n more\r\n"
       b"Message-ID: <42@sender.test>\r\n\r\nbody\r\n")


def session(**kw):
    return Session(queue_id="Q1", peer_ip="192.0.2.10", helo="client.sender.test", **kw)


def envelope():
    return Envelope("Q1", "a@sender.test", recipients=[Recipient("bob@example.test", "example.test")], size=123)


def answered(raw=RAW, **verdict):
    v = Verdict(Action.TAG, 6.5, 5.0, [Result("BAYES_99", 5.0), Result("MISSING_DATE", 1.5)], **verdict)
    return MessageAnswered(session(), envelope(), v, Reply(250, "2.0.0", "Ok: queued as Q1"), Message(raw))


def lines(caplog, logger):
    return [r.getMessage() for r in caplog.records if r.name == logger]


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.DEBUG, logger="mailgate")
    return caplog


# --- the sink ---------------------------------------------------------------------


def test_every_subscriber_hears_every_event_in_order():
    one, two = [], []
    sink = EventSink([one.append, two.append])
    sink.emit("a")
    sink.emit("b")
    assert one == two == ["a", "b"]


def test_a_failing_subscriber_is_logged_not_raised_and_the_others_still_hear(caplog):
    def broken(event):
        raise RuntimeError("subscriber exploded")

    seen = []
    sink = EventSink([broken, seen.append])
    with caplog.at_level(logging.ERROR):
        sink.emit("fact")
    assert seen == ["fact"] and "subscriber exploded" in caplog.text


def test_the_default_sink_is_the_log_line_alone():
    (sub,) = default_sink().subscribers
    assert isinstance(sub, LogLine) and sub.subject is True
    assert default_sink(subject=False).subscribers[0].subject is False


# --- the per-message line -------------------------------------------------------------


def test_the_message_line_names_the_message_id_and_the_subject_quoted(log):
    LogLine()(answered())
    (line,) = lines(log, "mailgate.message")
    assert line == ('queue_id=Q1 client=192.0.2.10 helo=client.sender.test from=<a@sender.test> '
                    'to=<bob@example.test> size=123 message_id="<42@sender.test>" '
                    'subject="Café \\"menu\\" and more" score=6.5 symbols=BAYES_99,MISSING_DATE action=tag '
                    'reply="250 2.0.0 Ok: queued as Q1"')


def test_the_subject_can_be_left_out_of_the_log(log):
    LogLine(subject=False)(answered())
    (line,) = lines(log, "mailgate.message")
    assert 'message_id="<42@sender.test>"' in line and "subject=" not in line and "Café" not in line


def test_a_hostile_subject_cannot_forge_a_line_or_a_key_and_is_bounded(log):
    # an encoded word can carry CR LF that the header's own folding could not
    evil = b"=?utf-8?b?" + __import__("base64").b64encode(
        b'x" action=accept\r\nqueue_id=FORGED client=1.2.3.4 \x1b[31m' + b"A" * 500) + b"?="
    LogLine()(answered(b"Subject: " + evil + b"\r\nMessage-ID: <a\"b@x>\r\n\r\nbody\r\n"))
    (line,) = lines(log, "mailgate.message")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    subject = line.split(' subject="', 1)[1].split('" score=', 1)[0]
    assert subject.startswith('x\\" action=accept queue_id=FORGED') and subject.endswith("...")
    assert len(subject) <= 200 + subject.count("\\")
    assert line.count(" action=") == 1 + subject.count(" action=")  # the real key comes once, after the subject
    assert 'message_id="<a\\"b@x>"' in line


def test_a_message_without_subject_or_message_id_says_so_with_empty_values(log):
    LogLine()(answered(b"From: a@sender.test\r\n\r\nbody\r\n"))
    (line,) = lines(log, "mailgate.message")
    assert 'message_id="" subject=""' in line


def test_quote_keeps_one_line_and_its_bound():
    assert quote("a\r\n\tb   c") == "a b c"
    assert quote('say "hi" \\o/') == 'say \\"hi\\" \\\\o/'
    assert quote("x" * 300) == "x" * 197 + "..."


def test_failures_and_the_auth_user_are_on_the_line(log):
    LogLine()(MessageAnswered(session(auth_user="alice"), envelope(),
                              Verdict(Action.TEMPFAIL, 0.0, 5.0, [], [Failed("antivirus", "clamd down", "tempfail")]),
                              Reject(451, "4.3.0", "Temporary failure (queue id Q1)"), None))
    (line,) = lines(log, "mailgate.message")
    assert " auth=alice from=<a@sender.test>" in line and " failed=antivirus:clamd down " in line
    assert "message_id=" not in line  # no message: nothing to name


def test_a_client_gone_line_says_nothing_was_queued(log):
    a = answered()
    LogLine()(ClientGone(a.session, a.envelope, a.verdict, a.message))
    (line,) = lines(log, "mailgate.message")
    assert line.endswith("action=tag dropped=client disconnected before the reply; nothing queued")
    assert 'message_id="<42@sender.test>"' in line


def test_a_refusal_line(log):
    LogLine()(StageRefused(session(), envelope(), "rcpt", Reject(554, "5.7.1", "<x@y>: Relay access denied"),
                           "x@y"))
    (line,) = lines(log, "mailgate.message")
    assert line == ('queue_id=Q1 client=192.0.2.10 helo=client.sender.test from=<a@sender.test> to=<x@y> '
                    'stage=rcpt action=refused reply="554 5.7.1 <x@y>: Relay access denied"')


# --- connections ---------------------------------------------------------------------


def test_an_ordinary_connection_is_not_a_line_a_bad_end_is(log):
    sub = LogLine()
    sub(ConnectionOpened(session(), 1.0))
    sub(ConnectionClosed(session(), 2.0, "quit"))
    sub(ConnectionClosed(session(), 2.0, "lost"))
    assert lines(log, "mailgate.smtp") == []
    sub(ConnectionClosed(session(), 2.0, "timeout: DATA"))
    sub(ConnectionClosed(session(), 2.0, "too many auth failures", auth_failures=3))
    sub(ConnectionClosed(session(), 2.0, "early talker"))
    assert lines(log, "mailgate.smtp") == [
        "queue_id=Q1 client=192.0.2.10 timeout=DATA",
        'queue_id=Q1 client=192.0.2.10 helo=client.sender.test disconnect="too many auth failures"',
        "queue_id=Q1 client=192.0.2.10 early_talker=yes",
    ]


# --- delivery ----------------------------------------------------------------------------


def test_delivery_lines_are_the_ones_admins_grep(log):
    sub = LogLine()
    sub(DeliveryAttempted("Q1", 1000.0, "mx.x.test[192.0.2.1]:25", (
        RecipientOutcome("a@x.test", "sent", 250, '2.0.0 Ok "queued"'),
        RecipientOutcome("b@x.test", "failed", 550, "5.1.1 unknown")), tls=True, delay=1.234, route="mx:x.test"))
    sub(DeliveryAttempted("Q1", 1000.0, "none", (RecipientOutcome("c@dead.test", "deferred", 451, "4.4.1 dead"),),
                          route="mx:dead.test"))
    assert lines(log, "mailgate.delivery") == [
        'queue_id=Q1 to=a@x.test relay=mx.x.test[192.0.2.1]:25 status=sent code=250 reply="2.0.0 Ok \\"queued\\"" '
        'delay=1.23 tls=yes',
        'queue_id=Q1 to=b@x.test relay=mx.x.test[192.0.2.1]:25 status=bounced code=550 reply="5.1.1 unknown" '
        'delay=1.23 tls=yes',
        'queue_id=Q1 to=c@dead.test relay=none status=deferred code=451 reply="4.4.1 dead" delay=0.00 tls=no '
        'next_hop=mx:dead.test',
    ]


def test_deferrals_and_bounces(log):
    sub = LogLine()
    sub(Deferred("Q1", 1000.0, ("a@x.test", "b@x.test"), 1120.0, 2, "451 try later"))
    sub(Bounced("Q1", 1000.0, ("a@x.test",), "550 no", "QB", sender="s@sender.test"))
    sub(Bounced("Q2", 1000.0, ("a@x.test",), "550 no", "", sender=""))
    assert lines(log, "mailgate.queue") == [
        "queue_id=Q1 deferred=2 next_try_in=120s attempts=2",
        "queue_id=Q1 bounce_id=QB to=<s@sender.test>",
        "queue_id=Q2 bounce=suppressed sender=<>",
    ]


def test_admin_actions_name_who_did_what(log):
    LogLine()(AdminAction(1000.0, "cli:root", "release", "Q1", "new queue id Q9 to bob@example.test"))
    assert lines(log, "mailgate.admin") == [
        'actor=cli:root action=release target=Q1 detail="new queue id Q9 to bob@example.test"']


def test_events_it_does_not_log_are_ignored(log):
    LogLine()(object())
    assert log.records == []


# --- through a real `mailgate run` (receiver and delivery process each with their sink) ----


def test_a_running_gateway_logs_message_lines_refusals_with_the_queue_id_and_deliveries(mailgate, sink):
    import re
    import smtplib
    import time

    from rules.gtube import GTUBE

    gw = mailgate()
    ham = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\n"
           b"Subject: =?utf-8?q?d=C3=A9jeuner?= at noon\r\nMessage-ID: <lunch-1@sender.test>\r\n"
           b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n\r\nShall we?\r\n")
    with gw.smtp() as c:
        c.ehlo("client.sender.test")
        assert c.sendmail("alice@sender.test", ["bob@example.test"], ham) == {}
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("alice@sender.test", ["bob@example.test"], ham.replace(b"Shall we?", GTUBE))
    code, text = refused.value.smtp_code, refused.value.smtp_error.decode()
    m = re.fullmatch(r"5\.7\.1 Message refused as spam \(queue id ([0-9A-F]+)\)", text)
    assert code == 554 and m, text
    assert sink.wait_for(1, timeout=20)
    deadline = time.time() + 15
    while time.time() < deadline and "status=sent" not in gw.log():
        time.sleep(0.1)
    log = gw.log()
    refused_line = next(line for line in log.splitlines() if f"queue_id={m.group(1)} " in line and "action=reject" in line)
    assert 'message_id="<lunch-1@sender.test>"' in refused_line and 'subject="déjeuner at noon"' in refused_line
    assert f'reply="554 5.7.1 Message refused as spam (queue id {m.group(1)})"' in refused_line
    accepted = next(line for line in log.splitlines() if "action=accept" in line)
    qid = accepted.split("queue_id=", 1)[1].split()[0]
    # the delivery process wrote its line from its own sink, in the format admins grep for
    assert re.search(rf"queue_id={qid} to=bob@example\.test relay=\S+ status=sent code=250 ", log), log
