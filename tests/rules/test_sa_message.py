"""What the rules see of a message: headers, rendered body, raw body, URIs, HTML facts."""

from __future__ import annotations

from rules.sa.message import MessageView

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
    assert v.header("Subject") == b"Quarterly  report\n"
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
