"""The ICAP client against a real c-icap + virus_scan in front of our clamd,
and against scripted servers for the replies c-icap does not give."""

from __future__ import annotations

import socket
import threading

import pytest

from scanners.base import EICAR, Clean, Infected, ScanFailed
from scanners.icap import IcapScanner, parse_headers, threat_names
from tests.scanners.test_clamd import mime_with_attachment, zipped
from tests.support.clamd import EICAR_NAMES, MARKER, MARKER_NAME

CLEAN_MAIL = b"From: a@sender.test\r\nSubject: hello\r\n\r\nJust a note.\r\n"


@pytest.fixture(params=["RESPMOD", "REQMOD"])
def icap(request, icap_server):
    return IcapScanner("127.0.0.1", icap_server.port, service="avscan", method=request.param, timeout=10)


def test_eicar(icap):
    outcome = icap.scan_blocking(b"Subject: t\r\n\r\n" + EICAR + b"\r\n")
    assert isinstance(outcome, Infected) and outcome.names[0] in EICAR_NAMES


def test_eicar_in_zip_attachment(icap):
    outcome = icap.scan_blocking(mime_with_attachment("a.zip", zipped("eicar.com", EICAR)))
    assert isinstance(outcome, Infected) and outcome.names[0] in EICAR_NAMES


def test_custom_signature(icap):
    assert icap.scan_blocking(b"Subject: t\r\n\r\n" + MARKER + b"\r\n") == Infected([MARKER_NAME])


def test_clean_is_204(icap):
    assert icap.scan_blocking(CLEAN_MAIL) == Clean()


def test_unknown_service_is_a_failure(icap_server):
    outcome = IcapScanner("127.0.0.1", icap_server.port, service="no-such-service").scan_blocking(CLEAN_MAIL)
    assert isinstance(outcome, ScanFailed) and "404" in outcome.reason


def test_nothing_listening(tmp_path):
    from tests.support.ports import free_port

    outcome = IcapScanner("127.0.0.1", free_port(), timeout=2).scan_blocking(CLEAN_MAIL)
    assert isinstance(outcome, ScanFailed) and outcome.retry


class OneShotServer:
    """Reads one request, sends a canned reply (or nothing), closes."""

    def __init__(self, reply: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.received = b""
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            while not self.received.endswith(b"0\r\n\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                self.received += chunk
            if self.reply is None:
                conn.recv(1)  # hold the connection open until the client gives up
            else:
                conn.sendall(self.reply)
        self.sock.close()


def scan_with(reply, timeout=5):
    server = OneShotServer(reply)
    outcome = IcapScanner("127.0.0.1", server.port, timeout=timeout).scan_blocking(b"Subject: x\r\n\r\nbody")
    server.thread.join(10)
    return outcome, server.received


def test_request_is_rfc3507_respmod_with_chunked_body():
    _, received = scan_with(b"ICAP/1.0 204 No Content\r\n\r\n")
    head, _, rest = received.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("RESPMOD icap://127.0.0.1:") and lines[0].endswith("/avscan ICAP/1.0")
    assert "Allow: 204" in lines
    enc = next(line for line in lines if line.startswith("Encapsulated:"))
    offsets = dict(item.strip().split("=") for item in enc.split(":", 1)[1].split(","))
    assert rest[int(offsets["res-hdr"]):].startswith(b"HTTP/1.1 200 OK")
    body = rest[int(offsets["res-body"]):]
    assert body == b"%x\r\nSubject: x\r\n\r\nbody\r\n0\r\n\r\n" % len(b"Subject: x\r\n\r\nbody")


def test_violations_found_header():
    reply = (b"ICAP/1.0 200 OK\r\nX-Violations-Found: 1\r\n\tmessage.eml\r\n\tW32/Sober.M@mm\r\n\t0\r\n\t2\r\n"
             b"Encapsulated: res-hdr=0, null-body=19\r\n\r\nHTTP/1.1 403 No\r\n\r\n")
    assert scan_with(reply)[0] == Infected(["W32/Sober.M@mm"])


def test_blocked_page_without_a_name():
    reply = (b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=45\r\n\r\n"
             b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\n4\r\nnope\r\n0\r\n\r\n")
    assert scan_with(reply)[0] == Infected(["ICAP-blocked-HTTP-403"])


def test_unmodified_200_is_clean():
    reply = (b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=19\r\n\r\n"
             b"HTTP/1.1 200 OK\r\n\r\n4\r\nbody\r\n0\r\n\r\n")
    assert scan_with(reply)[0] == Clean()


def test_server_error_is_a_failure():
    outcome, _ = scan_with(b"ICAP/1.0 500 Server Error\r\n\r\n")
    assert isinstance(outcome, ScanFailed) and "500" in outcome.reason


def test_garbage_reply_is_a_failure():
    outcome, _ = scan_with(b"HTTP/1.0 200 OK\r\n\r\n")
    assert isinstance(outcome, ScanFailed) and "not an ICAP status line" in outcome.reason


def test_silent_server_times_out():
    outcome, _ = scan_with(None, timeout=0.5)
    assert isinstance(outcome, ScanFailed) and "did not answer in time" in outcome.reason


def test_infection_found_header_parsing():
    _, headers = parse_headers(b"ICAP/1.0 200 OK\r\nX-Infection-Found: Type=0; Resolution=2; Threat=Eicar-Test;")
    assert threat_names(headers) == ["Eicar-Test"]
    _, headers = parse_headers(b"ICAP/1.0 200 OK\r\nX-Virus-ID: Trojan.Foo")
    assert threat_names(headers) == ["Trojan.Foo"]


def test_bad_method_refused():
    with pytest.raises(ValueError):
        IcapScanner("127.0.0.1", 1344, method="OPTIONS")
