"""The Trophie adapter against the Trophie stand-in daemon (tests/fakes)."""

from __future__ import annotations

from scanners.base import EICAR, Clean, Infected, ScanFailed
from scanners.trophie import TrophieScanner
from tests.support.clamd import MARKER


def test_trophie_protocol(path_daemon, tmp_path):
    d = path_daemon("trophie")
    t = TrophieScanner(d.socket_path, timeout=2, tmp_dir=str(tmp_path))
    assert t.name == "trophie"
    assert t.scan_blocking(EICAR) == Infected(["Eicar_test_file"])
    assert t.scan_blocking(b"Subject: x\r\n\r\n" + MARKER) == Infected(["TROJ_MAILGATE.A"])
    assert t.scan_blocking(b"Subject: x\r\n\r\nclean\r\n") == Clean()
    assert t.scan_blocking(b"FAKE-AV-TRIGGER-ERROR") == ScanFailed("trophie error: engine error")


def test_unknown_virus_name_is_labelled_trophie():
    assert TrophieScanner("/x").interpret(b"1\n") == Infected(["unknown-trophie-virus"])
