"""Real Redis servers on loopback for tests (Debian's redis-server package).

What the machines here need: every setting on the command line, never
/etc/redis/redis.conf (the package's file binds elsewhere and persists);
``--save "" --appendonly no`` keeps nothing on disk; a server is ready in a
few hundredths of a second.  The servers run in the foreground as our own
children (not ``--daemonize``), so a test can stop, restart, pause
(SIGSTOP: a Redis that is slow, not gone) and resume them.

- ``RedisServer``: one server on a free port; ``restart()`` comes back on the
  same port, as a restarted production Redis would.
- ``RedisClusterNodes``: three masters started with ``--cluster-enabled yes``
  (and ``--cluster-port``: the bus port is otherwise the port + 10000) and
  joined with ``redis-cli --cluster create ... --cluster-replicas 0
  --cluster-yes``; usable once every node reports ``cluster_state:ok``.
- ``RedisSentinel``: a sentinel (``redis-server FILE --sentinel``; it
  rewrites its file, so the file is its own) monitoring a ``RedisServer``
  as ``mymaster`` with a quorum of 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from tests.support.ports import free_port
from tests.support.programs import require_program, stop_process


def command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One inline command to 127.0.0.1:port, the reply's first line (no redis-py:
    the fixture must not depend on the client under test)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"$") and not data.startswith(b"$-1"):  # a bulk string: its body follows
            size = int(data[1:data.index(b"\r\n")])
            while len(data) < data.index(b"\r\n") + 2 + size + 2:
                data += s.recv(65536)
            return data[data.index(b"\r\n") + 2:][:size].decode()
        return data.decode().strip()



def wait_for_ping(server, what: str, timeout: float, log) -> None:
    """Until ``server`` (with .proc, .port, .stop()) answers PING; its log in the error."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.proc.returncode}:\n{log()}")
        try:
            if command(server.port, "PING", timeout=0.5) == "+PONG":
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{what} did not answer on {server.port}:\n{log()}")
        time.sleep(0.02)

class RedisServer:
    def __init__(self, workdir: Path, port: Optional[int] = None, extra: tuple = ()):
        self.program = require_program("redis-server")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = tuple(extra)
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self._log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.program, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes", *self.extra],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(self.workdir))
        wait_for_ping(self, "redis-server", timeout, self.log)
        return self

    def log(self) -> str:
        try:
            return (self.workdir / "redis.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.resume()  # a paused server cannot act on SIGTERM
        stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the port stays open and connections are accepted by the
        kernel, but nothing answers: a Redis that hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def cmd(self, *args: str) -> str:
        return command(self.port, *args)


class RedisClusterNodes:
    """Three masters, no replicas, all slots assigned."""

    def __init__(self, workdir: Path, count: int = 3):
        self.workdir = Path(workdir)
        # the bus port is named (Redis 7's cluster-port): by default it is the
        # port + 10000, which a free port above 55535 does not have, and which
        # nobody checked was free
        self.nodes = [RedisServer(self.workdir / f"node{i}", extra=(
            "--cluster-enabled", "yes", "--cluster-config-file", str(self.workdir / f"node{i}" / "nodes.conf"),
            "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000")) for i in range(count)]

    @property
    def url(self) -> str:
        return self.nodes[0].url  # a seed: the client learns the others from it

    def start(self, timeout: float = 30.0) -> "RedisClusterNodes":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # no node outlives a cluster that did not come up
            raise

    def _start(self, timeout: float) -> "RedisClusterNodes":
        cli = require_program("redis-cli")
        for node in self.nodes:
            node.start()
        r = subprocess.run([cli, "--cluster", "create", *[n.address for n in self.nodes],
                            "--cluster-replicas", "0", "--cluster-yes"],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{r.stdout}\n{r.stderr}")
        deadline = time.monotonic() + timeout
        while not all("cluster_state:ok" in n.cmd("CLUSTER", "INFO") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinel:
    def __init__(self, workdir: Path, master: RedisServer, service: str = "mymaster"):
        self.program = require_program("redis-server")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.master = master
        self.service = service
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "RedisSentinel":
        conf = self.workdir / "sentinel.conf"
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\ndir {self.workdir}\n"
                        f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n"
                        f"sentinel down-after-milliseconds {self.service} 1000\n")
        self._log = open(self.workdir / "sentinel.log", "ab")
        self.proc = subprocess.Popen([self.program, str(conf), "--sentinel"], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(self.workdir))
        wait_for_ping(self, "redis sentinel", timeout, lambda: "")
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        try:
            os.remove(self.workdir / "sentinel.conf")
        except OSError:
            pass
