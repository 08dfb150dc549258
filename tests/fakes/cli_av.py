"""Stand-in for the commercial command-line virus scanners.

Usage: ``cli_av.py VENDOR [the vendor's own options...] FILE``

Each vendor entry reproduces what that program is documented to do (the
sources are cited beside each built-in profile in scanners/command.py): its
exit code for clean / infected / error and the line it prints for an
infection.  The "signatures" are the EICAR test file and the MailGate test
marker; a file containing ``FAKE-AV-TRIGGER-ERROR`` makes the program fail
the way that vendor fails, and ``FAKE-AV-TRIGGER-HANG`` makes it hang (for
timeout tests; at most a minute, and never past its parent).  It also insists on being given the options the profile
documents, so a profile with wrong arguments fails its test.
"""

from __future__ import annotations

import os
import sys
import time

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MARKER = b"MAILGATE-TEST-VIRUS-MARKER-7f3a9c"

# vendor: (required options, clean code, infected code, error code, infected line template)
VENDORS = {
    "clamscan": (["--no-summary"], 0, 1, 2, "{path}: {name} FOUND"),
    "trend-vscan": (["-za", "-a"], 0, 1, 255, "*** Found virus {name} in file {path}"),
    "sophos-sweep": (["-archive", "-ss"], 0, 3, 2, ">>> Virus '{name}' found in file {path}"),
    "sophos-savscan": (["-archive", "-ss", "-mime"], 0, 3, 2, ">>> Virus '{name}' found in file {path}"),
    "avira-antivir": (["--allfiles", "-z"], 0, 1, 203, "ALERT: [{name} virus] {path} <<< Contains code of the {name} virus"),
    "kaspersky-avp": (["-s", "-p"], 0, 4, 1, "{path} INFECTED {name}"),
    "kaspersky-kavscanner": (["-e", "PASBME"], 0, 25, 99, "{path} INFECTED {name}"),
    "mcafee-uvscan": (["--mime", "--secure"], 0, 13, 6, "        {path} ... Found the {name} virus !!!"),
    "command-csav": ([], 50, 51, 101, "{path} Infection: {name}"),
    "fsecure-fsav": (["--dumb"], 0, 3, 1, "{path}: Infected: {name} [Aquarius]"),
    "f-prot": (["-DUMB", "-ARCHIVE"], 0, 3, 1, "{path}  Infection: {name}"),
    "ca-inoculan": (["-SEC"], 0, 100, 4, "[{path}] was infected by virus [{name}]"),
    "rav": (["--mail"], 1, 2, 6, "{path}\tInfected: {name}"),
    "vexira": (["--all-files"], 0, 1, 7, "{path}: virus {name} found"),
}

NAMES = {"eicar": "EICAR-Test-File", "marker": "MailGate-Test-Marker"}


def hang(limit: float = 60.0) -> None:
    """Hang like a stuck engine, but not past the life of whoever ran us
    (a gateway killed mid-scan must not leave this behind) nor a minute."""
    parent = os.getppid()
    deadline = time.monotonic() + limit
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in VENDORS:
        print(f"usage: cli_av.py {{{'|'.join(VENDORS)}}} [options] FILE", file=sys.stderr)
        return 64
    vendor = argv[1]
    options, path = argv[2:-1], argv[-1]
    required, clean, infected, error, line = VENDORS[vendor]
    missing = [o for o in required if o not in options]
    if missing:
        print(f"{vendor}: unknown usage, missing {' '.join(missing)}", file=sys.stderr)
        return error
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        print(f"{vendor}: cannot open {path}: {e.strerror}")
        return error
    print(f"{vendor} stand-in scanner for MailGate tests, pid {os.getpid()}")
    if b"FAKE-AV-TRIGGER-HANG" in data:
        hang()
    if b"FAKE-AV-TRIGGER-ERROR" in data:
        print(f"{vendor}: internal error while reading {path}")
        return error
    found = [NAMES[k] for k, sig in (("eicar", EICAR), ("marker", MARKER)) if sig in data]
    for name in found:
        print(line.format(path=path, name=name))
    return infected if found else clean


if __name__ == "__main__":
    sys.exit(main(sys.argv))
