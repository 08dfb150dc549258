"""`mailgate av-selftest` against a real clamd and a blind engine."""

from __future__ import annotations

import subprocess
import sys

from tests.support.clamd import EICAR_NAMES
from tests.support.programs import require_program


def selftest(tmp_path, toml: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(toml)
    return subprocess.run([sys.executable, "-m", "gateway.cli", "av-selftest", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=120)


def test_working_engine_passes(tmp_path, clamd_server):
    out = selftest(tmp_path, f'[[scanners]]\ntype = "clamd"\nsocket = "{clamd_server.socket_path}"\n')
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok   clamd (")
    assert any(n in out.stdout for n in EICAR_NAMES) and "clean probe passed" in out.stdout


def test_blind_and_unreachable_engines_fail(tmp_path, clamd_server):
    true = require_program("true")
    out = selftest(tmp_path, f'[[scanners]]\ntype = "clamd"\nsocket = "{clamd_server.socket_path}"\n'
                             f'[[scanners]]\ntype = "command"\nname = "blind"\ncommand = "{true}"\n'
                             'clean_codes = [0]\ninfected_codes = [1]\n'
                             f'[[scanners]]\ntype = "sophie"\nsocket = "{tmp_path}/none.sock"\n')
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ok   clamd")
    assert lines[1].startswith("FAIL blind") and "EICAR NOT detected" in lines[1]
    assert lines[2].startswith("FAIL sophie") and "EICAR scan failed" in lines[2]


def test_no_scanners_is_said_plainly(tmp_path):
    out = selftest(tmp_path, "")
    assert out.returncode == 1 and "no [[scanners]] configured" in out.stdout


def test_bad_config_is_one_line_exit_2(tmp_path):
    out = selftest(tmp_path, '[[scanners]]\ntype = "clamd"\n')
    assert out.returncode == 2 and "Traceback" not in out.stderr and "needs socket" in out.stderr
