"""`make bench`: throughput end to end with postfix's smtp-source and smtp-sink.

For each concurrency it runs smtp-source straight into smtp-sink (the ceiling
on this machine) and through `mailgate run` into the same smtp-sink, in the
same invocation, and prints messages per second for both and their ratio.
"accepted" counts until smtp-source has its last 250; "delivered" until the
gateway's queue is empty again.  Then it runs the per-area benchmarks.

Single absolute numbers on a shared machine are noise: compare ratios, and
run it twice.
"""

from __future__ import annotations

import argparse
import statistics
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every bench gateway runs without the web console: two gateways (or a
# `make run` beside the bench) would both want its port, 8025
WEB_OFF = "[web]\nenabled = false\n"
sys.path.insert(0, str(REPO))

from tests.support.ports import free_port  # noqa: E402

AREA_BENCHES = [["tools.bench_envelope"], ["tools.bench_bayes"], ["tools.bench_av"], ["tools.bench_rules"],
                ["tools.bench_hardening"], ["tools.bench_store"], ["tools.bench_monitor"], ["tools.eval_pipeline"],
                # SpamAssassin parity on the public corpus (its answers cached in ~/.cache/mailgate/sa_parity)
                ["tools.sa_parity", "--quiet"]]
# the accuracy table scores the whole corpus with the stock rules (minutes):
# --quick gives it a quarter of the corpus
QUICK_ARGS = {"tools.eval_pipeline": ["--quick"], "tools.sa_parity": ["--limit", "300"]}


def program(name: str) -> str:
    for d in ("", "/usr/sbin/", "/usr/local/sbin/"):
        path = shutil.which(name) if not d else (d + name if os.access(d + name, os.X_OK) else None)
        if path:
            return path
    sys.exit(f"bench: {name} not found (make bench installs postfix's tools)")


def wait_port(port: int, timeout: float = 120.0, proc=None, log=lambda: "") -> None:
    """Until something greets on ``port``; fails at once if ``proc`` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port}:\n{log()[-3000:]}")


def smtp_source(port: int, sessions: int, messages: int, size: int = 5120) -> float:
    t0 = time.monotonic()
    subprocess.run([program("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-f", "bench@sender.test", "-t", "user@example.test", f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def queue_empty(queue_dir: Path) -> bool:
    d = queue_dir / "messages"
    return not d.exists() or not any(d.iterdir())


def peak_rss_mb(pid: int) -> float:
    """Peak RSS of the gateway and its delivery process together."""
    total = 0.0
    pids = [pid] + [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                                                    text=True).stdout.split()]
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return total


class Gateway:
    def __init__(self, workdir: Path, sink_port: int, dns: str, extra: str = ""):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.queue = workdir / "queue"
        self.config = workdir / "mailgate.toml"
        self.config.write_text(f"""
[server]
listen = ["127.0.0.1:{self.port}"]
hostname = "mx.bench.test"
max_connections_per_ip = 1000
[relay]
domains = ["example.test"]
[routes]
"*" = "smtp:[127.0.0.1]:{sink_port}"
[dns]
nameservers = ["{dns}"]
[queue]
dir = "{self.queue}"
[log]
level = "warning"
{extra}
{"" if "[web]" in extra else WEB_OFF}""")
        self.log = open(workdir / "mailgate.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(self.config)],
                                     cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _one_run(gw: Gateway, sink_port: int, sessions: int, messages: int) -> tuple[float, float, float]:
    """(direct, accepted, delivered) messages per second."""
    direct = smtp_source(sink_port, sessions, messages)
    t0 = time.monotonic()
    accepted = smtp_source(gw.port, sessions, messages)
    while not queue_empty(gw.queue):
        time.sleep(0.05)
    delivered = time.monotonic() - t0
    return messages / direct, messages / accepted, messages / delivered


def _warm(gw: Gateway) -> None:
    smtp_source(gw.port, 10, 200)  # imports, caches, page cache
    while not queue_empty(gw.queue):
        time.sleep(0.1)


def run_relay(sink_port: int, dns: str, workdir: Path, sessions: list[int], messages: int, label: str,
              extra: str = "", repeat: int = 3) -> list[tuple]:
    """Median of ``repeat`` runs per concurrency: single runs on a shared
    2-core machine swing by 20 %."""
    rows = []
    gw = Gateway(workdir, sink_port, dns, extra)
    try:
        _warm(gw)
        for s in sessions:
            runs = [_one_run(gw, sink_port, s, messages) for _ in range(repeat)]
            med = [statistics.median(r[i] for r in runs) for i in range(3)]
            rows.append((label, s, *med, peak_rss_mb(gw.proc.pid)))
    finally:
        gw.stop()
    return rows


def run_paired(sink_port: int, dns: str, workdir: Path, sessions: list[int], messages: int,
               base: tuple[str, str], other: tuple[str, str], repeat: int = 3,
               prepare=None) -> tuple[list[tuple], dict]:
    """Two gateways up at once (an idle one costs nothing), runs alternated
    (A B, B A, ...): ``other``'s share of ``base``'s delivered throughput is
    the median of neighbouring pairs, so a machine whose speed drifts by
    20 % between minutes does not decide the ratio.  ``prepare(gw)`` runs on
    each gateway before its warm-up (a bench that must pass greylisting first)."""
    gws = {label: Gateway(workdir / label.replace(" ", "_").replace("+", ""), sink_port, dns, extra)
           for label, extra in (base, other)}
    rows, ratios = [], {}
    try:
        for gw in gws.values():
            if prepare is not None:
                prepare(gw)
            _warm(gw)
        for s in sessions:
            runs: dict[str, list] = {base[0]: [], other[0]: []}
            pair_ratios = []
            for i in range(repeat):
                order = (base[0], other[0]) if i % 2 == 0 else (other[0], base[0])
                got = {label: _one_run(gws[label], sink_port, s, messages) for label in order}
                for label, r in got.items():
                    runs[label].append(r)
                pair_ratios.append(got[other[0]][2] / got[base[0]][2])
            for label, rs in runs.items():
                med = [statistics.median(r[k] for r in rs) for k in range(3)]
                rows.append((label, s, *med, peak_rss_mb(gws[label].proc.pid)))
            ratios[s] = (statistics.median(pair_ratios), pair_ratios)
    finally:
        for gw in gws.values():
            gw.stop()
    return rows, ratios


def print_rows(rows) -> None:
    print(f"{'gateway':<22} {'sessions':>8} {'direct msg/s':>13} {'accepted msg/s':>15} {'delivered msg/s':>16} "
          f"{'ratio':>6} {'peak RSS MB*':>12}")
    for label, s, direct, acc, dlv, rss in rows:
        print(f"{label:<22} {s:>8} {direct:>13.0f} {acc:>15.0f} {dlv:>16.0f} {dlv / direct:>6.3f} {rss:>12.0f}")
    print("* the SMTP process and its delivery process together")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is printed")
    ap.add_argument("--sessions", default="20,100")
    ap.add_argument("--relay-only", action="store_true", help="skip the per-area benchmarks")
    ap.add_argument("--only", metavar="AREA", help="run only the per-area benchmark tools.bench_AREA (e.g. hardening)")
    ap.add_argument("--quick", action="store_true", help="the accuracy table on a quarter of the corpus")
    args = ap.parse_args(argv)
    areas = [b + QUICK_ARGS.get(b[0], []) for b in AREA_BENCHES] if args.quick else AREA_BENCHES
    if args.only:
        chosen = [b for b in areas if b[0] in (f"tools.bench_{args.only}", f"tools.{args.only}")]
        if not chosen:
            ap.error(f"--only {args.only}: no such area ({', '.join(b[0] for b in AREA_BENCHES)})")
        return run_areas(chosen)
    sessions = [int(s) for s in args.sessions.split(",")]

    from tests.support.dns import Dnsmasq
    from tests.support.gateway import default_records

    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    sink_port = free_port()
    sink = subprocess.Popen([program("smtp-sink"), "-u", "nobody", "-m", "2000", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dns = Dnsmasq(tmp / "dns", default_records().a("mx.bench.test", "127.0.0.1")).start()
    rows = []
    try:
        wait_port(sink_port)
        print(f"# smtp-source -l 5120 -m {args.messages}, median of {args.repeat} runs per row; gateway with its "
              f"default checks (no Bayes model, no virus scanner configured)")
        rows += run_relay(sink_port, dns.nameserver, tmp / "bare", sessions, args.messages, "relay only",
                          extra='[checks]\ndisabled = ["' + '", "'.join(_all_checks()) + '"]\n', repeat=args.repeat)
        # clamd on vs off, measured in alternation: our Received header makes
        # every message unique, so clamd's cache of clean results does not
        # flatter the figure.  clamd's TemporaryDirectory is on tmpfs when
        # there is one, as sites run it.
        from tools.bench_av import clamd_temp_note, scanner_toml, start_bench_clamd

        socket_path, stop_clamd = start_bench_clamd(str(tmp))
        try:
            paired, ratios = run_paired(sink_port, dns.nameserver, tmp, sessions, args.messages,
                                        ("default checks", ""), ("default + clamd", scanner_toml(socket_path)),
                                        repeat=args.repeat)
            rows = paired + rows
        finally:
            stop_clamd()
        print_rows(rows)
        for s, (ratio, pairs) in ratios.items():
            print(f"clamd on/off at {s} sessions: {ratio:.2f} of the delivered throughput "
                  f"(median of alternated pairs: {', '.join(f'{r:.2f}' for r in pairs)})")
        print(clamd_temp_note())
    finally:
        dns.stop(final=True)
        sink.terminate()
        sink.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.relay_only:
        return 0
    return run_areas(areas)


def run_areas(benches) -> int:
    for module, *extra in benches:
        print(f"\n## {module} {' '.join(extra)}", flush=True)
        subprocess.run([sys.executable, "-m", module, *extra], cwd=REPO, check=False)
    return 0


def _all_checks() -> list[str]:
    from gateway.plugins import discover

    return sorted(discover().checks)


if __name__ == "__main__":
    sys.exit(main())
