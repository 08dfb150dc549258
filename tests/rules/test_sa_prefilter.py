"""The Hyperscan prefilter: never misses a match of the rule's own regex."""

from __future__ import annotations

import logging
import os
import re
import threading

import pytest

from rules.sa import prefilter
from rules.sa.prefilter import Pattern, build, hs_expression, required_part

if os.environ.get("CI") != "true":  # a dependency on x86-64 (setup.cfg): CI must have it
    pytest.importorskip("hyperscan")


# (translated pattern, Python flags, text) - the prefilter must name the
# pattern whenever Python's re matches, for every construct the stock rules use
SUPERSET_CASES = [
    (rb"viagra", 0, b"buy viagra now"),
    (rb"v[i1!|]agra", re.I, b"BUY V1AGRA NOW"),
    (rb"(?<![a-z])pills", 0, b"cheap pills"),
    (rb"foo(?!bar)", 0, b"foo baz"),
    (rb"(a)\1x", 0, b"aax"),
    (rb"(?>a+)b", 0, b"aaab"),
    (rb"a*+b", 0, b"aab"),
    (rb"^Subject line$", re.M, b"first\nSubject line\nlast"),
    (rb"start.+end", re.S, b"start\n\nend"),
    (rb"caf\xe9", re.I, b"CAF\xe9 au lait"),
    (rb"\xe2\x80\x8b", 0, b"zero\xe2\x80\x8bwidth"),
    (rb"(?:ab|cd){2,3}x", 0, b"abcdx"),
    (rb"a[^>]{0,2048}z", 0, b"a" + b"-" * 1500 + b"z"),
    (rb"x\d{1,80}y", 0, b"x12345y"),
    (rb"(?i)mixed CASE", 0, b"MIXED case"),
    (rb"\bword\b", 0, b"a word here"),
]


@pytest.mark.parametrize("source,flags,text", SUPERSET_CASES, ids=[c[0][:30].decode("latin-1") for c in SUPERSET_CASES])
def test_every_python_match_is_a_candidate(source, flags, text):
    assert re.search(source, text, flags), "the case itself must match in Python"
    pf = build([Pattern("R", source, flags)])
    assert "R" in pf.covered
    assert pf.candidates(text) == {"R"}


def test_a_pattern_that_cannot_match_is_not_a_candidate():
    pf = build([Pattern("A", rb"viagra", re.I), Pattern("B", rb"(?:ab){2,3}x", 0), Pattern("C", rb"caf\xe9", 0)])
    assert pf.covered == {"A", "B", "C"}
    assert pf.candidates(b"a perfectly ordinary business letter about coffee") == set()
    assert pf.candidates(b"VIAGRA and abababx") == {"A", "B"}


def test_line_start_patterns_sharing_a_database_are_not_missed():
    # 72_active.cf __HAS_HREF next to __HAS_IMG_SRC_DATA: with their ^ anchors
    # Hyperscan found neither in this text, so MIXED_HREF_CASE was lost
    text = b"-ice cream00-->ssle\n<p>\n\n<A href=>\n"
    href, img = rb"^[^>].*?<a href=", rb"^[^>].*?<img src=['\"]data"
    assert re.search(href, text, re.I | re.M)
    pf = build([Pattern("__HAS_HREF", href, re.I | re.M), Pattern("__HAS_IMG_SRC_DATA", img, re.I | re.M)])
    assert pf.covered == {"__HAS_HREF", "__HAS_IMG_SRC_DATA"}
    assert pf.candidates(text) == {"__HAS_HREF"}
    assert hs_expression(rb"(?:^|\s)a[\^^]\^", drop_line_starts=True) == rb"(?:|\s)a[\^^]\^"
    assert hs_expression(rb"^a") == rb"^a"  # single-line anchors are kept


def test_hs_expression_escapes_bytes_and_widens_large_repeats():
    assert hs_expression(b"caf\xe9\\\xe9\x00") == b"caf\\xe9\\xe9\\x00"
    # repeats of a group always, of a byte or class above the limit
    assert hs_expression(rb"(?:ab){2,3}(x){5}") == rb"(?:ab){1,}(x){1,}"
    assert hs_expression(rb"a{1,80}[^>]{0,2048}b{2,5}c{3}") == rb"a{1,}[^>]{0,}b{2,5}c{3}"
    # braces in a class or escaped are literals, left alone
    assert hs_expression(rb"[{]{1,90}\{1,90\}[]{]") == rb"[{]{1,}\{1,90\}[]{]"


def test_required_part_cuts_a_long_pattern_to_a_run_every_match_contains():
    assert required_part(rb"(?:^|\W)(?=a)[xy]{2,3}?b\\c(d(e)f)+g", 12) == rb"b\\c(d(e)f)+"
    # one required group is looked into, then cut
    assert required_part(rb"(?:a?(?:your|din)?abc[d)]e(?:f|g)){5}", 14) == rb"bc[d)]e(?:f|g)"
    # a global flag group stays in front
    assert required_part(rb"(?i)x?abc(?=q)de", 6) == rb"(?i)ab"
    # nothing to cut safely
    assert required_part(rb"ab|cd", 5) is None
    assert required_part(rb"(ab|cd)", 5) is None
    assert required_part(rb"a?b?(?=c)", 9) is None


def test_long_pattern_is_prefiltered_by_its_cut(monkeypatch):
    monkeypatch.setattr(prefilter, "MAX_PATTERN", 40)
    source = rb"(?:^|\W)" + rb"(?:alpha|beta|gamma|delta)\s+" * 3 + rb"omega"
    assert len(source) > 40
    pf = build([Pattern("L", source, 0)])
    assert "L" in pf.covered
    text = b" beta   alpha gamma omega"
    assert re.search(source, text)
    assert pf.candidates(text) == {"L"}
    assert pf.candidates(b"nothing of the sort") == set()


def test_refused_pattern_is_reported_and_left_to_python():
    # Hyperscan takes $ only at the end of a pattern
    pf = build([Pattern("OK", rb"fine", 0), Pattern("END", rb"(?:$|\W)opt(?:out)", 0)])
    assert pf.covered == {"OK"}
    assert "anchor" in pf.refused["END"].lower()


def test_databases_are_cached_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(prefilter, "CACHE_MIN_SECONDS", 0)
    patterns = [Pattern(f"R{i}", b"word%d\\b" % i, 0) for i in range(prefilter.CHUNK + 3)]
    first = build(patterns, str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("hs-") for f in files)

    def no_compiling(chunks):
        assert chunks == [], "compiled although the cache had it"
        return []

    monkeypatch.setattr(prefilter, "_compile_chunks", no_compiling)
    again = build(patterns, str(tmp_path))
    assert again.covered == first.covered
    assert again.candidates(b"word7 and word52") == {"R7", "R52"}


def test_unreadable_cache_file_is_ignored_and_rewritten(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(prefilter, "CACHE_MIN_SECONDS", 0)
    patterns = [Pattern("R", b"word", 0)]
    build(patterns, str(tmp_path))
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not json\ngarbage")
    with caplog.at_level(logging.WARNING, logger="mailgate.rules.sa"):
        pf = build(patterns, str(tmp_path))
    assert "unreadable cache file" in caplog.text
    assert pf.candidates(b"a word") == {"R"}
    assert path.read_bytes().startswith(b"{}\n")


def test_quick_compiles_are_not_cached(tmp_path):
    build([Pattern("R", b"word", 0)], str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_old_cache_files_are_pruned(tmp_path):
    old = tmp_path / "hs-0123.db"
    old.write_bytes(b"{}\n")
    os.utime(old, (1, 1))
    keep = tmp_path / "notes.txt"
    keep.write_text("not ours")
    build([Pattern("R", b"word", 0)], str(tmp_path))
    assert not old.exists() and keep.exists()


def test_threads_scan_at_once_each_with_its_own_scratch():
    pf = build([Pattern(i, b"abc%d\\b" % i, 0) for i in range(120)])
    text = b"xx abc7 abc77 " * 200
    errors = []

    def work():
        try:
            for _ in range(300):
                assert pf.candidates(text) == {7, 77}
        except Exception as e:  # collected: an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_many_chunks_compile_in_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(prefilter, "CACHE_MIN_SECONDS", 0)
    patterns = [Pattern(f"R{i}", b"term%d\\b" % i, 0) for i in range(3 * prefilter.CHUNK + 1)]
    pf = build(patterns, str(tmp_path))
    assert len(pf.databases) == 4 and len(pf.covered) == len(patterns)
    assert pf.candidates(b"term3 term120 term150") == {"R3", "R120", "R150"}
    assert len(list(tmp_path.iterdir())) == 4


def test_failing_worker_processes_fall_back_to_compiling_here(monkeypatch, caplog):
    monkeypatch.setattr(prefilter.sys, "executable", "/bin/false")
    patterns = [Pattern(f"R{i}", b"term%d\\b" % i, 0) for i in range(3 * prefilter.CHUNK)]
    with caplog.at_level(logging.WARNING, logger="mailgate.rules.sa"):
        pf = build(patterns)
    assert "worker processes failed" in caplog.text
    assert pf.candidates(b"term3 term120") == {"R3", "R120"}


def test_unwritable_cache_dir_is_reported_and_the_build_goes_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(prefilter, "CACHE_MIN_SECONDS", 0)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with caplog.at_level(logging.WARNING, logger="mailgate.rules.sa"):
        pf = build([Pattern("R", b"word", 0)], str(not_a_dir))
    assert "cannot write cache file" in caplog.text
    assert pf.candidates(b"a word") == {"R"}
