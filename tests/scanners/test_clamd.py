"""The clamd adapter against a real clamd with our signature database, over
its unix socket and over TCP."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import zipfile

import pytest
from twisted.internet import defer

from scanners.base import EICAR, Clean, GuardedScanner, Infected, ScanFailed
from scanners.clamd import ClamdScanner, interpret
from tests.scanners.conftest import result_of
from tests.support.clamd import EICAR_NAMES, MARKER, MARKER_NAME


def mime_with_attachment(filename: str, payload: bytes) -> bytes:
    b64 = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\nContent-Type: text/plain\r\n\r\n"
            b"see attached\r\n--BB\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=" + filename.encode() + b"\r\n\r\n" + b64 + b"--BB--\r\n")


def zipped(name: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, payload)
    return buf.getvalue()


@pytest.fixture(params=["unix", "tcp"])
def clamd_adapter(request, clamd_server):
    if request.param == "unix":
        return ClamdScanner(socket_path=clamd_server.socket_path, timeout=10)
    return ClamdScanner(host="127.0.0.1", port=clamd_server.port, timeout=10)


def test_plain_eicar(clamd_adapter):
    outcome = clamd_adapter.scan_blocking(b"Subject: test\r\n\r\n" + EICAR + b"\r\n")
    assert isinstance(outcome, Infected) and outcome.names[0] in EICAR_NAMES


def test_base64_attachment(clamd_adapter):
    outcome = clamd_adapter.scan_blocking(mime_with_attachment("eicar.com", EICAR))
    assert isinstance(outcome, Infected) and outcome.names[0] in EICAR_NAMES


def test_inside_a_zip_attachment(clamd_adapter):
    outcome = clamd_adapter.scan_blocking(mime_with_attachment("files.zip", zipped("eicar.com", EICAR)))
    assert isinstance(outcome, Infected) and outcome.names[0] in EICAR_NAMES


def test_custom_signature(clamd_adapter):
    outcome = clamd_adapter.scan_blocking(b"Subject: x\r\n\r\nsome text " + MARKER + b" more\r\n")
    assert outcome == Infected([MARKER_NAME])


def test_clean_message(clamd_adapter):
    assert clamd_adapter.scan_blocking(b"Subject: hello\r\n\r\nJust a note, nothing attached.\r\n") == Clean()


def test_big_message_streams_in_pieces(clamd_adapter):
    # 2 MB goes out in several writes; the INSTREAM framing must survive them
    body = b"Subject: big\r\n\r\n" + (b"0123456789abcdef" * 64 + b"\r\n") * 2000 + EICAR + b"\r\n"
    outcome = clamd_adapter.scan_blocking(body)
    assert isinstance(outcome, Infected) and "Test.EICAR.NDB.UNOFFICIAL" in outcome.names


class RecordingClamd:
    """A clamd stand-in on a unix socket: reads one INSTREAM per connection,
    undoes its framing and answers ``reply``."""

    def __init__(self, path: str, reply: bytes = b"stream: OK\n"):
        self.reply = reply
        self.streams: list[tuple[bytes, bytes]] = []  # (command, payload)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as reader:
                command = reader.readline()
                if not command:  # pyclamd's client connects once when it is made
                    continue
                payload = []
                while True:
                    size = struct.unpack("!L", reader.read(4))[0]
                    if not size:
                        break
                    payload.append(reader.read(size))
                self.streams.append((command, b"".join(payload)))
                conn.sendall(self.reply)
                # end of reply; read what is left so closing does not reset it
                conn.shutdown(socket.SHUT_WR)
                while reader.read(65536):
                    pass

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.server.close()
        self.thread.join(5)


@pytest.fixture
def recording_clamd(tmp_path):
    server = RecordingClamd(str(tmp_path / "clamd.sock"))
    yield server
    server.close()


@pytest.mark.parametrize("size", [0, 10, 64 * 1024, 3 * 1024 * 1024 + 7])
def test_instream_framing(recording_clamd, tmp_path, size):
    message = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    outcome = ClamdScanner(socket_path=str(tmp_path / "clamd.sock"), timeout=10).scan_blocking(message)
    assert outcome == Clean()
    assert recording_clamd.streams == [(b"nINSTREAM\n", message)]


def test_virus_reply_from_a_stand_in(tmp_path):
    server = RecordingClamd(str(tmp_path / "clamd.sock"), reply=b"stream: Some.Virus FOUND\n")
    try:
        outcome = ClamdScanner(socket_path=str(tmp_path / "clamd.sock"), timeout=10).scan_blocking(b"data")
    finally:
        server.close()
    assert outcome == Infected(["Some.Virus"])


def test_clamd_that_stops_reading_times_out(tmp_path):
    # the write blocks once the socket buffers are full: the kernel send
    # timeout ends it, and it is reported as a timeout, not a refusal
    path = str(tmp_path / "deaf.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)  # connections complete in the backlog; nothing ever reads
    try:
        outcome = ClamdScanner(socket_path=path, timeout=0.5).scan_blocking(b"x" * (8 * 1024 * 1024))
    finally:
        server.close()
    assert isinstance(outcome, ScanFailed) and not outcome.retry and "in time" in outcome.reason


def test_no_clamd_is_a_retryable_failure(tmp_path):
    outcome = ClamdScanner(socket_path=str(tmp_path / "none.sock"), timeout=2).scan_blocking(b"x")
    assert isinstance(outcome, ScanFailed) and outcome.retry and "could not reach clamd" in outcome.reason


def test_silent_clamd_times_out(silent_unix):
    outcome = ClamdScanner(socket_path=silent_unix, timeout=0.5).scan_blocking(b"Subject: x\r\n\r\nhi\r\n")
    assert isinstance(outcome, ScanFailed) and not outcome.retry and "in time" in outcome.reason


def test_ping(clamd_server, tmp_path):
    assert ClamdScanner(socket_path=clamd_server.socket_path).ping()
    assert not ClamdScanner(socket_path=str(tmp_path / "none.sock")).ping()


def test_needs_an_address():
    with pytest.raises(ValueError):
        ClamdScanner()


def test_interpret_error_reply():
    assert isinstance(interpret({"stream": ("ERROR", "Can't allocate memory")}), ScanFailed)
    assert interpret({"stream": ("FOUND", "V")}) == Infected(["V"])
    assert interpret(None) == Clean()


def test_self_test_through_a_thread_runner(clamd_server, clock):
    # the guarded scanner hands the blocking call to run_in_thread; here the
    # "thread" runs inline so the Deferred has fired when scan() returns
    g = GuardedScanner(ClamdScanner(socket_path=clamd_server.socket_path), clock,
                       lambda fn, *a: defer.maybeDeferred(fn, *a))
    assert result_of(g.self_test()) is True
