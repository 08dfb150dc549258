"""The ``eval:`` tests implemented natively.

Each entry of ``EVALS`` names the rule kinds it may appear in, checks its
arguments once when the rules load (``unsupported`` says why a call cannot
run, and the rule is skipped and reported), and computes a hit count from an
``EvalContext``.  An eval we do not implement is never a silent "no hit":
it is skipped at load time and shown by ``mailgate rules lint``.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rules.sa.message import split_short_paragraphs
from rules.sa.perlre import Unsupported, compile_perl, parse_literal


@dataclass
class EvalContext:
    view: Any  # rules.sa.message.MessageView
    lists: dict[str, list[str]] = field(default_factory=dict)  # welcome/block lists
    # DNSBL answers of the gateway's DNSBL checks: zone -> A records / TXT
    dnsbl: dict[str, list[str]] = field(default_factory=dict)
    dnsbl_txt: dict[str, list[str]] = field(default_factory=dict)
    rbl_sets: dict[str, str] = field(default_factory=dict)  # check_rbl set name -> zone
    cache: dict = field(default_factory=dict)
    # what the gateway's sender_domain check (MAIL stage, through the injected
    # resolver) learned of the envelope sender's domain: None when it did not
    # look (null sender, relay client, check off, offline scoring) or the
    # domain exists, "nxdomain" when it does not
    sender_dns: Optional[str] = None


def address_matches(address: str, patterns) -> bool:
    """SpamAssassin list syntax: globs (``*@example.com``, ``?``) on the address."""
    return _globs(patterns).match(address.lower()) is not None


_GLOBS: dict[tuple, re.Pattern] = {}


def _globs(patterns) -> re.Pattern:
    """One regex for a whole list of globs, built once per distinct list
    (evals are plain functions; the lists only change on a reload)."""
    key = tuple(patterns)
    rx = _GLOBS.get(key)
    if rx is None:
        if len(_GLOBS) > 64:  # lists change only on a reload
            _GLOBS.clear()
        rx = _GLOBS[key] = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in key) or "(?!)")
    return rx


def parse_call(text: str) -> tuple[str, tuple]:
    """"check_rbl('zen', 'zen.spamhaus.org.')" -> ('check_rbl', ('zen', 'zen.spamhaus.org.'))."""
    m = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", text, re.S)
    if not m:
        raise ValueError(f"cannot read eval call {text[:60]!r}")
    name, argtext = m.group(1), (m.group(2) or "").strip()
    if not argtext:
        return name, ()
    args = []
    for tok in _split_args(argtext):
        tok = tok.strip()
        if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "'\"":
            args.append(tok[1:-1])
        else:
            try:
                args.append(str(ast.literal_eval(tok)))
            except (ValueError, SyntaxError):
                args.append(tok)
    return name, tuple(args)


def _split_args(text: str) -> list[str]:
    out, cur, quote = [], [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            cur.append(ch)
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


@dataclass(frozen=True)
class Eval:
    kinds: tuple
    run: Callable[[EvalContext, tuple], float]
    check: Optional[Callable[[tuple], Optional[str]]] = None


def unsupported(kind: str, call: tuple[str, tuple]) -> Optional[str]:
    """Why this eval cannot run here, or None when it can."""
    name, args = call
    ev = EVALS.get(name)
    if ev is None:
        return f"eval:{name}() is not implemented"
    if kind not in ev.kinds:
        return f"eval:{name}() is not available in {kind} rules"
    if ev.check is not None:
        try:
            return ev.check(args)
        except (IndexError, ValueError, Unsupported) as e:
            return f"eval:{name}(): bad arguments ({e})"
    return None


def run(ctx: EvalContext, call: tuple[str, tuple]) -> float:
    name, args = call
    return EVALS[name].run(ctx, args)


# --- header tests -------------------------------------------------------------


def _missing_to(ctx, args):
    v = ctx.view
    return 0 if v.header_count("To") or v.header_count("Apparently-To") else 1


def _header_count_range(ctx, args):
    n = ctx.view.header_count(args[0])
    return 1 if float(args[1]) <= n <= float(args[2]) else 0


def _check_range_args(args):
    float(args[1]), float(args[2])
    return None


_ILLEGAL_HEADER_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\xff]")
_C0_CONTROLS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _raw_header_bytes(ctx, name: str) -> list[bytes]:
    """The header's values as the bytes on the wire (the parsed view turns
    undeclared 8-bit bytes into U+FFFD, which would look like valid UTF-8)."""
    key = ("raw_header_bytes",)
    fields = ctx.cache.get(key)
    if fields is None:
        head = ctx.view.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        fields = []
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1][1].append(line)
            elif b":" in line:
                k, _, v = line.partition(b":")
                fields.append((k.strip().lower(), [v.lstrip(b" \t")]))
        ctx.cache[key] = fields
    want = name.lower().encode()
    return [b"\n".join(v) for k, v in fields if k == want]


def _illegal_chars(ctx, args):
    """HeaderEval::check_illegal_chars on the raw header: valid UTF-8
    without controls is legal; otherwise count non-ASCII and C0 controls
    (less one cent, pound or registered sign in a Subject)."""
    header, ratio, count = args[0], float(args[1]), float(args[2])
    if header.upper() == "ALL":
        raw = ctx.view.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0] + b"\n"
    else:
        raw = b"\n".join(_raw_header_bytes(ctx, header))
    if not raw.strip():
        return 0
    if any(b >= 0x80 for b in raw):
        try:
            raw.decode("utf-8")
            if not _C0_CONTROLS.search(raw):
                return 0
        except UnicodeDecodeError:
            pass
    illegal = len(_ILLEGAL_HEADER_BYTES.findall(raw))
    if illegal and header.lower() == "subject":
        if sum(raw.count(c) for c in (b"\xa2", b"\xa3", b"\xae")) == 1:
            illegal -= 1
    return 1 if illegal / len(raw) >= ratio and illegal >= count else 0


def _originators(ctx) -> list[str]:
    v = ctx.view
    addrs = v.addresses("From", "Resent-From", "Sender")
    if v.envelope_sender:
        addrs.append(v.envelope_sender.lower())
    return addrs


def _in_list(list_names: tuple, who: Callable[[EvalContext], list[str]]):
    def run(ctx, args):
        patterns = [p for n in list_names for p in ctx.lists.get(n, ())]
        if not patterns:
            return 0
        return 1 if any(address_matches(a, patterns) for a in who(ctx)) else 0

    return run


def _recipients(ctx) -> list[str]:
    v = ctx.view
    return v.addresses("To", "Cc") + [r.lower() for r in v.recipients]


def _from_in_list(ctx, args):
    patterns = ctx.lists.get("list:" + args[0].lower(), [])
    return 1 if patterns and any(address_matches(a, patterns) for a in ctx.view.addresses("From")) else 0


def _replyto_in_list(ctx, args):
    patterns = ctx.lists.get("list:" + args[0].lower(), [])
    return 1 if patterns and any(address_matches(a, patterns) for a in ctx.view.addresses("Reply-To")) else 0


# --- DNSBL tests: answers come from the gateway's DNSBL checks -------------------


def _zone_of(ctx, set_name: str) -> Optional[str]:
    return ctx.rbl_sets.get(set_name)


def _answers_match(answers: list[str], sub: Optional[str]) -> bool:
    if not answers:
        return False
    if not sub:
        return True
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", sub):
        return sub in answers
    if re.fullmatch(r"\d+", sub):
        mask = int(sub)
        for a in answers:
            try:
                last = int(a.rsplit(".", 1)[1])
            except (IndexError, ValueError):
                continue
            if last & mask:
                return True
        return False
    rx = compile_perl(sub)
    return any(rx.search(a.encode()) for a in answers)


def _check_rbl(ctx, args):
    zone = args[1].rstrip(".").lower()
    return 1 if _answers_match(ctx.dnsbl.get(zone, []), args[2] if len(args) > 2 else None) else 0


def _check_rbl_txt(ctx, args):
    zone = args[1].rstrip(".").lower()
    txts = ctx.dnsbl_txt.get(zone, [])
    if not txts:
        return 0
    if len(args) < 3:
        return 1
    pattern = args[2]
    rx = compile_perl(pattern) if not pattern.startswith("/") else compile_perl(*parse_literal(pattern))
    return 1 if any(rx.search(t.encode()) for t in txts) else 0


def _check_rbl_sub(ctx, args):
    zone = _zone_of(ctx, args[0])
    if zone is None:
        return 0
    return 1 if _answers_match(ctx.dnsbl.get(zone, []), args[1]) else 0


def _check_sub_args(args):
    sub = args[1] if len(args) > 1 else args[0]
    if not re.fullmatch(r"[\d.]+", sub):
        compile_perl(sub)
    return None


def _check_rbl_args(args):
    if len(args) < 2:
        return "needs a set name and a zone"
    if len(args) > 2:
        _check_sub_args((args[0], args[2]))
    return None


# --- body and MIME tests ----------------------------------------------------------


def _body_length(ctx, args):
    return 1 if ctx.view.body_length <= float(args[0]) else 0


_MIME_KEYS: dict = {}  # every key check_for_mime knows is read from mime_scan below




_MIME_SCAN_KEYS = {
    # MIMEEval::_check_attachments results read by check_for_mime
    "mime_qp_long_line": lambda st: st["qp_long_line"],
    "mime_bad_iso_charset": lambda st: st["bad_iso_charset"],
    # Message.pm sets this flag on the message; SA 4.0's check_for_mime looks
    # for it on the scan status and never finds it: we read it where it is
    "mimepart_limit_exceeded": lambda st: st["mimepart_limit_exceeded"],
    # as _check_attachments counts them: base64 parts, excess QP bytes (SA
    # reuses the name), Content-Disposition attachments, base64 ASCII text
    "mime_base64_count": lambda st: st["base64_count"],
    "mime_qp_count": lambda st: st["qp_count"],
    "mime_attachment": lambda st: st["attachment"],
    "mime_base64_encoded_text": lambda st: st["base64_encoded_text"],
}


def _check_for_mime(ctx, args):
    if args[0] == "mime_faraway_charset":
        return _mime_faraway_charset(ctx)
    if args[0] in _MIME_SCAN_KEYS:
        return 1 if _MIME_SCAN_KEYS[args[0]](ctx.view.mime_scan) else 0
    return _MIME_KEYS[args[0]](ctx.view.mime_stats)


def _mime_key_check(args):
    if args and (args[0] in _MIME_KEYS or args[0] in _MIME_SCAN_KEYS or args[0] == "mime_faraway_charset"):
        return None
    return f"check_for_mime('{args[0] if args else ''}') not implemented"


def _mime_multipart_ratio(ctx, args):
    # MIMEEval::check_mime_multipart_ratio
    ratio = ctx.view.mime_scan["multipart_ratio"]
    return 1 if float(args[0]) <= ratio < float(args[1]) else 0


def _ma_non_text(ctx, args):
    # MIMEEval::check_ma_non_text
    return 1 if ctx.view.mime_scan["ma_non_text"] else 0


def _base64_length(ctx, args):
    # MIMEEval::check_base64_length: the longest raw line (newline included) of a base64 part
    length = ctx.view.mime_scan["base64_length"]
    if len(args) > 1 and length > float(args[1]):
        return 0
    return 1 if length >= float(args[0]) else 0


def _base64_length_check(args):
    if not args:
        return "needs a minimum length"
    for a in args[:2]:
        float(a)
    return None


def _mime_html_only(ctx, args):
    return 1 if ctx.view.mime_stats["html_only"] else 0


_PARSE_FLAGS = frozenset({"missing_head_body_separator", "truncated_header", "missing_mime_head_body_separator",
                          "mime_epilogue_exists", "missing_mime_headers", "mimepart_limit_exceeded"})


def _msg_parse_flags(ctx, args):
    # MIMEEval::check_msg_parse_flags over Message.pm's flags
    return 1 if args[0] in ctx.view.parse_flags else 0


def _parse_flags_check(args):
    return None if args and args[0] in _PARSE_FLAGS else f"parse flag '{args[0] if args else ''}' not implemented"


# --- HTML tests -------------------------------------------------------------------


def _html_values(r) -> dict[str, float]:
    total = max(r.total_tags, 1)
    return {
        "length": float(getattr(r, "raw_length", 0)),
        "bad_tag_ratio": r.bad_tags / total,
        "non_element_ratio": r.bad_tags / total,
        "closed_extra_ratio": r.closed_extra / total,
        "max_size": float(r.max_font_size),
        "tags": float(r.total_tags),
    }


_HTML_RANGE_KEYS = {"length", "bad_tag_ratio", "non_element_ratio", "closed_extra_ratio", "max_size", "tags"}


def _html_range_values(r, key: str) -> list[float]:
    if key == "obfuscation_ratio":
        # HTML.pm: obfuscations / tags (start and end tags), per HTML part, only
        # defined when the part has an obfuscation at all
        return [st["obfuscation"] / st["tags"] for st in r.part_stats if st["obfuscation"] and st["tags"]]
    return [_html_values(r)[key]]


def _html_range(ctx, args):
    # HTMLEval::html_range: min < value <= max, "inf" (or no max) an open top
    r = ctx.view.html
    if r is None:
        return 0
    lo = float(args[1])
    hi = args[2] if len(args) > 2 else "inf"
    for value in _html_range_values(r, args[0]):
        if hi == "inf":
            if value > lo:
                return 1
        elif lo < value <= float(hi):
            return 1
    return 0


def _html_range_check(args):
    if args[0] not in _HTML_RANGE_KEYS and args[0] != "obfuscation_ratio":
        return f"html_range('{args[0]}') not implemented"
    float(args[1])
    if len(args) > 2 and args[2] != "inf":
        float(args[2])
    return None


_HTML_TESTS = {
    "html": lambda r: True,
    "embeds": lambda r: r.embeds,
    "form_action_mailto": lambda r: r.form_action_mailto,
    # HTML.pm html_font_invisible and html_tests, per part
    "font_low_contrast": lambda r: any(st["font_low_contrast"] for st in r.part_stats),
    "font_invalid_color": lambda r: any(st["font_invalid_color"] for st in r.part_stats),
    "font_face_bad": lambda r: any(st["font_face_bad"] for st in r.part_stats),
}


def _html_title_subject_ratio(ctx, args):
    # HTMLEval::html_title_subject_ratio: a title longer than ratio x the Subject (its newline counted)
    subject = _get(ctx, "Subject")
    r = ctx.view.html
    if not subject or r is None:
        return 0
    limit = float(args[0])
    for st in r.part_stats:
        longest = max((len(t.encode("utf-8", "surrogateescape")) for t in st["titles"] if t), default=0)
        if longest / len(subject) > limit:
            return 1
    return 0


def _iframe_src(ctx, args):
    # HTMLEval::check_iframe_src: an <iframe> with a non-empty src
    r = ctx.view.html
    return 1 if r is not None and any(st["iframe_src"] for st in r.part_stats) else 0


def _html_test(ctx, args):
    r = ctx.view.html
    return 1 if r is not None and _HTML_TESTS[args[0]](r) else 0


def _html_test_check(args):
    return None if args and args[0] in _HTML_TESTS else f"html_test('{args[0] if args else ''}') not implemented"


def _html_tag_exists(ctx, args):
    r = ctx.view.html
    return 1 if r is not None and r.tags.get(args[0].lower()) else 0


def _html_text_sources(r, what: str) -> list[str]:
    return {"comment": r.comments, "title": ["".join(r.title)], "anchor": r.anchor_text}[what]


def _html_text_match(ctx, args):
    r = ctx.view.html
    if r is None:
        return 0
    key = ("html_text_match", args)
    rx = ctx.cache.get(key)
    if rx is None:
        rx = ctx.cache[key] = compile_perl(args[1])
    return 1 if any(rx.search(t.encode("utf-8", "replace")) for t in _html_text_sources(r, args[0]) if t) else 0


def _html_text_match_check(args):
    if args[0] not in ("comment", "title", "anchor"):
        return f"html_text_match('{args[0]}') not implemented"
    compile_perl(args[1])
    return None


def _html_image_ratio(ctx, args):
    """Ratio of rendered text length to image area (SpamAssassin's definition)."""
    r = ctx.view.html
    if r is None or not r.image_area:
        return 0
    text_len = len(re.sub(r"\s+", "", "".join(r.text)))
    ratio = text_len / r.image_area
    return 1 if float(args[0]) < ratio <= float(args[1]) else 0


def _range2_check(args):
    float(args[0]), float(args[1])
    return None


# --- dates, capitals, more HTML -----------------------------------------------------

_RCVD_TIME = re.compile(r"(\s.?\d+ \S\S\S \d+ \d+:\d+:\d+ \S+)")
_RCVD_LOCAL = re.compile(r"\bfrom (?:localhost\s|(?:\S+ ){1,2}\S*\b127\.0\.0\.1\b)|qmail \d+ invoked by uid \d+")
_RCVD_FETCHMAIL = re.compile(r"\bby localhost with \w+ \(fetchmail-[\d.]+")


def _date_header_time(ctx) -> Optional[int]:
    """HeaderEval::_get_date_header_time: Resent-Date, else Date, the first that parses."""
    for header in ("Resent-Date", "Date"):
        for value in ctx.view.header_values(header, raw=True):
            if value.strip():
                when = parse_rfc822_date(value.strip())
                if when is not None:
                    return when
    return None


def _received_header_times(ctx) -> list[int]:
    """HeaderEval::_get_received_header_times: the date of each Received
    header, newest first, leaving out the local delivery and fetchmail hops
    on top (their time is when the mail was fetched, not sent)."""
    received = [re.sub(r"\n[ \t]+", " ", v.strip("\r\n")).replace("\r", "")
                for v in ctx.view.header_values("Received", raw=True)]
    received = [r for r in received if r.strip()]
    if received and _RCVD_LOCAL.search(received[0]):
        local = received[:1]
        received = received[1:]
        if received and _RCVD_FETCHMAIL.search(received[0]):
            received = received[1:]
        else:
            received = local + received
    times = []
    for r in received:
        m = _RCVD_TIME.search(r)
        if m:
            when = parse_rfc822_date(m.group(1))
            if when is not None:
                times.append(when)
    return times


def _date_diff(ctx) -> Optional[float]:
    """HeaderEval::_check_date_diff: Date: minus the closest Received time,
    in seconds; 0 when either is missing (SpamAssassin's default)."""
    if "date_diff" in ctx.cache:
        return ctx.cache["date_diff"]
    diff = 0
    when = _date_header_time(ctx)
    times = _received_header_times(ctx) if when is not None else []
    if times:
        diffs = [when - t for t in times]
        if len(diffs) > 1 and diffs[-1] == 0:
            diffs.pop()
        diff = sorted(diffs, key=abs)[0]
    ctx.cache["date_diff"] = diff
    return diff


def _shifted_date(ctx, args):
    diff = _date_diff(ctx)
    if diff is None:
        return 0
    lo, hi = args
    return 1 if ((lo == "undef" or diff >= 3600 * float(lo)) and (hi == "undef" or diff < 3600 * float(hi))) else 0


def _shifted_date_check(args):
    for a in args[:2]:
        if a != "undef":
            float(a)
    return None if len(args) == 2 else "needs two bounds"


_CAPS_FP_CHARSETS = re.compile(r"=\?(?:iso-2022-jp|euc-jp|shift-jis|big5|gb2312|euc-kr|ks_c_5601|koi8-r|"
                               r"windows-125[01]|utf-8)\?", re.I)


def _subject_all_caps(ctx, args):
    vals = ctx.view.header_values("Subject")
    if not vals:
        return 0
    subject = re.sub(r"^(?:(?:Re|Fwd|Fw|Aw|Antwort|WG|SV|VB|VS|VL):\s*)+", "", vals[0].strip(), flags=re.I)
    if not re.search(r"\s", subject) or len(subject) < 10:
        return 0
    if any(_CAPS_FP_CHARSETS.search(v) for v in ctx.view.header_values("Subject", raw=True)):
        return 0
    letters = re.sub(r"[^a-zA-Z]", "", subject)
    return 1 if letters and letters == letters.upper() else 0


_LOWER_DIGITS = b"abcdefghijklmnopqrstuvwxyz0123456789"
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _uppercase(ctx, args):
    """Share of upper-case letters in the body, in percent (SpamAssassin's counting)."""
    if "uppercase" not in ctx.cache:
        length = lower = upper = 0
        for para in ctx.view.paragraphs[1:]:  # the Subject is not body text here
            if not re.search(rb"\S\s+\S", para) or re.match(rb"(?:[A-Za-z0-9+/=]{60,76} ){2}", para):
                continue
            length += len(para)
            lower += len(para) - len(para.translate(None, _LOWER_DIGITS))  # tr/a-z0-9//
            upper += len(para) - len(para.translate(None, _UPPER))  # tr/A-Z//
        ctx.cache["uppercase"] = 0.0 if length < 200 or not (lower + upper) else 100.0 * upper / (lower + upper)
    value = ctx.cache["uppercase"]
    return 1 if float(args[0]) < value <= float(args[1]) else 0


def _html_image_only(ctx, args):
    """HTMLEval::html_image_only: an HTML part with an image whose HTML
    source (HTML.pm's {length}, not the rendered text) is min < length <= max."""
    r = ctx.view.html
    if r is None:
        return 0
    lo, hi = float(args[0]), float(args[1])
    return 1 if any(st.get("img") and lo < st.get("length", 0) <= hi for st in r.part_stats) else 0


_EXPR = re.compile(r"^\s*(==|!=|<=|>=|<|>)\s*(-?\d+)\s*$")


def _compare(value: float, expr: str) -> bool:
    m = _EXPR.match(expr)
    op, n = m.group(1), float(m.group(2))
    return {"==": value == n, "!=": value != n, "<=": value <= n, ">=": value >= n,
            "<": value < n, ">": value > n}[op]


def _html_tag_balance(ctx, args):
    """HTMLEval::html_tag_balance: in any HTML part that saw the tag, its
    open-minus-close count (never below 0) satisfies the expression."""
    r = ctx.view.html
    if r is None:
        return 0
    tag = args[0].lower()
    return 1 if any(tag in st.get("balance", {}) and _compare(float(st["balance"][tag]), args[1])
                    for st in r.part_stats) else 0


def _expr_check(args):
    return None if len(args) == 2 and _EXPR.match(args[1]) else "needs a tag and a comparison such as '!= 0'"


def _html_eval(ctx, args):
    r = ctx.view.html
    if r is None:
        return 0
    return 1 if _compare(_html_values(r)[args[0]], args[1]) else 0


def _html_eval_check(args):
    if len(args) != 2 or args[0] not in _HTML_RANGE_KEYS or not _EXPR.match(args[1]):
        return f"html_eval{args!r} not implemented"
    return None


def _mime_html(ctx, args):
    ctypes = ctx.view.header_values("Content-Type")
    if ctypes and ctypes[0].strip().lower().startswith("text/html"):
        return 1
    return 1 if ctx.view.html is not None else 0


# --- the Received chain (RelayEval) --------------------------------------------------
# ``ctx.view.chain`` is Received.pm's reading of the chain (rules.sa.received):
# live, our own SMTP session is its newest hop.


def _all_trusted(ctx, args):
    c = ctx.view.chain
    return 1 if c.trusted and not c.untrusted and not c.unparseable else 0


def _no_relays(ctx, args):
    c = ctx.view.chain
    return 1 if not c.trusted and not c.untrusted and not c.unparseable else 0


def _relays_unparseable(ctx, args):
    return 1 if ctx.view.chain.unparseable else 0


def _helo_ip_mismatch(ctx, args):
    # RelayEval::helo_ip_mismatch: an untrusted hop whose (public) IPv4 HELO is
    # not in the client's /24
    from rules.sa.received import is_ipv4, is_private

    for r in ctx.view.chain.untrusted:
        if not is_ipv4(r.helo) or is_private(r.helo):
            continue
        if is_ipv4(r.ip) and not is_private(r.ip) and r.helo != r.ip:
            prefix = r.helo.rsplit(".", 1)[0] + "."
            if not r.ip.startswith(prefix):
                return 1
    return 0


_DOTCOM_HELO = re.compile(r"(?:\.|^)(?:lycos\.com|lycos\.co\.uk|hotmail\.com|localhost\.com|excite\.com|"
                          r"caramail\.com|cs\.com|aol\.com|msn\.com|yahoo\.com|drizzle\.com)$", re.I)


def _no_rdns_dotcom_helo(ctx, args):
    # RelayEval::_check_received_helos: as in SpamAssassin, each public untrusted
    # hop resets the verdict, so the oldest one decides
    found = 0
    for r in ctx.view.chain.untrusted:
        if r.ip_private:
            continue
        found = 1 if _DOTCOM_HELO.search(r.helo) and r.no_reverse_dns else 0
    return found


_NUMERIC_HELO = re.compile(r"\bhelo=((?:1\d\d|2[0-4]\d|25[0-5]|[1-9]\d|\d)(?:\.(?:1\d\d|2[0-4]\d|25[0-5]|[1-9]\d|\d))"
                           r"{3})\b(?=[\000-\040,;\[()<>]|\Z)", re.I)


def _numeric_helo(ctx, args):
    # RelayEval::check_for_numeric_helo (bug 5878: a public address as HELO)
    from rules.sa.received import is_private

    text = " ".join(r.as_string() for r in ctx.view.chain.untrusted)
    m = _NUMERIC_HELO.search(text)
    return 1 if m and not is_private(m.group(1)) else 0


def _sender_no_reverse(ctx, args):
    # RelayEval::check_for_sender_no_reverse: the oldest untrusted hop has a dotted rDNS
    untrusted = ctx.view.chain.untrusted
    if not untrusted:
        return 0
    r = untrusted[-1]
    return 1 if "." in r.rdns and not r.ip_private else 0


def _from_domain_in_received(ctx, args):
    # RelayEval::check_for_from_domain_in_received_headers(domain, 'true'|'false')
    domain, desired = args[0], args[1]
    if not re.search(rb"\b" + re.escape(domain.encode()), _get_addr(ctx, "From"), re.I):
        return 0
    c = ctx.view.chain
    rcvd = " ".join(r.as_string() for r in c.trusted) + "\n" + " ".join(r.as_string() for r in c.untrusted)
    d = domain  # SpamAssassin interpolates the domain unescaped into the pattern
    found = re.search(rf" rdns=\S*\b{d} [^\]]*by=\S*\b{d} ", rcvd) is not None
    return 1 if found == (desired == "true") else 0


def _from_domain_check(args):
    if len(args) != 2:
        return "needs a domain and 'true' or 'false'"
    re.compile(args[0])
    return None


def _hostname_to_domain(hostname: str) -> str:
    # RelayEval::hostname_to_domain
    if not re.search(r"[a-zA-Z]", hostname):
        return hostname  # an IP address
    parts = hostname.split(".")
    if len(parts) > 1 and re.search(r"(?:\S{3,}|ie|fr|de)", parts[-1]):
        return ".".join(parts[-2:])
    if len(parts) > 2:
        return ".".join(parts[-3:])
    return hostname


_DOMAIN_LIKE = re.compile(r"^\w+(?:[\w.-]+\.)+\w+$")
_V4_ONLY = re.compile(r"^(\d+\.\d+)\.\d+\.\d+$")


def _forged_received(ctx) -> tuple[int, int]:
    """RelayEval::_check_for_forged_received: (mismatch_from, mismatch_ip_helo)
    over the untrusted hops, newest first: a hop's "by" domain that is not the
    newer hop's rDNS domain, and an IP-address HELO in another /16 than the client."""
    state = ctx.cache.get("forged_received")
    if state is not None:
        return state
    from rules.sa.received import is_private

    relays = ctx.view.chain.untrusted
    by = [_hostname_to_domain(r.by.lower()) for r in relays]
    frm: list = [_hostname_to_domain(r.rdns.lower()) for r in relays]
    helo = [_hostname_to_domain(r.helo.lower()) for r in relays]
    mismatch_from = mismatch_ip_helo = 0
    for i, r in enumerate(relays):
        if not _DOMAIN_LIKE.match(by[i]):
            continue
        if frm[i] is not None and re.match(r"^localhost(?:\.localdomain)?$", frm[i]) and r.ip == "127.0.0.1":
            frm[i] = None
        hlo, fip = helo[i], r.ip
        if _V4_ONLY.match(hlo) and re.match(r"^\d+\.\d+\.\d+\.\d+$", fip) and fip != hlo:
            hclassb, fclassb = _V4_ONLY.match(hlo).group(1), _V4_ONLY.match(fip).group(1)
            if hclassb != fclassb and not is_private(hlo):
                mismatch_ip_helo += 1
        prev = frm[i - 1] if i > 0 else None
        if prev is not None and _DOMAIN_LIKE.match(prev) and by[i] != prev and not (by[i] == "msn.com"
                                                                                     and prev == "hotmail.com"):
            mismatch_from += 1
    state = ctx.cache["forged_received"] = (mismatch_from, mismatch_ip_helo)
    return state


def _forged_received_trail(ctx, args):
    # RelayEval::check_for_forged_received_trail: more than one hop whose "by"
    # is not the domain the next newer hop came from
    return 1 if _forged_received(ctx)[0] > 1 else 0


def _forged_received_ip_helo(ctx, args):
    # RelayEval::check_for_forged_received_ip_helo
    return 1 if _forged_received(ctx)[1] > 0 else 0


# --- HeaderEval: more header tests ------------------------------------------------
# ``_get`` is SpamAssassin's scalar ``$pms->get``: the values (decoded, one
# per line) joined, '' when absent; ``_get_addr`` is ``get('Name:addr')``,
# the first address.  Both work on bytes, as SpamAssassin's Perl regexes do.

_IPV4 = rb"(?:1\d\d|2[0-4]\d|25[0-5]|[1-9]\d|\d)"
# SpamAssassin's IP_ADDRESS: an IPv4 address or an IPv6 one (this IPv6 part is
# looser than SA's, which spells out every compressed form)
IP_ADDRESS = (rb"(?i:\b(?<!:)" + _IPV4 + rb"\." + _IPV4 + rb"\." + _IPV4 + rb"\." + _IPV4 + rb"\b"
              rb"|(?:IPv6:|(?<![a-f0-9:]))(?:[a-f0-9]{0,4}:){2,7}[a-f0-9]{0,4}(?![a-f0-9:]))")
_IP_RE = re.compile(IP_ADDRESS)


def _get(ctx, name: str) -> bytes:
    key = ("get", name)
    value = ctx.cache.get(key)
    if value is None:
        value = ctx.cache[key] = ctx.view.header(name) or b""
    return value


def _get_addr(ctx, name: str) -> bytes:
    key = ("get:addr", name)
    value = ctx.cache.get(key)
    if value is None:
        addrs = ctx.view.header_addresses(name)
        value = ctx.cache[key] = addrs[0] if addrs else b""
    return value


def _received_spaced(ctx) -> bytes:
    """All Received headers with whitespace runs as one space (``s/\\s+/ /gs``)."""
    value = ctx.cache.get("rcvd_spaced")
    if value is None:
        value = ctx.cache["rcvd_spaced"] = re.sub(rb"\s+", b" ", _get(ctx, "Received"))
    return value


def _gated_through_received_hdr_remover(ctx, args):
    # HeaderEval::gated_through_received_hdr_remover
    txt = _get(ctx, "Mailing-List")
    if re.search(rb"^contact \S+\@\S+\; run by ezmlm$", txt, re.M):
        if (re.search(rb"^mailing list \S+\@\S+", _get(ctx, "Delivered-To"), re.M)
                and re.search(rb"qmail \d+ invoked (?:from network|by .{3,20})\); \d+ ... \d+",
                              _get(ctx, "Received"))):
            return 1
    rcvd = _get(ctx, "Received")
    if not rcvd:
        return 1  # no Received headers: the forgery tests cannot run
    return 1 if re.search(rb"from groups\.msn\.com \(\S+\.msn\.com ", rcvd) else 0


def _fake_aol_relay(ctx, args):
    # HeaderEval::check_for_fake_aol_relay_in_rcvd
    # a white-space run before "rly-" is the space of the squeezed text
    if not _AOL_RELAY.search(_get(ctx, "Received")):
        return 0
    rcvd = _received_spaced(ctx)
    if _AOL_RELAY.search(rcvd):
        if re.search(rb"/AOL-\d+\.\d+\.\d+\)", rcvd) or re.search(rb"ESMTP id (?:RELAY|MAILRELAY|MAILIN)", rcvd):
            return 0
        return 1
    return 0


_AOL_RELAY = re.compile(rb"\s(?i:rly-[a-z][a-z]\d\d\.)")


def _msn_groups_headers(ctx) -> bool:
    # HeaderEval::check_for_msn_groups_headers
    m = re.search(rb"<(\S+)\@groups\.msn\.com>", _get(ctx, "To"), re.I)
    if not m:
        return False
    listname = m.group(1)
    m2 = re.search(rb"from mail pickup service by ((?:p\d\d\.)groups\.msn\.com)\b", _get(ctx, "Received"))
    if not m2:
        return False
    msgid = _get(ctx, "Message-Id")
    if re.fullmatch(rb"notifications", listname):
        return bool(re.match(rb"<\S+\@" + re.escape(m2.group(1)) + rb">", msgid))
    if not re.match(rb"<" + re.escape(listname) + rb"-\S+\@groups\.msn\.com>", msgid):
        return False
    return bool(re.search(re.escape(listname) + rb"-bounce\@groups\.msn\.com", _get_addr(ctx, "EnvelopeFrom")))


def _hotmail_state(ctx) -> tuple[int, int]:
    """(forged hotmail Received, hotmail From without hotmail Received)."""
    # HeaderEval::_check_for_forged_hotmail_received_headers
    state = ctx.cache.get("hotmail")
    if state is not None:
        return state
    state = (0, 0)
    if b"hotmail.com" not in _get(ctx, "Received") and not re.search(rb"\bhotmail\.com$", _get_addr(ctx, "From"),
                                                                     re.I):
        ctx.cache["hotmail"] = state  # neither a hotmail hop nor a hotmail sender: nothing to find
        return state
    rcvd = _received_spaced(ctx)
    ip_ok = bool(_IP_RE.search(_get(ctx, "X-Originating-Ip")))
    orig_ok = bool(re.search(rb"hotmail\.com|msonline\-outlook", _get(ctx, "X-OriginatorOrg")))
    legit = (
        re.search(rb"from mail pickup service by hotmail\.com with Microsoft SMTPSVC;", rcvd)
        or _msn_groups_headers(ctx)
        or _gated_through_received_hdr_remover(ctx, ())
        or (ip_ok and re.search(rb"from (?:\S*\.)?hotmail.com \(\S+\.hotmail(?:\.msn)?\.com[ \)]", rcvd))
        or (orig_ok and re.search(rb"from \S*\.outbound\.protection\.outlook\.com "
                                  rb"\(\S+\.outbound\.protection\.outlook\.com[ \)]", rcvd))
        or (orig_ok and re.search(rb"from \S*\.(?:eur|nam)prd\d+\.prod\.outlook\.com \(" + IP_ADDRESS + rb"\)",
                                  rcvd, re.I))
        or (ip_ok and re.search(rb"from \S*\.hotmail.com \(\[" + IP_ADDRESS + rb"\][ \):]", rcvd))
        or (ip_ok and re.search(rb"from \S+ by \S+\.hotmail(?:\.msn)?\.com with HTTP\;", rcvd))
        or (ip_ok and re.search(rb"from \[66\.218.\S+\] by \S+\.yahoo\.com", rcvd))
    )
    if not legit:
        if re.search(rb"(?:from |HELO |helo=)\S*hotmail\.com\b", rcvd):
            state = (1, 0)
        elif re.search(rb"\bhotmail\.com$", _get_addr(ctx, "From"), re.I):
            state = (0, 1)
    ctx.cache["hotmail"] = state
    return state


def _forged_hotmail(ctx, args):
    # HeaderEval::check_for_forged_hotmail_received_headers
    return _hotmail_state(ctx)[0]


def _no_hotmail_received(ctx, args):
    # HeaderEval::check_for_no_hotmail_received_headers
    return _hotmail_state(ctx)[1]


def _forged_eudoramail(ctx, args):
    # HeaderEval::check_for_forged_eudoramail_received_headers
    if not re.search(rb"\beudoramail\.com$", _get_addr(ctx, "From"), re.I):
        return 0
    if _gated_through_received_hdr_remover(ctx, ()):
        return 0
    ip_ok = _IP_RE.search(_get(ctx, "X-Sender-Ip"))
    return 0 if ip_ok and re.search(rb"by \S*whowhere.com\;", _received_spaced(ctx)) else 1


def _forged_yahoo(ctx, args):
    # HeaderEval::check_for_forged_yahoo_received_headers
    sender = _get_addr(ctx, "From")
    if not re.search(rb"\byahoo\.com$", sender, re.I):
        return 0
    rcvd = _get(ctx, "Received")
    if _get(ctx, "Resent-From") and _get(ctx, "Resent-To") and _get(ctx, "X-Received"):
        rcvd = _get(ctx, "X-Received")
    rcvd = re.sub(rb"\s+", b" ", rcvd)
    if _gated_through_received_hdr_remover(ctx, ()):
        return 0
    trusted = ctx.view.relays.get("x-spam-relays-trusted") or b""
    untrusted = ctx.view.relays.get("x-spam-relays-untrusted") or b""
    if re.search(rb" rdns=\S+\.yahoo\.com ", trusted) or re.search(rb"^[^\]]+ rdns=\S+\.yahoo\.com ", untrusted):
        return 0
    for legit in (rb"by web\S+\.mail\S*\.yahoo\.com via HTTP", rb"by sonic\S+\.consmr\.mail\S*\.yahoo\.com with HTTP",
                  rb"by smtp\S+\.yahoo\.com with SMTP",
                  rb"from \[" + IP_ADDRESS + rb"\] by \S+\.(?:groups|scd|dcn)\.yahoo\.com with NNFMP",
                  rb"by \w+\.\w+\.yahoo\.com \(\d+\.\d+\.\d+/\d+\.\d+\.\d+\)(?: with ESMTP)? id \w+"):
        if re.search(legit, rcvd):
            return 0
    if re.search(rb"\bmailer\d+\.bulk\.scd\.yahoo\.com\b", rcvd) and re.search(rb"\@reply\.yahoo\.com$", sender, re.I):
        return 0
    return 1


def _forged_juno(ctx, args):
    # HeaderEval::check_for_forged_juno_received_headers
    if not re.search(rb"\bjuno\.com$", _get_addr(ctx, "From"), re.I):
        return 0
    if _gated_through_received_hdr_remover(ctx, ()):
        return 0
    xorig, xmailer, rcvd = _get(ctx, "X-Originating-IP"), _get(ctx, "X-Mailer"), _get(ctx, "Received")
    if xorig:
        if (not re.search(rb"from.*\b(?:juno|untd)\.com.*[\[\(]" + IP_ADDRESS + rb"[\]\)].*by", rcvd)
                and not re.search(rb" cookie\.(?:juno|untd)\.com ", rcvd)):
            return 1
        return 1 if b"Juno " not in xmailer else 0
    if re.search(rb"from.*\bmail\.com.*\[" + IP_ADDRESS + rb"\].*by", rcvd):
        if not re.search(rb"\bmail\.com", xmailer):
            return 1
    elif re.search(rb"from (webmail\S+\.untd\.com) \(\1 \[" + IP_ADDRESS + rb"\]\) by", rcvd):
        if not re.search(rb"^Webmail Version \d", xmailer):
            return 1
    else:
        return 1
    return 0 if _IP_RE.search(xorig) else 1


def _forged_gmail(ctx, args):
    # HeaderEval::check_for_forged_gmail_received_headers
    if not re.search(rb"\bgmail\.com$", _get_addr(ctx, "From"), re.I):
        return 0
    xreceived = _get(ctx, "X-Received")
    if re.search(rb"by 10\.\S+ with SMTP id \S+", xreceived) or re.search(rb"by 2002\:a\d\d\:\w+\:\S+ with SMTP id \S+",
                                                                      xreceived):
        return 0
    if re.search(rb"by smtp\.googlemail\.com with ESMTPSA id \S+", _get(ctx, "Received")):
        return 0
    # GOOGLE_MESSAGE_STATE_LENGTH_MIN, GOOGLE_SMTP_SOURCE_LENGTH_MIN (the joined values, newline included)
    if len(_get(ctx, "X-Gm-Message-State")) >= 60 and len(_get(ctx, "X-Google-Smtp-Source")) >= 60:
        return 0
    return 1


def _env_and_hdr_from_match(ctx, args):
    # HeaderEval::check_for_matching_env_and_hdr_from
    return 1 if _get_addr(ctx, "EnvelopeFrom").lower() == _get_addr(ctx, "From").lower() else 0


def _recipients_state(ctx) -> tuple[bool, float]:
    # HeaderEval::_check_recipients (TOCC_SORTED_COUNT 7, TOCC_SIMILAR_COUNT 5, TOCC_SIMILAR_LENGTH 2)
    state = ctx.cache.get("tocc")
    if state is not None:
        return state
    values = [v for n in ("To", "Cc", "Bcc") for v in ctx.view.header_values(n, raw=True)]
    if sum(v.count(",") + v.count(";") for v in values) + len(values) < 5:
        # fewer than 5 addresses (each needs a separator): neither test can hit
        state = ctx.cache["tocc"] = (False, 0.0)
        return state
    inputs: list[bytes] = []
    for name in ("ToCc", "Bcc"):
        inputs += [a for a in ctx.view.header_addresses(name) if a]
        if len(inputs) >= 5:
            break
    address: list[bytes] = []
    previous = b""
    for current in inputs:
        if current.lower() != previous.lower():
            address.append(current)
            previous = current
        if len(address) == 256:
            break
    is_sorted = len(address) >= 7 and address == sorted(address)
    similar = 0.0
    if len(address) >= 5:
        user = [a[:2] for a in address]
        fqhn = [a.split(b"@", 1)[1] if b"@" in a else None for a in address]
        host = [f[:2] if f is not None else None for f in fqhn]
        hits = combinations = 0
        for i in range(len(address)):
            for j in range(i + 1, len(address)):
                hits += user[i] == user[j]
                hits += host[i] == host[j] and fqhn[i] != fqhn[j]
                combinations += 1
        similar = hits / combinations
    state = ctx.cache["tocc"] = (is_sorted, similar)
    return state


def _sorted_recipients(ctx, args):
    # HeaderEval::sorted_recipients
    return 1 if _recipients_state(ctx)[0] else 0


def _similar_recipients(ctx, args):
    # HeaderEval::similar_recipients
    value = _recipients_state(ctx)[1]
    lo, hi = args
    return 1 if (lo == "undef" or value >= float(lo)) and (hi == "undef" or value < float(hi)) else 0


def _undef_range_check(args):
    if len(args) != 2:
        return "needs a minimum and a maximum ('undef' for none)"
    for a in args:
        if a != "undef":
            float(a)
    return None


def _to_in_subject(ctx, args):
    # HeaderEval::check_for_to_in_subject
    full_to = _get_addr(ctx, "To")
    if not full_to:
        return 0
    subject = _get(ctx, "Subject")
    if args[0] == "address":
        if full_to.lower() not in subject.lower():
            return 0
        return 1 if re.search(rb"\b" + re.escape(full_to) + rb"\b", subject, re.I) else 0
    if args[0] == "user":
        if full_to.split(b"@", 1)[0].lower() not in subject.lower():
            return 0
        to = re.escape(full_to.split(b"@", 1)[0])
        rx = (rb"^(?:(?:re|fw):\s*(?:\w+\s+)?" + to + rb"$|(?-i:" + to + rb")\s*[,:;!?-](?:$|\s)|" + to
              + rb"$|,\s*" + to + rb"[,:;!?-]$)")
        return 1 if re.search(rx, subject, re.I) else 0
    return 0


def _to_in_subject_check(args):
    return None if args and args[0] in ("address", "user") else "needs 'address' or 'user'"


_TZ = {
    "UT": "+0000", "UTC": "+0000", "NDT": "-0230", "AST": "-0400", "ADT": "-0300", "NST": "-0330", "EST": "-0500",
    "EDT": "-0400", "CST": "-0600", "CDT": "-0500", "MST": "-0700", "MDT": "-0600", "PST": "-0800", "PDT": "-0700",
    "HST": "-1000", "AKST": "-0900", "AKDT": "-0800", "HADT": "-0900", "HAST": "-1000", "GMT": "+0000",
    "BST": "+0100", "IST": "+0100", "WET": "+0000", "WEST": "+0100", "CET": "+0100", "CEST": "+0200",
    "EET": "+0200", "EEST": "+0300", "MSK": "+0300", "MSD": "+0400", "MET": "+0100", "MEZ": "+0100",
    "MEST": "+0200", "MESZ": "+0200", "BRST": "-0200", "BRT": "-0300", "AEST": "+1000", "AEDT": "+1100",
    "ACST": "+0930", "ACDT": "+1030", "AWST": "+0800", "NZST": "+1200", "NZDT": "+1300", "JST": "+0900",
    "KST": "+0900", "HKT": "+0800", "SGT": "+0800", "PHT": "+0800", "IDT": "+0300",
}
_MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
_MON = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"


def parse_rfc822_date(text: str) -> Optional[int]:
    """Util::parse_rfc822_date: the first date found anywhere in the text, in
    seconds since the epoch; None when there is none."""
    import calendar

    s = re.sub(r"\s+", " ", re.sub(r", *", " ", f" {text} "))
    m = re.search(rf" (\d+) {_MON} (\d{{4}}) ", s, re.I)
    if m:
        dd, mon, yyyy = m.group(1), m.group(2), m.group(3)
    else:
        m = re.search(rf" {_MON} +(\d+) \d+:\d+:\d+ (\d{{4}}) ", s, re.I)
        if m:
            mon, dd, yyyy = m.group(1), m.group(2), m.group(3)
        else:
            m = re.search(rf" (\d+) {_MON} (\d{{2,3}}) ", s, re.I)
            if not m:
                return None
            dd, mon, yyyy = m.group(1), m.group(2), m.group(3)
    s = s[:m.start()] + " " + s[m.end():]
    year = int(yyyy)
    if len(yyyy) == 2 and year < 50:
        year += 2000
    elif len(yyyy) != 4:
        year += 1900
    hh = mm = ss = 0
    m = re.search(r" (\d?\d):(\d\d)(:(\d\d))? ", s)
    if m:
        hh, mm, ss = int(m.group(1)), int(m.group(2)), int(m.group(4) or 0)
        s = s[:m.start()] + " " + s[m.end():]
    tzoff = "-0000"
    m = re.search(r" ([-+]\d{4}) ", s)
    if m:
        tzoff = m.group(1)
    else:
        m = re.search(r"\b([A-Z]{2,4}(?:-DST)?)\b", s)
        if m and m.group(1) in _TZ:
            tzoff = _TZ[m.group(1)]
    month, day = _MONTHS.index(mon.lower()) + 1, int(dd)
    ss, mm, hh = min(ss, 59), min(mm, 59), min(hh, 23)
    max_dd = 30 if month in (4, 6, 9, 11) else (29 if calendar.isleap(year) else 28) if month == 2 else 31
    if day > max_dd:
        day, month = 1, month + 1
        if month > 12:
            month, year = 1, year + 1
    year = min(max(year, 1970), 2037)
    try:
        when = calendar.timegm((year, month, day, hh, mm, ss, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    m = re.search(r"([-+])(\d\d)(\d\d)$", tzoff)
    if m:
        off = (int(m.group(2)) * 60 + int(m.group(3))) * 60
        if m.group(1) == "-":
            when += off
        elif when < off:
            when = 0
        else:
            when -= off
    return when


def _sa_message_id(ctx) -> bytes:
    """SpamAssassin's MESSAGEID pseudo-header, in its order."""
    value = ctx.cache.get("MESSAGEID")
    if value is None:
        v = ctx.view
        value = ctx.cache["MESSAGEID"] = b"".join(
            v.header(n) or b"" for n in ("X-Message-Id", "Resent-Message-Id", "X-Original-Message-ID", "Message-Id")
            if v.header_count(n))
    return value


def _outlook_message_id(ctx, args):
    # HeaderEval::check_outlook_message_id
    m = re.match(rb"<[0-9a-f]{4}([0-9a-f]{8})\$[0-9a-f]{8}\$[0-9a-f]{8}\@", _sa_message_id(ctx))
    if not m:
        return 0
    timetoken = int(m.group(1), 16)
    x, y, fudge = 0.0023283064365387, 27111902.8329849, 250
    expected = int((parse_rfc822_date(_get(ctx, "Date").decode("latin-1")) or 0) * x + y)
    if abs(timetoken - expected) < fudge:
        return 0
    # SpamAssassin matches a date pattern here but then parses the whole of the
    # Received headers, which finds the first (newest) hop's date
    expected = int((parse_rfc822_date(_get(ctx, "Received").decode("latin-1")) or 0) * x + y)
    return 1 if abs(timetoken - expected) >= fudge else 0


_TEMPLATE_MARK = re.compile(rb"%[A-Z][A-Z_-]")
_TEMPLATE_OK = re.compile(rb"^(?:X-VMS-To|X-UIDL|X-Face|To|Cc|From|Subject|References|In-Reply-To|"
                          rb"(?:X-|Resent-|X-Original-)?Message-Id):", re.I)


def _unresolved_template(ctx, args):
    # HeaderEval::check_unresolved_template
    head = ctx.view.raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    if b"=?" not in head and not _TEMPLATE_MARK.search(head):
        return 0  # nothing in the header section, raw or (no encoded words) decoded
    for line in _get(ctx, "ALL").split(b"\n"):
        if _TEMPLATE_MARK.search(line) and not _TEMPLATE_OK.match(line):
            return 1
    return 0


def _ratware_name_id(ctx, args):
    # HeaderEval::check_ratware_name_id
    m = re.search(rb"<[A-Z]{28}\.([^>]+?)>", _sa_message_id(ctx))
    if m and re.search(rb"\"[^\"]+\"\s*<" + re.escape(m.group(1)) + rb">", _get(ctx, "From")):
        return 1
    return 0


def _valid_registered_domain(host: str) -> Optional[str]:
    """RegistryBoundaries trim_domain + is_domain_valid: the registered domain, None if its TLD is unknown."""
    from rules.sa import uris as uri_mod

    host = host.lower().strip(".")
    if uri_mod.ip_of(host):
        return host
    return uri_mod._suffix_list().get_sld(host, strict=True) or None


def _ratware_envelope_from(ctx, args):
    # HeaderEval::check_ratware_envelope_from
    to, sender = _get_addr(ctx, "To"), _get_addr(ctx, "EnvelopeFrom")
    if not sender or not to or re.match(rb"SRS\d[=+-]", sender, re.I):
        return 0
    m = re.match(rb"^([^@]+)\@(.+)$", to)
    if not m:
        return 0
    dom = _valid_registered_domain(m.group(2).decode("utf-8", "replace"))
    if not dom or "." not in dom:
        return 0
    rx = rb"\b" + re.escape(dom.encode()) + rb"." + re.escape(m.group(1)) + rb"@"
    return 1 if re.search(rx, sender, re.I) else 0


def _mailfrom_matches_rcvd(ctx, args):
    # WLBLEval::check_mailfrom_matches_rcvd: the envelope sender's registered
    # domain against the first untrusted relay's rDNS (all trusted ones if none)
    sender = _get_addr(ctx, "EnvelopeFrom").decode("utf-8", "replace")
    m = re.search(r"\@([^@]+\.[^@]+)\Z", sender)
    if not m:
        return 0
    c = ctx.view.chain
    relays = c.untrusted[:1] or c.trusted
    sender_domain = _valid_registered_domain(m.group(1)) or m.group(1).lower()
    for r in relays:
        rdns = r.rdns.lower()
        if rdns and (_valid_registered_domain(rdns) or rdns) == sender_domain:
            return 1
    return 0


# --- BodyEval ----------------------------------------------------------------------


def _mpart_alt_diff(ctx, args):
    # BodyEval::multipart_alternative_difference
    madiff = ctx.view.alternative_difference[0]
    lo, hi = float(args[0]), args[1]
    return 1 if (lo == 0 or madiff > lo) and (hi == "undef" or madiff <= float(hi)) else 0


def _mpart_alt_diff_count(ctx, args):
    # BodyEval::multipart_alternative_difference_count
    _, html_words, text_words = ctx.view.alternative_difference
    if not html_words > float(args[1]):
        return 0
    return 1 if text_words / html_words > float(args[0]) else 0


def _two_numbers_or_undef(args):
    float(args[0])
    if args[1] != "undef":
        float(args[1])
    return None


def _blank_line_ratio(ctx, args):
    # BodyEval::check_blank_line_ratio over the decoded (not rendered) text parts
    lo, hi = float(args[0]), float(args[1])
    minlines = int(float(args[2])) if len(args) > 2 else 1
    minlines = max(minlines, 1)
    key = ("blank_lines", minlines)
    ratio = ctx.cache.get(key)
    if ratio is None:
        blank = nlines = 0
        for ctype, text, _ in ctx.view._parts:
            if ctype == "text/calendar":
                continue
            for line in text.replace("\r\n", "\n").splitlines(keepends=True):
                nlines += 1
                if not line.strip():
                    blank += 1
        ratio = ctx.cache[key] = -1 if nlines < minlines else 100 * blank / nlines
    return 1 if (lo == 0 and ratio <= hi) or lo < ratio <= hi else 0


def _vertical_words(ctx, args):
    # BodyEval::tvd_vertical_words: the largest share of spaces on a body line
    lo, hi = float(args[0]), float(args[1])
    if hi >= 100:
        hi = 101
    value = ctx.cache.get("tvd_vertical_words")
    if value is None:
        value = -1
        for para in ctx.view.paragraphs:
            n = len(para)
            if n <= 5:
                continue
            spaces = para.count(b" ")
            nonspaces = n - spaces
            pct = 100 if spaces > nonspaces or nonspaces == 0 else int(100 * spaces / nonspaces)
            value = max(value, pct)
        ctx.cache["tvd_vertical_words"] = value
    return 1 if lo <= value < hi else 0



# --- WLBLEval: URI host lists ------------------------------------------------------

_URI_HOST_TABLES: dict[tuple, dict[str, bool]] = {}


def _uri_host_table(entries: list[str]) -> dict[str, bool]:
    """host -> listed (False for a "!host" exception), the last entry on a host winning;
    built once per distinct list."""
    key = tuple(entries)
    table = _URI_HOST_TABLES.get(key)
    if table is None:
        if len(_URI_HOST_TABLES) > 64:  # lists change only on a reload
            _URI_HOST_TABLES.clear()
        table = _URI_HOST_TABLES[key] = {}
        for e in key:
            table[e.lstrip("!")] = not e.startswith("!")
    return table


# scheme and authority as uris.host_of splits them
_URI_AUTHORITY = re.compile(r"\s*[a-z][a-z0-9+.-]*:/*([^/?#\\]*)", re.I)


def _uri_hosts_enlisted(ctx) -> dict[str, str]:
    """WLBLEval::_check_uri_host_listed: list name -> the first host found on it."""
    found = ctx.cache.get("uri_host_enlisted")
    if found is not None:
        return found
    found = ctx.cache["uri_host_enlisted"] = {}
    names = sorted(k.split(":", 1)[1] for k in ctx.lists if k.startswith("uri_host:"))
    if not names:
        return found
    from rules.sa import uris as uri_mod

    tables = {n: _uri_host_table(ctx.lists["uri_host:" + n]) for n in names}
    seen = set()
    authorities = set()
    for uri in ctx.view.uris:
        if uri[:7].lower() == "mailto:":
            continue
        # host_of reads only the authority: parse each distinct one once
        m = _URI_AUTHORITY.match(uri)
        if m:
            if m.group(1) in authorities:
                continue
            authorities.add(m.group(1))
        host = (uri_mod.host_of(uri) or "").lower()
        if not host or host in seen:
            continue
        seen.add(host)
        if host.startswith("[") and host.endswith("]"):
            keys = [host[1:-1]]
        elif re.fullmatch(r"\d+\.\d+\.\d+\.\d+", host):
            keys = [host]
        else:
            labels = host.split(".")
            keys = [".".join(labels[i:]) for i in range(len(labels))][-11:]  # SA keeps the last 11
        for name in names:
            table = tables[name]
            for q in keys:
                verdict = table.get(q)
                if verdict is not None:
                    if verdict and name not in found:
                        found[name] = host
                    break
    return found


def _uri_host_listed(ctx, args):
    # WLBLEval::check_uri_host_listed
    return 1 if args[0] in _uri_hosts_enlisted(ctx) else 0


# --- charsets far from the site's ok_locales (Locales.pm) ----------------------------

_CYRILLIC = "KOI8R KOI8U KOI8T ISOIR111 CP1251 GEORGIANPS CP1251 PT154 CP866"
_CHARSETS_FOR_LOCALE = {
    "ja": "EUCJP JISX020119760 JISX020819830 JISX020819900 JISX020819970 JISX021219900 JISX021320001 "
          "JISX021320002 SHIFT_JIS SHIFTJIS ISO2022JP SJIS JIS7 JISX0201 JISX0208 JISX0212",
    "ko": "EUCKR KSC56011987",
    "ru": _CYRILLIC, "ka": _CYRILLIC, "tg": _CYRILLIC, "be": _CYRILLIC, "uk": _CYRILLIC, "bg": _CYRILLIC,
    "th": "TIS620",
    "zh": "GB1988 GB2312 GB231219800 GB18030 GBK BIG5HKSCS BIG5 EUCTW ISO2022CN",
}
_UNIVERSAL_CHARSET = re.compile(r"USASCII$|ASCII$|ISO8859|ISO10646|UTF|UCS|CP125|WINDOWS|IBM852$|UNICODE11UTF[78]|"
                                r"XUNKNOWN$|ISO$")


def charset_ok_for_locales(charset: str, locales: list[str]) -> bool:
    """Locales::is_charset_ok_for_locales."""
    cs = re.sub(r"[^A-Z0-9]", "", charset.upper())
    cs = re.sub(r"^3D", "", cs)  # broken by quoted-printable
    if _UNIVERSAL_CHARSET.match(cs):
        return True
    for locale in locales:
        locale = "en" if not locale or locale == "C" else locale
        ok = _CHARSETS_FOR_LOCALE.get(re.sub(r"^([a-z][a-z]).*$", r"\1", locale, flags=re.S))
        if ok is not None and cs in ok.split(" "):
            return True
    return False


def _far_locales(ctx) -> Optional[list[str]]:
    """The ok_locales setting, None when it is "all" (the default: nothing is far away).
    SpamAssassin also adds the process's LANG; a gateway's environment says
    nothing about its users, so only the setting counts here."""
    locales = ctx.lists.get("ok_locales") or ["all"]
    return None if "all" in locales else locales


def _charset_of_ct(value: bytes) -> Optional[str]:
    # MIMEEval::get_charset_from_ct_line
    for rx in (rb'charset="([^"]+)"', rb"charset='([^']+)'", rb"charset=(\S+)"):
        m = re.search(rx, value, re.I)
        if m:
            return m.group(1).decode("latin-1")
    return None


def _faraway_charset(ctx, args):
    # MIMEEval::check_for_faraway_charset: the message's charset is far away and most of the body is 8-bit
    locales = _far_locales(ctx)
    ctype = _get(ctx, "Content-Type")
    if locales is None or not ctype:
        return 0
    charset = _charset_of_ct(ctype)
    if charset is None or charset_ok_for_locales(charset, locales):
        return 0
    body = b"\n".join(ctx.view.paragraphs)
    high = len(body) - len(body.translate(None, bytes(range(0x80, 0x100))))
    return 1 if len(body) - high <= high and high > 3 else 0  # are_more_high_bits_set


def _faraway_charset_in_headers(ctx, args):
    # HeaderEval::check_for_faraway_charset_in_headers: an encoded word of From or Subject
    locales = _far_locales(ctx)
    if locales is None:
        return 0
    for name in ("From", "Subject"):
        for value in ctx.view.header_values(name, raw=True):
            for charset in re.findall(r"=\?(.+?)\?.\?.*?\?=", value):
                if not charset_ok_for_locales(charset, locales):
                    return 1
    return 0


def _mime_faraway_charset(ctx) -> int:
    # MIMEEval::_check_mime_header's mime_faraway_charset: any part's charset
    locales = _far_locales(ctx)
    if locales is None:
        return 0
    return 1 if any(not charset_ok_for_locales(c, locales) for c in ctx.view.mime_scan["html_charsets"]) else 0


def _html_charset_faraway(ctx, args):
    # HTMLEval::html_charset_faraway: an HTML part whose <meta> charsets are mostly far away
    locales = _far_locales(ctx)
    r = ctx.view.html
    if locales is None or r is None:
        return 0
    for st in r.part_stats:
        charsets = [c for meta in st["charsets"] for c in meta.split()]
        bad = sum(1 for c in charsets if not charset_ok_for_locales(c, locales))
        if bad and bad >= len(charsets) - bad:
            return 1
    return 0

# --- check_dns_sender (DNSEval.pm) -------------------------------------------------


def _dns_sender(ctx, args):
    """NO_DNS_FOR_FROM: the envelope sender's domain does not exist (its A and
    MX lookups answered NXDOMAIN).  A network test: SpamAssassin runs it only
    with DNS.  This engine runs its evals synchronously in a worker thread,
    so it does not query: the answer is the one the gateway's sender_domain
    check already got at MAIL time through the injected resolver.  Without
    that answer (offline scoring, check disabled, lookup failed) the rule
    does not hit, as in SpamAssassin without DNS."""
    return 1 if ctx.sender_dns == "nxdomain" else 0


# --- VBounce plugin (VBounce.pm) ---------------------------------------------------


def _bounce_relays(ctx):
    patterns = ctx.lists.get("bounce_relays", ())
    return _globs(patterns) if patterns else None


def _have_any_bounce_relays(ctx, args):
    return 1 if ctx.lists.get("bounce_relays") else 0


_QUOTED_RECEIVED = re.compile(rb"^[> ]*Received:", re.I)


def _welcomelist_bounce_relays(ctx, args):
    """A bounce quoting a Received header of one of our own relays: the
    message it returns really went out through us."""
    rx = _bounce_relays(ctx)
    if rx is None:
        return 0

    def listed(host: bytes) -> bool:
        return bool(rx.match(host.decode("utf-8", "surrogateescape").lower()))

    for line in ctx.view.paragraphs:
        if _QUOTED_RECEIVED.match(line) and any(listed(h) for h in re.findall(rb"(?<= )(\S+\.\S+)(?= )", line)):
            return 1
    body = ctx.view.raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[-1]
    if not re.search(rb"Received:", body, re.I):
        return 0
    full, found = b"", False
    for line in body.split(b"\n"):
        if not found:
            if not _QUOTED_RECEIVED.match(line):
                continue
            found = True
        full = full + line if line[:1].isspace() else line
        if _QUOTED_RECEIVED.match(full) and any(listed(h) for h in re.findall(rb"(?<=\s)(\S+\.\S+)(?=\s)", full)):
            return 1
    return 0


# --- check_stock_info (BodyEval.pm) ----------------------------------------------

_STOCK_FIELD = re.compile(r"^\s*([^:\s][^:\n]{2,29})\s*:\s*\S", re.M)
# as in BodyEval: every alternative is anchored at the end, only the first at the start
_STOCK_WORD = re.compile(
    r"(^trad(?:e|ing)date|company(?:name)?|s\w?(?:t\w?o\w?c\w?k|y\w?m(?:\w?b\w?o\w?l)?)|t(?:arget|icker)"
    r"|(?:opening|current)p(?:rice)?|p(?:rojected|osition)|expectations|weeks?high|marketperformance"
    r"|(?:year|week|month|day|price)(?:target|estimates?)|sector|r(?:ecommendation|ating))$")


def _stock_info(ctx, args):
    """Stock-tip fields ("Symbol: ...", "Target: ...") in the first text/plain
    part: hits when at least ``min`` different kinds appear (0: always)."""
    minimum = int(float(args[0])) if args else 0
    if "stock_info" not in ctx.cache:
        kinds: set[str] = set()
        plain = [t for c, t, _ in ctx.view._parts if c == "text/plain"]
        if plain:
            for chunk in split_short_paragraphs(plain[0]):
                for field_name in _STOCK_FIELD.findall(chunk):
                    word = re.sub(r"[^a-z]", "", field_name.lower())
                    m = _STOCK_WORD.search(word)
                    if m:
                        kinds.add(m.group(1))
        ctx.cache["stock_info"] = len(kinds)
    return 1 if minimum == 0 or ctx.cache["stock_info"] >= minimum else 0


# --- FreeMail plugin (FreeMail.pm) and check_equal_from_domains (HeaderEval.pm) ---

# FreeMail.pm's default welcomelist: role accounts and provider-generated senders
_FM_WELCOME = re.compile(
    r"^(?:abuse|support|sales|info|helpdesk|contact|kontakt|(?:post|host|domain)master|undisclosed.*"
    r"|request-[a-f0-9]{16}|bounced?-|[a-f0-9]{8}(?:\.[a-f0-9]{8}|-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12})"
    r"|.+=.+=.+)@", re.I)
# envelope senders of bulk mail: check_freemail_replyto does not judge them
_FM_BULK_ENVFROM = re.compile(
    r"(?:^(?:post|host|domain)master|^double-bounce|^(?:sentto|owner|return|(?:gr)?bounced?)-.+"
    r"|-(?:request|bounces?|admin|owner)|\b(?:do[._-t]?)?no[._-t]?repl(?:y|ies)|.+=.+)@", re.I)
# FreeMail.pm's email_regex; any alphabetic TLD stands in for its valid_tlds
_FM_EMAIL = (r"(?=.{0,64}@)(?<![a-z0-9!#$%&'*+/=?^_`{|}~-])([a-z0-9!#$%&'*+/=?^_`{|}~-]+"
             r"(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:[a-z0-9](?:[a-z0-9-]{0,59}[a-z0-9])?\.){1,4}"
             r"(?:xn--[a-z0-9-]+|[a-z]{2,63})\b)")
_FM_EMAIL_RE = re.compile(_FM_EMAIL, re.I)
_FM_URL_AT = re.compile(r"<?https?://\S{0,255}(?:@|%40)\S{0,255}", re.I)
_FM_LABELLED = re.compile(r"<?(?<!mailto:)" + _FM_EMAIL +
                          r"(?:>|\s{1,10}(?!(?:fa(?:x|csi)|tel|phone|e?-?mail))[a-z]{2,11}:)", re.I)
_FM_MAX_BODY_EMAILS = 5  # freemail_max_body_emails
_FM_MAX_BODY_FREEMAILS = 3  # freemail_max_body_freemails
_fm_tables: dict[int, tuple] = {}


def _freemail_table(ctx) -> Optional[tuple]:
    """(domains, wildcard regex, welcomelist) from the rules' freemail_* lines;
    None when there are none (FreeMail.pm then disables itself)."""
    domains = ctx.lists.get("freemail_domains")
    if not domains:
        return None
    cached = _fm_tables.get(id(domains))
    if cached is None or cached[0] is not domains:
        plain = {d for d in domains if "*" not in d and "?" not in d}
        wild = [re.escape(d).replace(r"\?", ".").replace(r"\*", "[^.]*") for d in domains if d not in plain]
        wild_re = re.compile(r"@(?:" + "|".join(wild) + r")$") if wild else None
        cached = _fm_tables[id(domains)] = (domains, plain, wild_re, set(ctx.lists.get("freemail_welcomelist", ())))
    return cached[1:]


def _is_freemail(ctx, email: str) -> bool:
    table = _freemail_table(ctx)
    if table is None or not email:
        return False
    plain, wild_re, welcome = table
    domain = email.rpartition("@")[2]
    if email in welcome or domain in welcome or _FM_WELCOME.search(email):
        return False
    return domain in plain or bool(wild_re is not None and wild_re.search(email))


def _addrs(ctx, name: str) -> list[str]:
    return [a.decode("utf-8", "surrogateescape").lower() for a in ctx.view.header_addresses(name)]


def _all_from_addrs(ctx) -> list[str]:
    """PerMsgStatus::all_from_addrs: Resent-From (first) when present, else
    the From-like headers and the envelope sender; runs of dots squeezed."""
    resent = _addrs(ctx, "Resent-From")[:1]
    if resent:
        addrs = resent
    else:
        addrs = (_addrs(ctx, "From") + _addrs(ctx, "Envelope-Sender") + _addrs(ctx, "Resent-Sender")
                 + _addrs(ctx, "X-Envelope-From") + [ctx.view.envelope_sender.lower()])
        addrs = [re.sub(r"\.{2,}", ".", a) for a in addrs if a]
    return list(dict.fromkeys(addrs))


def _fm_regex(args) -> Optional[re.Pattern]:
    return _compiled(args[0]) if args and args[0] else None


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern:
    return compile_perl(pattern)


def _freemail_from(ctx, args):
    if _freemail_table(ctx) is None:
        return 0
    rx = _fm_regex(args)
    return 1 if any(_is_freemail(ctx, a) and (rx is None or rx.search(a.encode("utf-8", "surrogateescape")))
                    for a in _all_from_addrs(ctx)) else 0


def _freemail_header(ctx, args):
    if _freemail_table(ctx) is None:
        return 0
    rx = _fm_regex(args[1:])
    return 1 if any(_is_freemail(ctx, a) and (rx is None or rx.search(a.encode("utf-8", "surrogateescape")))
                    for a in _addrs(ctx, args[0].split(":", 1)[0])) else 0


def _freemail_body_emails(ctx) -> Optional[set]:
    """FreeMail.pm _parse_body: freemail addresses in mailto links and the
    body text; None when there are too many addresses to judge."""
    key = "freemail_body"
    if key in ctx.cache:
        return ctx.cache[key]
    found: dict[str, None] = {}
    html = ctx.view.html
    for link in (html.links if html is not None else ()):
        m = re.match(r"(?i)mailto:" + _FM_EMAIL, link)
        if m and len(found) < 20:
            found.setdefault(m.group(1).lower())
    for para in ctx.view.paragraphs:
        text = para.decode("utf-8", "replace")
        text = _FM_LABELLED.sub(" ", _FM_URL_AT.sub(" ", text))
        for m in _FM_EMAIL_RE.finditer(text):
            found.setdefault(m.group(1).lower())
            if len(found) >= 40:
                break
        if len(found) >= 40:
            break
    out: Optional[set] = set()
    count_all = count_fm = 0
    for email in found:
        count_all += 1
        if count_all == _FM_MAX_BODY_EMAILS:  # freemail_skip_when_over_max
            out = None
            break
        if not _is_freemail(ctx, email):
            continue
        count_fm += 1
        if count_fm == _FM_MAX_BODY_FREEMAILS:
            out = None
            break
        out.add(email)
    ctx.cache[key] = out
    return out


def _freemail_body(ctx, args):
    if _freemail_table(ctx) is None:
        return 0
    body = _freemail_body_emails(ctx)
    if not body:
        return 0
    rx = _fm_regex(args)
    return 1 if rx is None or any(rx.search(e.encode("utf-8", "surrogateescape")) for e in body) else 0


def _freemail_replyto(ctx, args):
    if _freemail_table(ctx) is None:
        return 0
    what = args[0] if args else "replyto"
    env = ctx.view.envelope_sender
    if env and _FM_BULK_ENVFROM.search(env):
        return 0
    froms, replytos = _addrs(ctx, "From"), _addrs(ctx, "Reply-To")
    from_fm = any(_is_freemail(ctx, a) for a in froms)
    reply_fm = any(_is_freemail(ctx, a) for a in replytos)
    if from_fm and reply_fm and not any(f in replytos for f in froms):
        return 1
    if what == "replyto" and not reply_fm:
        return 0
    if what == "reply" and ((replytos and not reply_fm) or (not replytos and not from_fm)):
        return 0
    body = _freemail_body_emails(ctx)
    if not body:
        return 0
    reply = replytos if what == "replyto" or reply_fm else froms
    return 1 if any(b != r for b in body for r in reply) else 0


def _freemail_replyto_check(args):
    if args and args[0] not in ("replyto", "reply"):
        return f"unknown option {args[0]!r}"
    return None


def _second_level(address: str) -> str:
    m = re.search(r"@([^@]*)\Z", address)
    domain = m.group(1) if m else ""
    return re.sub(r"^.+\.([^.]+\.[^.]+)$", r"\1", domain, flags=re.S)


def _equal_from_domains(ctx, args):
    """HeaderEval::check_equal_from_domains: From's and the envelope
    sender's last two labels differ (a scalar get: the first address)."""
    v = ctx.view
    from_addr = v.header("From", "addr")
    env = v.header("EnvelopeFrom", "addr")
    fd = _second_level(from_addr.decode("utf-8", "surrogateescape").split("\n")[0]) if from_addr else ""
    ed = _second_level(env.decode("utf-8", "surrogateescape").split("\n")[0]) if env else ""
    if not fd or not ed:
        return 0
    return 1 if fd.lower() != ed.lower() else 0


_H = ("header",)
_B = ("body", "rawbody", "full")
EVALS: dict[str, Eval] = {
    "check_for_missing_to_header": Eval(_H, _missing_to),
    "check_header_count_range": Eval(_H, _header_count_range, _check_range_args),
    "check_illegal_chars": Eval(_H, _illegal_chars, _check_range_args),
    "check_from_in_whitelist": Eval(_H, _in_list(("welcome",), _originators)),
    "check_from_in_welcomelist": Eval(_H, _in_list(("welcome",), _originators)),
    "check_from_in_default_whitelist": Eval(_H, _in_list(("def_welcome",), _originators)),
    "check_from_in_default_welcomelist": Eval(_H, _in_list(("def_welcome",), _originators)),
    "check_from_in_blacklist": Eval(_H, _in_list(("block",), _originators)),
    "check_from_in_blocklist": Eval(_H, _in_list(("block",), _originators)),
    "check_to_in_whitelist": Eval(_H, _in_list(("welcome_to",), _recipients)),
    "check_to_in_welcomelist": Eval(_H, _in_list(("welcome_to",), _recipients)),
    "check_to_in_blacklist": Eval(_H, _in_list(("block_to",), _recipients)),
    "check_to_in_blocklist": Eval(_H, _in_list(("block_to",), _recipients)),
    "check_to_in_more_spam": Eval(_H, _in_list(("more_spam_to",), _recipients)),
    "check_to_in_all_spam": Eval(_H, _in_list(("all_spam_to",), _recipients)),
    "check_from_in_list": Eval(_H, _from_in_list),
    "check_replyto_in_list": Eval(_H, _replyto_in_list),
    "check_rbl": Eval(_H, _check_rbl, _check_rbl_args),
    "check_rbl_txt": Eval(_H, _check_rbl_txt, lambda a: None if len(a) >= 2 else "needs a set and a zone"),
    "check_rbl_sub": Eval(_H, _check_rbl_sub, _check_sub_args),
    "check_body_length": Eval(_B, _body_length, lambda a: (float(a[0]), None)[1]),
    "check_for_mime": Eval(_B, _check_for_mime, _mime_key_check),
    "check_for_mime_html_only": Eval(_B, _mime_html_only),
    "check_msg_parse_flags": Eval(_B + _H, _msg_parse_flags, _parse_flags_check),
    "html_range": Eval(_B, _html_range, _html_range_check),
    "html_test": Eval(_B, _html_test, _html_test_check),
    "html_tag_exists": Eval(_B, _html_tag_exists, lambda a: None if a else "needs a tag name"),
    "html_text_match": Eval(_B, _html_text_match, _html_text_match_check),
    "html_image_ratio": Eval(_B, _html_image_ratio, _range2_check),
    "check_for_shifted_date": Eval(_H, _shifted_date, _shifted_date_check),
    "subject_is_all_caps": Eval(_H, _subject_all_caps),
    "check_for_uppercase": Eval(_B, _uppercase, _range2_check),
    "html_image_only": Eval(_B, _html_image_only, _range2_check),
    "html_tag_balance": Eval(_B, _html_tag_balance, _expr_check),
    "html_eval": Eval(_B, _html_eval, _html_eval_check),
    "check_for_mime_html": Eval(_B, _mime_html),
    "check_all_trusted": Eval(_H, _all_trusted),
    "check_no_relays": Eval(_H, _no_relays),
    "check_relays_unparseable": Eval(_H, _relays_unparseable),
    "helo_ip_mismatch": Eval(_H, _helo_ip_mismatch),
    "check_for_no_rdns_dotcom_helo": Eval(_H, _no_rdns_dotcom_helo),
    "check_for_numeric_helo": Eval(_H, _numeric_helo),
    "check_for_sender_no_reverse": Eval(_H, _sender_no_reverse),
    "check_for_from_domain_in_received_headers": Eval(_H, _from_domain_in_received, _from_domain_check),
    "check_for_forged_received_trail": Eval(_H, _forged_received_trail),
    "check_for_forged_received_ip_helo": Eval(_H, _forged_received_ip_helo),
    "gated_through_received_hdr_remover": Eval(_H, _gated_through_received_hdr_remover),
    "check_for_fake_aol_relay_in_rcvd": Eval(_H, _fake_aol_relay),
    "check_for_forged_hotmail_received_headers": Eval(_H, _forged_hotmail),
    "check_for_no_hotmail_received_headers": Eval(_H, _no_hotmail_received),
    "check_for_forged_eudoramail_received_headers": Eval(_H, _forged_eudoramail),
    "check_for_forged_yahoo_received_headers": Eval(_H, _forged_yahoo),
    "check_for_forged_juno_received_headers": Eval(_H, _forged_juno),
    "check_for_forged_gmail_received_headers": Eval(_H, _forged_gmail),
    "check_for_matching_env_and_hdr_from": Eval(_H, _env_and_hdr_from_match),
    "sorted_recipients": Eval(_H, _sorted_recipients),
    "similar_recipients": Eval(_H, _similar_recipients, _undef_range_check),
    "check_for_to_in_subject": Eval(_H, _to_in_subject, _to_in_subject_check),
    "check_outlook_message_id": Eval(_H, _outlook_message_id),
    "check_unresolved_template": Eval(_H, _unresolved_template),
    "check_ratware_name_id": Eval(_H, _ratware_name_id),
    "check_ratware_envelope_from": Eval(_H, _ratware_envelope_from),
    "check_mailfrom_matches_rcvd": Eval(_H, _mailfrom_matches_rcvd),
    "check_mime_multipart_ratio": Eval(_B, _mime_multipart_ratio, _range2_check),
    "check_ma_non_text": Eval(_B, _ma_non_text),
    "check_base64_length": Eval(_B, _base64_length, _base64_length_check),
    "html_title_subject_ratio": Eval(_B, _html_title_subject_ratio, lambda a: (float(a[0]), None)[1]),
    "check_iframe_src": Eval(_B, _iframe_src),
    "multipart_alternative_difference": Eval(_B, _mpart_alt_diff, _two_numbers_or_undef),
    "multipart_alternative_difference_count": Eval(_B, _mpart_alt_diff_count, _range2_check),
    "check_blank_line_ratio": Eval(_B, _blank_line_ratio, _range2_check),
    "check_for_faraway_charset": Eval(_B, _faraway_charset),
    "check_for_faraway_charset_in_headers": Eval(_H, _faraway_charset_in_headers),
    "html_charset_faraway": Eval(_B, _html_charset_faraway),
    "check_uri_host_listed": Eval(_H + _B, _uri_host_listed, lambda a: None if a and a[0] else "needs a list name"),
    "check_uri_host_in_blocklist": Eval(_H + _B, lambda ctx, a: _uri_host_listed(ctx, ("BLOCK",))),
    "check_uri_host_in_blacklist": Eval(_H + _B, lambda ctx, a: _uri_host_listed(ctx, ("BLOCK",))),
    "check_uri_host_in_welcomelist": Eval(_H + _B, lambda ctx, a: _uri_host_listed(ctx, ("WELCOME",))),
    "check_uri_host_in_whitelist": Eval(_H + _B, lambda ctx, a: _uri_host_listed(ctx, ("WELCOME",))),
    "tvd_vertical_words": Eval(_B, _vertical_words, _range2_check),
    "check_freemail_from": Eval(_H, _freemail_from, lambda a: (_fm_regex(a), None)[1]),
    "check_freemail_header": Eval(_H, _freemail_header,
                                  lambda a: "needs a header name" if not a else (_fm_regex(a[1:]), None)[1]),
    "check_freemail_body": Eval(_H, _freemail_body, lambda a: (_fm_regex(a), None)[1]),
    "check_freemail_replyto": Eval(_H, _freemail_replyto, _freemail_replyto_check),
    "check_equal_from_domains": Eval(_H, _equal_from_domains),
    "check_stock_info": Eval(_B, _stock_info, lambda a: (int(float(a[0])) if a else 0, None)[1]),
    "check_dns_sender": Eval(_H, _dns_sender),
    "have_any_bounce_relays": Eval(_B, _have_any_bounce_relays),
    "check_welcomelist_bounce_relays": Eval(_B, _welcomelist_bounce_relays),
    "check_whitelist_bounce_relays": Eval(_B, _welcomelist_bounce_relays),
    "check_for_ascii_text_illegal": Eval(_B, lambda ctx, a: 1 if ctx.view.mime_scan["ascii_text_illegal"] else 0),
}
