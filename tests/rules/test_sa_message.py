"""What the rules see of a message: headers, rendered body, raw body, URIs, HTML facts."""

from __future__ import annotations

import pytest

from rules.sa.message import (MessageView, name_to_rgb, parse_css_background, split_short_lines,
                              split_short_paragraphs, truncate_scan)

RAW = (
    b"Received: from a.test by mx.test; Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"From: =?utf-8?q?J=C3=BCrgen?= <jurgen@example.test>\r\n"
    b"To: a@example.test\r\nCc: b@example.test\r\n"
    b"Subject: Quarterly\r\n  report\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"First line\r\nsame paragraph =C3=A9t=C3=A9\r\n\r\nSecond paragraph\r\n"
    b"--B\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><head><title>T</title><style>p{}</style></head><body><p>Hello\r\n  <b>world</b></p>"
    b"<p>See <a href=\"http://www.example.test/x\">this</a> <img src=\"cid:1\" width=10 height=20></p>"
    b"<!-- hidden --></body></html>\r\n--B--\r\n"
)


def test_headers_are_decoded_unfolded_and_joined():
    v = MessageView(RAW)
    assert v.header("From") == "J\u00fcrgen <jurgen@example.test>\n".encode()
    assert v.header("From", "raw").startswith(b"=?utf-8?q?")
    assert v.header("From", "addr") == b"jurgen@example.test"
    assert v.header("From", "name") == "J\u00fcrgen".encode()
    assert v.header("Subject") == b"Quarterly report\n"  # Node.pm: a fold and its white space are one space
    assert v.header("ToCc") == b"a@example.test\nb@example.test\n"
    assert v.header("X-Missing") is None
    assert v.header("ALL").startswith(b"Received: from a.test")


def test_body_is_rendered_in_paragraphs_subject_first():
    v = MessageView(RAW)
    assert v.paragraphs[0] == b"Quarterly report"
    assert "First line same paragraph \u00e9t\u00e9".encode() in v.paragraphs
    assert b"Second paragraph" in v.paragraphs
    assert b"Hello world" in v.paragraphs  # HTML rendered, source line break is a space
    assert not any(b"p{}" in p or b"<b>" in p for p in v.paragraphs)  # style and tags gone
    assert b"<b>world</b>" in v.rawbody_text


def test_uris_and_html_facts():
    v = MessageView(RAW)
    assert "http://www.example.test/x" in v.uris
    assert v.html.tags["img"] == 1 and v.html.image_area == 200
    assert v.html.comments == ["<!-- hidden -->"] and "".join(v.html.title) == "T"
    assert v.html.anchor_text == ["this"]
    assert v.mime_stats["qp_count"] == 1 and not v.mime_stats["html_only"]


def test_relays_pseudo_headers_come_from_the_session():
    v = MessageView(RAW, relays={"x-spam-relays-untrusted": b"[ ip=192.0.2.1 rdns= helo=x ]"})
    assert v.header("X-Spam-Relays-Untrusted") == b"[ ip=192.0.2.1 rdns= helo=x ]\n"
    assert v.header("X-Spam-Relays-Trusted") is None


def test_header_addresses_lists_every_address():
    v = MessageView(RAW)
    assert v.header_addresses("ToCc") == [b"a@example.test", b"b@example.test"]
    assert v.header_addresses("Bcc") == []


def test_mime_scan_facts():
    st = MessageView(RAW).mime_scan
    assert st["multipart_alternative"] and st["body_html_count"] == 1 and st["body_text_count"] == 1
    assert not st["qp_long_line"] and not st["ma_non_text"] and st["base64_length"] == 0
    # text bytes over HTML bytes of the alternative's last parts
    assert 0.1 < st["multipart_ratio"] < 0.5


def test_parse_flags_of_a_clean_message_are_empty():
    assert MessageView(RAW).parse_flags == frozenset()
    assert "missing_head_body_separator" in MessageView(b"From: a@example.test\r\nSubject: x").parse_flags


def test_html_part_stats_follow_sa_html_pm():
    v = MessageView(RAW)
    (st,) = v.html.part_stats
    assert st["titles"] == ["T"] and st["img"] == 1
    assert st["tags"] == 19  # start and end tags, as HTML.pm counts them
    assert st["obfuscation"] == 0 and not st["font_low_contrast"]


@pytest.mark.parametrize("value,rgb", [
    ("White", "#ffffff"), ("#FFF", "#ffffff"), ("#12345", "#112233"), ("#1234567", "#123456"),
    ("rgb(255, 0, 16)", "#ff0010"), ("rgb(100%, 0%, 50%)", "#ff007f"), ("ff0000", "invalid"),
    ("bogus", "invalid"),
])
def test_name_to_rgb(value, rgb):
    assert name_to_rgb(value) == rgb


def test_parse_css_background_layers():
    assert parse_css_background('url("a b.png") no-repeat, rgb(1, 2, 3) red') == [
        ['url("a b.png")', "no-repeat"], ["rgb(1, 2, 3)", "red"]]


def test_alternative_difference_counts_words_missing_from_text():
    madiff, html_words, text_words = MessageView(RAW).alternative_difference
    # HTML words T, Hello, world, See, this; the text part has none of them
    assert (html_words, text_words) == (5, 6) and madiff == 100.0


def test_a_thousand_levels_of_nesting_give_a_bounded_view():
    from gateway.mime import MAX_MIME_DEPTH
    from tests.gateway.test_mime import nested

    v = MessageView(nested(1000))  # parsed here, not handed in: bounded all the same
    assert len(v.mime_headers) == MAX_MIME_DEPTH + 1
    assert v.mime_scan["body_text_count"] == 0  # the text part is below the limit, inside opaque bytes
    assert "mime_epilogue_exists" not in v.parse_flags
    assert v.body_text == b"deep\n" and v.uris == []
    shallow = MessageView(nested(3))
    assert b"the innermost text" in shallow.body_text and "http://deep.example/x" in shallow.uris


def test_all_trusted_and_all_external_split_at_the_trust_boundary():
    raw = (b"X-Top: 1\r\nReceived: from localhost (localhost [127.0.0.1]) by mx.test (Postfix) with ESMTP id AAA1;"
           b" Tue, 12 Mar 2024 10:01:03 +0000\r\nX-Mid: 2\r\nReceived: from a.example (a.example [203.0.113.5]) by "
           b"mx.test (Postfix) with ESMTP id AAA2; Tue, 12 Mar 2024 10:01:02 +0000\r\nX-Low: 3\r\n"
           b"Subject: x\r\n\r\nhi\r\n")
    v = MessageView(raw)
    trusted, external = v.header("ALL-TRUSTED").decode(), v.header("ALL-EXTERNAL").decode()
    # PerMsgStatus: the boundary hop's Received header counts on both sides
    assert trusted.startswith("X-Top: 1\n") and "a.example" in trusted and "X-Low" not in trusted
    assert external.startswith("Received: from a.example") and "X-Low: 3" in external and "X-Mid" not in external
    assert v.header("ALL-UNTRUSTED") == v.header("ALL-EXTERNAL")


# Chunk lengths from SpamAssassin 4.0.1 itself:
# perl -MMail::SpamAssassin::Message -e 'print join ",", map length,
#   Mail::SpamAssassin::Message::split_into_array_of_short_paragraphs($text)'
@pytest.mark.parametrize("text, lengths", [
    (b"a" * 2048, [2048]),  # up to MAX_BODY_LINE_LENGTH: one chunk
    (b"a" * 5000, [2049, 2951]),  # no separator: cut after 2048 bytes, the rest (<= 4096) last
    (b"".join([b"x" * 99 + b"\n"] * 60), [2100, 3900]),  # after the first newline past 2048
    ((b"<td>" + b"y" * 40 + b"</td>") * 150, [2058, 2058, 3234]),  # no newline: after a ">"
    (b" ".join([b"word"] * 2000), [2050, 2050, 2050, 3849]),  # no newline or ">": after a space
    (b"z" * 3000 + b">" + b"z" * 3000 + b"\n" + b"q" * 100 + b"\n", [3001, 3102]),  # newline too far
    (b"b" * 5000 + b"\n" + b"c" * 10, [2049, 2962]),
])
def test_split_short_paragraphs_cuts_where_spamassassin_does(text, lengths):
    chunks = split_short_paragraphs(text)
    assert [len(c) for c in chunks] == lengths
    assert b"".join(chunks) == text


def test_truncate_scan_cuts_at_a_boundary_within_1k():
    assert truncate_scan(b"abc", 10) == b"abc"
    assert truncate_scan(b"a" * 20 + b">" + b"\n" + b"b" * 10, 10) == b"a" * 20 + b">\n"  # newline first
    assert truncate_scan(b"a" * 20 + b">b c" + b"d" * 10, 10) == b"a" * 20 + b">"
    assert truncate_scan(b"a" * 20 + b" " + b"b" * 2000, 10) == b"a" * 20 + b" "
    assert truncate_scan(b"a" * 2000 + b"\n", 10) == b"a" * 10  # separator more than 1 KB away


def test_rawbody_chunks_are_per_part_and_skip_calendars():
    raw = (b"Subject: s\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: text/plain\r\n\r\nline one\r\nline two\r\n"
           b"--B\r\nContent-Type: text/calendar\r\n\r\nBEGIN:VCALENDAR\r\n"
           b"--B\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"PGh0bWw+PGJvZHk+aGk8L2JvZHk+PC9odG1sPg0KDQpCdXkgbm93DQo=\r\n--B--\r\n")
    v = MessageView(raw)
    # the lines of a part are one chunk (CRLF made LF, the one before a boundary is the
    # boundary's, as Message.pm chomps it); parts are never joined
    assert v.rawbody_chunks == [b"line one\nline two", b"<html><body>hi</body></html>\n\nBuy now\n"]
    big = MessageView(b"Subject: s\r\nContent-Type: text/html\r\n\r\n" + b"<td>x</td>" * 1000)
    assert [len(c) for c in big.rawbody_chunks] == [2050, 2050, 2050, 3850]


# Piece lengths from SpamAssassin 4.0.1's Message::split_into_array_of_short_lines
@pytest.mark.parametrize("line, lengths", [
    (b"a" * 2048, [2048]),
    (b"a" * 2049, [2048, 1]),  # no space: cut at MAX_BODY_LINE_LENGTH
    (b"w" * 2047 + b" " + b"v" * 10, [2048, 10]),  # after the last space
    (b"w" * 2048 + b" " + b"v" * 10, [2049, 10]),  # a space right at 2048 is still found (rindex)
    (b" ".join([b"word"] * 1000) + b"\n", [2045, 2045, 910]),
    (b"x" * 5000 + b"\n", [2048, 2048, 905]),
])
def test_split_short_lines_cuts_where_spamassassin_does(line, lengths):
    pieces = split_short_lines(line)
    assert [len(p) for p in pieces] == lengths
    assert b"".join(pieces) == line


def test_body_lines_cut_long_paragraphs():
    para = " ".join(["word"] * 1000)
    v = MessageView(b"Subject: s\r\nContent-Type: text/plain\r\n\r\nshort\r\n\r\n" + para.encode() + b"\r\n")
    assert v.paragraphs == [b"s", b"short", para.encode()]
    # the paragraph's newline counts towards the cut, as in SpamAssassin's line
    assert [len(line) for line in v.body_lines] == [1, 5, 2045, 2045, 909]
    assert v.body_text == b"\n".join(v.body_lines) + b"\n"
