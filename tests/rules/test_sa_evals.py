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
    assert "not implemented" in unsupported("body", ("check_no_such_eval", ("2",)))
    assert "not available in body" in unsupported("body", ("check_rbl", ("a", "b.")))
    assert unsupported("header", ("check_rbl", ("a", "b."))) is None
    assert "not implemented" in unsupported("body", ("html_test", ("no_such_test",)))
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


# --- MIME (MIMEEval) ----------------------------------------------------------------------

def _multipart(parts: list[tuple[str, str]], ctype: str = "multipart/alternative", headers: str = "") -> MessageView:
    body = "".join(f"--B\n{h}\n\n{b}\n" for h, b in parts) + "--B--\n"
    return _msg(f"From: a@example.org\n{headers}Content-Type: {ctype}; boundary=B", body)


_TEXT = "Content-Type: text/plain; charset=us-ascii"
_HTML = "Content-Type: text/html; charset=us-ascii"


def test_qp_long_line():
    qp = "Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable"
    assert _eval(_multipart([(qp, "x" * 79 + "\nend")], "multipart/mixed"), "check_for_mime",
                 "mime_qp_long_line") == 1
    assert _eval(_multipart([(qp, "x" * 78 + "\nend")], "multipart/mixed"), "check_for_mime",
                 "mime_qp_long_line") == 0
    assert _eval(_multipart([(_TEXT, "x" * 200)], "multipart/mixed"), "check_for_mime", "mime_qp_long_line") == 0


def test_bad_iso_charset():
    bad = _multipart([("Content-Type: text/plain; charset=iso-1234-5", "x")], "multipart/mixed")
    good = _multipart([("Content-Type: text/plain; charset=iso-8859-15", "x"),
                       ("Content-Type: text/plain; charset=iso-2022-jp", "y")], "multipart/mixed")
    assert _eval(bad, "check_for_mime", "mime_bad_iso_charset") == 1
    assert _eval(good, "check_for_mime", "mime_bad_iso_charset") == 0


def test_mime_multipart_ratio():
    mostly_html = _multipart([(_TEXT, "."), (_HTML, "<p>" + "word " * 100 + "</p>")])
    balanced = _multipart([(_TEXT, "word " * 80), (_HTML, "<p>" + "word " * 80 + "</p>")])
    assert _eval(mostly_html, "check_mime_multipart_ratio", "0.00", "0.01") == 1
    assert _eval(balanced, "check_mime_multipart_ratio", "0.00", "0.01") == 0
    assert _eval(_msg("From: a@example.org", "just text"), "check_mime_multipart_ratio", "0.00", "0.01") == 0


def test_ma_non_text():
    with_image = _multipart([(_TEXT, "hi"), ("Content-Type: image/gif", "R0lGOD")])
    with_rtf = _multipart([(_TEXT, "hi"), ("Content-Type: application/rtf", "{\\rtf1}")])
    assert _eval(with_image, "check_ma_non_text") == 1
    assert _eval(with_rtf, "check_ma_non_text") == 0
    assert _eval(_multipart([(_TEXT, "hi"), ("Content-Type: image/gif", "x")], "multipart/mixed"),
                 "check_ma_non_text") == 0


def test_base64_length():
    b64 = "Content-Type: image/png\nContent-Transfer-Encoding: base64"
    long_lines = _multipart([(b64, "A" * 78 + "\n" + "A" * 10)], "multipart/mixed")  # 79 with the newline
    normal = _multipart([(b64, "A" * 76 + "\n" + "A" * 76)], "multipart/mixed")
    ics = _multipart([("Content-Type: application/ics\nContent-Transfer-Encoding: base64", "A" * 100 + "\nA")],
                     "multipart/mixed")
    assert _eval(long_lines, "check_base64_length", "79") == 1
    assert _eval(long_lines, "check_base64_length", "78", "78") == 0
    assert _eval(normal, "check_base64_length", "79") == 0
    assert _eval(normal, "check_base64_length", "77", "78") == 1
    assert _eval(ics, "check_base64_length", "79") == 0


@pytest.mark.parametrize("flag,body,hit", [
    ("missing_mime_head_body_separator", "--B\nContent-Type: text/plain\nnot a header\n--B--\n", 1),
    ("missing_mime_head_body_separator", "--B\nContent-Type: text/plain\n\nfine\n--B--\n", 0),
    ("missing_mime_headers", "--B\n\nno headers here\n--B--\n", 1),
    ("missing_mime_headers", "--B\nContent-Type: text/plain\n\nfine\n--B--\n", 0),
    ("mime_epilogue_exists", "--B\nContent-Type: text/plain\n\nfine\n--B--\nafter the end\n", 1),
    ("mime_epilogue_exists", "--B\nContent-Type: text/plain\n\nfine\n--B--\n.\n\n", 0),
])
def test_mime_parse_flags(flag, body, hit):
    view = _msg("From: a@example.org\nContent-Type: multipart/mixed; boundary=B", body)
    assert _eval(view, "check_msg_parse_flags", flag) == hit


def test_truncated_header_flag():
    assert _eval(_msg("From: a@example.org\nX-Long: " + "x" * 8200), "check_msg_parse_flags", "truncated_header") == 1
    assert _eval(_msg("From: a@example.org\nX-Long: " + "x" * 8000), "check_msg_parse_flags", "truncated_header") == 0


def test_mimepart_limit():
    many = _multipart([(_TEXT, str(i)) for i in range(1000)], "multipart/mixed")
    assert _eval(many, "check_for_mime", "mimepart_limit_exceeded") == 1
    assert _eval(_multipart([(_TEXT, "x")] * 3, "multipart/mixed"), "check_for_mime", "mimepart_limit_exceeded") == 0


# --- HTML (HTMLEval, HTML.pm) -----------------------------------------------------------


def _html(markup: str, subject: str = "Hello") -> MessageView:
    return _msg(f"From: a@example.org\nSubject: {subject}\nContent-Type: text/html", markup)


def test_obfuscation_ratio():
    # "V<b></b>ia<i></i>gra": two words split by tags, 4 tags -> 0.5
    split = _html("V<b></b>ia<i></i>gra")
    assert _eval(split, "html_range", "obfuscation_ratio", ".3", ".5") == 1
    assert _eval(split, "html_range", "obfuscation_ratio", ".5", ".6") == 0
    # a word after a block tag or after punctuation is not split
    clean = _html("<p>Hello</p><p>world</p> one<br>two. <b>three</b>")
    assert _eval(clean, "html_range", "obfuscation_ratio", "0", "inf") == 0


def test_html_range_bounds_are_min_exclusive_max_inclusive():
    big = _html('<font size="6">big</font>')
    assert _eval(big, "html_range", "max_size", "5", "6") == 1
    assert _eval(big, "html_range", "max_size", "6", "inf") == 0
    assert _eval(_html('<font size="7">x</font>'), "html_range", "max_size", "6", "inf") == 1


@pytest.mark.parametrize("markup,test,hit", [
    ('<font color="#ffffff">hidden</font>', "font_low_contrast", 1),
    # HTML.pm converts a bgcolor= attribute but never applies it
    ('<body bgcolor="#000000"><font color="#000001">x</font></body>', "font_low_contrast", 0),
    ('<div style="background-color: #000000"><span style="color: #050505">x</span></div>', "font_low_contrast", 1),
    ('<font color="#000080">visible</font>', "font_low_contrast", 0),
    ('<p style="color: red; background: url(x.png) #ff0000">same</p>', "font_low_contrast", 1),
    ('<font color="#ffffff"></font>text', "font_low_contrast", 0),  # closed before the text
    ('<font color="bogus">x</font>', "font_invalid_color", 1),
    ('<font color="ff0000">x</font>', "font_invalid_color", 1),  # SpamAssassin wants the '#'
    ('<font color="red">x</font>', "font_invalid_color", 0),
    ('<font face="Arial, Helvetica">x</font>', "font_face_bad", 0),
    ("<font face='\"Tahoma\", Verdana'>x</font>", "font_face_bad", 0),
    ('<font face="x@y#1">x</font>', "font_face_bad", 1),
])
def test_html_font_tests(markup, test, hit):
    assert _eval(_html(markup), "html_test", test) == hit


def test_title_subject_ratio():
    long_title = _html("<title>" + "A much longer title than the subject" + "</title><p>x</p>", subject="Hi")
    assert _eval(long_title, "html_title_subject_ratio", "3.5") == 1
    assert _eval(_html("<title>Hi there</title>x", subject="Hi there"), "html_title_subject_ratio", "3.5") == 0
    assert _eval(_html("<p>no title</p>", subject="Hi"), "html_title_subject_ratio", "3.5") == 0


def test_iframe_src():
    assert _eval(_html('<iframe src="http://x.example/">'), "check_iframe_src") == 1
    assert _eval(_html('<iframe src="  ">'), "check_iframe_src") == 0
    assert _eval(_html("<p>none</p>"), "check_iframe_src") == 0


# --- BodyEval -------------------------------------------------------------------------


def test_multipart_alternative_difference():
    same = _multipart([(_TEXT, "buy cheap watches today"), (_HTML, "<p>buy <b>cheap</b> watches today</p>")])
    differ = _multipart([(_TEXT, "hello friend"),
                         (_HTML, "<p>buy cheap watches today at our store</p>")])
    assert _eval(same, "multipart_alternative_difference", "99", "100") == 0
    assert _eval(differ, "multipart_alternative_difference", "99", "100") == 1
    assert _eval(_html("<p>only html</p>"), "multipart_alternative_difference", "99", "100") == 0


def test_multipart_alternative_difference_count():
    many_text = _multipart([(_TEXT, " ".join(f"w{i}" for i in range(20))), (_HTML, "<p>w1 w2 w3 w4 w5</p>")])
    assert _eval(many_text, "multipart_alternative_difference_count", "3", "1") == 1
    even = _multipart([(_TEXT, "w1 w2 w3 w4 w5"), (_HTML, "<p>w1 w2 w3 w4 w5</p>")])
    assert _eval(even, "multipart_alternative_difference_count", "3", "1") == 0


def test_blank_line_ratio():
    airy = _msg("From: a@example.org", "line\n\n\n\n\n\n\n\n\nend\n")
    dense = _msg("From: a@example.org", "one\ntwo\nthree\n\nfour\n")
    assert _eval(airy, "check_blank_line_ratio", "70", "90", "4") == 1
    assert _eval(dense, "check_blank_line_ratio", "70", "90", "4") == 0
    assert _eval(_msg("From: a@example.org", "x\n"), "check_blank_line_ratio", "0", "10", "4") == 1  # -1: too short


def test_vertical_words():
    vertical = _msg("From: a@example.org\nSubject: hi", "V I A G R A N O W\n")
    prose = _msg("From: a@example.org\nSubject: hi", "A normal sentence of ordinary words.\n")
    assert _eval(vertical, "tvd_vertical_words", "0", "10") == 0
    assert _eval(prose, "tvd_vertical_words", "0", "10") == 0
    assert _eval(prose, "tvd_vertical_words", "10", "30") == 1
    assert _eval(vertical, "tvd_vertical_words", "80", "100") == 1  # 8 spaces to 9 letters: 88 %


# --- WLBLEval: URI host lists ------------------------------------------------------------


def _uri_lists(text: str) -> dict:
    from rules.sa.ruleset import load_text

    return load_text(text, path="local.cf").lists


def test_uri_host_lists_are_read_in_order():
    lists = _uri_lists("enlist_uri_host (SUSP) top example.com\nenlist_uri_host (SUSP) !good.example.com\n"
                       "blocklist_uri_host bad.example\nwelcomelist_uri_host friend.example\n"
                       "enlist_uri_host (OTHER) zip\ndelist_uri_host (SUSP) top\n")
    assert lists["uri_host:SUSP"] == ["example.com", "!good.example.com"]
    assert lists["uri_host:BLOCK"] == ["bad.example"] and lists["uri_host:WELCOME"] == ["friend.example"]
    assert lists["uri_host:OTHER"] == ["zip"]


@pytest.mark.parametrize("url,listname,hit", [
    ("http://www.shop.top/x", "SUSP", 1),           # a listed TLD covers every host under it
    ("http://a.example.com/", "SUSP", 1),
    ("http://good.example.com/", "SUSP", 0),         # "!host" is an exception to its parent
    ("http://x.good.example.com/", "SUSP", 0),
    ("http://example.org/", "SUSP", 0),
    ("http://bad.example/", "BLOCK", 1),
    ("mailto:someone@bad.example", "BLOCK", 0),       # mailto URIs are not looked at
])
def test_check_uri_host_listed(url, listname, hit):
    lists = _uri_lists("enlist_uri_host (SUSP) top example.com !good.example.com\nblocklist_uri_host bad.example\n")
    view = _msg("From: a@example.org\nSubject: s", f"see {url} now\n")
    assert int(run(EvalContext(view, lists=lists), ("check_uri_host_listed", (listname,)))) == hit


def test_uri_host_in_blocklist_and_welcomelist():
    lists = _uri_lists("blocklist_uri_host bad.example\nwelcomelist_uri_host friend.example\n")
    bad = _msg("From: a@example.org", "go to http://www.bad.example/offer\n")
    friendly = _msg("From: a@example.org", "go to http://friend.example/\n")
    assert int(run(EvalContext(bad, lists=lists), ("check_uri_host_in_blocklist", ()))) == 1
    assert int(run(EvalContext(bad, lists=lists), ("check_uri_host_in_welcomelist", ()))) == 0
    assert int(run(EvalContext(friendly, lists=lists), ("check_uri_host_in_welcomelist", ()))) == 1
    assert int(run(EvalContext(friendly, lists={}), ("check_uri_host_in_welcomelist", ()))) == 0


# --- charsets far from ok_locales (Locales.pm) --------------------------------------------

from rules.sa.evals import charset_ok_for_locales  # noqa: E402


@pytest.mark.parametrize("charset,locales,ok", [
    ("us-ascii", ["en"], True), ("ISO-8859-5", ["en"], True), ("utf-8", ["en"], True),
    ("windows-1251", ["en"], True), ("koi8-r", ["en"], False), ("koi8-r", ["ru"], True),
    ("big5", ["en", "zh_TW"], True), ("euc-kr", ["ja"], False), ("3Dkoi8-r", ["ru"], True),
])
def test_charset_ok_for_locales(charset, locales, ok):
    assert charset_ok_for_locales(charset, locales) is ok


def _ctx(view, locales=None):
    return EvalContext(view, lists={"ok_locales": locales} if locales else {})


def test_faraway_charset_needs_ok_locales_and_mostly_8bit_text():
    body = "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440\n"
    raw = ("From: a@example.org\r\nSubject: x\r\nContent-Type: text/plain; charset=koi8-r\r\n\r\n").encode() \
        + body.encode("koi8-r")
    cyrillic = MessageView(raw)
    assert int(run(_ctx(cyrillic, ["en"]), ("check_for_faraway_charset", ()))) == 1
    assert int(run(_ctx(cyrillic, ["en", "ru"]), ("check_for_faraway_charset", ()))) == 0
    assert int(run(_ctx(cyrillic), ("check_for_faraway_charset", ()))) == 0  # ok_locales all (the default)
    ascii_koi = _msg("From: a@example.org\nContent-Type: text/plain; charset=koi8-r", "plain ascii words here\n")
    assert int(run(_ctx(ascii_koi, ["en"]), ("check_for_faraway_charset", ()))) == 0


def test_faraway_charset_in_headers():
    view = _msg("From: a@example.org\nSubject: =?koi8-r?B?8NLJ18XU?=")
    assert int(run(_ctx(view, ["en"]), ("check_for_faraway_charset_in_headers", ()))) == 1
    assert int(run(_ctx(view, ["ru"]), ("check_for_faraway_charset_in_headers", ()))) == 0
    assert int(run(_ctx(view), ("check_for_faraway_charset_in_headers", ()))) == 0
    plain = _msg("From: a@example.org\nSubject: =?utf-8?q?caf=C3=A9?=")
    assert int(run(_ctx(plain, ["en"]), ("check_for_faraway_charset_in_headers", ()))) == 0


def test_mime_faraway_charset():
    view = _multipart([("Content-Type: text/plain; charset=euc-kr", "x")], "multipart/mixed")
    assert int(run(_ctx(view, ["en"]), ("check_for_mime", ("mime_faraway_charset",)))) == 1
    assert int(run(_ctx(view, ["ko"]), ("check_for_mime", ("mime_faraway_charset",)))) == 0


def test_html_charset_faraway():
    far = _html('<meta http-equiv="Content-Type" content="text/html; charset=big5"><p>x</p>')
    near = _html('<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1"><p>x</p>')
    assert int(run(_ctx(far, ["en"]), ("html_charset_faraway", ()))) == 1
    assert int(run(_ctx(far, ["zh"]), ("html_charset_faraway", ()))) == 0
    assert int(run(_ctx(near, ["en"]), ("html_charset_faraway", ()))) == 0


def test_ok_locales_setting_is_read():
    assert _uri_lists("ok_locales en ru\n")["ok_locales"] == ["en", "ru"]


from rules.sa.evals import parse_rfc822_date  # noqa: E402


@pytest.mark.parametrize("text,when", [
    ("Sat, 28 Nov 2026 10:00:00 +0100", "2026-11-28 09:00:00"),
    ("28 Nov 2026 10:00:00 EST", "2026-11-28 15:00:00"),
    ("from a.example by b.example with SMTP id x; Sat, 28 Nov 2026 10:00:00 -0000\n"
     "from c by d; Fri, 27 Nov 2026 08:00:00 -0000", "2026-11-28 10:00:00"),  # the first date found
    ("Thu Nov 26 13:44:25 2026", "2026-11-26 00:00:00"),  # SA consumes the time with this form
    ("31 Feb 2026 10:00:00 +0000", "2026-03-01 10:00:00"),  # a day past the month's end rolls over
    ("no date here", None),
])
def test_parse_rfc822_date_like_spamassassin(text, when):
    import calendar
    import time as _time

    expected = None if when is None else calendar.timegm(_time.strptime(when, "%Y-%m-%d %H:%M:%S"))
    assert parse_rfc822_date(text) == expected


# --- check_stock_info, check_dns_sender, FreeMail, and what parity with SA needed ----


def _stock(body: str, ctype: str = "text/plain") -> MessageView:
    return _msg(f"From: a@example.org\nSubject: tip\nContent-Type: {ctype}", body)


def test_stock_info_counts_distinct_stock_tip_fields_of_the_first_text_part():
    tip = "Company: Acme Gold Corp\nSymbol: ACGC\nCurrent Price: $0.12\nTarget: $1.50\n"
    assert _eval(_stock(tip), "check_stock_info", "2") == 1
    assert _eval(_stock(tip), "check_stock_info", "5") == 0  # four kinds, not five
    # the same kind twice is one kind; a field name is at most 30 characters from the line start
    assert _eval(_stock("Symbol: A\nSymbol: B\na much longer line that names the Target: x\n"),
                 "check_stock_info", "2") == 0
    assert _eval(_stock("Symbol: A\nsee the Target: x\n"), "check_stock_info", "2") == 1  # "...target" ends it
    # s.t.o.c.k spelt with a filler between the letters still counts (BodyEval's regex)
    assert _eval(_stock("S-t-o-c-k: ACGC\nRating: strong buy\n"), "check_stock_info", "2") == 1
    assert _eval(_stock("<p>Symbol: ACGC</p><p>Target: 1</p>", "text/html"), "check_stock_info", "2") == 0
    assert _eval(_stock("nothing here\n"), "check_stock_info", "0") == 1  # min 0: always


def test_stock_info_is_loaded_from_rules():
    from rules.sa.ruleset import load_text

    rs = load_text("body TVD_STOCK1 eval:check_stock_info('2')\n", path="local.cf")
    assert "TVD_STOCK1" in rs.rules and not rs.skipped


def test_dns_sender_hits_only_on_the_gateway_nxdomain_answer():
    view = _msg("From: a@nowhere.example\nSubject: x", envelope_sender="a@nowhere.example")
    assert int(run(EvalContext(view, sender_dns="nxdomain"), ("check_dns_sender", ()))) == 1
    assert int(run(EvalContext(view), ("check_dns_sender", ()))) == 0  # not looked up: no hit


def test_sender_dns_reads_the_sender_domain_result():
    from gateway.records import Envelope, Result
    from rules.sa_check import sender_dns

    class Txn:
        envelope = Envelope("q", "a@nowhere.example",
                            results=[Result("SENDER_DOMAIN_UNKNOWN", 3.0, "nowhere.example (no such domain)")])

    assert sender_dns(Txn()) == "nxdomain"
    Txn.envelope = Envelope("q", "a@empty.example",
                            results=[Result("SENDER_DOMAIN_UNKNOWN", 3.0, "empty.example (no MX, A or AAAA)")])
    assert sender_dns(Txn()) is None  # the name exists: SpamAssassin looks for NXDOMAIN/SERVFAIL
    Txn.envelope = None
    assert sender_dns(Txn()) is None


_FM = {"freemail_domains": ["freemail.example", "*.webmail.example"], "freemail_welcomelist": ["ok@freemail.example"]}


def _fm(view, name, *args):
    return int(run(EvalContext(view, lists=_FM), (name, tuple(args))))


def test_freemail_from_and_header():
    v = _msg("From: Joe <joe1@freemail.example>\nReply-To: joe@mail.webmail.example\nSubject: x")
    assert _fm(v, "check_freemail_from") == 1
    assert _fm(v, "check_freemail_from", r"\d@") == 1
    assert _fm(v, "check_freemail_header", "Reply-To") == 1  # the wildcard domain
    assert _fm(v, "check_freemail_header", "Reply-To", r"\d@") == 0
    assert _fm(_msg("From: ok@freemail.example\nSubject: x"), "check_freemail_from") == 0  # welcomelisted
    assert _fm(_msg("From: info@freemail.example\nSubject: x"), "check_freemail_from") == 0  # role account
    assert _fm(_msg("From: joe@corp.example\nSubject: x"), "check_freemail_from") == 0
    assert int(run(EvalContext(v), ("check_freemail_from", ()))) == 0  # no freemail_domains: plugin off


def test_freemail_replyto_different_freemails_or_body_address():
    v = _msg("From: joe@freemail.example\nReply-To: jim@freemail.example\nSubject: x")
    assert _fm(v, "check_freemail_replyto", "replyto") == 1
    same = _msg("From: joe@freemail.example\nReply-To: joe@freemail.example\nSubject: x")
    assert _fm(same, "check_freemail_replyto", "replyto") == 0
    body = _msg("From: joe@freemail.example\nSubject: x", "write to jack@freemail.example today\n")
    assert _fm(body, "check_freemail_replyto", "reply") == 1  # no Reply-To: From against the body
    bulk = _msg("From: joe@freemail.example\nReply-To: jim@freemail.example\nSubject: x",
                envelope_sender="list-bounces@lists.example")
    assert _fm(bulk, "check_freemail_replyto", "replyto") == 0  # a bulk envelope sender is not judged


def test_equal_from_domains_compares_the_last_two_labels():
    assert _eval(_msg("From: a@mail.example.org\nSubject: x", envelope_sender="b@bounce.example.org"),
                 "check_equal_from_domains") == 0
    assert _eval(_msg("From: a@example.org\nSubject: x", envelope_sender="b@example.net"),
                 "check_equal_from_domains") == 1
    assert _eval(_msg("From: a@example.org\nSubject: x"), "check_equal_from_domains") == 0  # no envelope


def test_envelope_from_falls_back_to_the_headers_as_spamassassin():
    rp = "Return-Path: <rp@example.net>\n" + _RCVD + "\nFrom: a@example.org\nSubject: x"
    assert _msg(rp).envelope_from == "rp@example.net"  # above every Received: set by the last hop
    below = _RCVD + "\nReturn-Path: <rp@example.net>\nFrom: a@example.org\nSubject: x"
    assert _msg(below).envelope_from == ""  # below a Received: anyone could have written it
    fetch = ("Return-Path: <rp@example.net>\nReceived: from localhost by h with IMAP (fetchmail-6.2.5)\n"
             "X-Sender: xs@example.com\nFrom: a@example.org\nSubject: x")
    assert _msg(fetch).envelope_from == ""  # fetchmail: the envelope is lost
    assert _msg(rp, envelope_sender="mail@from.example").envelope_from == "mail@from.example"


def test_ascii_text_illegal_flags_8bit_text_claiming_ascii():
    raw = b"From: a@example.org\r\nSubject: x\r\nContent-Type: text/plain\r\n\r\ncaf\xe9\r\n"
    assert _eval(MessageView(raw), "check_for_ascii_text_illegal") == 1
    ok = b"From: a@example.org\r\nSubject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n"
    assert _eval(MessageView(ok), "check_for_ascii_text_illegal") == 0
    assert _eval(_msg("From: a@example.org\nSubject: x", "plain ascii\n"), "check_for_ascii_text_illegal") == 0


def test_illegal_chars_reads_the_raw_bytes():
    korean = b"From: a@example.org\r\nSubject: [\xb1\xa4\xb0\xed] \xbf\xe4\xc1\xf2\r\n\r\nx\r\n"
    assert _eval(MessageView(korean), "check_illegal_chars", "Subject", "0.00", "2") == 1
    utf8 = "From: a@example.org\r\nSubject: caf\u00e9 cr\u00e8me\r\n\r\nx\r\n".encode()
    assert _eval(MessageView(utf8), "check_illegal_chars", "Subject", "0.00", "2") == 0  # valid UTF-8
    pound = b"From: a@example.org\r\nSubject: only \xa3 5\r\n\r\nx\r\n"
    assert _eval(MessageView(pound), "check_illegal_chars", "Subject", "0.00", "1") == 0  # one pound sign


def test_shifted_date_skips_the_fetchmail_hop():
    headers = ("Received: from localhost (localhost [127.0.0.1]) by h (Postfix); Sat, 28 Nov 2026 20:00:00 +0000\n"
               "Received: from mail by localhost with POP3 (fetchmail-5.9.0); Sat, 28 Nov 2026 20:00:00 +0000\n"
               + _RCVD + "\nDate: Sat, 28 Nov 2026 10:00:00 +0000\nFrom: a@example.org\nSubject: x")
    # the local and fetchmail hops are ten hours later; the real hop agrees with Date:
    assert _eval(_msg(headers), "check_for_shifted_date", "undef", "-3") == 0
    assert _eval(_msg(headers), "check_for_shifted_date", "-3", "3") == 1


def test_html_image_only_measures_the_html_source():
    img = '<html><body><img src="http://x.example/a.gif" width=10 height=10></body></html>'
    v = _html(img)
    assert _eval(v, "html_image_only", "0", "400") == 1
    assert _eval(v, "html_image_only", str(len(img)), "1000") == 0


def test_vbounce_relays():
    from rules.sa.ruleset import load_text

    assert load_text("welcomelist_bounce_relays mx.example.org\n", path="l.cf").lists["bounce_relays"] == [
        "mx.example.org"]
    bounce = _msg("From: MAILER-DAEMON@example.org\nSubject: failure",
                  "Original message:\n\nReceived: from x by mx.example.org with SMTP; today\n")
    lists = {"bounce_relays": ["mx.example.org"]}
    assert int(run(EvalContext(bounce, lists=lists), ("check_welcomelist_bounce_relays", ()))) == 1
    assert int(run(EvalContext(bounce, lists=lists), ("have_any_bounce_relays", ()))) == 1
    assert int(run(EvalContext(bounce), ("check_welcomelist_bounce_relays", ()))) == 0
    assert int(run(EvalContext(bounce), ("have_any_bounce_relays", ()))) == 0
