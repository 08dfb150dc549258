"""Issue 13's store figures: what the shared Redis state costs.

1. Per operation.  ``incr`` / ``get`` / ``put`` on each backend (memory,
   SQLite, a local Redis, a local three-master Redis Cluster), through the
   ``gateway.store`` interface on one asyncio loop, as the checks call them:
   ``--ops`` operations one after another (p50 / p99 latency in
   microseconds), then the same number from 100 concurrent tasks (operations
   per second: what many sessions at once get).

2. The gateway.  Two ``mailgate run`` up at once, greylisting (delay 0, so
   the one smtp-source triplet passes after the warm-up and every message
   then reads and refreshes it) and both rate limits on (limits far above
   the load, so they count and never refuse): about four store operations
   per message.  One keeps its state in the embedded memory store, the other
   in Redis (``--cluster``: also a Redis Cluster).  smtp-source into each,
   alternated (as ``tools.bench.run_paired`` does): Redis's share of the embedded
   store's delivered throughput, median of neighbouring pairs.  Target:
   >= 0.9.

Loopback only.

    python -m tools.bench_store [--ops 5000] [--messages 2000] [--sessions 20,100] [--repeat 3] [--cluster]
    python -m tools.bench --only store
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.store import MemoryStore, SqliteStore, StoreSettings, open_store  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.redis import RedisClusterNodes, RedisServer  # noqa: E402


def _ops(store, op: str, i: int):
    if op == "incr":
        return store.incr(f"rate:bench:{i % 100}", 3600)
    if op == "get":
        return store.get(f"grey:bench:{i % 100}")
    return store.put(f"grey:bench:{i % 100}", {"first": 1733333333.5, "passed": True}, 3600)


async def _measure(store, ops: int) -> dict:
    out = {}
    for i in range(100):  # the keys exist, connections are open
        await _ops(store, "put", i)
    for op in ("incr", "get", "put"):
        lat = []
        for i in range(ops):
            t0 = time.perf_counter()
            await _ops(store, op, i)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(100)

        async def one(i):
            async with sem:
                await _ops(store, op, i)

        await asyncio.gather(*(one(i) for i in range(ops)))
        conc = ops / (time.perf_counter() - t0)
        out[op] = (lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6, conc)
    return out


def per_operation(tmp: Path, ops: int, redis_url: str, cluster_url: str) -> None:
    backends = [("memory", lambda: MemoryStore()),
                ("sqlite", lambda: SqliteStore(str(tmp / "bench.sqlite"))),
                ("redis", lambda: open_store(StoreSettings(backend="redis", url=redis_url, timeout=5.0)))]
    if cluster_url:
        backends.append(("redis cluster", lambda: open_store(StoreSettings(backend="redis", url=cluster_url,
                                                                           cluster=True, timeout=5.0))))
    print(f"{'backend':<14} {'op':<5} {'p50 us':>9} {'p99 us':>9} {'100 concurrent ops/s':>21}")
    for name, make in backends:
        loop = asyncio.new_event_loop()
        store = make()
        try:
            got = loop.run_until_complete(_measure(store, ops))
        finally:
            if hasattr(store, "aclose"):
                loop.run_until_complete(store.aclose())
            else:
                store.close()
            loop.close()
        for op, (p50, p99, conc) in got.items():
            print(f"{name:<14} {op:<5} {p50:>9.0f} {p99:>9.0f} {conc:>21.0f}")
    print(f"# {ops} operations each, sequential then 100 at a time, one asyncio loop")


# the web console off: two gateways up at once would both want its port
STATE = ('[greylist]\nenabled = true\ndelay = 0\n'
         '[ratelimit]\nconnections_per_minute = 100000000\nmessages_per_hour = 100000000\n'
         '[web]\nenabled = false\n')


def _pass_greylisting(gw) -> None:
    """smtp-source gives up at the first 451: its one triplet (client,
    bench@sender.test, user@example.test) is greylisted once and retried
    here (delay 0), so every message of the runs finds it passed."""
    import smtplib

    for attempt in range(2):
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as c:
            c.ehlo("bench.sender.test")
            c.mail("bench@sender.test")
            code, text = c.rcpt("user@example.test")
        if code == 250:
            return
    raise RuntimeError(f"the bench triplet is still refused: {code} {text!r}")


def paired(sink_port: int, dns: str, workdir: Path, sessions: list[int], messages: int, repeat: int,
           base: tuple[str, str], other: tuple[str, str]) -> tuple[list[tuple], dict]:
    """tools.bench.run_paired (both gateways up, runs alternated, the ratio the
    median of neighbouring pairs) with the bench triplet passed first."""
    from tools.bench import run_paired

    return run_paired(sink_port, dns, workdir, sessions, messages, base, other, repeat, prepare=_pass_greylisting)


def gateway_rows(tmp: Path, sessions: list[int], messages: int, repeat: int, stores: list[tuple[str, str]]) -> None:
    from tests.support.dns import Dnsmasq
    from tests.support.gateway import default_records
    from tools.bench import print_rows, program, wait_port

    sink_port = free_port()
    sink = subprocess.Popen([program("smtp-sink"), "-u", "nobody", "-m", "2000", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dns = Dnsmasq(tmp / "dns", default_records().a("mx.bench.test", "127.0.0.1")).start()
    try:
        wait_port(sink_port)
        print(f"# smtp-source -l 5120 -m {messages}, median of {repeat} alternated runs per row; default checks "
              f"plus greylisting and both rate limits (about four store operations per message)")
        for label, toml in stores:
            rows, ratios = paired(sink_port, dns.nameserver, tmp / label.replace(" ", "_"), sessions, messages,
                                  repeat, ("embedded store", STATE), (label, STATE + toml))
            print_rows(rows)
            for s, (ratio, pairs) in ratios.items():
                print(f"{label} / embedded store at {s} sessions: {ratio:.2f} of the delivered throughput "
                      f"(pairs: {', '.join(f'{r:.2f}' for r in pairs)}; target >= 0.9)", flush=True)
    finally:
        dns.stop(final=True)
        sink.terminate()
        sink.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=5000)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", default="20,100")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cluster", action="store_true", help="a Redis Cluster gateway row too")
    ap.add_argument("--only", choices=("ops", "gateway"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory (the gateways' logs)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-store-"))
    redis = RedisServer(tmp / "redis")
    cluster = RedisClusterNodes(tmp / "cluster")
    try:
        redis.start()
        cluster.start()
        if args.only in (None, "ops"):
            per_operation(tmp, args.ops, redis.url, cluster.url)
        if args.only in (None, "gateway"):
            stores = [("redis store", f'[store]\nbackend = "redis"\nurl = "{redis.url}"\n')]
            if args.cluster:
                stores.append(("redis cluster store",
                               f'[store]\nbackend = "redis"\ncluster = true\nurl = "{cluster.url}"\n'))
            gateway_rows(tmp, [int(s) for s in args.sessions.split(",")], args.messages, args.repeat, stores)
    finally:
        cluster.stop()
        redis.stop()
        if args.keep:
            print(f"# kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
