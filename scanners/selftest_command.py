"""``mailgate av-selftest``: ask every configured scanner to scan the EICAR
test file and a clean message, print what each said, exit 1 if any engine is
unreachable or blind.  For admins after an install or a signature update; the
running gateway does the same on its own every ``[av] self_test_interval``."""

from __future__ import annotations

import time

from scanners.base import EICAR, Clean, Infected

CLEAN_PROBE = (b"From: selftest@mailgate.invalid\r\nTo: postmaster@mailgate.invalid\r\n"
               b"Subject: MailGate anti-virus self-test (clean)\r\n\r\nNothing to see here.\r\n")


def run(args) -> int:
    from gateway.cli import load_config
    from scanners.av_check import build_adapter

    config = load_config(args)
    settings = list(getattr(config, "scanners", None) or [])
    if not settings:
        print("no [[scanners]] configured: messages are not scanned for viruses")
        return 1
    failures = 0
    for s in settings:
        adapter = build_adapter(s)
        t = time.perf_counter()
        eicar = adapter.scan_blocking(EICAR)
        clean = adapter.scan_blocking(CLEAN_PROBE)
        ms = (time.perf_counter() - t) * 1000
        ok = isinstance(eicar, Infected) and isinstance(clean, Clean)
        failures += not ok
        if isinstance(eicar, Infected):
            seen = "EICAR detected as " + ", ".join(eicar.names)
        elif isinstance(eicar, Clean):
            seen = "EICAR NOT detected: this engine is not protecting mail"
        else:
            seen = f"EICAR scan failed: {eicar.reason}"
        probe = "clean probe passed" if isinstance(clean, Clean) else f"clean probe gave {clean}"
        print(f"{'ok  ' if ok else 'FAIL'} {adapter.describe()}: {seen}; {probe} ({ms:.0f} ms)")
    return 1 if failures else 0


def register_commands(sub, parent) -> None:
    p = sub.add_parser("av-selftest", parents=[parent],
                       help="scan EICAR and a clean message with every configured virus scanner")
    p.set_defaults(func=run)
