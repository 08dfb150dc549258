"""ClamAV's clamd through pyclamd: the whole raw message goes over INSTREAM
(clamd decodes MIME, base64 and archives itself), on a unix socket or TCP.

pyclamd is blocking and keeps its socket on the client object, so a fresh
client is made for every scan (cheap: one connect) and the call runs in the
thread pool, never on the reactor.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import pyclamd

from scanners.base import Clean, Infected, Outcome, ScanFailed, Scanner


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

    def describe(self) -> str:
        where = self.socket_path or f"{self.host}:{self.port}"
        return f"{self.name} ({where})"

    def _client(self) -> Any:
        if self.socket_path:
            return pyclamd.ClamdUnixSocket(filename=self.socket_path, timeout=self.socket_timeout)
        return pyclamd.ClamdNetworkSocket(host=self.host, port=self.port, timeout=self.socket_timeout)

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
            return ScanFailed(f"cannot reach clamd: {e}", retry=True)
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
