"""What the connection and envelope checks cost: latency and CPU.

Two parts, both against real DNS on loopback (dnsmasq with test domains,
forwarding three DNSBL zones and one RHSBL zone to rbldnsd):

1. In process: every envelope check (HELO, rDNS, sender domain, null sender,
   lists, DNSBL x3 + reject, RHSBL, rate limits, greylisting, static
   recipient verification) run stage by stage as the gateway runs them (the
   checks of one stage concurrently), for N transactions.  "cold" uses a new
   client address, HELO name and sender domain each time, so every lookup
   goes to the network; "warm" repeats one, so the resolver cache answers.
   Reports the added connect-to-RCPT latency (median, p99) and the CPU time
   per warm-cache message (target: at most 2 ms).

2. End to end: ``mailgate run`` twice, once with these checks on and once
   with them all in ``[checks] disabled``; a client connects from a
   127.x.y.z address, says EHLO, MAIL, RCPT and QUIT.  Reports
   connect-to-RCPT latency (median, p99) for both, cold and warm, and
   envelopes per second (sequential) for both.

    python -m tools.bench_envelope [--n 300] [--e2e-n 200] [--no-e2e]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

ENVELOPE_CHECKS = ["helo", "rdns", "sender_domain", "null_sender_rcpts", "ip_lists", "sender_lists",
                   "recipient_lists", "dnsbl", "dnsbl_reject", "rhsbl", "connection_rate", "message_rate",
                   "greylist", "recipient_verify"]

ZONES = {
    "zen.test": ("ip4set", ":127.0.0.2:Listed $\n127.0.0.2\n192.0.2.0/28\n"),
    "bl.test": ("ip4set", ":127.0.0.2:Blocked $\n127.0.0.2\n"),
    "pbl.test": ("ip4set", ":127.0.0.10:Dynamic $\n10.0.0.0/8\n"),
    "dbl.test": ("dnset", ":127.0.1.2:Spam domain $\nspammer.example\n"),
}


def percentile(values, p):
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


def records(n_domains: int):
    from tests.support.dns import Records

    r = (Records(ttl=3600).mx("example.test", "mail.example.test", 10).a("mail.example.test", "127.0.0.1")
         .mx("sender.test", "mx1.sender.test", 10).a("mx1.sender.test", "127.0.0.1"))
    # cold runs need distinct names: a sender domain, a HELO name and a PTR per client
    for i in range(n_domains):
        hi, lo = divmod(i, 250)
        ip = f"127.1.{hi}.{lo + 1}"
        r.mx(f"s{i}.test", f"mx.s{i}.test", 10).a(f"mx.s{i}.test", ip).a(f"h{i}.client.test", ip)
    return r


def rbl_toml() -> str:
    return """
[rbl]
zones = [ { zone = "zen.test", score = 3.5 }, { zone = "bl.test", score = 3.0 },
          { zone = "pbl.test", score = 1.0, codes = { "127.0.0.10" = { symbol = "PBL", score = 1.0 } } } ]
reject_count = 2
timeout = 2.0
[rhsbl]
zones = [ { zone = "dbl.test", score = 2.5 } ]
"""


# --- part 1: in process -------------------------------------------------------


def build_checks(dns, users_file: str, cache_size: int):
    import tomllib

    from gateway.config import HostPort, validate
    from gateway.plugins import Services
    from gateway.resolver import Resolver
    from gateway.store import MemoryStore
    from rules import dnsbl, greylist, helo, lists, ratelimit, rdns, recipients, rhsbl, sender

    modules = (dnsbl, greylist, helo, lists, ratelimit, rdns, recipients, rhsbl, sender)
    sections = {k: v for m in modules for k, v in m.SECTIONS.items()}
    data = tomllib.loads(rbl_toml() + f"""
[server]
hostname = "mx.gateway.test"
[relay]
domains = ["example.test"]
[lists]
block_ips = ["203.0.113.0/24"]
allow_senders = ["@friend.test"]
allow_recipients = ["abuse@example.test"]
[ratelimit]
connections_per_minute = 1000000
messages_per_hour = 1000000
[greylist]
enabled = true
delay = 0
[recipients]
verify = "static"
static_files = {{ "example.test" = "{users_file}" }}
""")
    config = validate(data, sections)
    resolver = Resolver([HostPort(dns.host, dns.port)], timeout=2.0, cache_size=cache_size)
    services = Services(reactor=None, resolver=resolver, store=MemoryStore())
    checks = []
    for m in modules:
        for cls in m.CHECKS:
            c = cls.from_config(config, services)
            if c is not None:
                checks.append(c)
    return checks, resolver


async def run_stages(checks, ip: str, helo_name: str, sender: str):
    from gateway.records import Envelope, Recipient, Session, Stage, Transaction

    session = Session("BENCH", ip, local_ip="127.0.0.1", helo=helo_name)
    by_stage = {s: [c for c in checks if c.stage == s] for s in Stage}

    async def stage(s, txn):
        outs = []
        for c in by_stage[s]:
            r = c.check(txn)
            outs.append(r if asyncio.iscoroutine(r) else _done(r))
        return await asyncio.gather(*outs)

    await stage(Stage.CONNECT, Transaction(session))
    await stage(Stage.HELO, Transaction(session))
    env = Envelope("BENCH", sender)
    txn = Transaction(session, env)
    await stage(Stage.MAIL, txn)
    rcpt = Recipient("bob@example.test", "example.test")
    await stage(Stage.RCPT, Transaction(session, env, rcpt=rcpt, state=txn.state))


async def _done(value):
    return value


def in_process(dns, tmp: Path, n: int) -> dict:
    users = tmp / "users.txt"
    users.write_text("bob\nalice\n")
    # cold: cache off, and new names each time (the DNS servers do not cache either)
    checks, _ = build_checks(dns, str(users), cache_size=0)

    async def cold():
        out = []
        for i in range(n):
            hi, lo = divmod(i, 250)
            t0 = time.perf_counter()
            await run_stages(checks, f"198.18.{hi}.{lo + 1}", f"h{i}.client.test", f"a@s{i}.test")
            out.append(time.perf_counter() - t0)
        return out

    cold_times = asyncio.run(cold())
    checks, resolver = build_checks(dns, str(users), cache_size=10000)

    async def warm():
        await run_stages(checks, "198.18.0.1", "h0.client.test", "a@s0.test")  # fill the cache
        before = resolver.queries
        out, cpu0 = [], time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            await run_stages(checks, "198.18.0.1", "h0.client.test", "a@s0.test")
            out.append(time.perf_counter() - t0)
        return out, (time.process_time() - cpu0) / n, resolver.queries - before

    warm_times, cpu, stray = asyncio.run(warm())
    return {"cold": cold_times, "warm": warm_times, "cpu": cpu, "stray_queries": stray,
            "checks": [c.name for c in checks]}


# --- part 2: end to end -----------------------------------------------------------


def envelope_once(port: int, source: str, helo_name: str, sender: str) -> float:
    t0 = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as c:
        c.ehlo(helo_name)
        code, _ = c.mail(sender)
        if code != 250:
            raise RuntimeError(f"MAIL refused: {code}")
        code, text = c.rcpt("bob@example.test")
        elapsed = time.perf_counter() - t0
        if code != 250:
            raise RuntimeError(f"RCPT refused from {source}: {code} {text!r}")
    return elapsed


def e2e(dns, tmp: Path, n: int) -> dict:
    from tests.support.gateway import GatewayProcess, base_config
    from tests.support.ports import free_port
    from tests.support.sink import Sink

    sink = Sink().start()
    users = tmp / "e2e-users.txt"
    users.write_text("bob\n")
    on = rbl_toml() + f"""
[helo]
check_loopback = true
[rdns]
check_loopback = true
[ratelimit]
connections_per_minute = 1000000
messages_per_hour = 1000000
[recipients]
verify = "static"
static_files = {{ "example.test" = "{users}" }}
"""
    off = "[checks]\ndisabled = " + str(ENVELOPE_CHECKS).replace("'", '"') + "\n"
    results = {}
    try:
        for label, extra in (("relay alone", off), ("envelope checks on", on)):
            port = free_port()
            workdir = tmp / label.replace(" ", "_")
            text = base_config(port, str(workdir / "queue"), str(sink.port), dns.nameserver) + extra
            gw = GatewayProcess(workdir, text, port).start(timeout=120)
            try:
                cold = []
                for i in range(n):
                    hi, lo = divmod(i, 250)
                    cold.append(envelope_once(port, f"127.1.{hi}.{lo + 1}", f"h{i}.client.test", f"a@s{i}.test"))
                warm = [envelope_once(port, "127.1.0.1", "h0.client.test", "a@s0.test") for _ in range(n)]
                t0 = time.perf_counter()
                for _ in range(n):
                    envelope_once(port, "127.1.0.1", "h0.client.test", "a@s0.test")
                rate = n / (time.perf_counter() - t0)
                results[label] = {"cold": cold, "warm": warm, "rate": rate}
            finally:
                gw.stop()
    finally:
        sink.stop()
    return results


def ms(x: float) -> str:
    return f"{x * 1000:8.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="in-process transactions per run")
    ap.add_argument("--e2e-n", type=int, default=200, help="end-to-end envelopes per run")
    ap.add_argument("--no-e2e", action="store_true", help="skip the mailgate-run part")
    args = ap.parse_args(argv)
    n_domains = max(args.n, args.e2e_n)

    from tests.support.dns import Dnsmasq, Rbldnsd

    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-envelope-"))
    rbl = Rbldnsd(ZONES).start()
    dns = Dnsmasq(tmp / "dns", records(n_domains), forward={z: rbl for z in ZONES}).start()
    try:
        r = in_process(dns, tmp, args.n)
        print(f"Envelope checks in process ({len(r['checks'])} checks: {', '.join(r['checks'])}), "
              f"{args.n} transactions, connect..RCPT")
        print(f"{'DNS cache':<12}{'median ms':>10}{'p99 ms':>10}")
        for label in ("cold", "warm"):
            t = r[label]
            print(f"{label:<12}{ms(statistics.median(t)):>10}{ms(percentile(t, 99)):>10}")
        verdict = "OK" if r["cpu"] <= 0.002 else "OVER TARGET"
        print(f"CPU per warm-cache message: {r['cpu'] * 1000:.3f} ms (target <= 2 ms: {verdict}); "
              f"network queries during the warm run: {r['stray_queries']}")
        if not args.no_e2e:
            res = e2e(dns, tmp, args.e2e_n)
            print()
            print(f"End to end through `mailgate run`, {args.e2e_n} envelopes each (connect, EHLO, MAIL, RCPT)")
            print(f"{'gateway':<22}{'cold med':>10}{'cold p99':>10}{'warm med':>10}{'warm p99':>10}{'env/s':>8}")
            for label, v in res.items():
                print(f"{label:<22}{ms(statistics.median(v['cold'])):>10}{ms(percentile(v['cold'], 99)):>10}"
                      f"{ms(statistics.median(v['warm'])):>10}{ms(percentile(v['warm'], 99)):>10}"
                      f"{v['rate']:>8.0f}")
            base, on = res["relay alone"], res["envelope checks on"]
            print(f"added by the checks (median): cold {ms(statistics.median(on['cold']) - statistics.median(base['cold']))} ms, "
                  f"warm {ms(statistics.median(on['warm']) - statistics.median(base['warm']))} ms; "
                  f"sequential throughput {on['rate'] / base['rate']:.2f}x of the relay alone")
    finally:
        dns.stop()
        rbl.stop(final=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
