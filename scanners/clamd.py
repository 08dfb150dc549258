"""ClamAV's clamd through pyclamd: the whole raw message goes over INSTREAM
(clamd decodes MIME, base64 and archives itself), on a unix socket or TCP.

pyclamd is blocking and keeps its socket on the client object, so each
thread of the pool gets its own client, and the call never runs on the
reactor.  Two pyclamd details are fixed in small subclasses: it writes
chunks with ``send()``, which on a socket with a timeout may write only part
of a chunk and corrupt the INSTREAM framing, so our sockets send everything;
and its TCP client is IPv4 only.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Optional

import pyclamd

from scanners.base import Clean, Infected, Outcome, ScanFailed, Scanner


class _SendAllSocket(socket.socket):
    def send(self, data, flags=0):
        self.sendall(data, flags)
        return len(data)


class _UnixClient(pyclamd.ClamdUnixSocket):
    def _init_socket(self):
        s = _SendAllSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_socket)
        except OSError as e:
            s.close()
            raise pyclamd.ConnectionError(f"could not reach clamd on {self.unix_socket}: {e.strerror or e}")
        self.clamd_socket = s


class _TcpClient(pyclamd.ClamdNetworkSocket):
    def _init_socket(self):
        last: Optional[OSError] = None
        for family, kind, proto, _, addr in socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM):
            s = _SendAllSocket(family, kind, proto)
            s.settimeout(self.timeout)
            try:
                s.connect(addr)
            except OSError as e:
                s.close()
                last = e
                continue
            self.clamd_socket = s
            return
        raise pyclamd.ConnectionError(
            f"could not reach clamd on {self.host}:{self.port}: {getattr(last, 'strerror', None) or last}")


class ClamdScanner(Scanner):
    engine = "clamd"

    def __init__(self, socket_path: str = "", host: str = "", port: int = 3310,
                 timeout: float = 30.0, name: str = ""):
        super().__init__(name)
        if not socket_path and not host:
            raise ValueError("clamd needs a unix socket path or a TCP address")
        self.socket_path = socket_path
        self.host = host
        self.port = port
        # pyclamd retries a timed-out recv() 5 times before giving up, so each
        # wait gets a fifth of the budget to end near the deadline
        self.socket_timeout = max(timeout / 5.0, 0.05)
        self._local = threading.local()

    def describe(self) -> str:
        where = self.socket_path or f"{self.host}:{self.port}"
        return f"{self.name} ({where})"

    def _client(self) -> Any:
        # pyclamd's constructor connects once to test the address; keeping a
        # client per thread saves that extra connect on every scan
        client = getattr(self._local, "client", None)
        if client is None:
            if self.socket_path:
                client = _UnixClient(filename=self.socket_path, timeout=self.socket_timeout)
            else:
                client = _TcpClient(host=self.host, port=self.port, timeout=self.socket_timeout)
            self._local.client = client
        return client

    def scan_blocking(self, data: bytes) -> Outcome:
        try:
            client = self._client()
            found = client.scan_stream(data, chunk_size=64 * 1024)
        except pyclamd.BufferTooLongError:
            return ScanFailed("message exceeds clamd's StreamMaxLength")
        except socket.timeout:
            return ScanFailed("clamd did not answer in time")
        except pyclamd.ConnectionError as e:
            if _caused_by_timeout(e):  # pyclamd wraps a recv() timeout too
                return ScanFailed("clamd did not answer in time")
            # refused / socket missing: clamd restarting, worth a second try
            cause = e.__context__ if isinstance(e.__context__, pyclamd.ConnectionError) else e
            return ScanFailed(str(cause), retry=True)
        except OSError as e:
            return ScanFailed(f"clamd connection failed: {e.strerror or e}", retry=True)
        return interpret(found)

    def ping(self) -> bool:
        try:
            return bool(self._client().ping())
        except (pyclamd.ConnectionError, OSError):
            return False


def _caused_by_timeout(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, socket.timeout):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def interpret(found: Optional[dict]) -> Outcome:
    """pyclamd's scan_stream result: None, or {'stream': ('FOUND'|'ERROR', text)}."""
    if not found:
        return Clean()
    names, errors = [], []
    for status, text in found.values():
        (names if status == "FOUND" else errors).append(text)
    if names:
        return Infected(names)
    return ScanFailed(f"clamd error: {'; '.join(errors) or 'unknown'}")
