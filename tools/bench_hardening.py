"""Issue 10's figures: can one client starve the others, and what dribbled DATA costs.

1. Bystander latency.  A bystander keeps one connection (after EHLO) and
   sends a ``NOOP`` every 20 ms; a second bystander sends whole small
   messages (connect, EHLO, MAIL, RCPT, DATA 1 KB, QUIT) every 100 ms.  Both
   run for ``--duration`` seconds in three scenarios, each on a fresh
   ``mailgate run``:

   (a) idle;
   (b) a flood: one client says EHLO, then in one write
       ``MAIL FROM:<x@rN.dns-never-answers.test>`` and 2 MiB of ``NOOP\\r\\n``
       (and QUIT), then reads its replies slowly; again and again.  The
       gateway's [dns] nameserver is a UDP socket here that never answers, and
       only the ``sender_domain`` check is on, so MAIL waits on DNS while the
       NOOPs pile up;
   (c) 8 clients each send 10 pipelined ``AUTH PLAIN`` lines with a wrong
       password for a PBKDF2 user (``mailgate passwd``) per write, again and
       again, reconnecting when the gateway closes, each connection from a
       new 127.x.y.z address.

   p50 / p99 / max in ms.  The p99 is corrected for coordinated omission (as
   HdrHistogram does): a reply that took L while the next request was due
   after ``interval`` also stands for the requests that could not be sent in
   the meantime (L - interval, L - 2 interval, ...), so one 11 s stall
   weighs as the 550 NOOPs it held up, not as one sample.  Target: p99 under
   100 ms in (b) and (c).

2. Dribbled DATA.  8 MiB of DATA content sent in 400-byte writes
   (TCP_NODELAY, one send() each, paced at ``--dribble-rate`` writes a
   second so that each arrives alone, as a slow client's segments do;
   unpaced, the kernel hands the gateway 64 KiB per read and nothing is
   dribbled) against the same bytes in one sendall(), alternated,
   ``--repeat`` times each.  CPU seconds (utime+stime from /proc/PID/stat)
   of the receiving ``mailgate run`` process from the 354 to the final 250;
   its delivery child's until the queue is empty again is shown apart, not
   in the ratio.  All checks are off: this is about the protocol.  Target:
   dribbled receiver CPU within 1.5x of one write.  The "floor" row is a
   bare Twisted protocol on the same asyncio reactor receiving the same
   writes and only keeping them: what 20,000 reads cost before the gateway
   does anything, and so the best ratio reachable on this machine.

Loopback only; every load loop is bounded in count and time.

    python -m tools.bench_hardening [--duration 10] [--repeat 5] [--dribble-rate 5000] [--only latency|cpu]
    python -m tools.bench --only hardening
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TARGET_P99 = 0.100  # seconds
TARGET_CPU_RATIO = 1.5
NOOP_INTERVAL = 0.020
MESSAGE_INTERVAL = 0.100
FLOOD_BYTES = 2 * 1024 * 1024
AUTH_CLIENTS = 8
AUTH_PER_WRITE = 10
DATA_BYTES = 8 * 1024 * 1024
DRIBBLE_WRITE = 400
REPLY_TIMEOUT = 60.0  # the longest one bystander reply is waited for
USER, PASSWORD = "benchuser", "right-password"

# --- pure helpers ------------------------------------------------------------------


def percentile(values, p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    k = min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


def corrected(samples, interval: float) -> list[float]:
    """Latencies with the requests a stall kept from being sent added back.

    A closed-loop client that waits ``L`` for a reply, with its next request
    due ``interval`` later, would have sent ``L // interval`` more requests
    in the meantime, waiting ``L - interval``, ``L - 2 interval``, ...
    (HdrHistogram's recordValueWithExpectedInterval)."""
    out = []
    for latency in samples:
        out.append(latency)
        if interval > 0:
            missed = latency - interval
            while missed > 0:
                out.append(missed)
                missed -= interval
    return out


def summary(samples, interval: float) -> dict:
    """n, p50, corrected p99 and max of latencies in seconds."""
    if not samples:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"n": len(samples), "p50": percentile(samples, 50), "p99": percentile(corrected(samples, interval), 99),
            "max": max(samples)}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def plain_response(user: str, password: str) -> str:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()


def dribble_chunks(data: bytes, size: int):
    return (data[i:i + size] for i in range(0, len(data), size))


def message_body(size: int, tag: str = "") -> bytes:
    """A message of about ``size`` bytes, CRLF lines of 78 octets, ending in CRLF (no dot)."""
    head = (f"From: bench@sender.test\r\nTo: user@example.test\r\nSubject: hardening bench {tag}\r\n"
            f"Message-ID: <{tag or 'x'}.{time.time_ns()}@sender.test>\r\n\r\n").encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n"
    n = max(1, (size - len(head)) // len(line))
    return head + line * n


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- SMTP client bits ----------------------------------------------------------------


class Conn:
    """A blocking SMTP client connection: send bytes, read whole replies."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = REPLY_TIMEOUT):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = self.file.readline(65536)
            if not line:
                raise ConnectionError("connection closed: " + b"".join(lines).decode(errors="replace"))
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        try:
            return int(lines[-1][:3]), b"".join(lines)
        except ValueError:
            raise ConnectionError(f"not an SMTP reply: {lines[-1]!r}") from None

    def cmd(self, line: bytes, expect: Optional[int] = None) -> tuple[int, bytes]:
        self.sock.sendall(line + b"\r\n")
        code, text = self.reply()
        if expect is not None and code // 100 != expect // 100:
            raise RuntimeError(f"{line[:40]!r} -> {text[:200]!r}")
        return code, text

    def close(self) -> None:
        for f in (self.file.close, self.sock.close):
            try:
                f()
            except OSError:
                pass


def send_message(port: int, body: bytes, source: str = "127.0.0.1", sender: str = "<>") -> None:
    """connect, EHLO, MAIL, RCPT, DATA, QUIT; raises unless every reply is positive."""
    c = Conn(port, source)
    try:
        code, text = c.reply()
        if code != 220:
            raise RuntimeError(f"greeting {text!r}")
        c.cmd(b"EHLO bystander.test", 250)
        c.cmd(b"MAIL FROM:" + sender.encode(), 250)
        c.cmd(b"RCPT TO:<user@example.test>", 250)
        c.cmd(b"DATA", 354)
        c.sock.sendall(body + b".\r\n")
        code, text = c.reply()
        if code != 250:
            raise RuntimeError(f"end of data {text!r}")
        c.cmd(b"QUIT")
    finally:
        c.close()


class Bystanders:
    """The two bystanders, each in its own thread, for ``duration`` seconds."""

    def __init__(self, port: int, duration: float):
        self.port, self.duration = port, duration
        self.noop: list[float] = []
        self.msg: list[float] = []
        self.errors: list[str] = []
        self.inflight: dict[str, Optional[float]] = {"noop": None, "msg": None}  # start of the request waiting
        self.lock = threading.Lock()
        self.closed = False
        self.noop_conn = Conn(port)  # set up before any load starts
        self.noop_conn.reply()
        self.noop_conn.cmd(b"EHLO bystander.test", 250)
        self.threads = [threading.Thread(target=self._noops, daemon=True),
                        threading.Thread(target=self._messages, daemon=True)]

    def start(self) -> "Bystanders":
        self.end = time.monotonic() + self.duration
        for t in self.threads:
            t.start()
        return self

    def join(self, grace: float = 2 * REPLY_TIMEOUT) -> None:
        """Wait for the requests under way; one still unanswered after ``grace``
        counts as long as it has waited (a lower bound)."""
        deadline = self.end + grace
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            for kind, out in (("noop", self.noop), ("msg", self.msg)):
                t0 = self.inflight[kind]
                if t0 is not None:
                    out.append(time.perf_counter() - t0)
                    self.errors.append(f"{kind} still unanswered after {time.perf_counter() - t0:.0f} s")
                    self.inflight[kind] = None
            self.closed = True
        self.noop_conn.close()

    def _paced(self, interval: float, kind: str, once, out: list[float], stop_on_error: bool) -> None:
        due = time.monotonic()
        while time.monotonic() < self.end:
            t0 = time.perf_counter()
            self.inflight[kind] = t0
            try:
                once()
                error = None
            except (OSError, RuntimeError, ConnectionError) as e:
                # a reply that never came within REPLY_TIMEOUT counts as that long (a lower bound)
                error = f"{kind}: {type(e).__name__}: {e}"[:200]
            with self.lock:
                if self.closed:
                    return  # join() has already counted this one
                self.inflight[kind] = None
                out.append(time.perf_counter() - t0)
                if error:
                    self.errors.append(error)
                    if stop_on_error:
                        return
            due = max(due + interval, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))

    def _noops(self) -> None:
        def once():
            code, text = self.noop_conn.cmd(b"NOOP")
            if code != 250:
                raise RuntimeError(f"NOOP -> {text!r}")

        self._paced(NOOP_INTERVAL, "noop", once, self.noop, stop_on_error=True)  # its connection is gone

    def _messages(self) -> None:
        body = message_body(1024, "bystander")
        self._paced(MESSAGE_INTERVAL, "msg", lambda: send_message(self.port, body), self.msg, stop_on_error=False)


def _hard_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Load:
    """Clients that stop by themselves: at ``stop()``, or after ``max_rounds``."""

    def __init__(self):
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.socks: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def _connect(self, port: int, source: str) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT, source_address=(source, 0))
        with self.lock:
            self.socks.add(s)
        return s

    def _drop(self, s: socket.socket) -> None:
        with self.lock:
            self.socks.discard(s)
        _hard_close(s)

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            _hard_close(s)  # unblocks a sendall or recv under way
        for t in self.threads:
            t.join(10)


def _read_line(s: socket.socket, buf: bytearray) -> bytes:
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    i = buf.index(b"\n")
    line = bytes(buf[:i + 1])
    del buf[:i + 1]
    return line


def _read_reply(s: socket.socket, buf: bytearray) -> bytes:
    while True:
        line = _read_line(s, buf)
        if line[3:4] != b"-":
            return line


class Flood(Load):
    """Scenario (b): EHLO, then MAIL (DNS never answers) + 2 MiB of NOOP + QUIT in one write."""

    def __init__(self, port: int, size: int = FLOOD_BYTES, max_rounds: int = 100):
        super().__init__()
        self.port, self.size, self.max_rounds = port, size, max_rounds
        self.threads = [threading.Thread(target=self._run, daemon=True)]

    def _run(self) -> None:
        noops = b"NOOP\r\n" * (self.size // 6)
        for n in range(self.max_rounds):
            if self.stopping.is_set():
                return
            try:
                s = self._connect(self.port, "127.0.2.1")
            except OSError:
                self.count("connect failed")
                self.stopping.wait(0.2)
                continue
            reader = None
            try:
                buf = bytearray()
                _read_reply(s, buf)
                s.sendall(b"EHLO flood.test\r\n")
                _read_reply(s, buf)
                payload = b"MAIL FROM:<x@r%d.%d.dns-never-answers.test>\r\n" % (os.getpid(), n) + noops + b"QUIT\r\n"
                reader = threading.Thread(target=self._drain, args=(s,), daemon=True)
                reader.start()
                self.count("rounds")
                s.sendall(payload)  # one write; blocks while the gateway does not read
                self.count("rounds fully sent")
                while reader.is_alive() and not self.stopping.is_set():
                    reader.join(0.1)
            except OSError:
                pass
            finally:
                self._drop(s)
                if reader is not None:
                    reader.join(5)

    def _drain(self, s: socket.socket) -> None:
        """Read the replies slowly (at most 256 KiB per 20 ms) until the gateway closes."""
        try:
            while not self.stopping.is_set():
                chunk = s.recv(262144)
                if not chunk:
                    self.count("rounds closed by gateway")
                    break
                self.count("reply lines", chunk.count(b"\n"))
                time.sleep(0.02)
        except OSError:
            pass


class AuthFlood(Load):
    """Scenario (c): clients each writing 10 pipelined wrong AUTH PLAIN lines at a time."""

    def __init__(self, port: int, clients: int = AUTH_CLIENTS, per_write: int = AUTH_PER_WRITE,
                 max_batches: int = 2000):
        super().__init__()
        self.port, self.per_write, self.max_batches = port, per_write, max_batches
        line = f"AUTH PLAIN {plain_response(USER, 'wrong-password')}\r\n".encode()
        self.batch = line * per_write
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, client: int) -> None:
        batches = 0
        n = 0
        while batches < self.max_batches and not self.stopping.is_set():
            # every connection from a new address (127.3+client.x.y), as a botnet
            # would: a per-address failure limit must not be all that keeps
            # the hashing off the bystanders
            source = f"127.{3 + client}.{n // 250 % 250}.{n % 250 + 1}"
            n += 1
            try:
                s = self._connect(self.port, source)
            except OSError:
                self.count("connect failed")
                self.stopping.wait(0.2)
                continue
            self.count("connections")
            try:
                buf = bytearray()
                _read_reply(s, buf)
                s.sendall(b"EHLO attacker.test\r\n")
                _read_reply(s, buf)
                while batches < self.max_batches and not self.stopping.is_set():
                    s.sendall(self.batch)
                    batches += 1
                    self.count("AUTH sent", self.per_write)
                    for _ in range(self.per_write):
                        code = _read_reply(s, buf)[:3]
                        self.count(f"{code.decode(errors='replace')} replies")
                        if code.startswith(b"421"):
                            raise ConnectionError("421")
            except (OSError, ConnectionError):
                self.count("connections ended")
            finally:
                self._drop(s)
            self.stopping.wait(0.05)  # a gateway that closes at once does not make this a busy loop


# --- the gateway ---------------------------------------------------------------------------


def _program(name: str) -> Optional[str]:
    for d in ("/usr/sbin/", "/usr/local/sbin/"):
        if os.access(d + name, os.X_OK):
            return d + name
    return shutil.which(name)


def all_checks() -> list[str]:
    from gateway.plugins import discover

    return sorted(discover().checks)


class Gateway:
    """``mailgate run`` in its own process group, so a wedged one can be killed with its child."""

    def __init__(self, workdir: Path, blackhole_port: int, sink_port: int, checks_on=(), users_file: str = ""):
        from tests.support.ports import free_port

        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.queue = workdir / "queue"
        disabled = [c for c in all_checks() if c not in checks_on]
        config = workdir / "mailgate.toml"
        config.write_text(f"""
[server]
listen = ["127.0.0.1:{self.port}"]
hostname = "mx.bench.test"
max_connections_per_ip = 1000
max_message_size = {4 * DATA_BYTES}
[relay]
domains = ["example.test"]
[routes]
"*" = "smtp:[127.0.0.1]:{sink_port}"
[dns]
nameservers = ["127.0.0.1:{blackhole_port}"]
timeout = 5.0
[queue]
dir = "{self.queue}"
[log]
level = "warning"
[checks]
disabled = [{", ".join(f'"{c}"' for c in disabled)}]
[web]
enabled = false
""" + (f'[auth]\nusers_file = "{users_file}"\n' if users_file else ""))
        self.log_path = workdir / "mailgate.log"
        self.log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.pop("MAILGATE_CONFIG", None)  # the gateway runs the code beside this file, as the bench does
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)], cwd=workdir,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        from tools.bench import wait_port

        wait_port(self.port, proc=self.proc, log=self.log_text)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def delivery_pid(self) -> Optional[int]:
        from tests.support.gateway import children

        kids = children(self.proc.pid)
        return kids[0] if kids else None

    def queue_empty(self) -> bool:
        d = self.queue / "messages"
        return not d.exists() or not any(d.iterdir())

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM; a gateway whose reactor is still chewing a flood gets SIGKILL (and its group)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log.close()


class Env:
    """What every gateway here shares: a DNS server that never answers, a sink, a users file."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.blackhole.bind(("127.0.0.1", 0))  # receives, never read, never answers
        self.blackhole_port = self.blackhole.getsockname()[1]
        from tests.support.ports import free_port

        self.sink_port = free_port()
        self.sink = None
        sink = _program("smtp-sink")
        if sink:
            self.sink = subprocess.Popen([sink, "-u", "nobody", "-m", "2000", f"127.0.0.1:{self.sink_port}", "1024"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # else: nothing listens there; deliveries are refused and wait for a retry, which is cheap
        self.sink_note = "smtp-sink" if sink else "a closed port (no smtp-sink found)"
        self.users_file = tmp / "users"
        self.users_file.write_text(self._pbkdf2_line() + "\n")

    def _pbkdf2_line(self) -> str:
        r = subprocess.run([sys.executable, "-m", "gateway.cli", "passwd", USER], input=PASSWORD + "\n",
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
        if not line.startswith(USER + ":{PBKDF2"):
            raise RuntimeError(f"mailgate passwd failed ({r.returncode}): {r.stdout!r} {r.stderr[-500:]!r}")
        return line

    def gateway(self, name: str, **kw) -> Gateway:
        return Gateway(self.tmp / name, self.blackhole_port, self.sink_port, **kw)

    def close(self) -> None:
        self.blackhole.close()
        if self.sink:
            self.sink.terminate()
            self.sink.wait()


# --- 1. bystander latency ------------------------------------------------------------------


def latency_scenario(env: Env, label: str, load_factory, duration: float) -> dict:
    gw = env.gateway(label.split()[0].strip("()"), checks_on=("sender_domain",), users_file=str(env.users_file))
    load = None
    try:
        for _ in range(5):  # warm: imports, the first spool write
            send_message(gw.port, message_body(1024, "warm"))
        by = Bystanders(gw.port, duration)
        if load_factory is not None:
            load = load_factory(gw.port).start()
            time.sleep(0.5)  # the flood is in place before the bystanders start
        by.start()
        time.sleep(duration)
        if load is not None:
            load.stop()  # the load ends with the window; what it left queued in the gateway may still delay
        by.join()
    finally:
        if load is not None:
            load.stop()
        gw.stop()
    return {"label": label, "noop": summary(by.noop, NOOP_INTERVAL), "msg": summary(by.msg, MESSAGE_INTERVAL),
            "errors": by.errors, "load": dict(load.counts) if load else {}}


def ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1000:.1f}"


def print_latency(rows: list[dict], duration: float) -> bool:
    print(f"Bystander latency, {duration:g} s per scenario, each on a fresh `mailgate run` (only sender_domain on; "
          f"[dns] a UDP socket that never answers, timeout 5 s)")
    print(f"NOOP: one connection, one every {NOOP_INTERVAL * 1000:.0f} ms; message: connect..QUIT with 1 KB DATA, "
          f"one every {MESSAGE_INTERVAL * 1000:.0f} ms; ms; p99* corrected for coordinated omission")
    print(f"{'scenario':<34}{'NOOP n':>7}{'p50':>9}{'p99*':>10}{'max':>10}  {'msg n':>6}{'p50':>9}{'p99*':>10}"
          f"{'max':>10}")
    ok = True
    for r in rows:
        n, m = r["noop"], r["msg"]
        print(f"{r['label']:<34}{n['n']:>7}{ms(n['p50']):>9}{ms(n['p99']):>10}{ms(n['max']):>10}  {m['n']:>6}"
              f"{ms(m['p50']):>9}{ms(m['p99']):>10}{ms(m['max']):>10}")
        if r["load"]:
            print(f"{'':<4}load: " + ", ".join(f"{k} {v}" for k, v in sorted(r["load"].items())))
        if r["label"].startswith("(c)") and not any(k.startswith("535") for k in r["load"]):
            print(f"{'':<4}warning: no 535 reply: the AUTH load never reached a password check")
        for e in r["errors"][:3]:
            print(f"{'':<4}bystander error: {e}")
        if len(r["errors"]) > 3:
            print(f"{'':<4}... {len(r['errors']) - 3} more bystander errors")
    for r in rows[1:]:
        n, m = r["noop"], r["msg"]
        good = n["p99"] < TARGET_P99 and m["p99"] < TARGET_P99 and not r["errors"]
        ok = ok and good
        print(f"target {r['label']}: bystander p99 < {TARGET_P99 * 1000:.0f} ms: NOOP {ms(n['p99'])} ms, "
              f"message {ms(m['p99'])} ms: {verdict(good)}")
    return ok


def run_latency(env: Env, duration: float) -> bool:
    scenarios = [("(a) idle", None),
                 ("(b) 2 MiB pipelined NOOP flood", Flood),
                 (f"(c) {AUTH_CLIENTS} x {AUTH_PER_WRITE} pipelined AUTH", AuthFlood)]
    rows = []
    for label, factory in scenarios:
        rows.append(latency_scenario(env, label, factory, duration))
    return print_latency(rows, duration)


# --- 2. dribbled DATA CPU -------------------------------------------------------------------


def timed_data(gw: Gateway, data: bytes, dribble: bool, rate: float = 5000.0) -> tuple[float, float, float]:
    """(receiver CPU s, delivery child CPU s, wall s) for one message's DATA."""
    c = Conn(gw.port)
    try:
        c.reply()
        c.cmd(b"EHLO cpu.test", 250)
        c.cmd(b"MAIL FROM:<bench@sender.test>", 250)
        c.cmd(b"RCPT TO:<user@example.test>", 250)
        c.cmd(b"DATA", 354)
        child = gw.delivery_pid()
        cpu0, child0, t0 = cpu_seconds(gw.proc.pid), cpu_seconds(child) if child else 0.0, time.perf_counter()
        send_data(c.sock, data, dribble, rate)
        code, text = c.reply()
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(gw.proc.pid) - cpu0
        if code != 250:
            raise RuntimeError(f"end of data -> {text!r}")
        c.cmd(b"QUIT")
    finally:
        c.close()
    deadline = time.monotonic() + 120
    while not gw.queue_empty() and time.monotonic() < deadline:
        time.sleep(0.05)
    child_cpu = cpu_seconds(child) - child0 if child and os.path.exists(f"/proc/{child}") else float("nan")
    return cpu, child_cpu, wall


# The floor: what the same reactor costs to hand a protocol 20,000 separate
# reads, with nothing done to them but keeping them and spotting the end.
FLOOR_SERVER = r"""
import asyncio, sys
from twisted.internet import asyncioreactor
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
asyncioreactor.install(loop)
from twisted.internet import protocol, reactor

class Keep(protocol.Protocol):
    def connectionMade(self):
        self.parts, self.tail = [], b""
        self.transport.write(b"220 floor\r\n")

    def dataReceived(self, data):
        self.parts.append(data)
        seen = self.tail + data[-5:]
        if seen.endswith(b"\r\n.\r\n"):
            b"".join(self.parts)
            self.parts = []
            self.transport.write(b"250 ok\r\n")
        self.tail = seen[-4:]

factory = protocol.Factory()
factory.protocol = Keep
print(reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port, flush=True)
reactor.run()
"""


def send_data(sock: socket.socket, data: bytes, dribble: bool, rate: float) -> None:
    if not dribble:
        sock.sendall(data)
        return
    # paced: each write arrives alone, as segments from a slow client do;
    # unpaced, the kernel hands the reader 64 KiB at a time and nothing is
    # dribbled at all
    gap, due = 1.0 / rate, time.perf_counter()
    for chunk in dribble_chunks(data, DRIBBLE_WRITE):
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sock.sendall(chunk)
        due = max(due, time.perf_counter() - gap) + gap


def floor_cpu(repeat: int, rate: float) -> dict[bool, float]:
    """Median CPU seconds of the bare reactor (one write, dribbled)."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER], stdout=subprocess.PIPE, text=True)
    runs: dict[bool, list[float]] = {False: [], True: []}
    try:
        port = int(proc.stdout.readline())
        for i in range(repeat):
            for dribble in ((False, True) if i % 2 == 0 else (True, False)):
                c = Conn(port)
                try:
                    c.reply()
                    data = message_body(DATA_BYTES, f"floor{i}") + b".\r\n"
                    cpu0 = cpu_seconds(proc.pid)
                    send_data(c.sock, data, dribble, rate)
                    c.reply()
                    runs[dribble].append(cpu_seconds(proc.pid) - cpu0)
                finally:
                    c.close()
    finally:
        proc.terminate()
        proc.wait()
    return {k: statistics.median(v) for k, v in runs.items()}


# DATA-stage checks that need no DNS (the bench's resolver never answers):
# what a site's receiver does with a message's bytes besides reading them
CONTENT_CHECKS = ("gtube", "banned_attachments", "header_sanity", "mime_structure", "sa_rules")


def measure_pairs(gw: Gateway, repeat: int, rate: float, label: str):
    """Per mode (one write, dribbled): median (receiver CPU, child CPU, wall); and the per-pair ratios."""
    runs: dict[bool, list] = {False: [], True: []}
    pairs = []
    timed_data(gw, message_body(DATA_BYTES, f"warm{label}") + b".\r\n", False)
    for i in range(repeat):
        got = {}
        for dribble in ((False, True) if i % 2 == 0 else (True, False)):
            data = message_body(DATA_BYTES, f"cpu{label}{i}{int(dribble)}") + b".\r\n"
            got[dribble] = timed_data(gw, data, dribble, rate)
            runs[dribble].append(got[dribble])
        pairs.append(got[True][0] / got[False][0] if got[False][0] > 0 else float("inf"))
    med = {d: [statistics.median(r[k] for r in runs[d]) for k in range(3)] for d in runs}
    return med, pairs


def run_cpu(env: Env, repeat: int, rate: float) -> bool:
    print(f"Dribbled DATA: {DATA_BYTES // (1024 * 1024)} MiB of DATA in {DRIBBLE_WRITE}-byte writes (TCP_NODELAY, "
          f"{rate:.0f} writes/s = {rate * DRIBBLE_WRITE / 1e6:.1f} MB/s) vs one sendall, delivery to "
          f"{env.sink_note}; median of {repeat}, alternated")
    print("receiver = the `mailgate run` process from the 354 to the final 250; "
          "delivery = its child until the queue is empty (shown apart, not in the ratio)")
    print(f"{'checks':<16}{'writes':<18}{'receiver CPU s':>15}{'delivery CPU s':>15}{'wall s':>9}{'ratio':>8}")
    results = {}
    for label, checks_on in (("content", CONTENT_CHECKS), ("none", ())):
        gw = env.gateway(f"cpu-{label}", checks_on=checks_on)
        try:
            med, pairs = measure_pairs(gw, repeat, rate, label)
        finally:
            gw.stop()
        ratio = med[True][0] / med[False][0] if med[False][0] > 0 else float("inf")
        results[label] = (med, pairs, ratio)
        for dribble, writes in ((False, "one write"), (True, f"{DRIBBLE_WRITE}-byte writes")):
            m = med[dribble]
            tail = f"{ratio:>7.2f}x" if dribble else ""
            print(f"{label:<16}{writes:<18}{m[0]:>15.2f}{m[1]:>15.2f}{m[2]:>9.2f}{tail}")
    floor = floor_cpu(repeat, rate)
    print(f"{'floor':<16}{'':<18}{floor[False]:>7.2f} / {floor[True]:.2f}   (a bare Twisted protocol on the same "
          f"asyncio reactor that only keeps the bytes: one write / {DRIBBLE_WRITE}-byte writes)")
    med, pairs, ratio = results["content"]
    ok = ratio <= TARGET_CPU_RATIO
    print(f"target dribbled receiver CPU <= {TARGET_CPU_RATIO}x one write, content checks ({', '.join(CONTENT_CHECKS)})"
          f": {ratio:.2f}x (pairs: {', '.join(f'{p:.2f}' for p in pairs)}): {verdict(ok)}")
    med, pairs, ratio = results["none"]
    print(f"  with every check off the receiver does almost nothing with the bytes, and the reads dominate: "
          f"{ratio:.2f}x (pairs: {', '.join(f'{p:.2f}' for p in pairs)}); the bare reactor's own reads cost "
          f"{floor[True]:.2f} s, this receiver {med[True][0]:.2f} s")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of bystander traffic per scenario")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each DATA mode; the median is printed")
    ap.add_argument("--dribble-rate", type=float, default=5000.0,
                    help=f"{DRIBBLE_WRITE}-byte writes per second in the dribbled DATA")
    ap.add_argument("--only", choices=["latency", "cpu"], help="one of the two parts")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-bench-hardening-"))
    env = Env(tmp)
    try:
        if args.only in (None, "latency"):
            run_latency(env, args.duration)
        if args.only is None:
            print()
        if args.only in (None, "cpu"):
            run_cpu(env, args.repeat, args.dribble_rate)
    finally:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0  # a missed target is a figure, not an error: `make bench` goes on


if __name__ == "__main__":
    sys.exit(main())
