"""`mailgate run` as a real subprocess on a free loopback port.

``GatewayProcess`` writes a config (listening on a free port, accepting mail
for example.test, routing everything to a downstream sink, its queue in a temp
dir) plus whatever TOML a test appends, starts the gateway, and waits until
it answers SMTP.  ``stop()`` sends SIGTERM (graceful), ``kill()`` SIGKILL.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tests.support.ports import free_port

MAILGATE = [sys.executable, "-m", "gateway.cli"]
REPO = Path(__file__).resolve().parents[2]


def base_config(port: int, queue_dir: str, downstream: Optional[str], dns: Optional[str] = None,
                domains=("example.test",), trusted=(), hostname: str = "mx.gateway.test",
                server_extra: str = "", web: str = "enabled = false") -> str:
    # the web console is on by default at 127.0.0.1:8025: a test gateway keeps
    # it off (two gateways would fight for the port) unless ``web`` sets it up
    route = f'"smtp:[127.0.0.1]:{downstream}"' if downstream else '"mx"'
    lines = [
        "[server]",
        f'listen = ["127.0.0.1:{port}"]',
        f'hostname = "{hostname}"',
        server_extra.rstrip("\n"),
        "[relay]",
        f"domains = {list(domains)!r}".replace("'", '"'),
        f"trusted_networks = {list(trusted)!r}".replace("'", '"'),
        "[routes]",
        f'"*" = {route}',
        "[queue]",
        f'dir = "{queue_dir}"',
        'retry_min = "1s"',
        'retry_max = "2s"',
        'connect_timeout = "5s"',
    ]
    if dns:
        lines += ["[dns]", f'nameservers = ["{dns}"]', "timeout = 2.0"]
    lines += ["[web]", web]
    return "\n".join(lines) + "\n"


class GatewayProcess:
    def __init__(self, workdir: Path, config_text: str, port: int):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mailgate.toml"
        self.config_path.write_text(config_text)
        self.host = "127.0.0.1"
        self.port = port
        self.log_path = self.workdir / "mailgate.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "GatewayProcess":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("MAILGATE_CONFIG", None)
        if getattr(self, "_log", None):  # a restart after kill(): one handle at a time
            self._log.close()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            MAILGATE + ["run", "-c", str(self.config_path)], cwd=str(self.workdir), env=env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailgate exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(512).startswith(b"220"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"mailgate did not answer on port {self.port}:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def delivery_pids(self) -> list[int]:
        """Pids of the running `mailgate deliver` children of this gateway (read from /proc)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [pid for pid in children(self.proc.pid) if b"deliver" in _cmdline(pid)]

    def smtp(self, source_address: Optional[str] = None, timeout: float = 30) -> smtplib.SMTP:
        src = (source_address, 0) if source_address else None
        return smtplib.SMTP(self.host, self.port, timeout=timeout, source_address=src)

    def queue_dir(self) -> Path:
        return self.workdir / "queue"

    def cli(self, *args: str, check: bool = False, input: Optional[bytes] = None) -> subprocess.CompletedProcess:
        """Run another mailgate subcommand against this gateway's config."""
        return subprocess.run(MAILGATE + list(args) + ["-c", str(self.config_path)], cwd=str(self.workdir),
                              capture_output=True, check=check, input=input, timeout=120)


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(name))
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def default_records():
    """The DNS every e2e gateway sees unless a test brings its own server:
    the test domains exist, so sender checks pass for ordinary mail."""
    from tests.support.dns import Records

    return (Records(ttl=300)
            .mx("sender.test", "mx1.sender.test", 10).a("mx1.sender.test", "127.0.0.1")
            .a("sender.test", "127.0.0.1")
            .mx("example.test", "mail.example.test", 10).a("mail.example.test", "127.0.0.1")
            .a("client.sender.test", "127.0.0.1").ptr("127.0.0.1", "client.sender.test"))


def mailgate_factory(tmp_path: Path, sink=None):
    """What the ``mailgate`` fixture returns: call it to get a running gateway.

    Without ``dns=`` a dnsmasq with ``default_records()`` is started for it:
    a gateway in a test never asks the system resolver.
    """
    started: list[GatewayProcess] = []
    servers: list = []

    def make(extra_toml: str = "", dns: Optional[str] = None, downstream_port: Optional[int] = None,
             trusted=(), domains=("example.test",), start: bool = True, name: str = "gw",
             server_extra: str = "", web: str = "enabled = false") -> GatewayProcess:
        port = free_port()
        workdir = tmp_path / f"{name}{len(started)}"
        if dns is None:
            from tests.support.dns import Dnsmasq

            server = Dnsmasq(tmp_path / f"dns{len(servers)}", default_records()).start()
            servers.append(server)
            dns = server.nameserver
        downstream = downstream_port if downstream_port is not None else (sink.port if sink else None)
        text = base_config(port, str(workdir / "queue"), downstream, dns, domains, trusted,
                           server_extra=server_extra, web=web) + "\n" + extra_toml
        gw = GatewayProcess(workdir, text, port)
        started.append(gw)
        return gw.start() if start else gw

    make.started = started
    make.servers = servers
    return make
