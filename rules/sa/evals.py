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
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

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


def address_matches(address: str, patterns) -> bool:
    """SpamAssassin list syntax: globs (``*@example.com``, ``?``) on the address."""
    a = address.lower()
    return any(fnmatch.fnmatchcase(a, p) for p in patterns)


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


def _illegal_chars(ctx, args):
    header, ratio, count = args[0], float(args[1]), float(args[2])
    if header.upper() == "ALL":
        raw = ctx.view.raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        # RFC 2047 is the legal way to carry 8-bit text; strip what is already legal
    else:
        vals = ctx.view.header_values(header, raw=True)
        raw = "".join(vals).encode("utf-8", "surrogateescape")
    if not raw:
        return 0
    illegal = sum(1 for b in raw if b >= 0x80)
    return 1 if illegal / len(raw) > ratio and illegal >= count else 0


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


_MIME_KEYS = {
    "mime_base64_count": lambda st: st["base64_count"],
    "mime_qp_count": lambda st: st["qp_count"],
    "mime_attachment": lambda st: 1 if st["attachment"] else 0,
    "mime_base64_encoded_text": lambda st: 1 if st["base64_text"] else 0,
}


def _check_for_mime(ctx, args):
    return _MIME_KEYS[args[0]](ctx.view.mime_stats)


def _mime_key_check(args):
    return None if args and args[0] in _MIME_KEYS else f"check_for_mime('{args[0] if args else ''}') not implemented"


def _mime_html_only(ctx, args):
    return 1 if ctx.view.mime_stats["html_only"] else 0


_PARSE_FLAGS = {
    "missing_head_body_separator": lambda v: not v.has_header_body_separator,
}


def _msg_parse_flags(ctx, args):
    return 1 if _PARSE_FLAGS[args[0]](ctx.view) else 0


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


def _html_range(ctx, args):
    r = ctx.view.html
    if r is None:
        return 0
    value = _html_values(r)[args[0]]
    lo, hi = float(args[1]), float(args[2])
    # SpamAssassin: min <= value < max, with "inf" as an open top
    return 1 if lo <= value and (value < hi or hi == float("inf")) else 0


def _html_range_check(args):
    if args[0] not in _HTML_RANGE_KEYS:
        return f"html_range('{args[0]}') not implemented"
    float(args[1]), float(args[2])
    return None


_HTML_TESTS = {
    "html": lambda r: True,
    "embeds": lambda r: r.embeds,
    "form_action_mailto": lambda r: r.form_action_mailto,
}


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

_RCVD_DATE = re.compile(r";\s*([^;]*\d{1,2}\s+\w{3}\s+\d{2,4}\s+\d{1,2}:\d{2}[^;]*)$", re.S)


def _date_diff(ctx) -> Optional[float]:
    """Date: header minus the closest Received: time, in seconds (as SpamAssassin)."""
    if "date_diff" in ctx.cache:
        return ctx.cache["date_diff"]
    import email.utils

    diff = None
    dates = ctx.view.header_values("Date")
    try:
        when = email.utils.parsedate_to_datetime(dates[0].strip()).timestamp() if dates else None
    except (TypeError, ValueError, IndexError, OverflowError):
        when = None
    if when is not None:
        times = []
        for value in ctx.view.header_values("Received"):
            m = _RCVD_DATE.search(value.strip())
            if not m:
                continue
            try:
                times.append(email.utils.parsedate_to_datetime(m.group(1).strip()).timestamp())
            except (TypeError, ValueError, OverflowError):
                continue
        if times:
            diffs = [when - t for t in times]
            if len(diffs) > 1 and diffs[-1] == 0:
                diffs.pop()
            diff = min(diffs, key=abs)
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


def _uppercase(ctx, args):
    """Share of upper-case letters in the body, in percent (SpamAssassin's counting)."""
    if "uppercase" not in ctx.cache:
        length = lower = upper = 0
        for para in ctx.view.paragraphs[1:]:  # the Subject is not body text here
            if not re.search(rb"\S\s+\S", para) or re.match(rb"(?:[A-Za-z0-9+/=]{60,76} ){2}", para):
                continue
            length += len(para)
            lower += sum(1 for b in para if 0x61 <= b <= 0x7a or 0x30 <= b <= 0x39)
            upper += sum(1 for b in para if 0x41 <= b <= 0x5a)
        ctx.cache["uppercase"] = 0.0 if length < 200 or not (lower + upper) else 100.0 * upper / (lower + upper)
    value = ctx.cache["uppercase"]
    return 1 if float(args[0]) < value <= float(args[1]) else 0


def _html_image_only(ctx, args):
    r = ctx.view.html
    if r is None or not r.tags.get("img"):
        return 0
    length = len(re.sub(r"\s+", "", "".join(r.text)))
    return 1 if float(args[0]) < length <= float(args[1]) else 0


_EXPR = re.compile(r"^\s*(==|!=|<=|>=|<|>)\s*(-?\d+)\s*$")


def _compare(value: float, expr: str) -> bool:
    m = _EXPR.match(expr)
    op, n = m.group(1), float(m.group(2))
    return {"==": value == n, "!=": value != n, "<=": value <= n, ">=": value >= n,
            "<": value < n, ">": value > n}[op]


def _html_tag_balance(ctx, args):
    r = ctx.view.html
    if r is None or args[0].lower() not in r.tags:
        return 0
    return 1 if _compare(float(r.balance.get(args[0].lower(), 0)), args[1]) else 0


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


# --- the relay we saw (RelayEval) ---------------------------------------------------


def _all_trusted(ctx, args):
    relay = ctx.view.relay
    return 1 if relay is not None and relay.get("trusted") else 0


def _no_relays(ctx, args):
    return 1 if ctx.view.relay is None and not ctx.view.header_values("Received") else 0


def _relays_unparseable(ctx, args):
    return 0  # the one relay we know is our own SMTP session, never unparseable


def _helo_ip_mismatch(ctx, args):
    """HELO is an IP address literal whose /16 is not the client's (SpamAssassin's test)."""
    import ipaddress

    relay = ctx.view.relay
    if relay is None or relay.get("trusted"):
        return 0
    helo = relay.get("helo", "").strip("[]")
    try:
        claimed = ipaddress.ip_address(helo.removeprefix("IPv6:"))
        actual = ipaddress.ip_address(relay.get("ip", ""))
    except ValueError:
        return 0
    rfc1918 = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8")]
    if claimed.version != 4 or actual.version != 4 or any(a in n for a in (claimed, actual) for n in rfc1918):
        return 0  # private addresses say nothing across a NAT
    return 1 if str(claimed).split(".")[:2] != str(actual).split(".")[:2] else 0


_DOTCOM_HELO = re.compile(r"(?:\.|^)(?:lycos\.com|lycos\.co\.uk|hotmail\.com|localhost\.com|excite\.com|"
                          r"caramail\.com|cs\.com|aol\.com|msn\.com|yahoo\.com|drizzle\.com)$", re.I)


def _no_rdns_dotcom_helo(ctx, args):
    relay = ctx.view.relay
    if relay is None or relay.get("trusted") or relay.get("rdns"):
        return 0
    return 1 if _DOTCOM_HELO.search(relay.get("helo", "")) else 0


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
}
