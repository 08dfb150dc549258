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
