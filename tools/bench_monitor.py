"""Issue 11's figures for the tracking store and the metrics.

1. Queries over a big store.  ``--messages`` (default 1,000,000) generated
   messages spread over the last 30 days are written through the store's
   own writer path (the same records, merges and per-hour counts as live
   traffic) into a fresh SQLite store; then each kind of search the console
   offers, the message detail, the quarantine list, and the dashboard over
   a day, a week and the whole month are each timed ``--repeat`` times with
   different values (median and worst, in ms).  Targets: a search under
   200 ms, the dashboard under 500 ms.  Also the writer's cost per message
   (the time in the store's ``_write``, i.e. the SQL of the batches: rows,
   indexes, FTS triggers, per-hour counts) and the daily rollup's.

2. Throughput with tracking and metrics on against off: two ``mailgate run``
   up at once, smtp-source → mailgate → smtp-sink, runs alternated
   (tools/bench.py ``run_paired``): "on" must keep at least 0.95 of the
   delivered throughput of "off".

    python -m tools.bench_monitor [--messages 1000000] [--repeat 7] [--only queries|throughput|writer]
    python -m tools.bench --only monitor
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("invoice meeting lunch report offer cheap pills winner account password urgent update delivery "
         "order payment shipment holiday project budget review contract sale discount free prize").split()
SYMBOLS = [f"SYM_{i:02d}" for i in range(48)] + ["BAYES_99", "RBL_SPAMCOP"]
ACTIONS = (["accept"] * 60 + ["tag"] * 15 + ["quarantine"] * 5 + ["reject"] * 15 + ["tempfail"] * 5)


def generate(store, n: int, now: float, seed: int = 11) -> dict:
    """``n`` messages over 30 days before ``now``, through the store's writer; what the queries look for."""
    from gateway import events as ev
    from gateway.errors import Reply
    from gateway.records import Action, Envelope, Recipient, Result, Session, Verdict

    rnd = random.Random(seed)
    span = 30 * 86400
    senders = [f"user{i}@dom{i % 5000}.test" for i in range(50000)]
    rcpts = [f"staff{i}@example.test" for i in range(2000)]
    clients = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(100000)]
    picked = {}
    batch = []
    picked["write_s"] = 0.0
    t0 = time.monotonic()
    for i in range(n):
        ts = now - span + span * i / n
        qid = f"{int(ts * 1e6):014X}{i:06X}"
        action = Action(rnd.choice(ACTIONS))
        syms = rnd.sample(SYMBOLS, rnd.randint(0, 4))
        score = {"accept": rnd.uniform(-2, 4.9), "tag": rnd.uniform(5, 9), "quarantine": rnd.uniform(9, 15),
                 "reject": rnd.uniform(15, 40), "tempfail": 0.0}[action.value]
        sender = rnd.choice(senders)
        to = rnd.sample(rcpts, rnd.randint(1, 3))
        env = Envelope(queue_id=qid, sender=sender, size=rnd.randint(2000, 80000),
                       recipients=[Recipient(r, "example.test") for r in to])
        s = Session(queue_id=qid, peer_ip=rnd.choice(clients), helo="h.test")
        verdict = Verdict(action, score, 5.0, [Result(x, 1.0) for x in syms])
        code = {"reject": 554, "tempfail": 451}.get(action.value, 250)
        subject = " ".join(rnd.choice(WORDS) for _ in range(4)) + f" #{i}"
        # the Message-ID and Subject views of gateway.records.Message
        M = SimpleNamespace(message_id=f"<{i}.{rnd.randint(0, 10**9)}@{sender.partition('@')[2]}>", subject=subject)
        e = ev.MessageAnswered(s, env, verdict, Reply(code, "", "ok" if code == 250 else "no"), M, ts)
        batch.extend(store._records(e))
        if i % 997 == 0:
            picked.setdefault("queue_ids", []).append(qid)
            picked.setdefault("message_ids", []).append(M.message_id)
            picked.setdefault("senders", []).append(sender)
            picked.setdefault("recipients", []).append(to[0])
            picked.setdefault("clients", []).append(s.peer_ip)
        if len(batch) >= 5000:
            picked["write_s"] += _commit(store, batch)
            batch = []
        if i and i % 100000 == 0:
            print(f"  generated {i:,} messages ({time.monotonic() - t0:.0f}s)", flush=True)
    if batch:
        picked["write_s"] += _commit(store, batch)
    print(f"  generated {n:,} messages in {time.monotonic() - t0:.0f}s; the writer's SQL: "
          f"{picked['write_s'] / n * 1e6:.1f} us per message", flush=True)
    return picked


def _commit(store, batch) -> float:
    t0 = time.perf_counter()
    with store.engine.begin() as conn:
        store._write(conn, batch)
    return time.perf_counter() - t0


def run_writer(n: int) -> int:
    """The writer's cost per message alone, on a fresh store (``--only writer``)."""
    from monitor.tracking import TrackingStore

    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-monitor-"))
    now = time.time()
    try:
        store = TrackingStore(f"sqlite:///{tmp}/tracking.sqlite", clock=lambda: now, prune_on_timer=False)
        store.ensure_schema()
        print(f"# the writer: {n:,} generated messages into a fresh SQLite store")
        generate(store, n, now)
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def timed(fn, values) -> tuple[float, float, int]:
    times, rows = [], 0
    for v in values:
        t0 = time.perf_counter()
        got = fn(v)
        times.append((time.perf_counter() - t0) * 1000)
        rows = len(got) if hasattr(got, "__len__") else rows
    return statistics.median(times), max(times), rows


def run_queries(n: int, repeat: int) -> int:
    from monitor.tracking import TrackingStore

    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-monitor-"))
    now = time.time()
    try:
        store = TrackingStore(f"sqlite:///{tmp}/tracking.sqlite", clock=lambda: now, prune_on_timer=False)
        store.ensure_schema()
        print(f"# tracking store: {n:,} generated messages over 30 days (SQLite, WAL), {repeat} queries per row")
        picked = generate(store, n, now)
        t0 = time.perf_counter()
        days = store.rollup(now)  # what the writer's timer has done on a long-running store
        print(f"  rolled up {days} days in {time.perf_counter() - t0:.1f}s", flush=True)
        with store.engine.begin() as conn:  # what a long-running store has: the planner's statistics
            conn.exec_driver_sql("ANALYZE")
        size_mb = (tmp / "tracking.sqlite").stat().st_size / 1e6
        rnd = random.Random(5)

        def some(key):
            return rnd.sample(picked[key], repeat)

        day, week = now - 86400, now - 7 * 86400
        rows = [
            ("search: newest 100", lambda _: store.search(), [None] * repeat, 200),
            ("search: newest 100, page 10", lambda _: store.search(offset=900), [None] * repeat, 200),
            ("search: by queue id", lambda v: store.search(queue_id=v), some("queue_ids"), 200),
            ("search: by Message-ID", lambda v: store.search(message_id=v), some("message_ids"), 200),
            ("search: by sender", lambda v: store.search(sender=v), some("senders"), 200),
            ("search: by sender domain", lambda v: store.search(sender=v.partition("@")[2]), some("senders"), 200),
            ("search: by recipient", lambda v: store.search(recipient=v), some("recipients"), 200),
            ("search: by recipient domain", lambda v: store.search(recipient="example.test"), [None] * repeat, 200),
            ("search: by client address", lambda v: store.search(client=v), some("clients"), 200),
            ("search: by action (quarantine)", lambda _: store.search(action="quarantine"), [None] * repeat, 200),
            ("search: last day, by action", lambda _: store.search(since=day, action="reject"), [None] * repeat, 200),
            ("search: a week ago, one hour", lambda _: store.search(since=week, until=week + 3600), [None] * repeat,
             200),
            ("search: text, common word", lambda v: store.search(text=v), rnd.sample(WORDS, repeat), 200),
            ("search: text, one message", lambda v: store.search(text=f"#{v} "),
             [rnd.randrange(n) for _ in range(repeat)], 200),
            ("message detail", lambda v: [store.message(v)], some("queue_ids"), 200),
            ("quarantine list", lambda _: store.quarantine_items(), [None] * repeat, 200),
            ("dashboard: last day", lambda _: [store.dashboard(day, now)], [None] * repeat, 500),
            ("dashboard: last week", lambda _: [store.dashboard(week, now)], [None] * repeat, 500),
            ("dashboard: 30 days", lambda _: [store.dashboard(now - 31 * 86400, now)], [None] * repeat, 500),
            ("what-if verdicts: last day", lambda _: store.verdicts(day, now), [None] * repeat, None),
        ]
        print(f"{'query':<34} {'median ms':>10} {'worst ms':>9} {'rows':>7} {'target':>7}")
        misses = 0
        for label, fn, values, target in rows:
            med, worst, nrows = timed(fn, values)
            ok = "" if target is None else ("ok" if med < target else "MISS")
            misses += ok == "MISS"
            print(f"{label:<34} {med:>10.1f} {worst:>9.1f} {nrows:>7} {ok + (f' <{target}' if target else ''):>7}")
        print(f"store size {size_mb:.0f} MB; medians against the targets; text index: {store.text_index}")
        store.close()
        return 1 if misses else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OFF = '[tracking]\nenabled = false\n[metrics]\nenabled = false\n[web]\nenabled = false\n'
ON = '[tracking]\nenabled = true\n[metrics]\nenabled = true\n[web]\nenabled = false\n'


def run_throughput(sessions: list[int], messages: int, repeat: int) -> int:
    from tests.support.dns import Dnsmasq
    from tests.support.gateway import default_records
    from tests.support.ports import free_port
    from tools.bench import print_rows, program, run_paired, wait_port

    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-monitor-"))
    sink_port = free_port()
    sink = subprocess.Popen([program("smtp-sink"), "-u", "nobody", "-m", "2000", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dns = Dnsmasq(tmp / "dns", default_records().a("mx.bench.test", "127.0.0.1")).start()
    worst = 1.0
    try:
        wait_port(sink_port)
        print(f"# smtp-source -l 5120 -m {messages}, {repeat} alternated pairs per row; default checks")
        rows, ratios = run_paired(sink_port, dns.nameserver, tmp, sessions, messages,
                                  ("tracking+metrics off", OFF), ("tracking+metrics on", ON), repeat=repeat)
        print_rows(rows)
        for s, (ratio, pairs) in ratios.items():
            worst = min(worst, ratio)
            print(f"tracking+metrics on/off at {s} sessions: {ratio:.3f} of the delivered throughput "
                  f"(alternated pairs: {', '.join(f'{r:.2f}' for r in pairs)}; target >= 0.95)")
        on_store = tmp / "trackingmetrics_on" / "queue" / "tracking.sqlite"  # run_paired names the dirs
        if on_store.exists():
            from monitor.tracking import TrackingStore

            st = TrackingStore(f"sqlite:///{on_store}", prune_on_timer=False)
            tracked = len(st.search(limit=10**7))
            st.close()
            print(f"tracked messages in the 'on' store: {tracked}")
    finally:
        dns.stop(final=True)
        sink.terminate()
        sink.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if worst >= 0.95 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000, help="messages generated into the store")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--smtp-messages", type=int, default=2000, help="messages per smtp-source run")
    ap.add_argument("--sessions", default="20,100")
    ap.add_argument("--pairs", type=int, default=3, help="alternated on/off pairs per concurrency")
    ap.add_argument("--only", choices=("queries", "throughput", "writer"))
    args = ap.parse_args(argv)
    rc = 0
    if args.only == "writer":
        return run_writer(args.messages)
    if args.only in (None, "queries"):
        rc |= run_queries(args.messages, args.repeat)
    if args.only in (None, "throughput"):
        print()
        rc |= run_throughput([int(s) for s in args.sessions.split(",")], args.smtp_messages, args.pairs)
    return rc


if __name__ == "__main__":
    sys.exit(main())
