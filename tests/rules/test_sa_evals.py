"""Eval calls: reading them, refusing what we cannot run, list matching."""

from __future__ import annotations

import pytest

from rules.sa.evals import address_matches, parse_call, unsupported


@pytest.mark.parametrize("text,call", [
    ("check_rbl('zen', 'zen.spamhaus.org.')", ("check_rbl", ("zen", "zen.spamhaus.org."))),
    ("html_range('ratio', '0.1', 'inf')", ("html_range", ("ratio", "0.1", "inf"))),
    ("check_for_missing_to_header()", ("check_for_missing_to_header", ())),
    ("check_body_length(200)", ("check_body_length", ("200",))),
    ("check_rbl_sub('x', '127.0.0.2')", ("check_rbl_sub", ("x", "127.0.0.2"))),
    ("html_text_match('title', 'a,b')", ("html_text_match", ("title", "a,b"))),
])
def test_parse_call(text, call):
    assert parse_call(text) == call


def test_unsupported_explains_why():
    assert "not implemented" in unsupported("body", ("check_stock_info", ("2",)))
    assert "not available in body" in unsupported("body", ("check_rbl", ("a", "b.")))
    assert unsupported("header", ("check_rbl", ("a", "b."))) is None
    assert "not implemented" in unsupported("body", ("html_test", ("font_low_contrast",)))
    assert unsupported("body", ("html_range", ("length", "x", "1"))).startswith("eval:html_range(): bad")


@pytest.mark.parametrize("addr,patterns,hit", [
    ("Bob@Example.TEST", ["*@example.test"], True),
    ("bob@sub.example.test", ["*@example.test"], False),
    ("bob@sub.example.test", ["*@*.example.test"], True),
    ("bob@example.test", ["b?b@example.test"], True),
    ("alice@example.test", [], False),
])
def test_address_matches_globs(addr, patterns, hit):
    assert address_matches(addr, patterns) is hit


# --- running evals on messages ------------------------------------------------------

from rules.sa.evals import EvalContext, run  # noqa: E402
from rules.sa.message import MessageView  # noqa: E402


def _msg(headers: str, body: str = "hello\n", **kw) -> MessageView:
    raw = (headers.strip("\n").replace("\n", "\r\n") + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()
    return MessageView(raw, **kw)


def _eval(view: MessageView, name: str, *args) -> int:
    return int(run(EvalContext(view), (name, tuple(args))))


_RCVD = "Received: from mx.example.org (mx.example.org [192.0.2.7]) by in.example.net; Sat, 28 Nov 2026 10:00:00 +0000"


@pytest.mark.parametrize("headers,hit", [
    ("Mailing-List: contact list-help@example.org; run by ezmlm\nDelivered-To: mailing list l@example.org\n"
     "Received: (qmail 123 invoked from network); 28 Nov 2026 10:00:00 -0000\nFrom: a@example.org", 1),
    ("From: a@example.org", 1),  # no Received at all
    ("Received: from groups.msn.com (tk2.msn.com [65.54.195.210]) by x.example.net\nFrom: a@example.org", 1),
    (_RCVD + "\nFrom: a@example.org", 0),
])
def test_gated_through_received_hdr_remover(headers, hit):
    assert _eval(_msg(headers), "gated_through_received_hdr_remover") == hit


def test_fake_aol_relay():
    forged = "Received: from unknown (HELO mta05bw.bigpond.com) (80.71.176.130) by\n rly-xw01.mx.aol.com with QMQP"
    real = ("Received: from logs-tr.proxy.aol.com (logs-tr.proxy.aol.com [152.163.201.132])\n"
            " by rly-ip01.mx.aol.com (8.8.8/8.8.8/AOL-5.0.0) with ESMTP id NAA08955")
    assert _eval(_msg(forged), "check_for_fake_aol_relay_in_rcvd") == 1
    assert _eval(_msg(real), "check_for_fake_aol_relay_in_rcvd") == 0
    assert _eval(_msg(_RCVD), "check_for_fake_aol_relay_in_rcvd") == 0


def test_forged_hotmail_received():
    helo_forged = ("Received: from hotmail.com (bad.example.org [192.0.2.9]) by in.example.net\n"
                   "From: a@example.org")
    real = ("Received: from hotmail.com (f135.law8.hotmail.com [216.33.241.135]) by in.example.net\n"
            "X-Originating-IP: [192.0.2.1]\nFrom: a@hotmail.com")
    claimed = _RCVD + "\nFrom: someone@hotmail.com"
    assert (_eval(_msg(helo_forged), "check_for_forged_hotmail_received_headers"),
            _eval(_msg(helo_forged), "check_for_no_hotmail_received_headers")) == (1, 0)
    assert (_eval(_msg(claimed), "check_for_forged_hotmail_received_headers"),
            _eval(_msg(claimed), "check_for_no_hotmail_received_headers")) == (0, 1)
    assert _eval(_msg(real), "check_for_forged_hotmail_received_headers") == 0
    assert _eval(_msg(real), "check_for_no_hotmail_received_headers") == 0


def test_forged_eudoramail():
    real = ("Received: from Unknown/Local ([?.?.?.?]) by shared1-mail.whowhere.com; Thu Nov 29 13:44:25 2001\n"
            "X-Sender-Ip: 192.175.21.146\nFrom: a@eudoramail.com")
    assert _eval(_msg(real), "check_for_forged_eudoramail_received_headers") == 0
    assert _eval(_msg(_RCVD + "\nFrom: a@eudoramail.com"), "check_for_forged_eudoramail_received_headers") == 1
    assert _eval(_msg(_RCVD + "\nFrom: a@example.org"), "check_for_forged_eudoramail_received_headers") == 0


def test_forged_yahoo():
    real = "Received: from [192.0.2.1] by web12.mail.yahoo.com via HTTP; Sat, 28 Nov 2026\nFrom: a@yahoo.com"
    assert _eval(_msg(_RCVD + "\nFrom: a@yahoo.com"), "check_for_forged_yahoo_received_headers") == 1
    assert _eval(_msg(real), "check_for_forged_yahoo_received_headers") == 0
    assert _eval(_msg(_RCVD + "\nFrom: a@example.org"), "check_for_forged_yahoo_received_headers") == 0
    via_yahoo = _msg(_RCVD + "\nFrom: a@yahoo.com", relays={
        "x-spam-relays-untrusted": b"[ ip=192.0.2.5 rdns=mta1.mail.yahoo.com helo=x by=mx ident= ]"})
    assert _eval(via_yahoo, "check_for_forged_yahoo_received_headers") == 0


def test_forged_juno():
    real = ("Received: from webmail1.untd.com (webmail1.untd.com [192.0.2.4]) by mx.example.net\n"
            "X-Mailer: Webmail Version 1.0\nFrom: a@juno.com")
    assert _eval(_msg(real), "check_for_forged_juno_received_headers") == 1  # no X-Originating-IP: SA says forged
    real += "\nX-Originating-IP: [192.0.2.4]"
    juno_ip = "X-Originating-IP: [192.0.2.4]\nX-Mailer: Juno 5.0\nFrom: a@juno.com"
    assert _eval(_msg(_RCVD + "\n" + juno_ip), "check_for_forged_juno_received_headers") == 1  # not a Juno hop
    ok = ("Received: from cookie.juno.com (cookie.juno.com [192.0.2.4]) by mx.example.net\n"
          "X-Originating-IP: [192.0.2.4]\nX-Mailer: Juno 5.0\nFrom: a@juno.com")
    assert _eval(_msg(ok), "check_for_forged_juno_received_headers") == 0
    assert _eval(_msg(_RCVD + "\nFrom: a@example.org"), "check_for_forged_juno_received_headers") == 0


def test_forged_gmail():
    real = (_RCVD + "\nX-Received: by 10.1.2.3 with SMTP id abc123; Sat, 28 Nov 2026\nFrom: a@gmail.com")
    assert _eval(_msg(_RCVD + "\nFrom: a@gmail.com"), "check_for_forged_gmail_received_headers") == 1
    assert _eval(_msg(real), "check_for_forged_gmail_received_headers") == 0
    states = _RCVD + "\nFrom: a@gmail.com\nX-Gm-Message-State: " + "A" * 60 + "\nX-Google-Smtp-Source: " + "B" * 60
    assert _eval(_msg(states), "check_for_forged_gmail_received_headers") == 0
    assert _eval(_msg(_RCVD + "\nFrom: a@example.org"), "check_for_forged_gmail_received_headers") == 0


def test_matching_env_and_hdr_from():
    assert _eval(_msg("From: A <a@example.org>", envelope_sender="A@example.org"),
                 "check_for_matching_env_and_hdr_from") == 1
    assert _eval(_msg("From: a@example.org", envelope_sender="b@example.org"),
                 "check_for_matching_env_and_hdr_from") == 0


def test_sorted_and_similar_recipients():
    sorted_to = "To: " + ", ".join(f"{c}x@host{i}.example" for i, c in enumerate("abcdefg"))
    assert _eval(_msg(sorted_to), "sorted_recipients") == 1
    unsorted = "To: " + ", ".join(f"{c}x@host{i}.example" for i, c in enumerate("gfedcba"))
    assert _eval(_msg(unsorted), "sorted_recipients") == 0
    assert _eval(_msg("To: " + ", ".join(f"{c}@x.example" for c in "abcdef")), "sorted_recipients") == 0  # < 7
    # same two-letter user prefix and host prefix on different hosts: every pair scores
    similar = "To: " + ", ".join(f"jo{i}@mail{i}.example" for i in range(5))
    assert _eval(_msg(similar), "similar_recipients", "0.65", "undef") == 1
    varied = "To: alice@one.example, bob@two.example, carol@three.example, dave@four.example, eve@five.example"
    assert _eval(_msg(varied), "similar_recipients", "0.65", "undef") == 0
    assert _eval(_msg("To: jo1@a.example, jo2@a.example"), "similar_recipients", "0.65", "undef") == 0


@pytest.mark.parametrize("subject,hit", [
    ("bob", 1), ("Re: bob", 1), ("bob, your account", 1), ("bob: offer", 1),
    ("Hello, bob!", 0),  # SpamAssassin anchors every form at the start
    ("About bob's account", 0), ("Bobby", 0),
])
def test_to_in_subject_user(subject, hit):
    assert _eval(_msg(f"To: bob@example.org\nSubject: {subject}"), "check_for_to_in_subject", "user") == hit


def test_to_in_subject_address():
    assert _eval(_msg("To: bob@example.org\nSubject: for bob@example.org"), "check_for_to_in_subject", "address") == 1
    assert _eval(_msg("To: bob@example.org\nSubject: hi"), "check_for_to_in_subject", "address") == 0


def _outlook_id(when: float) -> str:
    token = int(when * 0.0023283064365387 + 27111902.8329849)
    return f"<0000{token:08x}$01234567$89abcdef@example.org>"


def test_outlook_message_id():
    import email.utils

    when = 1_700_000_000
    date = email.utils.formatdate(when)
    good = f"Date: {date}\nMessage-ID: {_outlook_id(when)}"
    assert _eval(_msg(good), "check_outlook_message_id") == 0
    forged = f"Date: {date}\nMessage-ID: {_outlook_id(when - 86400 * 30)}"
    assert _eval(_msg(forged), "check_outlook_message_id") == 1
    # the Date is off but the earliest Received agrees with the id: not forged
    rcvd = f"Received: from x by y; {email.utils.formatdate(when - 86400 * 30)}\n"
    assert _eval(_msg(rcvd + forged), "check_outlook_message_id") == 0
    assert _eval(_msg(f"Date: {date}\nMessage-ID: <abc@example.org>"), "check_outlook_message_id") == 0


def test_unresolved_template():
    assert _eval(_msg("From: a@example.org\nX-Campaign: %CUSTOMER_ID"), "check_unresolved_template") == 1
    assert _eval(_msg("From: a@example.org\nSubject: %FIRST_NAME"), "check_unresolved_template") == 0
    assert _eval(_msg("From: a@example.org\nX-Rate: 50%"), "check_unresolved_template") == 0


def test_ratware_name_id():
    mid = "Message-ID: <" + "ABCDEFGHIJKLMNOPQRSTUVWXYZAB" + ".bob@example.org>"
    assert _eval(_msg(mid + '\nFrom: "Bob" <bob@example.org>'), "check_ratware_name_id") == 1
    assert _eval(_msg(mid + '\nFrom: "Bob" <other@example.org>'), "check_ratware_name_id") == 0


def test_ratware_envelope_from():
    assert _eval(_msg("To: bob@example.com", envelope_sender="example.com.bob@spam.example.net"),
                 "check_ratware_envelope_from") == 1
    assert _eval(_msg("To: bob@example.com", envelope_sender="alice@example.com"), "check_ratware_envelope_from") == 0
    assert _eval(_msg("To: bob@example.com", envelope_sender="SRS0=x=example.com.bob@fwd.example"),
                 "check_ratware_envelope_from") == 0


def test_mailfrom_matches_rcvd():
    relay = {"ip": "192.0.2.1", "rdns": "out3.mail.example.com", "helo": "out3", "trusted": False}
    assert _eval(_msg("From: a@x.example", envelope_sender="bounce@news.example.com", relay=relay),
                 "check_mailfrom_matches_rcvd") == 1
    assert _eval(_msg("From: a@x.example", envelope_sender="bounce@other.example.org", relay=relay),
                 "check_mailfrom_matches_rcvd") == 0
    assert _eval(_msg("From: a@x.example", envelope_sender="bounce@example.com", relay={**relay, "rdns": ""}),
                 "check_mailfrom_matches_rcvd") == 0
