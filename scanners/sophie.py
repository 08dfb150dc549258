"""Sophie, the Sophos daemon front-end: a unix-socket line protocol.

The client writes the message to a file the daemon can read, sends the file's
absolute path and a newline, and reads one reply line:

* ``0``          clean
* ``1`` or ``1:NAME``  infected (NAME when the daemon is set to show names)
* ``-1`` or ``-1:TEXT``  the daemon could not scan

(Protocol as implemented by Sophie's clients in MIMEDefang's
``item_contains_virus_sophie`` and File::VirusScan's
``Engine::Daemon::Sophos::Sophie``, which read up to 256 bytes of reply.)
Trophie, the Trend Micro front-end by the same author, speaks the same
protocol; ``scanners/trophie.py`` reuses this class.
"""

from __future__ import annotations

import os
import socket
import tempfile

from scanners.base import Clean, Infected, Outcome, ScanFailed, Scanner

REPLY_LIMIT = 256


class PathLineScanner(Scanner):
    """Write to a file, send its path, read one ``0`` / ``1:name`` / ``-1:err`` line."""

    engine = "sophie"

    def __init__(self, socket_path: str, timeout: float = 30.0, tmp_dir: str = "", name: str = ""):
        super().__init__(name)
        if not socket_path:
            raise ValueError(f"{self.engine} needs the daemon's unix socket path")
        self.socket_path = socket_path
        self.timeout = timeout
        self.tmp_dir = tmp_dir or None

    def describe(self) -> str:
        return f"{self.name} ({self.socket_path})"

    def scan_blocking(self, data: bytes) -> Outcome:
        fd, path = tempfile.mkstemp(prefix="mailgate-", suffix=".eml", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # the daemon usually runs as its own user: it must be able to read it
            os.chmod(path, 0o644)
            return self._ask(os.path.abspath(path))
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _ask(self, path: str) -> Outcome:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(self.socket_path)
            except OSError as e:
                return ScanFailed(f"cannot reach {self.engine} at {self.socket_path}: {e.strerror or e}",
                                  retry=True)
            s.sendall(path.encode("utf-8", "surrogateescape") + b"\n")
            reply = b""
            while b"\n" not in reply and len(reply) < REPLY_LIMIT:
                chunk = s.recv(REPLY_LIMIT - len(reply))
                if not chunk:
                    break
                reply += chunk
        except socket.timeout:
            return ScanFailed(f"{self.engine} did not answer in time")
        except OSError as e:
            return ScanFailed(f"{self.engine} connection failed: {e.strerror or e}")
        finally:
            s.close()
        return self.interpret(reply)

    def interpret(self, reply: bytes) -> Outcome:
        line = reply.split(b"\n", 1)[0].strip().decode("utf-8", "replace")
        if not line:
            return ScanFailed(f"no reply from {self.engine}")
        code, _, text = line.partition(":")
        code = code.strip()
        if code == "0":
            return Clean()
        if code == "1":
            return Infected([text.strip() or f"unknown-{self.engine}-virus"])
        if code == "-1":
            return ScanFailed(f"{self.engine} error: {text.strip() or 'unspecified'}")
        return ScanFailed(f"unexpected reply from {self.engine}: {line[:80]!r}")


class SophieScanner(PathLineScanner):
    engine = "sophie"
