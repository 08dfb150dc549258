"""Command-line scanners: every built-in profile against its vendor stand-in
(tests/fakes/cli_av.py), clamscan for real with our signature database, and
profiles an admin writes in the config."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest

from gateway.config import validate
from gateway.plugins import discover
from scanners.base import EICAR, Clean, Infected, ScanFailed
from scanners.command import BUILTIN_PROFILES, CommandScanner, Profile, interpret, profile_from_settings
from tests.fakes.cli_av import VENDORS
from tests.support.clamd import EICAR_NAMES, MARKER, MARKER_NAME
from tests.support.programs import require_program

CLEAN_MAIL = b"Subject: hello\r\n\r\nNothing to see here.\r\n"


def test_every_builtin_profile_has_a_stand_in():
    assert set(BUILTIN_PROFILES) == set(VENDORS)


@pytest.mark.parametrize("vendor", sorted(BUILTIN_PROFILES))
def test_profile_against_its_stand_in(vendor, fake_bin, tmp_path):
    profile = replace(BUILTIN_PROFILES[vendor], command=str(fake_bin / vendor))
    scanner = CommandScanner(profile, timeout=20, tmp_dir=str(tmp_path))
    eicar = scanner.scan_blocking(b"Subject: t\r\n\r\n" + EICAR + b"\r\n")
    assert eicar == Infected(["EICAR-Test-File"]), eicar
    assert scanner.scan_blocking(MARKER) == Infected(["MailGate-Test-Marker"])
    assert scanner.scan_blocking(CLEAN_MAIL) == Clean()
    failed = scanner.scan_blocking(b"FAKE-AV-TRIGGER-ERROR")
    assert isinstance(failed, ScanFailed) and "internal error" in failed.reason, failed
    assert os.listdir(tmp_path) == []  # the message file and its directory are gone


def test_hanging_command_is_killed_at_its_timeout(fake_bin, tmp_path):
    profile = replace(BUILTIN_PROFILES["sophos-savscan"], command=str(fake_bin / "sophos-savscan"))
    scanner = CommandScanner(profile, timeout=1, tmp_dir=str(tmp_path))
    outcome = scanner.scan_blocking(b"FAKE-AV-TRIGGER-HANG")
    assert isinstance(outcome, ScanFailed) and "did not finish in 1s" in outcome.reason


def test_missing_program_is_a_failure(tmp_path):
    profile = replace(BUILTIN_PROFILES["mcafee-uvscan"], command=str(tmp_path / "no-such-uvscan"))
    outcome = CommandScanner(profile, tmp_dir=str(tmp_path)).scan_blocking(b"x")
    assert isinstance(outcome, ScanFailed) and "cannot run" in outcome.reason


@pytest.fixture(scope="module")
def clamscan_profile(clamd_server):
    binary = require_program("clamscan")
    base = BUILTIN_PROFILES["clamscan"]
    return replace(base, command=binary, args=("-d", clamd_server.db_dir) + base.args)


def test_real_clamscan(clamscan_profile, tmp_path):
    scanner = CommandScanner(clamscan_profile, timeout=60, tmp_dir=str(tmp_path))
    outcome = scanner.scan_blocking(b"Subject: t\r\n\r\n" + EICAR + b"\r\n")
    assert isinstance(outcome, Infected) and outcome.names[0] in EICAR_NAMES
    assert scanner.scan_blocking(b"Subject: t\r\n\r\n" + MARKER) == Infected([MARKER_NAME])
    assert scanner.scan_blocking(CLEAN_MAIL) == Clean()


def test_real_clamscan_error_exit(tmp_path):
    binary = require_program("clamscan")
    base = BUILTIN_PROFILES["clamscan"]
    # no database at all: clamscan documents exit 2 for errors
    profile = replace(base, command=binary, args=("-d", str(tmp_path / "no-db")) + base.args)
    outcome = CommandScanner(profile, timeout=60, tmp_dir=str(tmp_path)).scan_blocking(CLEAN_MAIL)
    assert isinstance(outcome, ScanFailed) and "exit 2" in outcome.reason


def test_unlisted_exit_code_is_an_error_never_clean():
    p = BUILTIN_PROFILES["sophos-savscan"]
    assert isinstance(interpret(p, 42, ""), ScanFailed)
    assert isinstance(interpret(p, -9, ""), ScanFailed)


def test_infected_without_a_parsable_name_still_infected():
    assert interpret(BUILTIN_PROFILES["f-prot"], 3, "garbled") == Infected(["f-prot-virus-exit-3"])
    assert interpret(BUILTIN_PROFILES["f-prot"], 8, "") == Infected(["f-prot-suspicious-exit-8"])


def test_several_names_are_all_reported():
    out = ">>> Virus 'EICAR-AV-Test' found in file a\n>>> Virus 'Troj/Foo' found in file b\n"
    assert interpret(BUILTIN_PROFILES["sophos-sweep"], 3, out) == Infected(["EICAR-AV-Test", "Troj/Foo"])


def test_args_without_file_placeholder_get_the_path_appended():
    p = Profile("x", "/opt/x/scan --quiet", args=("-a",))
    assert p.argv("/tmp/m.eml") == ["/opt/x/scan", "--quiet", "-a", "/tmp/m.eml"]


def test_profile_rejects_overlapping_codes_and_groupless_patterns():
    with pytest.raises(ValueError, match="listed twice"):
        Profile("x", "x", clean=frozenset({0}), infected=frozenset({0}))
    with pytest.raises(ValueError, match="group"):
        Profile("x", "x", names=("Found",))


def config(toml: str):
    import tomllib

    return validate(tomllib.loads(toml), discover().sections)


def test_admin_profile_from_config_alone(fake_bin, tmp_path):
    # an engine MailGate has never heard of, described in the config only:
    # here the F-Secure stand-in driven through a hand-written profile
    cfg = config(f"""
[[scanners]]
type = "command"
name = "acme"
command = "{fake_bin / 'fsecure-fsav'}"
args = ["--dumb", "{{file}}"]
clean_codes = [0]
infected_codes = [3, 6]
error_codes = [1]
names = [': Infected: +(.+?) \\[']
""")
    s = cfg.scanners[0]
    profile = profile_from_settings(s)
    assert profile.name == "acme" and profile.infected == frozenset({3, 6})
    scanner = CommandScanner(profile, tmp_dir=str(tmp_path), name=s.label)
    assert scanner.scan_blocking(EICAR) == Infected(["EICAR-Test-File"])
    assert scanner.scan_blocking(CLEAN_MAIL) == Clean()


def test_builtin_profile_with_overridden_path(fake_bin):
    cfg = config(f"""
[[scanners]]
type = "command"
profile = "mcafee-uvscan"
command = "{fake_bin / 'mcafee-uvscan'}"
""")
    profile = profile_from_settings(cfg.scanners[0])
    assert profile.command.endswith("mcafee-uvscan") and profile.infected == frozenset({13})
    assert cfg.scanners[0].label == "mcafee-uvscan"


@pytest.mark.parametrize("toml, message", [
    ('type = "command"', "need profile"),
    ('type = "command"\nprofile = "norton"', "unknown profile 'norton'"),
    ('type = "command"\ncommand = "/x"', "needs clean_codes and infected_codes"),
    ('type = "command"\ncommand = "/x"\nclean_codes = [0]\ninfected_codes = [0]', "listed twice"),
    ('type = "command"\nprofile = "rav"\nnames = ["(unclosed"]', "not a valid regular expression"),
])
def test_bad_command_config_is_refused_with_a_reason(toml, message):
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config("[[scanners]]\n" + toml)


def test_timeout_kills_the_whole_process_group(tmp_path):
    # a wrapper script whose own child would outlive a plain kill of the script
    pidfile = tmp_path / "child.pid"
    script = tmp_path / "wrapper.sh"
    script.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {pidfile}\nwait\n")
    script.chmod(0o755)
    profile = Profile("wrapper", str(script), clean=frozenset({0}), infected=frozenset({1}))
    outcome = CommandScanner(profile, timeout=0.5, tmp_dir=str(tmp_path)).scan_blocking(b"x")
    assert isinstance(outcome, ScanFailed) and "did not finish" in outcome.reason
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = os.path.exists(f"/proc/{child}") and "Z" not in open(f"/proc/{child}/stat").read().split()[2]
    assert not alive
