import base64

import pytest

from classifiers.tokenizer import TokenizerSettings, decode_header, registered_domain, tokenize

PLAIN = (
    b"Return-Path: <alice@corp.example>\r\n"
    b"Received: from mx.sender.example (mx.sender.example [192.0.2.10]) by gw.example.test\r\n"
    b"From: Alice Smith <alice@corp.example>\r\n"
    b"To: bob@example.test, carol@example.test\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <12345.abc@corp.example>\r\n"
    b"X-Mailer: Mutt 1.5.21\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Please find the numbers below. See https://www.reports.example.co.uk/q3/summary.\r\n"
)


def test_plain_message_gives_header_body_and_url_tokens():
    toks = tokenize(PLAIN)
    for t in ("subject:quarterly", "subject:report", "from:name:alice", "from:addr:alice@corp.example",
              "from:domain:corp.example", "to:count:2", "received:sender.example", "received:192.0.2",
              "message-id:@corp.example", "x-mailer:mutt 9.9.9", "please", "numbers", "below",
              "proto:https", "url:www.reports.example.co.uk", "url-domain:example.co.uk",
              "url-path:summary", "header:subject:1", "content-type:text/plain", "charset:us-ascii"):
        assert t in toks, t


def test_filter_headers_are_never_tokens():
    forged = PLAIN.replace(
        b"Subject:", b"X-Spam-Status: Yes, score=99 tests=VIAGRA_MAGIC\r\nX-Spam-Flag: YES\r\n"
        b"X-Virus-Scanned: clean by magicscanner\r\nAuthentication-Results: gw; spf=pass\r\nSubject:")
    assert tokenize(forged) == tokenize(PLAIN)
    assert not any("viagra" in t or "magicscanner" in t or "x-spam" in t for t in tokenize(forged))


@pytest.mark.parametrize("tagged", [b"SPAM*** Quarterly report", b"[SPAM] Quarterly report",
                                    b"***SPAM*** Quarterly report", b"{Spam?} Quarterly report"])
def test_subject_tag_is_not_a_token(tagged):
    toks = tokenize(PLAIN.replace(b"Subject: Quarterly report", b"Subject: " + tagged))
    assert tokenize(PLAIN) == toks


def test_html_tokens_visible_text_and_hidden_tricks():
    html = (b"<html><body><p>Cheap <b>meds</b> here</p>"
            b"<div style='display:none'>bayes poison words</div>"
            b"<font color=#ffffff>invisible</font><img src='http://203.0.113.9/pixel.gif'>"
            b"<form action='https://bit.ly/x'><input name=cc></form><script>evil()</script>"
            b"<a href='http://click.tracker.example/abc'>go</a></body></html>")
    raw = b"From: a@b.example\r\nSubject: hi\r\nContent-Type: text/html\r\n\r\n" + html
    toks = tokenize(raw)
    for t in ("cheap", "meds", "here", "html:hidden-style", "html:white-font", "html:tag:img",
              "html:tag:form", "html:tag:input", "html:tag:script", "url:ip", "url:shortener",
              "url:click.tracker.example"):
        assert t in toks, t
    assert "evil()" not in toks  # script text is not body text
    assert not any(t.startswith("<") for t in toks)


def test_html_off_keeps_text_without_html_tokens():
    raw = b"Subject: x\r\nContent-Type: text/html\r\n\r\n<p>Cheap <img src=x> meds</p>"
    toks = tokenize(raw, TokenizerSettings(html=False))
    assert "cheap" in toks and "meds" in toks
    assert not any(t.startswith("html:") for t in toks)


def test_attachment_gives_type_and_name_not_content():
    payload = base64.b64encode(b"MZ" + b"\x90" * 3000).decode()
    raw = ("From: x@y.example\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
           "Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\n"
           "Content-Type: text/plain\r\n\r\nsee attached invoice\r\n--BB\r\n"
           "Content-Type: application/octet-stream; name=\"invoice.pdf.exe\"\r\n"
           "Content-Disposition: attachment; filename=\"invoice.pdf.exe\"\r\n"
           "Content-Transfer-Encoding: base64\r\n\r\n" + payload + "\r\n--BB--\r\n").encode()
    toks = tokenize(raw)
    for t in ("filename:invoice.pdf.exe", "filename:ext:exe", "filename:double-ext",
              "mime:application/octet-stream", "attached", "invoice"):
        assert t in toks, t
    assert len(toks) < 100  # the attachment's bytes gave no tokens


def test_long_words_and_non_ascii_give_shape_tokens():
    raw = ("Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           "supercalifragilisticexpialidocious ÄÖÜäöüß visit mail to someone@example.org").encode()
    toks = tokenize(raw)
    assert "skip:s 30" in toks
    assert any(t.startswith("8bit%:") for t in toks)
    assert "email addr:example.org" in toks or "someone@example.org" in toks


def test_encoded_headers_and_charsets_are_decoded():
    assert decode_header("=?utf-8?q?Caf=C3=A9_ouvert?=") == "Café ouvert"
    assert decode_header("=?iso-8859-1?b?" + base64.b64encode("Grüße".encode("latin-1")).decode() + "?=") == "Grüße"
    assert decode_header("=?x-no-such-charset?q?abc?=") == "abc"
    raw = ("Subject: =?utf-8?q?Gro=C3=9Fe_Aktion?=\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
           "Content-Transfer-Encoding: quoted-printable\r\n\r\nsch=F6ne Gr=FC=DFe\r\n").encode()
    toks = tokenize(raw)
    assert "subject:große" in toks and "schöne" in toks and "grüße" in toks


def test_registered_domain_uses_the_public_suffix_list():
    assert registered_domain("www.mail.example.co.uk") == "example.co.uk"
    assert registered_domain("a.b.example.com") == "example.com"


HOSTILE = {
    "broken mime": b"Content-Type: multipart/mixed; boundary=\"nope\r\n\r\n--other\r\nContent-Type: text/html\r\n\r\n<p>x",
    "no boundary": b"Content-Type: multipart/alternative\r\n\r\nbody without parts",
    "bad charset": b"Content-Type: text/plain; charset=\"x-klingon\"\r\n\r\n\xff\xfe bad bytes \x80\x81",
    "wrong charset": b"Content-Type: text/plain; charset=utf-8\r\n\r\nlatin-1 bytes: caf\xe9 \xe0 la cr\xe8me",
    "charset in rfc2231 junk": b"Content-Type: text/plain; charset*=''%ZZ%\r\n\r\nhello",
    "bad encoded words": b"Subject: =?utf-8?b?!!!notbase64?= =?unknown?q?=ZZ?= =?utf-8?q?\r\n\r\nx",
    "bad base64": b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n@@@@ not base64 ====\r\n",
    "bad qp": b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=",
    "nuls": b"Subject: a\x00b\r\nFrom: \x00\x00\r\n\r\nbody\x00with\x00nuls" + b"\x00" * 10000,
    "binary junk": bytes(range(256)) * 400,
    "empty": b"",
    "only headers": b"Subject: nothing else",
    "huge header": b"Subject: " + b"A" * (2 * 1024 * 1024) + b"\r\n\r\nbody",
    "many headers": b"".join(b"X-H%d: v\r\n" % i for i in range(50000)) + b"\r\nbody",
    "huge received": b"Received: " + b"from a.b.example [1.2.3.4] " * 100000 + b"\r\n\r\nx",
    "bad rfc2231 filename": (b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Disposition: "
                             b"attachment; filename*=bogus''%FF%FE%\r\n\r\ndata\r\n--B--"),
    "deep nesting": (b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
                     + b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                                for i in range(300)) + b"--b300\r\nContent-Type: text/plain\r\n\r\ndeep\r\n"),
    "html junk": b"Content-Type: text/html\r\n\r\n<<<<a href='\x00'><img src=\"http://[::1:bad]/\"><!-- <" + b"<b>" * 5000,
    "weird url": b"Subject: x\r\n\r\nhttp://%%%%:99999999@@@/.. https://xn--a.xn--/ http://" + b"a." * 1000,
    "mbox line only": b"From someone Mon Jan 1 00:00:00 2024",
    "encoded-word bomb": b"Subject: " + b" ".join([b"=?utf-8?q?a=C3=A9?="] * 20000) + b"\r\n\r\nx",
    "address bomb": b"To: " + b", ".join(b"u%d@d%d.example" % (i, i) for i in range(20000)) + b"\r\n\r\nx",
    "part bomb": b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
                 + b"--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n" * 20000 + b"--B--",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_messages_never_raise(name):
    toks = tokenize(HOSTILE[name])
    assert isinstance(toks, list) and all(isinstance(t, str) for t in toks)
    assert len(toks) <= TokenizerSettings().max_tokens + 1


def test_ten_megabyte_attachment_is_capped():
    blob = base64.encodebytes(b"\x00\x01binary" * (10 * 1024 * 1024 // 8))
    raw = (b"From: x@y.example\r\nSubject: big\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"
           b"--BB\r\nContent-Type: text/plain\r\n\r\nhello there friend\r\n--BB\r\n"
           b"Content-Type: application/zip; name=big.zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + blob + b"\r\n--BB--\r\n")
    assert len(raw) > 10 * 1024 * 1024
    toks = tokenize(raw)
    assert "message:truncated" in toks
    assert "hello" in toks and "friend" in toks
    assert "filename:big.zip" in toks


def test_huge_text_body_is_capped_in_tokens():
    raw = b"Subject: x\r\n\r\n" + b"lorem ipsum dolor " * 200000
    settings = TokenizerSettings()
    toks = tokenize(raw, settings)
    assert len(toks) <= settings.max_tokens + 1
    assert "tokenizer:capped" in toks


def test_header_values_are_cut_before_decoding():
    toks = tokenize(HOSTILE["encoded-word bomb"])
    subject = [t for t in toks if t.startswith("subject:")]
    assert subject and all(len(t) <= len("subject:") + 20 for t in subject)
    assert "to:count:256" in tokenize(HOSTILE["address bomb"])  # 4000 characters of addresses


def test_parts_beyond_the_cap_are_not_walked():
    toks = tokenize(HOSTILE["part bomb"])
    assert toks.count("hello") < TokenizerSettings().max_parts
    assert "mime:many-parts" in toks


def test_non_bytes_input_is_reported_not_raised():
    assert tokenize("not bytes") == ["tokenizer:error"]


def test_nesting_past_the_parsed_views_limit_is_tokenized_not_an_error():
    from tests.gateway.test_mime import nested

    toks = tokenize(nested(1000))
    assert "tokenizer:error" not in toks  # the parse used to die of RecursionError here
    assert "header:from:1" in toks and "mime:many-parts" in toks
