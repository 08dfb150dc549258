"""Real DNS servers on loopback for tests: dnsmasq (records) and rbldnsd (DNSBLs).

API
===

Records (what the authoritative test server answers)::

    from tests.support.dns import Records
    records = (Records(ttl=60)
        .a("mail.example.test", "192.0.2.25")         # also answers the PTR of 192.0.2.25
        .aaaa("mail.example.test", "2001:db8::25")   # (idem for ip6.arpa)
        .mx("example.test", "mail.example.test", 10)
        .ptr("192.0.2.40", "unrelated.other.test")   # an explicit PTR wins over the one from .a()
        .txt("sender.test", "v=spf1 -all")           # text > 255 bytes is split into strings
        .txt("multi.test", "part one", "part two")   # or give the strings yourself
        .cname("www.example.test", "mail.example.test"))
    records.add("example.test", "MX", "20 backup.example.test")   # generic form
    Records.from_tuples([("mail.example.test", "A", "192.0.2.25"), ...])

Every name under a domain that has a record (its top label, e.g. ``.test``,
plus ``in-addr.arpa``/``ip6.arpa``) is answered locally: unknown names give
NXDOMAIN, known names without that type give NOERROR/no answer.  Names in
other top-level domains get REFUSED (a resolver sees SERVFAIL).

Servers (context managers, or start()/stop() yourself)::

    from tests.support.dns import Dnsmasq, Rbldnsd
    with Rbldnsd(zones={"zen.test": ("ip4set", ZEN_DATA)}) as rbl, \\
         Dnsmasq(tmp_path / "dns", records, forward={"zen.test": rbl}) as dns:
        dns.nameserver      # "127.0.0.1:PORT"  (the [dns] nameservers value)
        dns.host, dns.port  # for gateway.resolver.Resolver([HostPort(...)]) or dnspython
        dns.resolver()      # a dnspython Resolver pinned to this server (never the system one)
        dns.stop(); ...; dns.start()  # "DNS down" in the middle of a test; same port again
        dns.set_records(other)        # rewrite and restart (dnsmasq cannot reload its config)
        rbl.set_zone("zen.test", "ip4set", NEW_DATA)  # rbldnsd re-reads on SIGHUP

``forward`` maps a zone to a server (an ``Rbldnsd``, anything with
``host``/``port``, or "127.0.0.1#PORT"): dnsmasq forwards those names there,
uncached, so one nameserver serves both records and DNSBLs.  rbldnsd speaks
UDP only, so query DNSBL names over UDP (the gateway resolver does).

rbldnsd zones: ``{zone: (dataset_type, data_text)}``, with dataset types
``ip4set``, ``ip4tset``, ``ip4trie``, ``ip6trie``, ``dnset``, ``generic``...
in rbldnsd's own data syntax, e.g. for an ip4set::

    :127.0.0.2:Listed, see https://zen.test/$
    127.0.0.2
    192.0.2.66 :127.0.0.4:Exploited host $
    198.51.100.0/24 :127.255.255.254:query refused

A ``$SOA``/``$NS`` line is added when the data has none (a DNSBL needs a SOA
for negative answers to carry a TTL).

Pytest fixtures (import them into a test module, or into a conftest)::

    from tests.support.dns import dns_servers   # noqa: F401  (fixture)

    def test_x(dns_servers):
        rbl = dns_servers.rbldnsd({"zen.test": ("ip4set", "127.0.0.2\\n")})
        dns = dns_servers.dnsmasq(records, forward={"zen.test": rbl})

Each server started through the fixture is stopped at teardown, whatever the
test did.  Servers run in the foreground as children of the test process
(``dnsmasq -k``, ``rbldnsd -n``); ``stop()`` terminates the child and waits.

Why rbldnsd gets its own directory: it refuses to run as root and reads its
data files as user ``rbldns`` after dropping privileges (on every reload too),
and pytest's tmp_path sits below 0700 directories.  So its data lives in a
fresh ``mkdtemp`` directory made world-readable (755, files 644) and removed
at ``stop(final=True)`` / teardown.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

import dns.message
import dns.query
import dns.resolver
import dns.reversename
import pytest

from tests.support.ports import free_port
from tests.support.programs import require_program, stop_process

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 5.0


def _split_txt(text: str) -> list[str]:
    """A TXT string holds at most 255 bytes: longer text becomes several strings."""
    data = text.encode()
    if len(data) <= 255:
        return [text]
    out, i = [], 0
    while i < len(data):
        out.append(data[i:i + 255].decode("utf-8", "replace"))
        i += 255
    return out


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Records:
    """The records a ``Dnsmasq`` server answers (chainable builder)."""

    def __init__(self, ttl: int = 60):
        self.ttl = ttl
        self.hosts: list[tuple[str, str]] = []  # (name, ip) for A and AAAA
        self.mxs: list[tuple[str, str, int]] = []
        self.ptrs: list[tuple[str, str]] = []  # (reverse name, target)
        self.txts: list[tuple[str, list[str]]] = []
        self.cnames: list[tuple[str, str]] = []
        self.local_domains: set[str] = set()

    @staticmethod
    def _name(name: str) -> str:
        return name.strip().rstrip(".").lower()

    def a(self, name: str, ip: str) -> "Records":
        if not isinstance(ipaddress.ip_address(ip), ipaddress.IPv4Address):
            raise ValueError(f"A record needs an IPv4 address, got {ip!r}")
        self.hosts.append((self._name(name), ip))
        return self

    def aaaa(self, name: str, ip: str) -> "Records":
        if not isinstance(ipaddress.ip_address(ip), ipaddress.IPv6Address):
            raise ValueError(f"AAAA record needs an IPv6 address, got {ip!r}")
        self.hosts.append((self._name(name), str(ipaddress.ip_address(ip))))
        return self

    def mx(self, domain: str, host: str, preference: int = 10) -> "Records":
        self.mxs.append((self._name(domain), self._name(host), int(preference)))
        return self

    def ptr(self, ip_or_name: str, target: str) -> "Records":
        try:
            rev = dns.reversename.from_address(ip_or_name).to_text(omit_final_dot=True)
        except (ValueError, dns.exception.SyntaxError):
            rev = self._name(ip_or_name)
        self.ptrs.append((rev.lower(), self._name(target)))
        return self

    def txt(self, name: str, *strings: str) -> "Records":
        if not strings:
            raise ValueError("txt() needs at least one string")
        parts = [p for s in strings for p in (_split_txt(s) if len(strings) == 1 else [s])]
        for p in parts:
            if len(p.encode()) > 255:
                raise ValueError("a TXT string is at most 255 bytes; pass one long string to split it")
        self.txts.append((self._name(name), parts))
        return self

    def cname(self, alias: str, target: str) -> "Records":
        self.cnames.append((self._name(alias), self._name(target)))
        return self

    def local(self, domain: str) -> "Records":
        """Answer NXDOMAIN for names under ``domain`` even if it has no records."""
        self.local_domains.add(self._name(domain))
        return self

    def add(self, name: str, rdtype: str, value: str) -> "Records":
        """Generic form: ("x.test", "MX", "10 mx.x.test"), ("1.2.0.192.in-addr.arpa", "PTR", "h.test")."""
        t = rdtype.upper()
        if t == "A":
            return self.a(name, value)
        if t == "AAAA":
            return self.aaaa(name, value)
        if t == "MX":
            pref, _, host = value.strip().partition(" ")
            return self.mx(name, host.strip(), int(pref))
        if t == "PTR":
            return self.ptr(name, value)
        if t == "TXT":
            return self.txt(name, value)
        if t == "CNAME":
            return self.cname(name, value)
        raise ValueError(f"unsupported record type {rdtype!r} (A, AAAA, MX, PTR, TXT, CNAME)")

    @classmethod
    def from_tuples(cls, rows: Iterable[tuple[str, str, str]], ttl: int = 60) -> "Records":
        r = cls(ttl)
        for name, rdtype, value in rows:
            r.add(name, rdtype, value)
        return r

    def _names(self) -> Iterable[str]:
        yield from (n for n, _ in self.hosts)
        yield from (n for n, _, _ in self.mxs)
        yield from (n for n, _ in self.ptrs)
        yield from (n for n, _ in self.txts)
        yield from (n for n, _ in self.cnames)
        yield from self.local_domains

    def dnsmasq_lines(self) -> list[str]:
        tops = {"in-addr.arpa", "ip6.arpa"}
        for n in self._names():
            if n.endswith(".in-addr.arpa") or n.endswith(".ip6.arpa"):
                continue
            tops.add(n.rsplit(".", 1)[-1])
        lines = [f"local-ttl={self.ttl}"]
        lines += [f"local=/{t}/" for t in sorted(tops)]
        lines += [f"local=/{d}/" for d in sorted(self.local_domains)]
        # dnsmasq's PTR for an address is its first host-record, unless a
        # ptr-record names it: explicit PTRs go first so they win.
        lines += [f"ptr-record={rev},{target}" for rev, target in self.ptrs]
        lines += [f"host-record={name},{ip}" for name, ip in self.hosts]
        lines += [f"mx-host={d},{h},{p}" for d, h, p in self.mxs]
        lines += [f"txt-record={n}," + ",".join(_quote(s) for s in parts) for n, parts in self.txts]
        lines += [f"cname={a},{t}" for a, t in self.cnames]
        return lines


def _wait_answering(host: str, port: int, qname: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    q = dns.message.make_query(qname, "SOA")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} at start")
        try:
            dns.query.udp(q, host, port=port, timeout=0.2)
            return
        except (dns.exception.Timeout, OSError):
            time.sleep(0.03)
    raise RuntimeError(f"{what} did not answer on {host}:{port} within {START_TIMEOUT}s")


def _tail(path: Path, n: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


class _Server:
    host = LOOPBACK
    port: int
    _proc: Optional[subprocess.Popen] = None

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [self.host]
        r.port = self.port
        r.timeout = r.lifetime = timeout
        r.cache = None
        return r

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop(final=True)

    def start(self):  # pragma: no cover - interface
        raise NotImplementedError

    def stop(self, final: bool = False) -> None:
        stop_process(self._proc, timeout=5)
        self._proc = None


class Rbldnsd(_Server):
    """rbldnsd serving DNSBL zones on 127.0.0.1:port (UDP only)."""

    def __init__(self, zones: dict[str, tuple[str, str]], port: Optional[int] = None, ttl: int = 60):
        self.program = require_program("rbldnsd")
        self.port = port or free_port()
        self.ttl = ttl
        self.zones: dict[str, tuple[str, str]] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="mailgate-rbldnsd-"))
        os.chmod(self.dir, 0o755)
        for zone, (kind, data) in zones.items():
            self._write(zone, kind, data)

    def _file(self, zone: str) -> Path:
        return self.dir / f"{zone}.data"

    def _write(self, zone: str, kind: str, data: str) -> None:
        zone = zone.strip(".").lower()
        if "$SOA" not in data:
            data = f"$SOA {self.ttl} ns.{zone}. hostmaster.{zone}. 1 600 300 86400 {self.ttl}\n" \
                   f"$NS {self.ttl} ns.{zone}.\n" + data
        path = self._file(zone)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(data if data.endswith("\n") else data + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        self.zones[zone] = (kind, data)

    def start(self) -> "Rbldnsd":
        if self.running:
            return self
        if not self.zones:
            raise ValueError("rbldnsd needs at least one zone")
        cmd = [self.program]
        if os.geteuid() == 0:
            cmd += ["-u", "rbldns"]  # it refuses to run as root
        cmd += ["-b", f"{self.host}/{self.port}", "-w", str(self.dir), "-t", str(self.ttl), "-n", "-a"]
        cmd += [f"{z}:{kind}:{self._file(z).name}" for z, (kind, _) in self.zones.items()]
        # output to a file, not a pipe nobody reads (a full pipe would stall the server)
        with open(self.dir / "rbldnsd.log", "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_answering(self.host, self.port, next(iter(self.zones)), self._proc, "rbldnsd")
        except RuntimeError as e:
            why = _tail(self.dir / "rbldnsd.log")
            self.stop(final=True)
            raise RuntimeError(f"{e}: {why}") from None
        return self

    def set_zone(self, zone: str, kind: str, data: str) -> None:
        """Replace a zone's data; a new zone name needs a restart, which this does."""
        new = zone.strip(".").lower() not in self.zones
        self._write(zone, kind, data)
        if not self.running:
            return
        if new:
            self.stop()
            self.start()
            return
        self._proc.send_signal(signal.SIGHUP)
        # rbldnsd reloads between queries; wait until the SOA serial is answered again
        _wait_answering(self.host, self.port, zone.strip("."), self._proc, "rbldnsd")
        time.sleep(0.05)

    def stop(self, final: bool = False) -> None:
        super().stop()
        if final:
            shutil.rmtree(self.dir, ignore_errors=True)


class Dnsmasq(_Server):
    """dnsmasq answering ``Records`` locally and forwarding some zones, on 127.0.0.1:port."""

    def __init__(self, directory, records: Optional[Records] = None, forward: Optional[dict] = None,
                 port: Optional[int] = None):
        self.program = require_program("dnsmasq")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.records = records or Records()
        self.forward = dict(forward or {})

    @staticmethod
    def _target(server) -> str:
        if isinstance(server, str):
            return server
        return f"{server.host}#{server.port}"

    def config_text(self) -> str:
        lines = [
            f"port={self.port}",
            f"listen-address={self.host}",
            "bind-interfaces",
            "no-resolv",
            "no-hosts",
            "no-poll",
            "no-negcache",
            # uncached so tests that change rbldnsd data (or stop it) see it at once
            "cache-size=0",
            "user=root" if os.geteuid() == 0 else "",
            f"pid-file={self.dir / 'dnsmasq.pid'}",
            f"log-facility={self.dir / 'dnsmasq.log'}",
        ]
        lines += [f"server=/{zone.strip('.')}/{self._target(srv)}" for zone, srv in self.forward.items()]
        lines += self.records.dnsmasq_lines()
        return "\n".join(line for line in lines if line) + "\n"

    def start(self) -> "Dnsmasq":
        if self.running:
            return self
        conf = self.dir / "dnsmasq.conf"
        conf.write_text(self.config_text())
        with open(self.dir / "dnsmasq.stderr", "ab") as log:
            self._proc = subprocess.Popen([self.program, "-k", f"--conf-file={conf}"],
                                          stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_answering(self.host, self.port, "in-addr.arpa", self._proc, "dnsmasq")
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}: {_tail(self.dir / 'dnsmasq.stderr')}") from None
        return self

    def set_records(self, records: Records) -> None:
        self.records = records
        if self.running:
            self.stop()
            self.start()


class DnsServers:
    """Factory behind the ``dns_servers`` fixture: every server it starts is stopped at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = Path(tmp_path)
        self.started: list[_Server] = []

    def rbldnsd(self, zones: dict[str, tuple[str, str]], **kw) -> Rbldnsd:
        srv = Rbldnsd(zones, **kw)
        self.started.append(srv)
        return srv.start()

    def dnsmasq(self, records: Optional[Records] = None, forward: Optional[dict] = None, **kw) -> Dnsmasq:
        srv = Dnsmasq(self.tmp_path / f"dnsmasq-{len(self.started)}", records, forward, **kw)
        self.started.append(srv)
        return srv.start()

    def close(self) -> None:
        for srv in reversed(self.started):
            srv.stop(final=True)
        self.started.clear()


@pytest.fixture
def dns_servers(tmp_path):
    servers = DnsServers(tmp_path)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="module")
def envelope_dns(tmp_path_factory):
    """One dnsmasq per test module serving ``envelope_records()``."""
    servers = DnsServers(tmp_path_factory.mktemp("dns"))
    try:
        yield servers.dnsmasq(envelope_records())
    finally:
        servers.close()


# Test data used by several test modules (DNSBL codes as the issue asks:
# 127.0.0.2, .4, .10 listings and a 127.255.255.254 "query refused" error answer).
ZEN_IP4SET = """\
:127.0.0.2:Listed in zen.test SBL, see https://zen.test/query/$
127.0.0.2
192.0.2.66
198.51.100.7 :127.0.0.4:Listed in zen.test XBL (exploited host) $
198.51.100.8 :127.0.0.10:Dynamic IP (PBL) $
198.51.100.9 :127.255.255.254:Query refused (public resolver)
"""



def envelope_records(ttl: int = 60) -> Records:
    """Test domains for envelope checks (sender domains, PTR/FCrDNS, HELO names).

    - sender.test: MX mx1.sender.test (192.0.2.30, whose PTR points back: FCrDNS ok);
      also A 192.0.2.30 and TXT SPF.
    - aonly.test: A only; v6only.test: AAAA only; nomx.test: a TXT record and nothing
      else (exists, no MX/A/AAAA); nullmx.test: null MX (RFC 7505); ghost.test: NXDOMAIN.
    - 192.0.2.40: PTR unrelated.other.test, whose A is 192.0.2.41 (FCrDNS mismatch).
    - 192.0.2.66 and 198.51.100.0/24: no PTR.
    - 2001:db8::30: PTR v6host.sender.test with AAAA 2001:db8::30.
    - example.test: MX mail.example.test (192.0.2.25), the gateway's own domain.
    """
    return (
        Records(ttl)
        .mx("example.test", "mail.example.test", 10)
        .a("mail.example.test", "192.0.2.25")
        .mx("sender.test", "mx1.sender.test", 10)
        .a("mx1.sender.test", "192.0.2.30")
        .a("sender.test", "192.0.2.30")
        .txt("sender.test", "v=spf1 ip4:192.0.2.30 -all")
        .a("aonly.test", "192.0.2.31")
        .aaaa("v6only.test", "2001:db8::31")
        .txt("nomx.test", "exists but takes no mail")
        .mx("nullmx.test", ".", 0)
        .ptr("192.0.2.40", "unrelated.other.test")
        .a("unrelated.other.test", "192.0.2.41")
        .ptr("192.0.2.41", "unrelated.other.test")
        .aaaa("v6host.sender.test", "2001:db8::30")
        .local("ghost.test")
    )
