"""Perl regular expressions, as SpamAssassin rule files write them, turned
into Python ``re`` patterns.

``parse_literal`` splits ``/pattern/flags`` (or ``m{pattern}flags``,
``m!pattern!``...) into its parts; ``translate`` rewrites the Perl-only
constructs that have a Python equivalent (``\\z``, ``\\h``, ``\\x{263a}``,
POSIX classes, ``(?<name>``, inline flags in mid-pattern...) and raises
``Unsupported`` for the ones that have none (``\\K``, recursion, embedded
code, ``\\p{..}`` properties we do not map); ``compile_perl`` does both and
compiles.  ``needles`` finds literal strings a pattern cannot match without,
so the engine can skip a regex when none of them is in the text.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Optional

try:  # Python 3.11+
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _sre_c  # type: ignore
    import sre_parse as _sre_parse  # type: ignore


class Unsupported(ValueError):
    """A Perl construct with no Python equivalent (the rule is skipped)."""


_PAIRS = {"{": "}", "(": ")", "[": "]", "<": ">"}

_POSIX = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
    "space": r" \t\n\r\f\v", "blank": r" \t", "punct": r"!-/:-@\[-`{-~", "xdigit": "0-9A-Fa-f",
    "word": r"\w", "cntrl": r"\x00-\x1f\x7f", "print": r"\x20-\x7e", "graph": r"\x21-\x7e",
    "ascii": r"\x00-\x7f",
}

# Perl escapes whose Python spelling differs (outside a character class)
_ESCAPES = {
    "z": r"\Z",
    "Z": r"(?=\n?\Z)",
    "h": r"[ \t]",
    "H": r"[^ \t]",
    "v": r"[\n\x0b\f\r]",
    "V": r"[^\n\x0b\f\r]",
    "R": r"(?:\r\n|[\n\x0b\f\r])",
    "e": r"\x1b",
    "N": r"[^\n]",
}
_CLASS_ESCAPES = {"h": r" \t", "v": r"\n\x0b\f\r", "e": r"\x1b"}
_PROPS = {  # the Unicode properties rule writers use, approximated
    "L": r"^\W\d_", "Letter": r"^\W\d_", "Alpha": r"^\W\d_", "Alphabetic": r"^\W\d_",
    "N": r"\d", "Digit": r"\d", "Nd": r"\d", "Word": r"\w", "Space": r"\s", "XPosixSpace": r"\s",
}
_UNSUPPORTED_ESCAPES = {
    "K": "\\K (keep) has no Python equivalent",
    "G": "\\G (end of previous match) has no Python equivalent",
    "X": "\\X (grapheme cluster) has no Python equivalent",
    "C": "\\C (single byte) has no Python equivalent",
    "l": "\\l case modification", "u": "\\u case modification", "L": "\\L case modification",
    "U": "\\U case modification",
}
_PY_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


def parse_literal(text: str) -> tuple[str, str]:
    """'/foo/i' or 'm{foo}i' -> ('foo', 'i').  Raises ValueError if malformed."""
    s = text.strip()
    if s.startswith("m") and len(s) > 1 and not s[1].isalnum() and not s[1].isspace():
        s = s[1:]
    if not s:
        raise ValueError("empty pattern")
    open_ = s[0]
    if open_.isalnum() or open_.isspace() or open_ == "\\":
        raise ValueError(f"expected /pattern/ or m{{pattern}}, got {text[:40]!r}")
    close = _PAIRS.get(open_, open_)
    depth = 0
    i = 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == close and depth == 0:
            flags = s[i + 1:].strip()
            if not re.fullmatch(r"[a-zA-Z]*", flags):
                raise ValueError(f"unexpected text after the pattern: {flags[:40]!r}")
            return s[1:i], flags
        if close != open_:
            if c == open_:
                depth += 1
            elif c == close:
                depth -= 1
        i += 1
    raise ValueError(f"unterminated pattern {text[:40]!r}")


def python_flags(perl_flags: str) -> int:
    flags = 0
    for f in perl_flags:
        if f in _PY_FLAGS:
            flags |= _PY_FLAGS[f]
        elif f == "e":
            raise Unsupported("the /e modifier (code) is not a pattern")
        # g, o, a, u, l, d, n, p change nothing that matters for a match test
    return flags


def _hexchar(code: int, in_class: bool = False) -> str:
    """A code point as escaped bytes: rules match UTF-8 bytes, as in SpamAssassin."""
    if code < 0x100:
        return f"\\x{code:02x}"
    if in_class:
        raise Unsupported("a character above \\xff inside a class (patterns match bytes)")
    return "(?:" + "".join(f"\\x{b:02x}" for b in chr(code).encode("utf-8")) + ")"


def translate(pattern: str) -> str:
    """Perl pattern text -> Python pattern text (raises Unsupported)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    # one entry per open group: how many extra ')' to emit when it closes,
    # and the inline flags in force since a mid-pattern (?i)
    groups: list[list] = [[0, ""]]
    in_class = False
    class_start = 0

    def close_scoped(level):
        out.append(")" * level[0])
        level[0] = 0

    while i < n:
        c = pattern[i]
        if in_class:
            if c == "\\" and i + 1 < n:
                e = pattern[i + 1]
                if e in _CLASS_ESCAPES:
                    out.append(_CLASS_ESCAPES[e])
                    i += 2
                    continue
                if e == "x" and i + 2 < n and pattern[i + 2] == "{":
                    code, i = _braced_code(pattern, i, 16)
                    out.append(_hexchar(code, in_class=True))
                    continue
                if e in "pP":
                    prop, i2 = _property(pattern, i + 2)
                    body = _PROPS.get(prop)
                    if body is None or e == "P" or body.startswith("^"):
                        raise Unsupported(f"\\{e}{{{prop}}} inside a class")
                    out.append(body)
                    i = i2
                    continue
                if e.isalpha() and e not in "dDsSwWbnrtfaux0" and not e.isdigit():
                    if e == "N":
                        raise Unsupported("\\N inside a class")
                    out.append(re.escape(e))  # Perl ignores unknown letter escapes
                    i += 2
                    continue
                out.append(pattern[i:i + 2])
                i += 2
                continue
            if c == "[":
                m = re.match(r"\[:(\^?)(\w+):\]", pattern[i:])
                if m:
                    body = _POSIX.get(m.group(2))
                    if body is None:
                        raise Unsupported(f"POSIX class [:{m.group(2)}:]")
                    if m.group(1):
                        raise Unsupported("negated POSIX class inside a class")
                    out.append(body)
                    i += m.end()
                    continue
                out.append(r"\[")
                i += 1
                continue
            if c == "]" and i > class_start:
                in_class = False
                out.append("]")
                i += 1
                continue
            if c in "&~|-" and i + 1 < n and pattern[i + 1] == c:
                out.append("\\" + c)  # Python warns about set operations it may add
                i += 1
                continue
            out.append(c)
            i += 1
            continue

        if c == "\\":
            if i + 1 >= n:
                raise Unsupported("trailing backslash")
            e = pattern[i + 1]
            if e in _UNSUPPORTED_ESCAPES:
                raise Unsupported(_UNSUPPORTED_ESCAPES[e])
            if e == "Q":
                j = pattern.find("\\E", i + 2)
                lit = pattern[i + 2:] if j < 0 else pattern[i + 2:j]
                out.append(re.escape(lit))
                i = n if j < 0 else j + 2
                continue
            if e == "E":
                i += 2
                continue
            if e == "N" and i + 2 < n and pattern[i + 2] == "{":
                raise Unsupported("\\N{...} named characters")
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
                continue
            if e == "x" and i + 2 < n and pattern[i + 2] == "{":
                code, i = _braced_code(pattern, i, 16)
                out.append(_hexchar(code))
                continue
            if e == "c" and i + 2 < n:
                out.append(_hexchar(ord(pattern[i + 2].upper()) ^ 64))
                i += 3
                continue
            if e == "o" and i + 2 < n and pattern[i + 2] == "{":
                code, i = _braced_code(pattern, i, 8)
                out.append(_hexchar(code))
                continue
            if e in "pP":
                prop, i2 = _property(pattern, i + 2)
                body = _PROPS.get(prop)
                if body is None:
                    raise Unsupported(f"Unicode property \\{e}{{{prop}}}")
                if body.startswith("^"):
                    out.append(f"[{body}]" if e == "p" else f"[{body[1:]}_\\d]")
                else:
                    out.append(f"[{body}]" if e == "p" else f"[^{body}]")
                i = i2
                continue
            if e in "kg":
                m = re.match(r"\\[kg](?:\{(-?\w+)\}|<(\w+)>|'(\w+)'|(-?\d+))", pattern[i:])
                if not m:
                    raise Unsupported(f"\\{e} reference")
                ref = next(g for g in m.groups() if g is not None)
                if ref.startswith("-"):
                    raise Unsupported("relative back-reference")
                out.append(f"\\{ref}" if ref.isdigit() else f"(?P={ref})")
                i += m.end()
                continue
            if e.isalpha() and e not in "dDsSwWbBAnrtfaux0":
                out.append(re.escape(e))  # Perl: unknown letter escape is the letter
                i += 2
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue

        if c == "[":
            in_class = True
            out.append("[")
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            class_start = i
            if i < n and pattern[i] == "]":
                out.append(r"\]")
                i += 1
            continue

        if c == "(":
            if pattern.startswith("(?", i):
                rest = pattern[i + 2:]
                if rest.startswith(("{", "?{", "??{", "R)", "&", "|", "P>", "+", "-1", "0)")) or (
                    rest[:1].isdigit()
                ):
                    raise Unsupported("recursion, branch reset or embedded code")
                if rest.startswith("#"):
                    j = pattern.find(")", i)
                    i = n if j < 0 else j + 1
                    continue
                m = re.match(r"<(\w+)>|'(\w+)'|P<(\w+)>", rest)
                if m and not rest.startswith(("<=", "<!")):
                    out.append(f"(?P<{m.group(1) or m.group(2) or m.group(3)}>")
                    groups.append([0, ""])
                    i += 2 + m.end()
                    continue
                m = re.match(r"(\^?)([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])", rest)
                if m:
                    caret, on, off, end = m.group(1), m.group(2), m.group(3) or "", m.group(4)
                    on = "".join(f for f in on if f in "imsx")
                    off = "".join(f for f in off if f in "imsx" and f not in on)
                    if caret:
                        off = "".join(f for f in "imsx" if f not in on)
                    spec = on + ("-" + off if off else "")
                    if end == ":":
                        out.append(f"(?{spec}:" if spec else "(?:")
                        groups.append([0, ""])
                        i += 2 + m.end()
                        continue
                    # (?i) in mid-pattern: Python wants it scoped
                    if spec:
                        if not "".join(out).strip() and not off:
                            out.insert(0, f"(?{on})")
                        else:
                            out.append(f"(?{spec}:")
                            groups[-1][0] += 1
                            groups[-1][1] += f"(?{spec}:"
                    i += 2 + m.end()
                    continue
            groups.append([0, ""])
            out.append("(")
            i += 1
            continue

        if c == ")":
            if len(groups) > 1:
                close_scoped(groups.pop())
            out.append(")")
            i += 1
            continue

        if c == "|" and groups[-1][0]:
            reopen = groups[-1][1]
            close_scoped(groups[-1])
            out.append("|")
            out.append(reopen)
            groups[-1][0] = reopen.count("(")
            i += 1
            continue

        if c == "$" and i + 1 < n and pattern[i + 1] in "{" and pattern[i + 2:i + 3].isalpha():
            raise Unsupported("variable interpolation")
        out.append(c)
        i += 1

    if in_class:
        raise Unsupported("unterminated character class")
    for level in reversed(groups):
        close_scoped(level)
    return "".join(out)


def _braced_code(pattern: str, i: int, base: int) -> tuple[int, int]:
    """``\\x{HH}`` or ``\\o{OOO}`` at ``i`` -> (character code, index after it)."""
    j = pattern.find("}", i + 3)
    if j < 0:
        raise Unsupported(f"unterminated \\{pattern[i + 1]}{{...}}")
    try:
        return int(pattern[i + 3:j] or "0", base), j + 1
    except ValueError:
        raise Unsupported(f"bad number in \\{pattern[i + 1]}{{{pattern[i + 3:j]}}}") from None


def _property(pattern: str, i: int) -> tuple[str, int]:
    if i < len(pattern) and pattern[i] == "{":
        j = pattern.find("}", i)
        if j < 0:
            raise Unsupported("unterminated \\p{...}")
        return pattern[i + 1:j].strip().removeprefix("Is").removeprefix("Posix"), j + 1
    return pattern[i:i + 1], i + 1


def compile_perl(pattern: str, perl_flags: str = "", extra_flags: int = 0) -> re.Pattern:
    """Translate and compile to a bytes pattern; raises Unsupported with the reason.

    ``pattern`` holds one character per byte of the rule file (read as
    latin-1), so a UTF-8 sequence written literally in a rule matches the
    same bytes in the message, as it does in SpamAssassin.
    """
    flags = python_flags(perl_flags) | extra_flags
    text = translate(pattern)
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return re.compile(raw, flags)
        except re.error as e:
            raise Unsupported(f"Python re: {e.msg}") from None
        except (OverflowError, RecursionError, ValueError) as e:
            raise Unsupported(f"Python re: {e}") from None


# --- literal pre-filter ----------------------------------------------------

MIN_NEEDLE = 3
MAX_NEEDLES = 80


def needles(compiled: re.Pattern) -> Optional[tuple[bytes, ...]]:
    """Lower-case byte strings at least one of which any match must contain.

    None when no such set was found (the regex must always run).  Checked
    against lower-cased text, so case-insensitive patterns qualify too.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = _sre_parse.parse(compiled.pattern, compiled.flags & ~re.DEBUG)
    except Exception:
        return None
    found = _required(list(tree))
    if not found or min(len(s) for s in found) < MIN_NEEDLE or len(found) > MAX_NEEDLES:
        return None
    return tuple(sorted({f.encode("latin-1") for f in found}))


def _score(alts: list[str]) -> tuple:
    return (min(len(a) for a in alts), -len(alts))


def _required(items: list) -> Optional[list[str]]:
    candidates: list[list[str]] = []
    run: list[str] = []

    def flush():
        if run:
            # bytes.lower() folds ASCII only, like a bytes pattern's IGNORECASE
            candidates.append(["".join(run).encode("latin-1").lower().decode("latin-1")])
            run.clear()

    for op, av in items:
        if op is _sre_c.LITERAL:
            run.append(chr(av))
            continue
        flush()
        sub = None
        if op is _sre_c.SUBPATTERN:
            sub = _required(list(av[-1]))
        elif op is _sre_c.ATOMIC_GROUP:
            sub = _required(list(av))
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", None)):
            if av[0] >= 1:
                sub = _required(list(av[2]))
        elif op is _sre_c.BRANCH:
            alts: list[str] = []
            for alt in av[1]:
                r = _required(list(alt))
                if not r:
                    alts = []
                    break
                alts.extend(r)
            sub = alts or None
        elif op is _sre_c.ASSERT and av[0] == 1:
            sub = _required(list(av[1]))
        if sub:
            candidates.append(sub)
    flush()
    if not candidates:
        return None
    return max(candidates, key=_score)


# --- first-byte guard --------------------------------------------------------

_ALL = frozenset(range(256))
_DIGIT = frozenset(range(0x30, 0x3a))
_SPACE = frozenset(b" \t\n\r\f\v")
_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_CATEGORIES = {
    "CATEGORY_DIGIT": _DIGIT, "CATEGORY_NOT_DIGIT": _ALL - _DIGIT,
    "CATEGORY_SPACE": _SPACE, "CATEGORY_NOT_SPACE": _ALL - _SPACE,
    "CATEGORY_WORD": _WORD, "CATEGORY_NOT_WORD": _ALL - _WORD,
}


def _fold(codes: set, icase: bool) -> set:
    if not icase:
        return codes
    out = set(codes)
    for c in codes:
        ch = bytes([c])
        out.add(ch.lower()[0])
        out.add(ch.upper()[0])
    return out


def _in_set(items) -> Optional[set]:
    out: set = set()
    negate = False
    for op, av in items:
        if op is _sre_c.NEGATE:
            negate = True
        elif op is _sre_c.LITERAL:
            out.add(av)
        elif op is _sre_c.RANGE:
            out.update(range(av[0], min(av[1], 255) + 1))
        elif op is _sre_c.CATEGORY:
            s = _CATEGORIES.get(str(av))
            if s is None:
                return None
            out |= s
        else:
            return None
    return set(_ALL - out) if negate else out


def _first(items: list, icase: bool) -> tuple[Optional[set], bool]:
    """(bytes a match of this sequence can start with, can it match empty)."""
    acc: set = set()
    for op, av in items:
        if op in (_sre_c.AT, _sre_c.ASSERT, _sre_c.ASSERT_NOT):
            continue  # zero width
        if op is _sre_c.LITERAL:
            return acc | _fold({av}, icase), False
        if op is _sre_c.IN:
            s = _in_set(av)
            if s is None:
                return None, False
            return acc | _fold(s, icase), False
        if op is _sre_c.SUBPATTERN:
            s, nullable = _first(list(av[-1]), icase or bool(int(av[1]) & 2))
        elif op is _sre_c.ATOMIC_GROUP:
            s, nullable = _first(list(av), icase)
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", None)):
            s, nullable = _first(list(av[2]), icase)
            nullable = nullable or av[0] == 0
        elif op is _sre_c.BRANCH:
            s, nullable = set(), False
            for alt in av[1]:
                a, n = _first(list(alt), icase)
                if a is None:
                    return None, False
                s |= a
                nullable = nullable or n
        else:
            return None, False  # ANY, NOT_LITERAL, GROUPREF...
        if s is None:
            return None, False
        acc |= s
        if not nullable:
            return acc, False
    return acc, True


_LOWER = bytes(range(256)).lower()
_ICASE = int(re.IGNORECASE)
_SUBPATTERN = _sre_c.SUBPATTERN
_BRANCH = _sre_c.BRANCH
_REPEATS = (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, getattr(_sre_c, "POSSESSIVE_REPEAT", None))


class _CannotLower(Exception):
    pass


def _sub(p, data):
    return _sre_parse.SubPattern(p.state, data)


def _lower_tree(p):
    """A copy of the tree matching lower-cased text case-sensitively."""
    out = []
    for op, av in p.data:
        if op in (_sre_c.LITERAL, _sre_c.NOT_LITERAL):
            out.append((op, _LOWER[av]))
        elif op is _sre_c.IN:
            items = []
            for iop, iav in av:
                if iop is _sre_c.LITERAL:
                    items.append((iop, _LOWER[iav]))
                elif iop is _sre_c.RANGE:
                    items.append((iop, iav))
                    a, b = max(iav[0], 0x41), min(iav[1], 0x5A)
                    if a <= b:
                        items.append((iop, (a + 32, b + 32)))
                else:
                    items.append((iop, iav))
            out.append((op, items))
        elif op is _sre_c.SUBPATTERN:
            group, add_flags, del_flags, sp = av
            if int(del_flags) & _ICASE:
                raise _CannotLower()
            out.append((op, (group, int(add_flags) & ~_ICASE, del_flags, _lower_tree(sp))))
        elif op in _REPEATS:
            out.append((op, (av[0], av[1], _lower_tree(av[2]))))
        elif op is _sre_c.BRANCH:
            out.append((op, (av[0], [_lower_tree(alt) for alt in av[1]])))
        elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            out.append((op, (av[0], _lower_tree(av[1]))))
        elif op is _sre_c.ATOMIC_GROUP:
            out.append((op, _lower_tree(av)))
        elif op is _sre_c.GROUPREF_EXISTS:
            group, yes, no = av
            out.append((op, (group, _lower_tree(yes), _lower_tree(no) if no is not None else None)))
        elif op in (_sre_c.AT, _sre_c.ANY, _sre_c.GROUPREF, _sre_c.CATEGORY):
            out.append((op, av))
        else:
            raise _CannotLower()
    return _sub(p, out)


MIN_BRANCH_GUARD = 3


def _guard_node(first: set, p):
    items = [(_sre_c.LITERAL, c) for c in sorted(first)]
    return (_sre_c.ASSERT, (1, _sub(p, [(_sre_c.IN, items)])))


def _guarded_tree(p, icase: bool, depth: int = 0):
    """The tree with a first-byte lookahead before each big alternation
    (a copy where something changed, ``p`` itself otherwise)."""
    if depth > 50:
        return p
    data = []
    changed = False
    for op, av in p.data:
        if op is _SUBPATTERN:
            sub = _guarded_tree(av[3], icase or bool(int(av[1]) & _ICASE), depth + 1)
            if sub is not av[3]:
                av, changed = (av[0], av[1], av[2], sub), True
        elif op in _REPEATS:
            sub = _guarded_tree(av[2], icase, depth + 1)
            if sub is not av[2]:
                av, changed = (av[0], av[1], sub), True
        elif op is _BRANCH:
            alts = [_guarded_tree(alt, icase, depth + 1) for alt in av[1]]
            if any(a is not b for a, b in zip(alts, av[1])):
                av, changed = (av[0], alts), True
            # a leading alternation of the whole pattern is already pre-scanned by sre
            if len(av[1]) >= MIN_BRANCH_GUARD and not (depth == 0 and not data):
                first, nullable = _first([(op, av)], icase)
                if first and not nullable and len(first) <= 160:
                    data.append(_guard_node(first, p))
                    changed = True
        elif op is _sre_c.ATOMIC_GROUP:
            sub = _guarded_tree(av, icase, depth + 1)
            if sub is not av:
                av, changed = sub, True
        data.append((op, av))
    return _sub(p, data) if changed else p


def _compile_tree(tree, flags: int) -> re.Pattern:
    try:
        from re import _compiler as _sre_compile
    except ImportError:  # pragma: no cover
        import sre_compile as _sre_compile  # type: ignore
    return _sre_compile.compile(tree, flags)


@dataclass
class Parsed:
    """A translated pattern, parsed once: compiled for checking, kept as a
    tree for the pre-filter and the optimised form."""

    source: bytes
    flags: int
    tree: object  # None once an engine is built (see Parsed.reparse)

    def reparse(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tree = _sre_parse.parse(self.source, self.flags)


def parse_perl(pattern: str, perl_flags: str = "") -> Parsed:
    """Translate, parse and test-compile once; raises Unsupported."""
    flags = python_flags(perl_flags)
    text = translate(pattern)
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tree = _sre_parse.parse(raw, flags)
            _compile_tree(tree, flags)  # some errors (look-behind width) only show here
        except re.error as e:
            raise Unsupported(f"Python re: {e.msg}") from None
        except (OverflowError, RecursionError, ValueError, TypeError) as e:
            raise Unsupported(f"Python re: {e}") from None
    return Parsed(raw, flags | tree.state.flags, tree)


def tree_needles(tree) -> Optional[tuple[bytes, ...]]:
    found = _required(list(tree.data))
    if not found or min(len(s) for s in found) < MIN_NEEDLE or len(found) > MAX_NEEDLES:
        return None
    return tuple(sorted({f.encode("latin-1") for f in found}))


def optimise_parsed(parsed: Parsed, top_guard: bool = True, extra_flags: int = 0) -> tuple[re.Pattern, bool]:
    """(pattern, runs on lower-cased text): the same matches, found faster.

    A ``/i`` pattern becomes a case-sensitive one for lower-cased text
    (Python skips alternatives by their first literal, and scans for a
    literal prefix, only without IGNORECASE); big alternations and the
    pattern itself get a lookahead on the bytes they can start with.
    """
    flags = parsed.flags | extra_flags
    tree = parsed.tree
    on_lower = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if flags & re.IGNORECASE:
                try:
                    tree = _lower_tree(tree)
                    flags &= ~re.IGNORECASE
                    on_lower = True
                except _CannotLower:
                    pass
            icase = bool(flags & re.IGNORECASE)
            tree = _guarded_tree(tree, icase)
            # sre scans for a leading literal or class itself, much faster than a lookahead
            if top_guard and tree.data and tree.data[0][0] not in (_sre_c.LITERAL, _sre_c.IN, _BRANCH):
                first, nullable = _first(list(tree.data), icase)
                if first and not nullable and len(first) <= 128 and not (
                        tree.data and tree.data[0][0] is _sre_c.ASSERT):
                    tree = _sub(tree, [_guard_node(first, tree)] + list(tree.data))
            saved = tree.state.flags
            if on_lower:
                tree.state.flags &= ~re.IGNORECASE
            try:
                return _compile_tree(tree, flags), on_lower
            finally:
                tree.state.flags = saved
    except (re.error, RecursionError, TypeError, ValueError, AttributeError):
        return _compile_tree(parsed.tree, parsed.flags | extra_flags), False


def optimise(compiled: re.Pattern, top_guard: bool = True, extra_flags: int = 0) -> tuple[re.Pattern, bool]:
    """``optimise_parsed`` for an already compiled bytes pattern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = _sre_parse.parse(compiled.pattern, compiled.flags)
    return optimise_parsed(Parsed(compiled.pattern, compiled.flags, tree), top_guard, extra_flags)
