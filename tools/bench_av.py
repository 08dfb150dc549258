"""Anti-virus scan latency: median and p99 for 5 KB and 1 MB messages
through the clamd adapter (unix socket), plus the same through the guarded
scanner on a running reactor with its thread pool (what the gateway does).

Every message is unique: clamd caches clean results by hash, and repeated
content would measure the cache.  The clamd is our own (tests/support/clamd.py:
EICAR + one test signature), started in a temp dir and stopped at the end.

    python -m tools.bench_av [--n5k 400] [--n1m 40]

For tools/bench.py (throughput with clamd on against off):
``start_bench_clamd(tmpdir) -> (socket_path, stop)`` and
``scanner_toml(socket_path)`` give a clamd and the ``[[scanners]]`` text;
``clamd_temp_note()`` says where that clamd writes its temporary files
(tmpfs when there is one: tests/support/clamd.py ``tmpfs_dir``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def start_bench_clamd(tmpdir: str) -> tuple[str, Callable[[], None]]:
    """A clamd with our signature database -> (unix socket path, stop)."""
    from tests.support.clamd import start_bench_clamd as start

    return start(tmpdir)


def clamd_temp_note() -> str:
    from tests.support.clamd import tmpfs_dir

    where = tmpfs_dir()
    if where:
        return f"clamd: TemporaryDirectory on tmpfs ({where}), as a mail site runs it"
    return "clamd: no tmpfs found, TemporaryDirectory on disk (clamd costs several times more CPU per message)"


def scanner_toml(socket_path: str, timeout: float = 30) -> str:
    return (f'[[scanners]]\ntype = "clamd"\nsocket = "{socket_path}"\ntimeout = {timeout}\n'
            "[av]\nself_test_interval = 0\n")


def unique_message(i: int, size: int) -> bytes:
    head = (f"From: bench{i}@sender.test\r\nTo: user@example.test\r\nSubject: bench {i}\r\n"
            f"Message-ID: <bench-{i}-{size}@sender.test>\r\n\r\n").encode()
    line = f"Message {i}: the quick brown fox jumps over the lazy dog {i:08d}.\r\n".encode()
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[:size]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


def time_direct(scanner, size: int, n: int, offset: int) -> list[float]:
    from scanners.base import Clean

    out = []
    for i in range(n):
        data = unique_message(offset + i, size)
        t = time.perf_counter()
        outcome = scanner.scan_blocking(data)
        out.append(time.perf_counter() - t)
        if outcome != Clean():
            raise RuntimeError(f"unexpected {outcome} for a clean message")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n5k", type=int, default=400)
    parser.add_argument("--n1m", type=int, default=40)
    args = parser.parse_args(argv)

    from scanners.base import EICAR, Infected
    from scanners.clamd import ClamdScanner

    with tempfile.TemporaryDirectory(prefix="mailgate-bench-av-") as tmp:
        socket_path, stop = start_bench_clamd(tmp)
        try:
            scanner = ClamdScanner(socket_path=socket_path, timeout=60)
            if not isinstance(scanner.scan_blocking(EICAR), Infected):
                print("clamd did not detect EICAR: not benchmarking a scanner that does not scan")
                return 1
            rows = []
            offset = 0
            for label, size, n in (("5 KB", 5 * 1024, args.n5k), ("1 MB", 1024 * 1024, args.n1m)):
                for w in range(max(3, n // 10)):  # warm up clamd's threads and the page cache
                    scanner.scan_blocking(unique_message(10**9 + w * 7 + size, size))
                direct = time_direct(scanner, size, n, offset)
                offset += n
                rows.append((f"clamd adapter, {label}", n, direct))
            # the reactor can run once per process: guarded numbers for both sizes in one run
            guarded_5k = time_guarded_both(socket_path, args, offset)
            rows.extend(guarded_5k)
        finally:
            stop()

    print(f"{'path':<34} {'n':>5} {'median ms':>10} {'p99 ms':>9} {'msg/s':>8}")
    for label, n, values in rows:
        med = statistics.median(values) * 1000
        p99 = percentile(values, 99) * 1000
        rate = n / sum(values) if sum(values) else 0
        print(f"{label:<34} {n:>5} {med:>10.2f} {p99:>9.2f} {rate:>8.0f}")
    print("(unique content per message: clamd's clean-result cache never hits)")
    print(clamd_temp_note())
    return 0


def time_guarded_both(socket_path: str, args, offset: int) -> list:
    from twisted.internet import defer, threads
    from twisted.internet import reactor

    from scanners.base import GuardedScanner
    from scanners.clamd import ClamdScanner

    pool = reactor.getThreadPool()
    g = GuardedScanner(ClamdScanner(socket_path=socket_path, timeout=60), reactor,
                       lambda fn, *a: threads.deferToThreadPool(reactor, pool, fn, *a), timeout=60)
    rows = []

    @defer.inlineCallbacks
    def run():
        nonlocal offset
        try:
            for label, size, n in (("5 KB", 5 * 1024, args.n5k), ("1 MB", 1024 * 1024, args.n1m)):
                values = []
                for i in range(n):
                    data = unique_message(offset + i, size)
                    t = time.perf_counter()
                    yield g.scan(data)
                    values.append(time.perf_counter() - t)
                offset += n
                rows.append((f"guarded + thread pool, {label}", n, values))
        finally:
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run(installSignalHandlers=False)
    return rows


if __name__ == "__main__":
    sys.exit(main())
