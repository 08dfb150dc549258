"""One Hyperscan pass over a text, naming the regex rules that can match it.

Python's ``re`` scans the whole text once per rule; with the stock rules that
is some 600 scans of every message, most of them for rules that cannot match
(the fuzzy "v1agra" spellings, the form-filling phrases).  Hyperscan, which
rspamd uses for the same job, matches all of them in one pass.  It runs in
prefilter mode: it may report a rule that does not really match, never miss
one that does, so every candidate is still confirmed (and counted) by the
rule's own Python regex and results are exactly what they were without it.

Compiling is the price (Hyperscan builds automata, not backtracking code):
a bounded repeat is unrolled, and a few of the stock patterns took seconds
each.  So bounded repeats are widened to unbounded ones (a superset: still
safe for a prefilter): of a group always (``(?:...){1,3}`` -> ``{1,}``), of a
byte or class above ``REPEAT_LIMIT``; a pattern longer than ``MAX_PATTERN`` bytes is cut to the run of top-level
items that fits with the most required ones (a match of the whole contains a
match of any such run: a superset again; the fuzzy "n0rt0n" spellings are
5-200 KB each), and
patterns are compiled in databases of ``CHUNK``, which costs less in total
than one big database and isolates a pattern Hyperscan refuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional

log = logging.getLogger("mailgate.rules.sa")

MAX_PATTERN = 8000  # bytes of translated pattern; longer ones are cut (see module doc)
REPEAT_LIMIT = 20  # {m,n} with n above this becomes {min(m, limit),}
CHUNK = 50
CACHE_MIN_SECONDS = 0.2  # a database that compiles faster is not worth a file


def hs_expression(source: bytes, drop_line_starts: bool = False) -> bytes:
    """A translated (Python-syntax) pattern as a Hyperscan expression.

    Hyperscan takes a NUL-terminated string, so every byte outside printable
    ASCII is written as ``\\xHH`` (an escaped one loses its backslash: it was
    a literal either way); large bounded repeats are widened (see module doc).

    ``drop_line_starts`` removes the ``^`` anchors (a superset again) of a
    multi-line pattern: the Hyperscan of the ``hyperscan`` 0.9.1 wheel misses
    matches of such a pattern when it shares a database with a similar one
    (72_active.cf's ``/^[^>].*?<a href=/im`` next to ``/^[^>].*?<img
    src=['"]data/im`` finds nothing in ``"ssle\\n<p>\\n\\n<A href=>\\n"``,
    alone it finds the match), so the prefilter changed rule hits
    (MIXED_HREF_CASE).
    """
    out = bytearray()
    i, n = 0, len(source)
    in_class = False
    while i < n:
        c = source[i]
        if c == 0x5C and i + 1 < n:  # backslash
            nxt = source[i + 1]
            out += b"\\x%02x" % nxt if nxt < 0x20 or nxt >= 0x7F else source[i:i + 2]
            i += 2
            continue
        if c < 0x20 or c >= 0x7F:
            out += b"\\x%02x" % c
            i += 1
            continue
        if in_class:
            in_class = c != 0x5D
            out.append(c)
            i += 1
            continue
        if c == 0x5B:  # [ ... ]: a ] right after [ or [^ is a literal
            in_class = True
            start = i
            i += 1
            if i < n and source[i] == 0x5E:
                i += 1
            if i < n and source[i] == 0x5D:
                i += 1
            out += source[start:i]
            continue
        if c == 0x7B:
            m = _REPEAT.match(source, i)
            if m:
                after_group = i > 0 and source[i - 1] == 0x29 and (i < 2 or source[i - 2] != 0x5C)
                out += _widened(m, REPEAT_LIMIT if not after_group else 1)
                i = m.end()
                continue
        if c == 0x5E and drop_line_starts:  # outside a class and unescaped: an anchor
            i += 1
            continue
        out.append(c)
        i += 1
    return bytes(out)


_REPEAT = re.compile(rb"\{(\d+)(?:(,)(\d*))?\}")


def _widened(m: re.Match, limit: int) -> bytes:
    low = int(m.group(1))
    if m.group(2) is None:
        high: Optional[int] = low
    else:
        high = int(m.group(3)) if m.group(3) else None
    if high is not None and high <= limit:
        return m.group(0)
    return b"{%d,}" % min(low, limit)


_HEX_ESCAPE = re.compile(rb"\\x(?:\{[0-9a-fA-F]*\}|[0-9a-fA-F]{0,2})")
_QUANTIFIER = re.compile(rb"(?:[*+?]|\{(\d+)(?:,\d*)?\})[?+]?")
_ZERO_WIDTH = re.compile(rb"\\[bBAZz]$|[$^]$|\(\?<?[=!]")
_FLAGS_ONLY = re.compile(rb"\(\?[aiLmsux]+\)$")


def _item_end(source: bytes, i: int) -> int:
    """End of the top-level item starting at ``i`` (its quantifier not included)."""
    c = source[i]
    if c == 0x5C:  # backslash
        if i + 1 >= len(source):
            return i + 1
        nxt = source[i + 1]
        if nxt == 0x78:  # \xHH or \x{...}
            return _HEX_ESCAPE.match(source, i).end()
        if 0x30 <= nxt <= 0x39:
            j = i + 1
            while j < len(source) and 0x30 <= source[j] <= 0x39:
                j += 1
            return j
        return i + 2
    if c == 0x5B:  # a class; a ] right after [ or [^ is a literal
        j = i + 1
        if j < len(source) and source[j] == 0x5E:
            j += 1
        if j < len(source) and source[j] == 0x5D:
            j += 1
        while j < len(source) and source[j] != 0x5D:
            j += 2 if source[j] == 0x5C else 1
        return j + 1
    if c == 0x28:  # a group, to its matching parenthesis
        depth, j = 0, i
        while j < len(source):
            b = source[j]
            if b == 0x5C:
                j += 2
                continue
            if b == 0x5B:
                j = _item_end(source, j)
                continue
            if b == 0x28:
                depth += 1
            elif b == 0x29:
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return j
    return i + 1


def _top_items(source: bytes) -> Optional[list[tuple[bytes, bytes]]]:
    """(item, quantifier) pairs of a top-level concatenation; None for an alternation."""
    items = []
    i = 0
    while i < len(source):
        if source[i] == 0x7C:  # |
            return None
        end = _item_end(source, i)
        m = _QUANTIFIER.match(source, end)
        q = m.group(0) if m else b""
        items.append((source[i:end], q))
        i = end + len(q)
    return items


def _required_once(quantifier: bytes) -> bool:
    if not quantifier or quantifier[:1] == b"+":
        return True
    if quantifier[:1] in (b"*", b"?"):
        return False
    return int(_QUANTIFIER.match(quantifier).group(1)) >= 1


def required_part(source: bytes, limit: int) -> Optional[bytes]:
    """A run of consecutive top-level items of the pattern, at most ``limit``
    bytes, that every match of the pattern contains (so matches too): the run
    with the most required items.  None when there is none.

    A pattern that is one required group (``(?:...){5}``) is looked into.
    Global flag groups such as ``(?i)`` are kept in front of the run.
    """
    for _ in range(10):
        items = _top_items(source)
        if not items:
            return None
        if len(items) == 1 and _required_once(items[0][1]):
            inner = items[0][0]
            if inner.startswith(b"(?:"):
                source = inner[3:-1]
            elif inner.startswith(b"(") and not inner.startswith(b"(?"):
                source = inner[1:-1]
            else:
                return None
            continue
        return _best_run(items, limit)
    return None


def _best_run(items: list[tuple[bytes, bytes]], limit: int) -> Optional[bytes]:
    flags = b"".join(item for item, _ in items if _FLAGS_ONLY.match(item))
    sizes = [len(item) + len(q) for item, q in items]
    needed = [_required_once(q) and not _ZERO_WIDTH.match(item) and not _FLAGS_ONLY.match(item)
              for item, q in items]
    best, best_key = None, (0, 0)
    for i in range(len(items)):
        size = len(flags)
        count = 0
        for j in range(i, len(items)):
            size += sizes[j]
            if size > limit:
                break
            count += needed[j]
            if (count, size) > best_key:
                best, best_key = (i, j + 1), (count, size)
    if best is None or best_key[0] == 0:
        return None
    i, j = best
    return flags + b"".join(item + q for item, q in items[i:j] if not _FLAGS_ONLY.match(item))


@dataclass
class Pattern:
    key: Hashable
    source: bytes  # translated, Python syntax
    flags: int  # Python re flags


@dataclass
class Prefilter:
    """Compiled databases for one kind of text; ``covered`` are the keys it answers for."""

    databases: list = field(default_factory=list)  # (hyperscan.Database, keys by id)
    covered: frozenset = frozenset()
    refused: dict = field(default_factory=dict)  # key -> Hyperscan's reason

    _scratch: threading.local = field(default_factory=threading.local, repr=False)

    def candidates(self, text: bytes) -> set:
        """Keys of the covered patterns that may match ``text``."""
        found: set = set()
        scratches = self._scratches()
        for (db, keys), scratch in zip(self.databases, scratches):
            def on_match(i, start, end, flags, context, keys=keys):
                found.add(keys[i])
            db.scan(text, match_event_handler=on_match, scratch=scratch)
        return found

    def _scratches(self) -> list:
        # rules run in a thread pool; a scan needs scratch space no other
        # thread is using at the same time
        mine = getattr(self._scratch, "spaces", None)
        if mine is None:
            import hyperscan as hs
            mine = self._scratch.spaces = [hs.Scratch(db) for db, _ in self.databases]
        return mine


def _hs_flags(hs, flags: int) -> int:
    out = hs.HS_FLAG_PREFILTER | hs.HS_FLAG_SINGLEMATCH | hs.HS_FLAG_ALLOWEMPTY
    if flags & re.IGNORECASE:
        out |= hs.HS_FLAG_CASELESS
    if flags & re.DOTALL:
        out |= hs.HS_FLAG_DOTALL
    if flags & re.MULTILINE:
        out |= hs.HS_FLAG_MULTILINE
    return out


def _compile(hs, items: list[tuple[bytes, int]]):
    db = hs.Database()
    db.compile(expressions=[e for e, _ in items], ids=list(range(len(items))),
               elements=len(items), flags=[f for _, f in items])
    return db


def build(patterns: Iterable[Pattern], cache_dir: Optional[str] = None) -> Optional[Prefilter]:
    """A prefilter for what Hyperscan can take of ``patterns``; None without Hyperscan.

    With ``cache_dir``, each database that took a while to compile is kept
    there under a hash of its expressions and reused by the next start or
    reload (compiling the stock rules takes seconds; loading them back,
    milliseconds).
    """
    try:
        import hyperscan as hs
    except ImportError:
        return None
    items = []
    for p in patterns:
        source = p.source if len(p.source) <= MAX_PATTERN else required_part(p.source, MAX_PATTERN)
        if source is not None:
            items.append((p.key, hs_expression(source, bool(p.flags & re.MULTILINE)), _hs_flags(hs, p.flags)))
    chunks = [items[start:start + CHUNK] for start in range(0, len(items), CHUNK)]
    paths = [_cache_path(hs, chunk, cache_dir) if cache_dir else None for chunk in chunks]
    built: list = [_read_cached(path) if path else None for path in paths]
    todo = [i for i, b in enumerate(built) if b is None]
    compiled = _compile_chunks([[(e, f) for _, e, f in chunks[i]] for i in todo])
    for i, (body, refused, seconds) in zip(todo, compiled):
        built[i] = (hs.loadb(body, hs.HS_MODE_BLOCK) if body else None, refused)
        if paths[i] and seconds >= CACHE_MIN_SECONDS:
            _write_cached(paths[i], body, refused)
    pf = Prefilter()
    covered = set()
    for chunk, (db, refused) in zip(chunks, built):
        for i, reason in refused.items():
            pf.refused[chunk[i][0]] = reason
        good = [k for i, (k, _, _) in enumerate(chunk) if i not in refused]
        if db is not None and good:
            pf.databases.append((db, good))
            covered.update(good)
    pf.covered = frozenset(covered)
    if cache_dir:
        _prune(cache_dir)
    return pf


# a worker: reads its chunks (pickled by the parent that started it), prints the results
_WORKER = ("import pickle, sys; sys.path.insert(0, sys.argv[1]); "
           "from rules.sa.prefilter import compile_chunk; "
           "chunks = pickle.load(sys.stdin.buffer); "
           "pickle.dump([compile_chunk(c) for c in chunks], sys.stdout.buffer)")


def _compile_chunks(chunks: list[list[tuple[bytes, int]]]) -> list[tuple[bytes, dict[int, str], float]]:
    """``compile_chunk`` for each chunk; a big job in worker processes, one per core.

    Compiling the stock rules takes seconds of CPU and leaves some 60 MB of
    the compiler's scratch in the process heap; in a worker both stay out of
    the gateway, which only loads the finished databases.  The workers are
    plain ``python -c`` processes (not multiprocessing, which would import
    the caller's main module again in each).
    """
    if len(chunks) <= 2:
        return [compile_chunk(c) for c in chunks]
    workers = min(len(chunks), os.cpu_count() or 1)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    slices = [list(range(w, len(chunks), workers)) for w in range(workers)]
    procs = []
    try:
        for indexes in slices:
            proc = subprocess.Popen([sys.executable, "-c", _WORKER, root],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs.append(proc)
            proc.stdin.write(pickle.dumps([chunks[i] for i in indexes]))
            proc.stdin.close()
        results: list = [None] * len(chunks)
        for proc, indexes in zip(procs, slices):
            out = proc.stdout.read()
            if proc.wait() != 0:
                raise OSError(f"compiler worker exited with status {proc.returncode}")
            for i, result in zip(indexes, pickle.loads(out)):  # our own child's output
                results[i] = result
        return results
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        log.warning("rules prefilter: compiling in this process (worker processes failed: %s)", e)
        return [compile_chunk(c) for c in chunks]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def compile_chunk(chunk: list[tuple[bytes, int]]) -> tuple[bytes, dict[int, str], float]:
    """(serialized database of the accepted expressions or b"", refused index -> reason, seconds)."""
    import hyperscan as hs

    started = time.monotonic()
    refused: dict[int, str] = {}
    try:
        db = _compile(hs, chunk)
    except hs.error:
        # the binding does not say which expression failed: find out one by one
        for i, item in enumerate(chunk):
            try:
                _compile(hs, [item])
            except hs.error as e:
                refused[i] = str(e)
        good = [item for i, item in enumerate(chunk) if i not in refused]
        db = _compile(hs, good) if good else None
    body = hs.dumpb(db) if db is not None else b""
    return body, refused, time.monotonic() - started


CACHE_KEEP_DAYS = 7


def _prune(cache_dir: str) -> None:
    """Remove cache files no build has used for a week (rules updated since)."""
    cutoff = time.time() - CACHE_KEEP_DAYS * 86400
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    for name in names:
        if name.startswith("hs-") and name.endswith(".db"):
            path = os.path.join(cache_dir, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
            except OSError:
                pass


def _cache_path(hs, chunk: list, cache_dir: str) -> str:
    digest = hashlib.sha256(hs.__version__.encode())
    for _, expression, flags in chunk:
        digest.update(b"%d\0%s\0" % (flags, expression))
    return os.path.join(cache_dir, f"hs-{digest.hexdigest()[:32]}.db")


def _read_cached(path: str) -> Optional[tuple[object, dict[int, str]]]:
    """(database, refused) from what ``_write_cached`` stored: one JSON line,
    then the serialized database."""
    import hyperscan as hs

    try:
        with open(path, "rb") as f:
            head, _, body = f.read().partition(b"\n")
        refused = {int(k): v for k, v in json.loads(head).items()}
        db = hs.loadb(body, hs.HS_MODE_BLOCK) if body else None
        os.utime(path)  # in use: see _prune
        return db, refused
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError, hs.error) as e:
        log.warning("rules prefilter: ignoring unreadable cache file %s: %s", path, e)
        return None


def _write_cached(path: str, body: bytes, refused: dict[int, str]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(refused).encode() + b"\n" + body)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("rules prefilter: cannot write cache file %s: %s", path, e)
