"""Cost of the SpamAssassin-compatible rules engine per message.

    python -m tools.bench_rules [--corpus DIR] [--messages N]

Messages of 4-6 KB are taken from the SpamAssassin public corpus tarballs
(default ``../shared/corpus/spamassassin`` beside the repository, or
``$MAILGATE_CORPUS``), extracted into a temporary directory that is removed
afterwards; without the corpus, generated 5 KB messages are used.  Each rule
set is loaded once, then every message is judged on one core (the process
is pinned to one CPU where the OS allows); the median and 90th percentile of
the CPU time per message are printed, with the share of regex rules skipped,
and the stock rules are run with and without the Hyperscan prefilter to show
its gain and that it changes no rule hit.  Last, the CPU per message of reading
the Received chain (rules/sa/received.py) over every public-corpus message.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tarfile
import tempfile
import time

from tools.bench_bayes import default_corpus  # one rule for where the corpus is

SIZE_MIN, SIZE_MAX = 4000, 6000
TARBALLS = ("20030228_spam.tar.bz2", "20030228_easy_ham.tar.bz2", "20050311_spam_2.tar.bz2")


def corpus_messages(corpus: str, limit: int) -> list[bytes]:
    """Up to ``limit`` 4-6 KB messages from the corpus tarballs (spam and ham alternating)."""
    if not os.path.isdir(corpus):
        return []
    tmp = tempfile.mkdtemp(prefix="mailgate-bench-rules-")
    try:
        groups = []
        for name in TARBALLS:
            path = os.path.join(corpus, name)
            if not os.path.exists(path):
                continue
            with tarfile.open(path) as tar:
                members = [m for m in tar.getmembers()
                           if m.isfile() and SIZE_MIN <= m.size <= SIZE_MAX and not m.name.endswith("cmds")]
                tar.extractall(tmp, members=members, filter="data")
            groups.append([os.path.join(tmp, m.name) for m in sorted(members, key=lambda m: m.name)])
        out: list[bytes] = []
        for i in range(max((len(g) for g in groups), default=0)):
            for g in groups:
                if i < len(g) and len(out) < limit:
                    with open(g[i], "rb") as f:
                        out.append(f.read())
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


WORDS = ("offer free account verify click here money business report meeting please attached "
         "price order today limited time winner team project schedule thanks regards").split()


def generated_messages(n: int) -> list[bytes]:
    rnd = random.Random(5)
    out = []
    for i in range(n):
        body = []
        while sum(len(line) for line in body) < 4600:
            body.append(" ".join(rnd.choice(WORDS) for _ in range(12)) + "\r\n")
            if rnd.random() < 0.15:
                body.append("\r\n")
            if rnd.random() < 0.05:
                body.append(f"http://www{i}.example{rnd.randint(1, 50)}.test/p?id={rnd.randint(1, 9999)}\r\n")
        head = (f"From: sender{i}@example.test\r\nTo: rcpt@example.test\r\nSubject: {rnd.choice(WORDS)} {i}\r\n"
                f"Date: Sat, 28 Nov 2026 19:00:00 +0000\r\nMessage-ID: <{i}@example.test>\r\n"
                "Content-Type: text/plain; charset=us-ascii\r\n\r\n")
        out.append(head.encode() + "".join(body).encode())
    return out


def measure(dirs: list[str], messages: list[bytes], use_prefilter: bool = True) -> dict:
    from rules.sa.engine import Engine, hits_report
    from rules.sa.message import MessageView
    from rules.sa.ruleset import load

    cache = tempfile.mkdtemp(prefix="mailgate-bench-hs-")
    try:
        t0 = time.monotonic()  # wall time: the prefilter compiles on every core
        rs = load(dirs)
        engine = Engine(rs, use_prefilter=use_prefilter, cache_dir=cache)
        load_s = time.monotonic() - t0
        t0 = time.monotonic()
        rs = load(dirs)
        engine = Engine(rs, use_prefilter=use_prefilter, cache_dir=cache)
        cached_s = time.monotonic() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    cpus = _pin_one_cpu()
    regex_loaded = sum(1 for r in rs.rules.values() if r.parsed is not None)
    regex_skipped = sum(1 for s in rs.skipped.values() if s.regex)
    for raw in messages[:5]:  # warm caches (public suffix list, lazy imports)
        engine.run(MessageView(raw))
    times = []
    hits = 0
    results = []
    for raw in messages:
        # CPU time of this process: what one core spends, whatever else the machine runs
        t = time.process_time()
        found = engine.run(MessageView(raw))
        report = hits_report(engine, found)
        times.append((time.process_time() - t) * 1000)
        hits += len(report)
        results.append(found)
    times.sort()
    _unpin(cpus)
    return {
        "rules": len(rs.rules), "active": len(engine.active), "load_s": load_s, "cached_s": cached_s,
        "skipped_share": 100.0 * regex_skipped / max(regex_loaded + regex_skipped, 1),
        "median": statistics.median(times) if times else 0.0,
        "p90": times[int(len(times) * 0.9)] if times else 0.0,
        "hits": hits / max(len(messages), 1), "n": len(messages),
        "size": statistics.median(len(m) for m in messages) if messages else 0,
        "results": results,
        "prefiltered": sum(len(p.covered) for p in engine.prefilters.values()),
    }


ALL_TARBALLS = ("20030228_easy_ham.tar.bz2", "20030228_easy_ham_2.tar.bz2", "20030228_hard_ham.tar.bz2",
                "20030228_spam.tar.bz2", "20050311_spam_2.tar.bz2")
# the stock rules' originating_ip_headers (10_default_prefs.cf): their addresses join the chain
ORIGINATING = ("X-Yahoo-Post-IP", "X-Originating-IP", "X-Apparently-From", "X-SenderIP", "X-AOL-IP",
               "X-MS-Exchange-CrossTenant-OriginalAttributedTenantConnectingIp")


def all_corpus_messages(corpus: str) -> list[bytes]:
    """Every message of the public corpus tarballs, read in memory."""
    out: list[bytes] = []
    for name in ALL_TARBALLS:
        path = os.path.join(corpus, name)
        if not os.path.exists(path):
            continue
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile() and not m.name.endswith("cmds"):
                    out.append(tar.extractfile(m).read())
    return out


def measure_received(messages: list[bytes], rounds: int = 5) -> dict:
    """CPU per message of reading the Received chain (rules/sa/received.py), the
    median of ``rounds`` passes over all the messages."""
    from rules.sa.received import parse_message

    cpus = _pin_one_cpu()
    per_round = []
    relays = 0
    for _ in range(rounds):
        t = time.process_time()
        for raw in messages:
            parse_message(raw, originating_headers=ORIGINATING)
        per_round.append((time.process_time() - t) * 1000 / max(len(messages), 1))
    _unpin(cpus)
    for raw in messages:
        c = parse_message(raw, originating_headers=ORIGINATING)
        relays += len(c.trusted) + len(c.untrusted)
    return {"n": len(messages), "ms": statistics.median(per_round), "relays": relays / max(len(messages), 1)}


def _pin_one_cpu():
    try:
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {sorted(cpus)[0]})
        return cpus
    except (AttributeError, OSError):
        return None


def _unpin(cpus) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def main(argv=None) -> int:
    from rules.sa_check import SHIPPED_RULES, stock_dirs

    ap = argparse.ArgumentParser(prog="bench_rules", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=default_corpus())
    ap.add_argument("--messages", type=int, default=300)
    args = ap.parse_args(argv)
    messages = corpus_messages(args.corpus, args.messages)
    source = f"corpus {SIZE_MIN // 1000}-{SIZE_MAX // 1000} KB"
    if not messages:
        messages = generated_messages(args.messages)
        source = "generated 5 KB"
    sets = [("shipped", [SHIPPED_RULES], True)]
    if stock_dirs():
        sets.append(("stock, no hs", [SHIPPED_RULES] + stock_dirs(), False))
        sets.append(("shipped+stock", [SHIPPED_RULES] + stock_dirs(), True))
    print(f"rules engine, {len(messages)} messages ({source}), CPU time on one core")
    print(f"{'rule set':<14} {'rules':>6} {'run':>6} {'skip%':>6} {'load s':>7} {'cached':>7} {'med ms':>7} "
          f"{'p90 ms':>7} {'msg/s':>7} {'hits':>5}")
    measured = {}
    for label, dirs, use_prefilter in sets:
        r = measured[label] = measure(dirs, messages, use_prefilter)
        rate = 1000.0 / r["median"] if r["median"] else 0.0
        print(f"{label:<14} {r['rules']:>6} {r['active']:>6} {r['skipped_share']:>6.1f} {r['load_s']:>7.2f} "
              f"{r['cached_s']:>7.2f} {r['median']:>7.2f} {r['p90']:>7.2f} {rate:>7.0f} {r['hits']:>5.1f}")
    if "stock, no hs" in measured:
        with_hs, without = measured["shipped+stock"], measured["stock, no hs"]
        differ = sum(1 for a, b in zip(with_hs["results"], without["results"]) if a != b)
        print(f"hyperscan prefilter: {with_hs['prefiltered']} regex rules behind it; rule hits differ from "
              f"Python-only on {differ} of {len(messages)} messages")
    everything = all_corpus_messages(args.corpus) or messages
    rc = measure_received(everything)
    print(f"received chain (Received.pm's parse + trust walk): {rc['ms']:.3f} ms CPU per message over {rc['n']} "
          f"{'public-corpus' if everything is not messages else source} messages, {rc['relays']:.1f} relays each "
          f"(goal < 0.1 ms)")
    print("goal: median < 10 ms per 5 KB message with the stock rules; skip% is the share of regex rules skipped;")
    print("load s: wall time of a first start (Hyperscan compiles); cached: a restart that finds [rules] cache_dir")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
