"""The Sophie adapter against the Sophie stand-in daemon (tests/fakes)."""

from __future__ import annotations

import os

import pytest

from scanners.base import EICAR, Clean, Infected, ScanFailed
from scanners.sophie import SophieScanner
from tests.support.clamd import MARKER


@pytest.fixture
def sophie(path_daemon, tmp_path):
    d = path_daemon("sophie")
    return SophieScanner(d.socket_path, timeout=2, tmp_dir=str(tmp_path))


def test_eicar(sophie):
    assert sophie.scan_blocking(b"Subject: x\r\n\r\n" + EICAR) == Infected(["EICAR-AV-Test"])


def test_marker(sophie):
    assert sophie.scan_blocking(MARKER) == Infected(["Mal/MailGate-A"])


def test_clean(sophie):
    assert sophie.scan_blocking(b"Subject: hi\r\n\r\nhello\r\n") == Clean()


def test_engine_error(sophie):
    outcome = sophie.scan_blocking(b"FAKE-AV-TRIGGER-ERROR")
    assert outcome == ScanFailed("sophie error: engine error")


def test_temp_file_is_removed(sophie, tmp_path):
    sophie.scan_blocking(b"Subject: hi\r\n\r\nhello\r\n")
    assert [p for p in os.listdir(tmp_path) if p.startswith("mailgate-")] == []


def test_hang_times_out(sophie):
    sophie.timeout = 0.3
    outcome = sophie.scan_blocking(b"FAKE-AV-TRIGGER-HANG")
    assert isinstance(outcome, ScanFailed) and "did not answer in time" in outcome.reason


def test_no_daemon(tmp_path):
    outcome = SophieScanner(str(tmp_path / "none.sock"), tmp_dir=str(tmp_path)).scan_blocking(b"x")
    assert isinstance(outcome, ScanFailed) and outcome.retry


@pytest.mark.parametrize("reply, expected", [
    (b"0\n", Clean()),
    (b"1\n", Infected(["unknown-sophie-virus"])),
    (b"1:W32/Netsky-P\n", Infected(["W32/Netsky-P"])),
    (b"-1:File not found\n", ScanFailed("sophie error: File not found")),
    (b"-1\n", ScanFailed("sophie error: unspecified")),
    (b"", ScanFailed("no reply from sophie")),
    (b"HELLO\n", ScanFailed("unexpected reply from sophie: 'HELLO'")),
])
def test_interpret(reply, expected):
    assert SophieScanner("/x").interpret(reply) == expected
