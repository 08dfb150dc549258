"""An ICAP (RFC 3507) client: how today's commercial engines (Sophos,
Kaspersky, Trend, McAfee, Symantec scan servers, c-icap with ClamAV) are
usually reached.

The message is sent whole, as the body of an HTTP response (RESPMOD, the
default) or of an HTTP POST request (REQMOD), chunked, with ``Allow: 204`` so
a server that leaves it unmodified says so without echoing it back.

* ``204``: clean.
* ``200`` with ``X-Infection-Found`` (``Type=0; Resolution=2; Threat=NAME;``,
  draft-stecher-icap-subid) or ``X-Violations-Found`` (a count line, then
  four lines per violation: file name, threat name, id, disposition):
  infected.  ``X-Virus-ID`` (older servers) also names the virus.
* ``200`` whose encapsulated HTTP status is not 2xx: the server blocked it
  without naming why: infected, named after the status.
* ``200`` that returns the content unchanged with HTTP 2xx: clean.
* anything else: a failure.

Blocking sockets in the thread pool, one connection per scan.
"""

from __future__ import annotations

import socket
from typing import Optional
from urllib.parse import quote

from scanners.base import Clean, Infected, Outcome, ScanFailed, Scanner

MAX_HEADER = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


class IcapScanner(Scanner):
    engine = "icap"

    def __init__(self, host: str, port: int = 1344, service: str = "avscan", method: str = "RESPMOD",
                 timeout: float = 30.0, name: str = ""):
        super().__init__(name)
        method = method.upper()
        if method not in ("RESPMOD", "REQMOD"):
            raise ValueError("ICAP method must be RESPMOD or REQMOD")
        self.host = host
        self.port = port
        self.service = service.strip("/")
        self.method = method
        self.timeout = timeout

    def describe(self) -> str:
        return f"{self.name} (icap://{self.host}:{self.port}/{self.service} {self.method})"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"icap://{host}:{self.port}/{quote(self.service)}"

    def request(self, data: bytes) -> bytes:
        if self.method == "RESPMOD":
            req_hdr = b"GET /message.eml HTTP/1.1\r\nHost: mailgate\r\n\r\n"
            res_hdr = (b"HTTP/1.1 200 OK\r\nContent-Type: message/rfc822\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(data))
            encapsulated = f"req-hdr=0, res-hdr={len(req_hdr)}, res-body={len(req_hdr) + len(res_hdr)}"
            head = req_hdr + res_hdr
        else:
            req_hdr = (b"POST /message.eml HTTP/1.1\r\nHost: mailgate\r\nContent-Type: message/rfc822\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(data))
            encapsulated = f"req-hdr=0, req-body={len(req_hdr)}"
            head = req_hdr
        body = (b"%x\r\n%s\r\n" % (len(data), data) if data else b"") + b"0\r\n\r\n"
        icap = (f"{self.method} {self.url} ICAP/1.0\r\n"
                f"Host: {self.host}\r\n"
                "User-Agent: MailGate\r\n"
                "Allow: 204\r\n"
                f"Encapsulated: {encapsulated}\r\n\r\n").encode("ascii")
        return icap + head + body

    def scan_blocking(self, data: bytes) -> Outcome:
        try:
            s = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            return ScanFailed(f"cannot reach ICAP server {self.host}:{self.port}: {e.strerror or e}", retry=True)
        try:
            s.settimeout(self.timeout)
            s.sendall(self.request(data))
            return read_response(_Reader(s))
        except socket.timeout:
            return ScanFailed("ICAP server did not answer in time")
        except (OSError, ProtocolError) as e:
            return ScanFailed(f"ICAP exchange failed: {e}")
        finally:
            s.close()


class ProtocolError(Exception):
    pass


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ProtocolError("connection closed mid-response")
        self.buf += chunk

    def until(self, marker: bytes, limit: int = MAX_HEADER) -> bytes:
        while marker not in self.buf:
            if len(self.buf) > limit:
                raise ProtocolError("response header too long")
            self._fill()
        out, self.buf = self.buf.split(marker, 1)
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def parse_headers(block: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Status line and headers (continuation lines folded in)."""
    lines = block.decode("iso-8859-1").split("\r\n")
    status = lines[0]
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
    return status, headers


def read_response(reader: _Reader) -> Outcome:
    status, headers = parse_headers(reader.until(b"\r\n\r\n"))
    parts = status.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("ICAP/") or not parts[1].isdigit():
        raise ProtocolError(f"not an ICAP status line: {status[:80]!r}")
    code = int(parts[1])
    if code == 204:
        return Clean()
    if code != 200:
        return ScanFailed(f"ICAP server answered {status[:120]}")
    names = threat_names(headers)
    http_status = _encapsulated_http_status(reader, dict(headers).get("encapsulated", ""))
    if names:
        return Infected(names)
    if http_status is not None and not 200 <= http_status < 300:
        return Infected([f"ICAP-blocked-HTTP-{http_status}"])
    return Clean()


def threat_names(headers: list[tuple[str, str]]) -> list[str]:
    names: list[str] = []
    for name, value in headers:
        if name == "x-infection-found":
            for field in value.split(";"):
                key, _, val = field.strip().partition("=")
                if key.strip().lower() == "threat" and val.strip():
                    names.append(val.strip())
        elif name == "x-violations-found":
            lines = [ln.strip() for ln in value.split("\n")]
            # count, then (filename, threat, id, disposition) per violation
            body = lines[1:]
            for i in range(0, len(body) - 1, 4):
                if body[i + 1]:
                    names.append(body[i + 1])
        elif name == "x-virus-id":
            if value and value.lower() not in ("no threats", "none"):
                names.append(value)
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def _encapsulated_http_status(reader: _Reader, encapsulated: str) -> Optional[int]:
    """Reads the encapsulated part (so the connection is drained) and returns
    the HTTP status of an encapsulated response, if there is one."""
    offsets = []
    for item in encapsulated.split(","):
        key, _, val = item.strip().partition("=")
        if val.strip().isdigit():
            offsets.append((int(val), key.strip().lower()))
    offsets.sort()
    if not offsets:
        return None
    http_status = None
    header_len = offsets[-1][0]
    headers = reader.exactly(header_len) if header_len else b""
    res_hdr_at = next((o for o, k in offsets if k == "res-hdr"), None)
    if res_hdr_at is not None:
        block = headers[res_hdr_at:]
        first = block.split(b"\r\n", 1)[0].decode("iso-8859-1", "replace").split()
        if len(first) >= 2 and first[1].isdigit():
            http_status = int(first[1])
    if offsets[-1][1] in ("res-body", "req-body"):
        _drain_chunked(reader)
    return http_status


def _drain_chunked(reader: _Reader) -> None:
    total = 0
    while True:
        size_line = reader.until(b"\r\n").split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            reader.until(b"\r\n")
            return
        total += size
        if total > MAX_BODY:
            raise ProtocolError("encapsulated body too large")
        reader.exactly(size + 2)
