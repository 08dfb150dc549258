"""Reading SpamAssassin rule files into a ``RuleSet``.

The parser follows SpamAssassin's own conventions: ``#`` starts a comment
unless escaped as ``\\#``; ``ifplugin``/``if``/``else``/``endif`` blocks are
evaluated against the plugins and features this engine implements; a rule
defined again replaces the earlier definition and a later ``score`` line
overrides an earlier one, so directories are loaded in order and local rules
win.  Nothing here raises on a bad line: a rule we cannot run is recorded in
``RuleSet.skipped`` with its file, line and reason.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from rules.sa import evals
from rules.sa.perlre import Parsed, Unsupported, parse_literal, parse_perl

# The version we claim in ``if (version >= ...)``: the rule syntax of
# SpamAssassin 4.0.1 is what we read.
SA_VERSION = 4.000001

# Plugins whose rule syntax or eval tests we implement (at least partly; an
# eval we lack is skipped one by one and reported).  Rules inside
# ``ifplugin`` of any other plugin are not loaded, as in SpamAssassin.
PLUGINS = {
    "Mail::SpamAssassin::Plugin::ReplaceTags",
    "Mail::SpamAssassin::Plugin::MIMEHeader",
    "Mail::SpamAssassin::Plugin::HeaderEval",
    "Mail::SpamAssassin::Plugin::BodyEval",
    "Mail::SpamAssassin::Plugin::HTMLEval",
    "Mail::SpamAssassin::Plugin::MIMEEval",
    "Mail::SpamAssassin::Plugin::WLBLEval",
    "Mail::SpamAssassin::Plugin::DNSEval",
    "Mail::SpamAssassin::Plugin::RelayEval",
    "Mail::SpamAssassin::Plugin::Check",
    "Mail::SpamAssassin::Plugin::FreeMail",
    "Mail::SpamAssassin::Plugin::VBounce",
}
# ``if can(...)`` features: true for what this engine does
FEATURES = {
    "Mail::SpamAssassin::Conf::feature_bug6558_free",
    "Mail::SpamAssassin::Conf::feature_welcomelist_blocklist",
    "Mail::SpamAssassin::Conf::compat_welcomelist_blocklist",
    "Mail::SpamAssassin::Conf::perl_min_version_5010000",
    "Mail::SpamAssassin::Conf::feature_yesno_takes_args",
    "Mail::SpamAssassin::Conf::feature_edns",
    "Mail::SpamAssassin::Plugin::BodyEval::has_check_body_length",
    "Mail::SpamAssassin::Plugin::MIMEEval::has_check_for_ascii_text_illegal",
    "Mail::SpamAssassin::Conf::feature_originating_ip_headers",  # rules/sa/received.py
}

REGEX_KINDS = ("header", "body", "rawbody", "full", "uri", "mimeheader")
KINDS = REGEX_KINDS + ("meta",)

# directives that configure SpamAssassin itself (reports, Bayes, DNS,
# plugins we do not have...): accepted and ignored, never an error
_IGNORED = {
    "lang", "priority", "reuse", "test", "report", "unsafe_report", "clear_report_template",
    "clear_unsafe_report_template", "report_contact", "report_safe", "add_header", "remove_header",
    "clear_headers", "required_score", "rewrite_header", "ok_languages",
    "loadplugin", "tryplugin", "require_version", "version_tag", "dns_local_ports_avoid",
    "clear_originating_ip_headers", "originating_ip_headers", "bayes_ignore_header",
    "util_rb_tld", "util_rb_2tld", "util_rb_3tld", "clear_util_rb", "freemail_domains",
    "url_shortener", "url_shortener_get", "redirector_pattern", "uridnsbl_skip_domain",
    "adsp_override", "def_whitelist_auth", "def_welcomelist_auth",
    "whitelist_auth", "welcomelist_auth", "def_whitelist_from_dkim", "def_welcomelist_from_dkim",
    "whitelist_from_dkim", "welcomelist_from_dkim", "def_whitelist_from_spf",
    "def_welcomelist_from_spf", "whitelist_from_spf", "welcomelist_from_spf",
    "whitelist_from_rcvd", "welcomelist_from_rcvd", "def_whitelist_from_rcvd",
    "def_welcomelist_from_rcvd", "dns_block_rule", "fns_ignore_headers", "fns_ignore_dkim",
    "fns_check", "trusted_networks", "internal_networks", "msa_networks", "clear_trusted_networks",
    "clear_internal_networks", "use_bayes", "use_auto_whitelist", "use_auto_welcomelist",
    "skip_rbl_checks", "use_razor2", "use_pyzor", "use_dcc", "normalize_charset",
    "bayes_auto_learn", "bayes_auto_learn_threshold_spam", "bayes_auto_learn_threshold_nonspam",
    "uridnsbl", "urirhsbl", "urirhssub", "uridnssub", "askdns", "check_rbl_from_domain",
    "rbl_timeout", "envelope_sender_header", "dns_server", "dns_available", "dns_options",
    "util_rb_tld", "describe_html", "shortcircuit", "score_set", "unwhitelist_from", "unwelcomelist_from",
    "unblacklist_from", "unblocklist_from",
}
_BAYES_STOPWORDS = re.compile(r"^bayes_stopword_")

_WL_LISTS = {
    "whitelist_from": "welcome", "welcomelist_from": "welcome",
    "def_whitelist_from": "def_welcome", "def_welcomelist_from": "def_welcome",
    "blacklist_from": "block", "blocklist_from": "block",
    "whitelist_to": "welcome_to", "welcomelist_to": "welcome_to",
    "blacklist_to": "block_to", "blocklist_to": "block_to",
    "more_spam_to": "more_spam_to", "all_spam_to": "all_spam_to",
}

# directive -> the URI host list it fills ("" when the list is named in the line)
_URI_HOST_LISTS = {
    "enlist_uri_host": "", "delist_uri_host": "", "blocklist_uri_host": "BLOCK", "blacklist_uri_host": "BLOCK",
    "welcomelist_uri_host": "WELCOME", "whitelist_uri_host": "WELCOME",
}


@dataclass
class Rule:
    name: str
    kind: str  # header, body, rawbody, full, uri, mimeheader, meta
    source: str  # file:line
    parsed: Optional[Parsed] = None  # the translated regex, parsed once
    regex_text: str = ""  # the Perl pattern as written (ReplaceTags rewrites it)
    regex_flags: str = ""
    negate: bool = False  # header !~
    headers: tuple = ()  # header rules: names (pseudo-headers included)
    modifier: str = ""  # header rules: addr, name, raw, first, last, host, domain
    if_unset: Optional[bytes] = None
    exists: bool = False  # header NAME exists:Header
    eval: Optional[tuple[str, tuple]] = None  # (function, args)
    meta: str = ""
    needles: Optional[tuple[bytes, ...]] = None

    @property
    def is_eval(self) -> bool:
        return self.eval is not None

    @property
    def regex(self) -> Optional[re.Pattern]:
        """The rule's regex as written (translated), compiled on demand."""
        if self.parsed is None:
            return None
        return re.compile(self.parsed.source, self.parsed.flags)


@dataclass
class Skipped:
    name: str
    kind: str
    source: str
    reason: str
    regex: bool  # a regex rule (counts toward the skipped share) or an eval


@dataclass
class RuleSet:
    rules: dict[str, Rule] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    describes: dict[str, str] = field(default_factory=dict)
    tflags: dict[str, set] = field(default_factory=dict)
    maxhits: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, Skipped] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)  # whitelist_from & co, enlist_addrlist
    replace: dict[str, dict[str, str]] = field(default_factory=lambda: {
        "tag": {}, "pre": {}, "inter": {}, "post": {}})
    replace_rules: set = field(default_factory=set)
    replace_delims: list = field(default_factory=lambda: ["<", ">"])
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # syntax trouble, file:line reason
    ignored_directives: int = 0
    # meta rules switched off because a rule they name is defined nowhere
    disabled: dict[str, str] = field(default_factory=dict)

    def score_of(self, name: str, score_set: int) -> float:
        """The rule's score in the chosen set (SpamAssassin's defaults otherwise)."""
        values = self.scores.get(name)
        if values is None:
            if name.startswith("__"):
                return 0.0
            if name.startswith("T_"):
                return 0.01
            return -1.0 if "nice" in self.tflags.get(name, ()) else 1.0
        if len(values) == 4:
            return values[score_set]
        return values[0]

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in KINDS}
        for r in self.rules.values():
            out[r.kind] = out.get(r.kind, 0) + 1
        return out


class Parser:
    def __init__(self, ruleset: Optional[RuleSet] = None):
        self.rs = ruleset or RuleSet()
        self._including: list[str] = []

    # --- files and directories ---------------------------------------------

    def load_dir(self, path: str) -> None:
        for f in sorted(glob.glob(os.path.join(path, "*.cf"))):
            self.load_file(f)

    def load_file(self, path: str) -> None:
        real = os.path.realpath(path)
        if real in self._including:
            self.rs.problems.append(f"{path}: include loop, not read again")
            return
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            self.rs.problems.append(f"{path}: cannot read: {e.strerror}")
            return
        self.rs.files.append(path)
        self._including.append(real)
        try:
            # latin-1: one character per byte, so patterns keep their bytes
            self.parse_text(data.decode("latin-1"), path)
        finally:
            self._including.pop()

    def parse_text(self, text: str, path: str = "<text>") -> None:
        conds: list[bool] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = _strip_comment(line)
            if not line:
                continue
            where = f"{path}:{lineno}"
            word, _, rest = line.partition(" ")
            if "\t" in word:
                word, _, more = word.partition("\t")
                rest = (more + " " + rest).strip()
            rest = rest.strip()
            word = word.lower()
            if word == "ifplugin":
                conds.append(rest.strip() in PLUGINS)
                continue
            if word == "if":
                conds.append(_eval_if(rest, where, self.rs.problems))
                continue
            if word == "else":
                if conds:
                    conds[-1] = not conds[-1]
                else:
                    self.rs.problems.append(f"{where}: else without if")
                continue
            if word == "endif":
                if conds:
                    conds.pop()
                else:
                    self.rs.problems.append(f"{where}: endif without if")
                continue
            if not all(conds):
                continue
            self.directive(word, rest, where, path)
        if conds:
            self.rs.problems.append(f"{path}: {len(conds)} if/ifplugin block(s) not closed")

    # --- directives ------------------------------------------------------------

    def directive(self, word: str, rest: str, where: str, path: str) -> None:
        rs = self.rs
        if word in ("header", "body", "rawbody", "full", "uri", "mimeheader", "meta"):
            name, _, spec = _split2(rest)
            if not name or not spec:
                rs.problems.append(f"{where}: {word} needs a name and a definition")
                return
            self.define(word, name, spec, where)
        elif word == "score":
            name, _, values = _split2(rest)
            try:
                nums = [float(v) for v in values.split()]
            except ValueError:
                nums = []
            if name and values.startswith("(") or not name:
                rs.problems.append(f"{where}: relative scores are not supported")
                return
            if len(nums) not in (1, 4):
                rs.problems.append(f"{where}: score needs 1 or 4 numbers")
                return
            rs.scores[name] = nums
        elif word == "describe":
            name, _, text = _split2(rest)
            if name:
                rs.describes[name] = text
        elif word == "tflags":
            name, _, flags = _split2(rest)
            if not name:
                return
            fl = set()
            for f in flags.split():
                if f.startswith("maxhits="):
                    try:
                        rs.maxhits[name] = int(f.split("=", 1)[1])
                    except ValueError:
                        rs.problems.append(f"{where}: bad maxhits {f!r}")
                    fl.add("multiple")
                else:
                    fl.add(f)
            rs.tflags[name] = fl
        elif word == "include":
            target = rest if os.path.isabs(rest) else os.path.join(os.path.dirname(path), rest)
            self.load_file(target)
        elif word in ("replace_tag", "replace_pre", "replace_inter", "replace_post"):
            name, _, value = _split2(rest)
            if name and value:
                rs.replace[word.split("_", 1)[1]][name] = value
        elif word == "replace_rules":
            rs.replace_rules.update(rest.split())
        elif word == "replace_start" and rest:
            rs.replace_delims[0] = rest
        elif word == "replace_end" and rest:
            rs.replace_delims[1] = rest
        elif word in _WL_LISTS:
            rs.lists.setdefault(_WL_LISTS[word], []).extend(a.lower() for a in rest.split())
        elif word == "enlist_addrlist":
            m = re.match(r"\((\w+)\)\s+(.*)", rest)
            if m:
                rs.lists.setdefault("list:" + m.group(1).lower(), []).extend(
                    a.lower() for a in m.group(2).split())
        elif word == "originating_ip_headers":  # Received.pm appends their addresses to the chain
            names = rs.lists.setdefault("originating_ip_headers", [])
            names += [n for n in rest.split() if n.lower() not in {x.lower() for x in names}]
        elif word == "clear_originating_ip_headers":
            rs.lists["originating_ip_headers"] = []
        elif word == "ok_locales":
            rs.lists["ok_locales"] = rest.split()  # a setting: the last line wins
        elif word in _URI_HOST_LISTS:
            self.uri_host_list(word, rest, where)
        elif word in ("freemail_domains", "freemail_whitelist", "freemail_welcomelist"):
            # FreeMail.pm parse_config: domains (with * and ? globs), and the
            # addresses or domains never counted as freemail
            key = "freemail_domains" if word == "freemail_domains" else "freemail_welcomelist"
            rs.lists.setdefault(key, []).extend(a.lower() for a in rest.split())
        elif word in ("whitelist_bounce_relays", "welcomelist_bounce_relays"):
            # VBounce.pm: the site's own relays, globs as in whitelist_from
            rs.lists.setdefault("bounce_relays", []).extend(a.lower() for a in rest.split())
        elif word in ("util_rb_tld", "util_rb_2tld", "util_rb_3tld"):
            rs.lists.setdefault(word, []).extend(a.lower() for a in rest.split())
        elif word in _IGNORED or _BAYES_STOPWORDS.match(word) or word.startswith(("replace_", "report_")):
            rs.ignored_directives += 1
        else:
            rs.ignored_directives += 1

    def uri_host_list(self, word: str, rest: str, where: str) -> None:
        """WLBLEval's URI host lists (Conf.pm enlist_uri_host and friends), kept in
        ``lists["uri_host:NAME"]`` in order as "host" or "!host"; the last word on a host wins."""
        rs = self.rs
        m = re.match(r"\((.+?)\)\s+(.+)", rest, re.S)
        if _URI_HOST_LISTS[word]:
            names, hosts = [_URI_HOST_LISTS[word]], rest
        elif m:
            names, hosts = [m.group(1)], m.group(2)
        elif word == "delist_uri_host" and rest:
            names, hosts = [k.split(":", 1)[1] for k in rs.lists if k.startswith("uri_host:")], rest
        else:
            rs.problems.append(f"{where}: {word} needs (LISTNAME) and hosts")
            return
        for name in names:
            entries = rs.lists.setdefault("uri_host:" + name, [])
            if word == "delist_uri_host":
                drop = {h.lstrip("!") for h in hosts.lower().split()}
                entries[:] = [e for e in entries if e.lstrip("!") not in drop]
            else:
                entries.extend(hosts.lower().split())

    def define(self, kind: str, name: str, spec: str, where: str) -> None:
        rs = self.rs
        rs.skipped.pop(name, None)
        rs.rules.pop(name, None)
        rule = Rule(name, kind, where)
        try:
            if kind == "meta":
                rule.meta = spec
            elif spec.startswith("eval:"):
                rule.eval = evals.parse_call(spec[5:])
                problem = evals.unsupported(kind, rule.eval)
                if problem:
                    raise Unsupported(problem)
            elif kind in ("header", "mimeheader"):
                self._header(rule, spec)
            else:
                rule.regex_text, rule.regex_flags = parse_literal(spec)
        except Unsupported as e:
            rs.skipped[name] = Skipped(name, kind, where, str(e), regex=rule.eval is None)
            return
        except ValueError as e:
            rs.skipped[name] = Skipped(name, kind, where, f"syntax: {e}", regex=rule.eval is None)
            return
        rs.rules[name] = rule

    @staticmethod
    def _header(rule: Rule, spec: str) -> None:
        if spec.startswith("exists:"):
            rule.exists = True
            rule.headers = (spec[7:].strip(),)
            return
        m = re.match(r"(\S+?)\s*(=~|!~)\s*(.*)$", spec)
        if not m:
            raise ValueError("expected 'Header =~ /pattern/' or 'exists:Header'")
        target, op, rest = m.groups()
        unset = re.search(r"\s+\[if-unset:\s*(.*?)\]\s*$", rest)
        if unset:
            rule.if_unset = unset.group(1).encode("latin-1")
            rest = rest[:unset.start()]
        name, _, modifiers = target.partition(":")
        mods = [x for x in modifiers.split(":") if x]
        for mod in mods:
            if mod not in ("addr", "name", "raw", "first", "last", "host", "domain"):
                raise Unsupported(f"header modifier :{mod}")
        # raw is orthogonal to the rest; keep one main modifier
        rule.modifier = ",".join(mods)
        rule.headers = tuple(h for h in name.split("|") if h)
        rule.negate = op == "!~"
        rule.regex_text, rule.regex_flags = parse_literal(rest)


def _strip_comment(line: str) -> str:
    if "#" in line:
        line = re.sub(r"(?<!\\)#.*", "", line).replace("\\#", "#")
    return line.strip()


def _split2(text: str) -> tuple[str, str, str]:
    parts = text.split(None, 1)
    if not parts:
        return "", "", ""
    return parts[0], " ", parts[1].strip() if len(parts) > 1 else ""


_IF_TOKEN = re.compile(
    r"\s*(?:(version)|(perl_version)|(plugin|can|has)\s*\(\s*([\w:]+)\s*\)|(&&|\|\||!=|==|>=|<=|[<>()!])|"
    r"(\d+(?:\.\d+)?))"
)


def _eval_if(expr: str, where: str, problems: list) -> bool:
    """``if (version >= 3.004000)``, ``if can(...)``, ``if !plugin(...)``, combined."""
    out = []
    pos = 0
    expr = expr.strip()
    while pos < len(expr):
        m = _IF_TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            problems.append(f"{where}: cannot evaluate 'if {expr}', block skipped")
            return False
        pos = m.end()
        if m.group(1):
            out.append(repr(SA_VERSION))
        elif m.group(2):
            out.append("5.036")
        elif m.group(3):
            fn, arg = m.group(3), m.group(4)
            truth = arg in PLUGINS if fn == "plugin" else arg in FEATURES
            out.append("True" if truth else "False")
        elif m.group(5):
            op = m.group(5)
            out.append({"&&": " and ", "||": " or ", "!": " not "}.get(op, op))
        else:
            out.append(m.group(6))
    try:
        return bool(eval("".join(out), {"__builtins__": {}}, {}))  # tokens checked above
    except Exception:
        problems.append(f"{where}: cannot evaluate 'if {expr}', block skipped")
        return False


# --- after loading: ReplaceTags, compilation, meta checks --------------------


def _replace_tags(rs: RuleSet, pattern: str) -> str:
    start, end = (re.escape(d) for d in rs.replace_delims)
    for _ in range(6):
        again = False
        names = {}
        for kind in ("pre", "post", "inter"):
            m = re.search(f"{start}{kind} (.+?){end}", pattern)
            if m:
                names[kind] = m.group(1)
                pattern = pattern[:m.start()] + pattern[m.end():]
        parts = re.split(f"({start}[^<>]+{end})", pattern)
        while parts and parts[-1] == "":
            parts.pop()  # Perl's split drops trailing empty fields
        tag_re = re.compile(f"{start}(.+?){end}")
        pre = rs.replace["pre"].get(names.get("pre", ""))
        post = rs.replace["post"].get(names.get("post", ""))
        inter = rs.replace["inter"].get(names.get("inter", ""))
        for i, part in enumerate(parts):
            if pre and tag_re.search(part):
                part = tag_re.sub(lambda m: pre + m.group(0), part, count=1)
            if post and tag_re.search(part):
                part = tag_re.sub(lambda m: m.group(0) + post, part)
            if inter and part == "":
                part = inter
            m = tag_re.search(part)
            if m and m.group(1) in rs.replace["tag"]:
                value = rs.replace["tag"][m.group(1)]
                part = part.replace(m.group(0), value)
                again = again or bool(re.search(r"<[^>]+>", value))
            parts[i] = part
        pattern = "".join(parts)
        if not again:
            break
    return pattern


def finish(rs: RuleSet) -> RuleSet:
    """Compile the regexes (after ReplaceTags) and move failures to ``skipped``."""
    for name in list(rs.rules):
        rule = rs.rules[name]
        if rule.kind == "meta" or rule.eval is not None or rule.exists:
            continue
        text = rule.regex_text
        if name in rs.replace_rules:
            text = _replace_tags(rs, text)
        try:
            rule.parsed = parse_perl(text, rule.regex_flags)
        except Unsupported as e:
            del rs.rules[name]
            rs.skipped[name] = Skipped(name, rule.kind, rule.source, str(e), regex=True)
            continue
    for name, rule in list(rs.rules.items()):
        if rule.kind == "meta":
            try:
                rule.meta = _check_meta(rule.meta)
            except ValueError as e:
                del rs.rules[name]
                rs.skipped[name] = Skipped(name, "meta", rule.source, str(e), regex=False)
    _drop_undefined_dependencies(rs)
    return rs


def _drop_undefined_dependencies(rs: RuleSet) -> None:
    """Lists the meta rules that name a rule defined nowhere (a plugin's
    rule that is not loaded, a rule from a missing file).  SpamAssassin 4
    keeps them: the undefined name reads as 0 (Check.pm do_meta_tests sets
    ``$h->{$deprule} ||= 0``), so ``A && !__UNDEFINED`` can still hit."""
    for name, rule in rs.rules.items():
        if rule.kind != "meta":
            continue
        missing = [d for d in meta_names(rule.meta) if d not in rs.rules and d not in rs.skipped]
        if missing:
            rs.disabled[name] = f"{rule.source}: meta {name} names undefined {', '.join(missing[:3])} (read as 0)"


_META_TOKEN = re.compile(r"\s*(?:([A-Za-z_]\w*)|(\d+(?:\.\d+)?)|(&&|\|\||==|!=|>=|<=|[-+*/<>()!]))")


def _check_meta(expr: str) -> str:
    """Validate a meta expression's tokens; returns it normalised."""
    pos, out = 0, []
    expr = expr.strip()
    while pos < len(expr):
        m = _META_TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"meta: cannot read {expr[pos:pos + 20]!r}")
        out.append(m.group(0).strip())
        pos = m.end()
    if not out:
        raise ValueError("meta: empty expression")
    return " ".join(out)


def meta_names(expr: str) -> list[str]:
    return [m.group(1) for m in _META_TOKEN.finditer(expr) if m.group(1)]


def load(paths: Iterable[str]) -> RuleSet:
    """Load rule directories (or single .cf files) in order and compile."""
    parser = Parser()
    for p in paths:
        if os.path.isdir(p):
            parser.load_dir(p)
        elif os.path.isfile(p):
            parser.load_file(p)
        else:
            parser.rs.problems.append(f"{p}: no such rule directory or file")
    return finish(parser.rs)


def load_text(text: str, path: str = "<text>") -> RuleSet:
    parser = Parser()
    parser.parse_text(text, path)
    return finish(parser.rs)
