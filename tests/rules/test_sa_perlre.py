"""Perl regexes from rule files, translated for Python's re."""

from __future__ import annotations

import pytest

from rules.sa.perlre import Unsupported, compile_perl, needles, optimise, parse_literal, parse_perl


@pytest.mark.parametrize("text,pattern,flags", [
    ("/foo/i", "foo", "i"),
    ("m{a/b}x", "a/b", "x"),
    ("m!x\\!y!", "x\\!y", ""),
    ("/a\\/b/", "a\\/b", ""),
    ("m(a(b)c)", "a(b)c", ""),
])
def test_parse_literal(text, pattern, flags):
    assert parse_literal(text) == (pattern, flags)


@pytest.mark.parametrize("bad", ["foo", "/unterminated", "/x/ trailing words", ""])
def test_parse_literal_rejects(bad):
    with pytest.raises(ValueError):
        parse_literal(bad)


@pytest.mark.parametrize("perl,flags,text,matches", [
    (r"end\z", "", b"the end", True),
    (r"end\z", "", b"the end\n", False),
    (r"end\Z", "", b"the end\n", True),
    (r"[[:alpha:]]+[[:digit:]]", "", b"abc7", True),
    (r"a\h+b", "", b"a \t b", True),
    (r"(?<word>ab)\k<word>", "", b"abab", True),
    (r"x(?i)ABC|def", "", b"DEF", True),  # the flag reaches the next alternative, as in Perl
    (r"x(?i)ABC|def", "", b"XABC", False),
    (r"\x{263a}", "", "\u263a".encode(), True),  # code points match their UTF-8 bytes
    (r"caf\xc3\xa9", "", "café".encode(), True),
    (r"\Qa.b\E", "", b"a.b", True),
    (r"\Qa.b\E", "", b"axb", False),
    (r"a++b", "", b"aab", True),  # possessive (Python 3.11)
    (r"(?>a+)b", "", b"aab", True),  # atomic
    (r"\p{L}+\d", "", b"abc1", True),
    (r"[\w\-]+", "", b"a-b", True),
    (r"foo # comment", "x", b"foo", True),
])
def test_translation(perl, flags, text, matches):
    assert bool(compile_perl(perl, flags).search(text)) is matches


@pytest.mark.parametrize("perl", [r"a\Kb", r"(?{ code })", r"(?R)", r"(?|a|b)", r"\p{Han}", r"a\Gb",
                                  r"(?<=a+)b", r"\N{U+263A}", r"\x{26", r"[\x{zz}]", r"\o{9}", r"\o{17"])
def test_unsupported_constructs_are_reported(perl):
    with pytest.raises(Unsupported):
        compile_perl(perl)


def test_needles_are_necessary_literals():
    assert needles(compile_perl(r"\bviagra\s+online", "i")) == (b"viagra",)
    assert set(needles(compile_perl(r"(?:cheap|discount)\s+(?:pills|meds)"))) in (
        {b"cheap", b"discount"}, {b"pills", b"meds"})
    assert needles(compile_perl(r"\d+\s+\w+")) is None  # nothing literal to require
    assert needles(compile_perl(r"(?:ab|xyzw)")) is None  # too short to be worth it


@pytest.mark.parametrize("perl,flags", [
    (r"(?:^|\s)(?:cheap|free|gratis)\s+pills", "i"), (r"\b(?:pay|send|give)\s+me\b", "i"),
    (r"x{0,3}foo", "i"), (r"[^A-Z]x(?-i:Y)", "i"), (r"(a)\1b", "i"), (r"(?:Ab|CD|eF)+", ""),
    (r"^(?:FREE|Cheap)\b", "im"), (r"[A-C]{2}[^D-F]", "i"),
])
def test_optimised_form_finds_the_same_matches(perl, flags):
    rx = compile_perl(perl, flags)
    opt, on_lower = optimise(rx)
    for text in (b"get Cheap pills now", b"FREE pills", b"please SEND me", b"xxFOO", b"nothing", b"9xY",
                 b"9xy", b"aAB", b"AAB", b"ab CD ef EF", b"free\ncheap", b"ABd", b"abE"):
        assert bool(rx.search(text)) == bool(opt.search(text.lower() if on_lower else text)), text


def test_parse_perl_keeps_one_tree_for_everything():
    parsed = parse_perl(r"viagra\s+(?:online|cheap)", "i")
    assert parsed.source == rb"viagra\s+(?:online|cheap)" and parsed.flags & 2
    with pytest.raises(Unsupported):
        parse_perl(r"(?<=a+)b")
