"""`mailgate rules lint` and `mailgate dkim keygen`."""

from __future__ import annotations

import os
import re
import stat

import dkim

from gateway.cli import main
from rules.sa_check import SHIPPED_RULES


def _config(tmp_path, text=""):
    path = tmp_path / "mailgate.toml"
    path.write_text("[server]\nhostname = \"mx.gateway.test\"\n" + text)
    return str(path)


def test_lint_ends_with_the_summary_line(tmp_path, capsys):
    local = tmp_path / "local"
    local.mkdir()
    (local / "local.cf").write_text("body GOOD /fine/\nbody BROKEN /a\\Kb/\nheader EV eval:no_such_test()\n"
                                    "body OPTOUT /(?:$|\\W)opt(?:out)/\n")  # Hyperscan refuses the inner $
    path = _config(tmp_path, f"[rules]\ndirs = [{SHIPPED_RULES!r}, {str(local)!r}]\n"
                             f"cache_dir = {str(tmp_path / 'cache')!r}\n")
    assert main(["rules", "lint", "-c", path]) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").splitlines()
    m = re.fullmatch(r"rules: (\d+) loaded, (\d+) skipped", lines[-1])
    assert m and int(m.group(2)) == 2 and int(m.group(1)) > 20
    assert f"{local}/local.cf:2: BROKEN (body)" in out
    assert f"{local}/local.cf:3: EV (header): eval:no_such_test() is not implemented" in out
    assert re.search(r"regex rules: \d+ loaded, 1 skipped \(\d+\.\d% skipped\)", out)
    assert re.search(r"hyperscan prefilter: \d+ regex rules behind it, 1 refused by Hyperscan", out)
    assert "  OPTOUT: " in out


def test_lint_reports_missing_directories(tmp_path, capsys):
    path = _config(tmp_path, f"[rules]\ndirs = [{str(tmp_path / 'nope')!r}]\n")
    assert main(["rules", "lint", "-c", path]) == 0
    out = capsys.readouterr().out
    assert "no such rule directory" in out
    assert out.rstrip().splitlines()[-1] == "rules: 0 loaded, 0 skipped"


def test_keygen_writes_a_private_key_and_prints_the_record(tmp_path, capsys):
    path = _config(tmp_path)
    keys = tmp_path / "keys"
    assert main(["dkim", "keygen", "example.test", "mg2026", "--bits", "1024", "--dir", str(keys),
                 "-c", path]) == 0
    out = capsys.readouterr().out
    key_file = keys / "example.test.mg2026.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    record = [line for line in out.splitlines() if "IN TXT" in line][0]
    assert record.startswith("mg2026._domainkey.example.test. IN TXT")
    txt = "".join(record.split('"')[1::2]).encode()
    msg = b"From: a@example.test\r\nTo: b@x.test\r\nSubject: s\r\n\r\nbody\r\n"
    sig = dkim.sign(msg, b"mg2026", b"example.test", key_file.read_bytes())
    assert dkim.verify(sig + msg, dnsfunc=lambda name, timeout=5: txt)
    # an existing key is never replaced silently
    assert main(["dkim", "keygen", "example.test", "mg2026", "--dir", str(keys), "-c", path]) == 2
    assert "exists" in capsys.readouterr().err


def test_keygen_refuses_bad_names(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["dkim", "keygen", "not a domain", "sel", "--dir", str(tmp_path), "-c", path]) == 2
    assert main(["dkim", "keygen", "example.test", "bad sel", "--dir", str(tmp_path), "-c", path]) == 2
    err = capsys.readouterr().err
    assert "not a domain name" in err and "not a DKIM selector" in err
