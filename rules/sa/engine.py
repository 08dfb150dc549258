"""Running a compiled ``RuleSet`` against one message.

Rules of one kind are scanned together: body paragraphs are joined into one
text and each body regex searches it once (multi-line mode makes ``^``/``$``
mean paragraph start/end, as per paragraph in SpamAssassin); a regex first
has to pass a literal pre-filter (``needles``: strings any match must
contain, checked against the lower-cased text with a substring test), so
most of the thousand stock regexes never run.  Header rules are grouped by
header so each value is fetched and decoded once.  Meta rules are compiled
into one Python function evaluated in dependency order.

A match that spans two paragraphs (possible only because they were joined)
is re-checked paragraph by paragraph, so results equal the per-paragraph
semantics.  Rawbody rules are the exception: their units are SpamAssassin's
2-4 KB chunks, cut mid-line, so they always run chunk by chunk (the joined
text serves the needles only).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from rules.sa import evals, prefilter
from rules.sa.perlre import optimise_parsed, tree_needles
from rules.sa.ruleset import Rule, RuleSet, Skipped, meta_names

log = logging.getLogger("mailgate.rules.sa")

DEFAULT_SCORE_SET = 1  # network tests on, SpamAssassin's Bayes off (see docs/rules.md)
_UNIT_KINDS = ("body", "rawbody", "uri")
# Kinds whose units are chunks cut anywhere in a line (MessageView.rawbody_chunks):
# a regex sees one chunk as its whole subject (``^`` is the chunk's start, not
# a line's), so every rule runs chunk by chunk and the prefilter scans each
# chunk alone; on the joined text a match at a chunk's edge could be missed.
_CHUNK_KINDS = ("rawbody",)


@dataclass
class Hit:
    name: str
    score: float
    count: int
    describe: str


@dataclass
class _Scan:
    """One regex rule prepared for a kind's joined text."""

    rule: Rule
    regex: re.Pattern
    needles: Optional[tuple]
    multiple: bool
    maxhits: int
    per_unit: bool  # anchors/flags that only make sense on one unit at a time
    on_lower: bool = False  # a /i regex rewritten to run case-sensitively on lower-cased text
    prefiltered: bool = False  # runs only when the kind's Hyperscan pass names it
    nosubject: bool = False  # tflags nosubject: a body rule that skips the Subject line


class Engine:
    def __init__(self, rs: RuleSet, score_set: int = DEFAULT_SCORE_SET,
                 owned_elsewhere: Iterable[str] = (), report_evals_of: Iterable[str] = (),
                 use_prefilter: bool = True, cache_dir: Optional[str] = None,
                 score_sets: Iterable[int] = ()):
        """``score_set``: the set messages are scored with unless the caller
        names another; ``score_sets``: the other sets it may name per message
        (SpamAssassin switches to the Bayes sets once a model is available).
        A rule runs when it scores in any of them."""
        self.rs = rs
        self.use_prefilter = use_prefilter
        self.cache_dir = cache_dir
        self.score_set = score_set
        self.set_scores = {s: {n: rs.score_of(n, s) for n in rs.rules} for s in {score_set, *score_sets}}
        self.scores = self.set_scores[score_set]
        # nonzero in some set: what decides which rules run (see _active)
        self._runs = {n: any(v[n] for v in self.set_scores.values()) for n in rs.rules}
        self.owned_elsewhere = set(owned_elsewhere)
        self.rbl_sets: dict[str, str] = {}
        self._prepare()

    # --- compile --------------------------------------------------------------

    def _active(self) -> set[str]:
        """Rules worth running: a non-zero score, or needed by such a meta."""
        rules = self.rs.rules
        wanted = {n for n, r in rules.items() if self._runs.get(n) and not n.startswith("__")}
        stack = list(wanted)
        while stack:
            r = rules.get(stack.pop())
            if r is None or r.kind != "meta":
                continue
            for dep in meta_names(r.meta):
                if dep in rules and dep not in wanted:
                    wanted.add(dep)
                    stack.append(dep)
        return wanted

    def _prepare(self) -> None:
        rs = self.rs
        active = self._active()
        self.active = active
        self.headers: dict[tuple[str, str], list[_Scan]] = {}
        self.exists: list[Rule] = []
        self.mimeheaders: list[_Scan] = []
        self.scans: dict[str, list[_Scan]] = {k: [] for k in ("body", "rawbody", "full", "uri")}
        self.evals: list[Rule] = []
        # sub-rules (__NAME) of the body kinds run only when a meta rule asks
        # for their value (see _Hits)
        self.deferred: dict[str, tuple[str, _Scan]] = {}
        self.deferred_headers: dict[str, _Scan] = {}
        metas: list[Rule] = []
        for name, rule in rs.rules.items():
            if rule.eval is not None and rule.eval[0] in ("check_rbl", "check_rbl_txt") and rule.eval[1]:
                # set names must be known even for rules that do not run
                self.rbl_sets[rule.eval[1][0]] = rule.eval[1][1].rstrip(".").lower()
            if name not in active:
                continue
            if rule.kind == "meta":
                metas.append(rule)
            elif rule.eval is not None:
                self.evals.append(rule)
            elif rule.exists:
                self.exists.append(rule)
            else:
                scan = self._scan(rule)
                if rule.kind == "header" and name.startswith("__"):
                    self.deferred_headers[name] = scan
                elif rule.kind == "header":
                    for h in rule.headers:
                        self.headers.setdefault((h, rule.modifier), []).append(scan)
                elif rule.kind == "mimeheader":
                    self.mimeheaders.append(scan)
                elif name.startswith("__"):
                    self.deferred[name] = (rule.kind, scan)
                else:
                    self.scans[rule.kind].append(scan)
        self._compile_metas(metas)
        self.prefilters: dict[str, prefilter.Prefilter] = {}
        if self.use_prefilter:
            self._build_prefilters()
        # the parse trees served their purpose; hundreds of thousands of small
        # objects would only slow down every garbage collection from now on
        for rule in rs.rules.values():
            if rule.parsed is not None:
                rule.parsed.tree = None
        # every name a meta may read that is computed eagerly starts at 0, so
        # reading a miss is a plain dict lookup, not a __missing__ call
        lazy = set(self.lazy_metas) | set(self.deferred) | set(self.deferred_headers)
        names = {d for r in metas for d in meta_names(r.meta)}
        self._zeros = dict.fromkeys((n for n in names if n not in lazy), 0)

    def _scan(self, rule: Rule) -> _Scan:
        flags = self.rs.tflags.get(rule.name, set())
        parsed = rule.parsed
        per_unit = False
        extra = 0
        nosubject = rule.kind == "body" and "nosubject" in flags
        if rule.kind in _CHUNK_KINDS:
            per_unit = True
        elif rule.kind in _UNIT_KINDS:
            per_unit = (bool(parsed.flags & re.DOTALL) or b"\\A" in parsed.source or b"\\Z" in parsed.source
                        or nosubject)  # the joined text starts with the Subject
            extra = re.MULTILINE  # ^ and $ at each paragraph (line, URI) of the joined text
        if parsed.tree is None:
            parsed.reparse()
        if rule.needles is None:
            rule.needles = tree_needles(parsed.tree)
        regex, on_lower = optimise_parsed(parsed, top_guard=rule.kind != "header", extra_flags=extra)
        return _Scan(rule, regex, rule.needles, "multiple" in flags,
                     self.rs.maxhits.get(rule.name, 0), per_unit, on_lower=on_lower, nosubject=nosubject)

    def _build_prefilters(self) -> None:
        """One Hyperscan pass per kind of text instead of a regex scan per rule.

        Scans that see one unit at a time (``\\A``, ``/s``) are left out: on
        the joined text their prefilter answer could be a miss.
        """
        by_kind: dict[str, list[_Scan]] = {k: list(v) for k, v in self.scans.items()}
        for kind, scan in self.deferred.values():
            by_kind[kind].append(scan)
        for kind, scans in by_kind.items():
            eligible = [s for s in scans if kind in ("full",) + _CHUNK_KINDS or not s.per_unit]
            if not eligible:
                continue
            extra = re.MULTILINE if kind in _UNIT_KINDS and kind not in _CHUNK_KINDS else 0
            pf = prefilter.build((prefilter.Pattern(s.rule.name, s.rule.parsed.source, s.rule.parsed.flags | extra)
                                  for s in eligible), self.cache_dir)
            if pf is None:
                log.info("rules prefilter off: the hyperscan module is not available")
                return
            for s in eligible:
                s.prefiltered = s.rule.name in pf.covered
            self.prefilters[kind] = pf

    def _compile_metas(self, metas: list[Rule]):
        by_name = {r.name: r for r in metas}
        order: list[Rule] = []
        state: dict[str, int] = {}

        def visit(r: Rule, path: list[str]) -> bool:
            s = state.get(r.name)
            if s == 2:
                return True
            if s == 1:
                return False  # a cycle
            state[r.name] = 1
            for dep in meta_names(r.meta):
                d = by_name.get(dep)
                if d is not None and not visit(d, path + [r.name]):
                    state[r.name] = 2
                    self._skip(r, f"meta: circular dependency through {dep}")
                    return False
            state[r.name] = 2
            order.append(r)
            return True

        for r in metas:
            visit(r, [])
        order = [r for r in order if r.name in self.rs.rules]  # cycles removed above
        meta_of = {r.name: r for r in order}
        expensive: dict[str, bool] = {}

        def costly(name: str) -> bool:
            if name not in expensive:
                expensive[name] = False
                if name in self.deferred:
                    expensive[name] = True
                elif name in meta_of:
                    expensive[name] = any(costly(d) for d in meta_names(meta_of[name].meta))
            return expensive[name]

        # lazy metas: one function each, called when a rule reads the name;
        # scored metas: one function for all, in dependency order (no call per rule)
        lazy = [r for r in order if r.name.startswith("__") or not self._runs.get(r.name)]
        eager = [r for r in order if not (r.name.startswith("__") or not self._runs.get(r.name))]
        lines = []
        for i, r in enumerate(lazy):
            body = _meta_python(r.meta, costly)
            lines += [f"def _m{i}(h):"] + _guarded_return(body, "/" in r.meta)
        lines.append("def _eager(h):")
        for r in eager:
            body = _meta_python(r.meta, costly)
            if "/" in r.meta:
                lines += ["    try:", f"        h[{r.name!r}] = 1 if ({body}) else 0",
                          "    except ZeroDivisionError:", f"        h[{r.name!r}] = 0"]
            else:
                lines.append(f"    h[{r.name!r}] = 1 if ({body}) else 0")
        lines.append("    return h")
        namespace: dict = {}
        exec(compile("\n".join(lines), "<sa meta rules>", "exec"), namespace)  # from checked tokens
        self.lazy_metas = {r.name: namespace[f"_m{i}"] for i, r in enumerate(lazy)}
        self.eager_metas = namespace["_eager"]
        self.eager_meta_names = [r.name for r in eager]
        self.meta_count = len(order)
        return None

    def _skip(self, rule: Rule, reason: str) -> None:
        self.rs.rules.pop(rule.name, None)
        self.rs.skipped[rule.name] = Skipped(rule.name, rule.kind, rule.source, reason, regex=False)

    # --- run -------------------------------------------------------------------

    def run(self, view, ctx: Optional[evals.EvalContext] = None) -> dict[str, int]:
        """Rule name -> hit count (0 entries omitted except for metas)."""
        if ctx is None:
            ctx = evals.EvalContext(view)
        ctx.rbl_sets = self.rbl_sets
        ctx.lists = {**self.rs.lists, **ctx.lists}
        hits = _Hits(self, view)
        hits.update(self._zeros)
        self._run_headers(view, hits)
        units = {
            "body": lambda: view.body_lines,
            "rawbody": lambda: view.rawbody_chunks,
            "uri": lambda: [u.encode("utf-8", "surrogateescape") for u in view.uris],
            "full": lambda: [view.full_text],
        }
        texts = {
            "body": lambda: view.body_text,
            "rawbody": lambda: view.rawbody_text,
            "uri": lambda: view.uri_text,
            "full": lambda: view.full_text,
        }
        hits.texts, hits.units = texts, units
        for kind, scans in self.scans.items():
            if scans:
                self._run_kind(kind, scans, texts[kind](), units[kind], hits)
        for rule in self.evals:
            try:
                n = evals.run(ctx, rule.eval)
            except Exception as e:  # a bug in one eval must not cost the others
                log.warning("rule=%s eval=%s error=%r", rule.name, rule.eval[0], e)
                continue
            if n:
                hits[rule.name] = int(n)
        self.eager_metas(hits)
        return {k: v for k, v in hits.items() if v}

    def _header_deferred(self, scan: _Scan, hits: "_Hits") -> int:
        for h in scan.rule.headers:
            value, value_low = hits.header_of(h, scan.rule.modifier)
            if _header_match(scan, value, value_low):
                return 1
        return 0

    def _count_deferred(self, kind: str, scan: _Scan, hits: "_Hits") -> int:
        text = hits.text_of(kind)
        if not text:
            return 0
        if scan.prefiltered and scan.rule.name not in hits.candidates_of(kind):
            return 0
        if scan.needles is not None:
            low = hits.low_of(kind)
            if not any(map(low.__contains__, scan.needles)):
                return 0
        if scan.per_unit and kind != "full":
            return _count_units(scan, _skip_subject(scan, hits.units_of(kind, scan.on_lower), hits.view))
        n = _count_joined(scan, hits.low_of(kind) if scan.on_lower else text, kind)
        if n < 0:
            n = _count_units(scan, hits.units_of(kind, scan.on_lower))
        return n

    def _run_headers(self, view, hits) -> None:
        for (header, modifier), scans in self.headers.items():
            value, value_low = hits.header_of(header, modifier)
            for scan in scans:
                if _header_match(scan, value, value_low):
                    hits[scan.rule.name] = 1
        for rule in self.exists:
            if any(view.header_values(h, raw=True) for h in rule.headers):
                hits[rule.name] = 1
        if self.mimeheaders:
            for scan in self.mimeheaders:
                raw = "raw" in scan.rule.modifier
                for h in scan.rule.headers:
                    values = view.mime_header(h, raw)
                    if scan.on_lower:
                        values = [v.lower() for v in values]
                    if any(scan.regex.search(v) for v in values) != scan.rule.negate:
                        hits[scan.rule.name] = 1
                        break

    @staticmethod
    def _run_kind(kind: str, scans: list[_Scan], text: bytes, units, hits) -> None:
        if not text:
            return
        candidates = hits.candidates_of(kind)
        low = text.lower()
        unit_lists: dict[bool, list] = {}

        def unit_list(lower: bool) -> list:
            if lower not in unit_lists:
                unit_lists[lower] = [u.lower() for u in units()] if lower else units()
            return unit_lists[lower]

        for scan in scans:
            if scan.prefiltered and scan.rule.name not in candidates:
                continue
            needles = scan.needles
            if needles is not None:
                if len(needles) == 1:
                    if needles[0] not in low:
                        continue
                elif not any(map(low.__contains__, needles)):
                    continue
            if scan.per_unit and kind != "full":
                n = _count_units(scan, _skip_subject(scan, unit_list(scan.on_lower), hits.view))
            else:
                n = _count_joined(scan, low if scan.on_lower else text, kind)
                if n < 0:
                    n = _count_units(scan, unit_list(scan.on_lower))
            if n:
                hits[scan.rule.name] = n


class _Hits(dict):
    """Hit counts of one message.

    A name not computed yet is looked up on first use: a lazy meta rule is
    evaluated, a deferred sub-rule is run; anything else (a rule that did not
    hit, a skipped rule) is 0.  Meta rules short-circuit (``&&`` stops at the
    first false operand, cheap operands first), so an expensive sub-rule runs
    only when its answer can change a scored rule.
    """

    def __init__(self, engine: "Engine", view):
        super().__init__()
        self.engine = engine
        self.view = view
        self.texts: dict = {}
        self.units: dict = {}
        self._cache: dict = {}

    def text_of(self, kind: str) -> bytes:
        key = ("text", kind)
        if key not in self._cache:
            self._cache[key] = self.texts[kind]()
        return self._cache[key]

    def candidates_of(self, kind: str) -> set:
        """Rules of ``kind`` the prefilter says may match (empty without one)."""
        key = ("candidates", kind)
        if key not in self._cache:
            pf = self.engine.prefilters.get(kind)
            text = self.text_of(kind)
            if pf is None or not text:
                self._cache[key] = set()
            elif kind in _CHUNK_KINDS:  # each chunk alone, as its rules see it
                found: set = set()
                for unit in self.units_of(kind, False):
                    found |= pf.candidates(unit)
                self._cache[key] = found
            else:
                self._cache[key] = pf.candidates(text)
        return self._cache[key]

    def low_of(self, kind: str) -> bytes:
        key = ("low", kind)
        if key not in self._cache:
            self._cache[key] = self.text_of(kind).lower()
        return self._cache[key]

    def units_of(self, kind: str, lower: bool) -> list:
        key = ("units", kind, lower)
        if key not in self._cache:
            units = self.units[kind]()
            self._cache[key] = [u.lower() for u in units] if lower else units
        return self._cache[key]

    def header_of(self, name: str, modifier: str) -> tuple:
        key = ("h", name, modifier)
        if key not in self._cache:
            value = self.view.header(name, modifier)
            self._cache[key] = (value, value.lower() if value is not None else None)
        return self._cache[key]

    def __missing__(self, key):
        engine = self.engine
        fn = engine.lazy_metas.get(key)
        if fn is not None:
            self[key] = 0  # cycles were removed; this only guards against surprises
            value = self[key] = fn(self)
            return value
        scan = engine.deferred_headers.get(key)
        if scan is not None:
            value = self[key] = engine._header_deferred(scan, self)
            return value
        deferred = engine.deferred.get(key)
        if deferred is not None:
            value = self[key] = engine._count_deferred(deferred[0], deferred[1], self)
            return value
        return 0


def _skip_subject(scan: _Scan, units, view):
    """Body units less the Subject (the first paragraph when there is one)
    for ``tflags nosubject`` rules, as Check.pm skips the first body line."""
    if scan.nosubject and view.subject:
        return units[1:]
    return units


def _header_match(scan: _Scan, value, value_low) -> bool:
    if value is None:
        value = scan.rule.if_unset if scan.rule.if_unset is not None else b""
        value_low = value.lower()
    if scan.needles is not None and not scan.rule.negate:
        if not any(map(value_low.__contains__, scan.needles)):
            return False
    found = scan.regex.search(value_low if scan.on_lower else value) is not None
    return found != scan.rule.negate


def _crosses(match: re.Match, kind: str) -> bool:
    if kind == "full":
        return False
    return b"\n" in match.group(0)


def _count_joined(scan: _Scan, text: bytes, kind: str) -> int:
    """Hits on the joined text; -1 when a match crossed units (recheck per unit)."""
    if not scan.multiple:
        m = scan.regex.search(text)
        if m is None:
            return 0
        return -1 if _crosses(m, kind) else 1
    n = 0
    for m in scan.regex.finditer(text):
        if _crosses(m, kind):
            return -1
        n += 1
        if scan.maxhits and n >= scan.maxhits:
            break
    return n


def _count_units(scan: _Scan, units) -> int:
    n = 0
    for u in units:
        if scan.multiple:
            for _ in scan.regex.finditer(u):
                n += 1
                if scan.maxhits and n >= scan.maxhits:
                    return n
        elif scan.regex.search(u):
            return 1
    return n


_META_TOK = re.compile(r"([A-Za-z_]\w*)|(\d+(?:\.\d+)?)|(&&|\|\||==|!=|>=|<=|[-+*/<>()!])")


def _meta_python(expr: str, costly=None) -> str:
    """Perl meta expression -> Python, ``!`` bound to its operand as in Perl.

    When the whole expression is a chain of ``&&`` (nothing looser, no
    ``||``, at the top level), the operands are put cheap first: the result
    is only used as true/false, and Python's ``and`` stops at the first
    false operand, so costly sub-rules are often never run.
    """
    toks = [m.group(0) for m in _META_TOK.finditer(expr)]
    if costly is not None:
        parts: list[list[str]] = [[]]
        depth = 0
        splittable = True
        for t in toks:
            if t == "(":
                depth += 1
            elif t == ")":
                depth -= 1
            if depth == 0 and t == "||":
                splittable = False
                break
            if depth == 0 and t == "&&":
                parts.append([])
            else:
                parts[-1].append(t)
        if splittable and len(parts) > 1 and all(parts):
            def cost(part):
                return 1 if any(costly(t) for t in part if t[0].isalpha() or t[0] == "_") else 0
            parts.sort(key=cost)
            return " and ".join("(" + _operand_python(p) + ")" for p in parts)
    return _operand_python(toks)


def _operand_python(toks: list[str]) -> str:
    out: list[str] = []
    pending_not: list[int] = []  # '!' waiting for their operand, as open-paren depth marks
    depth = 0

    def operand_done():
        while pending_not and pending_not[-1] == depth:
            pending_not.pop()
            out.append("))")

    for t in toks:
        if t == "!":
            out.append(" (not (")
            pending_not.append(depth)
        elif t == "(":
            out.append("(")
            depth += 1
        elif t == ")":
            out.append(")")
            depth -= 1
            operand_done()
        elif t[0].isalpha() or t[0] == "_":
            out.append(f"h[{t!r}]")
            operand_done()
        elif t[0].isdigit():
            out.append(t)
            operand_done()
        else:
            out.append({"&&": " and ", "||": " or "}.get(t, f" {t} "))
    out.extend("))" * len(pending_not))
    return "".join(out)


def _guarded_return(body: str, divides: bool) -> list[str]:
    if not divides:
        return [f"    return 1 if ({body}) else 0"]
    return ["    try:", f"        return 1 if ({body}) else 0", "    except ZeroDivisionError:", "        return 0"]


def hits_report(engine: Engine, hits: dict[str, int], score_set: Optional[int] = None) -> list[Hit]:
    """The hits worth reporting: scored (in ``score_set``, default the
    engine's), not ``__`` sub-rules, not owned by another check."""
    scores = engine.scores if score_set is None else engine.set_scores[score_set]
    out = []
    for name in sorted(hits):
        if name.startswith("__") or name in engine.owned_elsewhere:
            continue
        score = scores.get(name, 0.0)
        if score == 0:
            continue
        out.append(Hit(name, score, hits[name], engine.rs.describes.get(name, "")))
    return out
