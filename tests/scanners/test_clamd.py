"""The clamd adapter against a real clamd with our signature database, over
its unix socket and over TCP."""

from __future__ import annotations

import base64
import io
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


def test_no_clamd_is_a_retryable_failure(tmp_path):
    outcome = ClamdScanner(socket_path=str(tmp_path / "none.sock"), timeout=2).scan_blocking(b"x")
    assert isinstance(outcome, ScanFailed) and outcome.retry and "could not reach clamd" in outcome.reason


def test_silent_clamd_times_out(silent_unix):
    outcome = ClamdScanner(socket_path=silent_unix, timeout=0.5).scan_blocking(b"Subject: x\r\n\r\nhi\r\n")
    assert isinstance(outcome, ScanFailed) and not outcome.retry


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
