"""Bounded MIME parsing (gateway/mime.py): a hostile nesting depth is held as
opaque bytes instead of exhausting the stack, shallow mail parses exactly as
the email package parses it, deep address comments cannot recurse either;
every DATA-stage check survives a 1,000-level message and fuzzed broken MIME;
and a real `mailgate run` answers the 1,000-level message for good."""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import functools
import smtplib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from gateway.mime import MAX_COMMENT_DEPTH, MAX_MIME_DEPTH, getaddresses, parse_mime, shallow_comments
from gateway.records import Envelope, Failed, Message, Recipient, Result, Session, Stage, Transaction

HEAD = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: deep\r\n"
        b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <deep.1@sender.test>\r\nMIME-Version: 1.0\r\n")
INNER = b"Content-Type: text/plain\r\n\r\nthe innermost text http://deep.example/x\r\n"


def nested(depth: int, inner: bytes = INNER, head: bytes = HEAD) -> bytes:
    """``depth`` multipart/mixed levels, each holding the next, ``inner`` at the bottom."""
    out = [head]
    for i in range(depth):
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    out.append(inner)
    out.extend(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"".join(out)


def rfc822_chain(depth: int) -> bytes:
    return HEAD + b"Content-Type: message/rfc822\r\n\r\n" * depth + INNER


def stdlib(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def types(msg) -> list[str]:
    return [p.get_content_type() for p in msg.walk()]


# --- the bound -------------------------------------------------------------------


def test_a_thousand_levels_recurse_in_the_email_package():
    # what the bound is for: the stock parser dies on this message
    with pytest.raises(RecursionError):
        stdlib(nested(1000))


def test_a_thousand_levels_parse_into_a_bounded_view():
    msg = parse_mime(nested(1000))
    parts = list(msg.walk())
    assert len(parts) == MAX_MIME_DEPTH + 1
    deepest = parts[-1]
    assert deepest.depth == MAX_MIME_DEPTH and deepest.opaque
    assert deepest.get_content_type() == "application/octet-stream"
    assert deepest.declared_type == "multipart/mixed"  # its headers stay as sent
    assert deepest["Content-Type"] == f'multipart/mixed; boundary="b{MAX_MIME_DEPTH}"'
    body = deepest.get_payload()
    assert isinstance(body, str) and "the innermost text" in body and body.endswith(f"--b{MAX_MIME_DEPTH}--")
    assert not any(p.opaque for p in parts[:-1])


def test_message_rfc822_chains_are_bounded_too():
    with pytest.raises(RecursionError):
        stdlib(rfc822_chain(1000))
    parts = list(parse_mime(rfc822_chain(1000)).walk())
    assert len(parts) == MAX_MIME_DEPTH + 1
    assert parts[-1].opaque and parts[-1].declared_type == "message/rfc822"
    assert "the innermost text" in parts[-1].get_payload()


def test_a_digest_part_without_content_type_counts_as_a_container():
    # in multipart/digest a part defaults to message/rfc822: a container without a header
    digest = (HEAD + b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
              + b"Subject: inner\r\n\r\nhello\r\n--d--\r\n")
    parts = list(parse_mime(digest, max_depth=1).walk())
    assert [p.get_content_type() for p in parts] == ["multipart/digest", "application/octet-stream"]
    assert parts[1].declared_type == "message/rfc822" and "Subject: inner" in parts[1].get_payload()
    assert types(parse_mime(digest, max_depth=2)) == ["multipart/digest", "message/rfc822", "text/plain"]


def test_a_leaf_at_the_limit_and_the_parts_after_an_opaque_one_are_read_normally():
    raw = (HEAD + b'Content-Type: multipart/mixed; boundary="top"\r\n\r\n--top\r\n'
           + b'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n--alt\r\n'
           + b"Content-Type: text/plain\r\n\r\nplain\r\n--alt--\r\n"
           + b"--top\r\nContent-Type: text/html\r\n\r\n<p>after</p>\r\n--top--\r\n")
    parts = list(parse_mime(raw, max_depth=1).walk())
    assert [p.get_content_type() for p in parts] == ["multipart/mixed", "application/octet-stream", "text/html"]
    assert "plain" in parts[1].get_payload() and parts[2].get_payload() == "<p>after</p>"
    leaf_at_limit = list(parse_mime(raw, max_depth=2).walk())
    assert [p.get_content_type() for p in leaf_at_limit] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html"]
    assert not any(p.opaque for p in leaf_at_limit)


def test_shallow_mail_parses_exactly_as_the_email_package_parses_it():
    raw = nested(5, inner=b'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
                          b"Subject: digested\r\n\r\nhi\r\n--d\r\nContent-Type: message/rfc822\r\n\r\n"
                          b"Subject: forwarded\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n--d--\r\n")
    mine, theirs = parse_mime(raw), stdlib(raw)
    assert types(mine) == types(theirs) and len(types(mine)) == 10
    assert mine.as_bytes() == theirs.as_bytes()
    assert [p.depth for p in mine.walk()] == [0, 1, 2, 3, 4, 5, 6, 7, 6, 7]


def test_max_depth_below_one_is_refused():
    with pytest.raises(ValueError):
        parse_mime(INNER, max_depth=0)


def test_message_says_when_its_view_was_truncated():
    assert Message(nested(1000)).mime_truncated
    assert Message(nested(1000)).max_mime_depth == MAX_MIME_DEPTH
    assert not Message(nested(MAX_MIME_DEPTH)).mime_truncated  # a leaf at the limit is whole
    assert Message(nested(3), max_mime_depth=2).mime_truncated


# --- address comments ----------------------------------------------------------------


def deep_comment(depth: int) -> str:
    return "Alice <alice@sender.test> " + "(" * depth + "c" + ")" * depth


def test_deep_comments_recurse_in_the_email_package():
    with pytest.raises(RecursionError):
        email.utils.getaddresses([deep_comment(1000)])


@pytest.mark.parametrize("depth", [MAX_COMMENT_DEPTH + 1, 1000, 100_000])
def test_deep_comments_are_dropped_and_the_address_kept(depth):
    assert getaddresses([deep_comment(depth)]) == [("Alice", "alice@sender.test")]


def test_comments_within_the_limit_are_left_alone():
    shallow = deep_comment(MAX_COMMENT_DEPTH)
    assert shallow_comments(shallow) == shallow
    assert getaddresses(["alice@sender.test (Alice Smith)"]) == [("Alice Smith", "alice@sender.test")]
    # only the deep comment goes, and escaped parentheses nest nothing
    value = "(ok) bob@example.test " + "(" * 60 + ")" * 60 + " (" + "\\(" * 80 + ")"
    assert shallow_comments(value) == "(ok) bob@example.test " + "  (" + "\\(" * 80 + ")"


def test_an_unterminated_deep_comment_is_dropped():
    assert shallow_comments("a@b.test " + "(" * 500) == "a@b.test  "
    assert getaddresses(["a@b.test " + "(" * 500]) == [("", "a@b.test")]


# --- every DATA-stage check -------------------------------------------------------------


@pytest.fixture(scope="module")
def data_checks():
    """The DATA-stage checks of the default config plus SpamAssassin's stock
    rules, their slow work run inline.  The rules run without their Hyperscan
    prefilter, which only skips rules that cannot match (test_sa_check shows
    the hits are the same) and would cost 10-40 s to compile here."""
    from tests.support.programs import require_program

    require_program("spamassassin")
    import rules.sa_check
    from gateway.config import validate
    from gateway.plugins import Services, discover
    from gateway.resolver import Resolver
    from gateway.runtime import build_runtime
    from twisted.internet import reactor

    catalogue = discover()
    config = validate({"rules": {"stock_rules": True, "cache_dir": ""}}, catalogue.sections)
    services = Services(reactor=reactor, resolver=Resolver.from_config(config.dns),
                        run_in_thread=lambda fn, *args: defer.maybeDeferred(fn, *args))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rules.sa_check, "Engine", functools.partial(rules.sa_check.Engine, use_prefilter=False))
        runtime = build_runtime(config, catalogue, services)
    checks = runtime.pipeline.by_stage[Stage.DATA]
    assert {"banned_attachments", "header_sanity", "mime_structure", "sa_rules", "bayes"} <= {c.name for c in checks}
    sa = next(c for c in checks if c.name == "sa_rules")
    assert len(sa.engine.rs.rules) > 1000  # the stock rules, not only ours
    return runtime


def run_check(check, txn) -> list:
    """What the check reports; an exception (raised or in its Deferred) escapes."""
    value = check.check(txn)
    if asyncio.iscoroutine(value):
        value = asyncio.new_event_loop().run_until_complete(value)
    if isinstance(value, defer.Deferred):
        out = []
        value.addBoth(out.append)
        assert out, f"{check.name} did not answer inline"
        value = out[0]
        if hasattr(value, "raiseException"):
            value.raiseException()
    records = [] if value is None else [value] if isinstance(value, (Result, Failed)) else list(value)
    assert all(isinstance(r, (Result, Failed)) for r in records), (check.name, records)
    return records


def judge(runtime, raw: bytes) -> tuple[list, bytes]:
    """Every DATA check on ``raw``, then the decider and the header finisher."""
    records = []
    message = Message(raw)
    for check in runtime.pipeline.by_stage[Stage.DATA]:
        env = Envelope("Q1", "alice@sender.test", recipients=[Recipient("bob@example.test", "example.test")])
        txn = Transaction(Session("Q1", "192.0.2.1", helo="client.sender.test"), env, message)
        records += run_check(check, txn)
    verdict = runtime.scorer.decide(records)
    return records, runtime.finisher.finish(raw, verdict)


def test_every_data_check_answers_a_thousand_level_message(data_checks):
    records, finished = judge(data_checks, nested(1000))
    symbols = {r.symbol for r in records if isinstance(r, Result)}
    assert "MIME_NESTING_TOO_DEEP" in symbols
    failures = {f.check: f for f in records if isinstance(f, Failed)}
    assert not [f for f in failures.values() if f.severity != "none"], failures
    assert "banned_attachments" in failures  # it could not look below the limit, and says so
    assert b"MIME_NESTING_TOO_DEEP" in finished.split(b"\r\n\r\n", 1)[0]


def test_every_data_check_answers_deep_address_comments(data_checks):
    raw = HEAD.replace(b"From: Alice <alice@sender.test>", ("From: " + deep_comment(2000)).encode()) + b"\r\nhi\r\n"
    records, _ = judge(data_checks, raw)
    assert not [f for f in records if isinstance(f, Failed) and f.severity != "none"], records


# --- fuzz: broken MIME through Message and every DATA check ---------------------------------------

_TRICKY_VALUES = [
    b"=?utf-8?b?!!!not base64?=", b"=?x-unknown-charset?q?=FF=FE?=", b"=?utf-8?q?unterminated",
    b"(" * 80 + b"a@b.test", b'"unterminated <a@b.test', b"a@b.test, , ,<>,<@>", b"<<<>>>@@@",
    b"multipart/mixed; boundary=", b"multipart/alternative", b"text/html; charset=x-bogus",
    b'text/plain; charset="utf-7"', b"application/zip; name*0*=utf-8''%FF%FE; name*1=\".exe\"",
    b"attachment; filename*=bad''%%%", b'attachment; filename="invoice.pdf.exe"',
    b"message/rfc822", b"message/delivery-status", b"base64", b"quoted-printable", b"x-uuencode",
    "caf\u00e9 \u202e".encode(), b"\xff\xfe\x00\x80", b"",
]
_HEADER_NAMES = [b"Subject", b"From", b"To", b"Cc", b"Reply-To", b"Content-Type", b"Content-Transfer-Encoding",
                 b"Content-Disposition", b"Received", b"Message-ID", b"Date", b"X-Junk", b"Content-Type "]
_BODIES = [
    b"SGVsbG8gd29ybGQ=", b"!!!@@@===not*base64", b"SGVsbG8", b"=ZZ=\r\n=4=\r\n=", b"soft break=\r\nline",
    b"<html><body><a href='http://evil.example/x?<script>'>click<div><div><table><tr><td>",
    b"<" * 50 + b"p>" * 50, b"MZ\x90\x00PE\x00\x00", b"PK\x03\x04" + b"\x00" * 26, b"begin 644 x\r\n`\r\nend",
    b"http://a.example/ https://[::1]/ www.b.example mailto:c@d.example", b"\x00\x01\x02\xff" * 8,
]

header_values = st.one_of(st.sampled_from(_TRICKY_VALUES), st.binary(max_size=40))
headers = st.lists(st.tuples(st.sampled_from(_HEADER_NAMES), header_values), max_size=5).map(
    lambda hs: b"".join(n + b": " + v + b"\r\n" for n, v in hs))
bodies = st.one_of(st.sampled_from(_BODIES), st.binary(max_size=120))
boundaries = st.one_of(st.sampled_from([b"b", b"", b" spaced", b'"q"', b"--", b"b" * 80]),
                       st.binary(min_size=1, max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b))
ctes = st.sampled_from([b"", b"base64", b"quoted-printable", b"7bit", b"8bit", b"binary", b"x-bogus"])


@st.composite
def leaf(draw) -> bytes:
    ctype = draw(st.sampled_from([b"text/plain", b"text/html", b"application/octet-stream", b"application/zip",
                                  b"message/delivery-status", b"text/plain; charset=iso-2022-jp"]))
    cte = draw(ctes)
    head = draw(headers) + b"Content-Type: " + ctype + b"\r\n"
    if cte:
        head += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    return head + b"\r\n" + draw(bodies) + b"\r\n"


def multipart(children) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw) -> bytes:
        boundary = draw(boundaries)
        parts = draw(st.lists(children, max_size=4))
        out = draw(headers) + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
        out += draw(st.sampled_from([b"", b"preamble\r\n"]))
        for p in parts:
            out += b"--" + boundary + draw(st.sampled_from([b"", b"  ", b"--"])) + b"\r\n" + p
        if draw(st.booleans()):  # the close delimiter is sometimes missing
            out += b"--" + boundary + b"--\r\n" + draw(st.sampled_from([b"", b"epilogue\r\n"]))
        return out
    return build()


def rfc822(children) -> st.SearchStrategy[bytes]:
    return st.tuples(headers, children).map(lambda hc: hc[0] + b"Content-Type: message/rfc822\r\n\r\n" + hc[1])


mime_trees = st.recursive(leaf(), lambda kids: st.one_of(multipart(kids), rfc822(kids)), max_leaves=8)


@st.composite
def messages(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))  # no structure at all
    raw = HEAD + draw(mime_trees)
    depth = draw(st.sampled_from([0, 0, 0, 3, MAX_MIME_DEPTH + 5]))
    if depth:  # sometimes past the bound
        raw = nested(depth, inner=raw[len(HEAD):])
    if draw(st.booleans()):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=30)) + raw[at:]
    nl = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    return raw.replace(b"\r\n", nl)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=messages())
def test_fuzz_broken_mime_through_every_data_check(data_checks, raw):
    from classifiers.tokenizer import tokenize
    from rules.uribl import message_domains

    message = Message(raw)
    list(message.parsed.walk())
    assert isinstance(message.mime_truncated, bool)
    judge(data_checks, raw)
    # content paths the default config leaves off (no Bayes model, no URI zones)
    assert "tokenizer:error" not in tokenize(raw)
    message_domains(raw, message.parsed)


# --- end to end --------------------------------------------------------------------------


def test_e2e_a_thousand_level_message_gets_a_definite_answer(mailgate, sink):
    gw = mailgate()
    with gw.smtp() as smtp:
        try:
            smtp.sendmail("alice@sender.test", ["bob@example.test"], nested(1000))
            code = 250
        except smtplib.SMTPDataError as e:
            code = e.smtp_code
        assert smtp.noop()[0] == 250  # and the session goes on
    assert code in (250, 554), code
    log = gw.log()
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
    if code == 250:
        assert sink.wait_for(1, timeout=20)
        head = sink.messages[0].data.split(b"\r\n\r\n", 1)[0]
        assert b"MIME_NESTING_TOO_DEEP" in head.replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
