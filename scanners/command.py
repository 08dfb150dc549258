"""Command-line scanners driven by a declarative profile.

A profile says which program to run with which arguments (``{file}`` is
replaced by the path of the message written to a temp file; without
``{file}`` the path is appended), which exit codes mean clean, infected,
suspicious (treated as infected) or error, and regular expressions whose
first group is a virus name in the program's output (stdout and stderr
together).  An exit code the profile does not list is an error: a scanner we
do not understand never passes a message as clean.

Built-in profiles are below.  Each one's codes and patterns come from the
vendor's documentation where it is still published, and otherwise from the
long-lived mail filters that drove these programs in production (MIMEDefang,
File::VirusScan, MailScanner, amavisd-new); the source is named beside each.
An admin adds any other engine with the same keys in a ``[[scanners]]``
table (``type = "command"``), or overrides a built-in's command path/args.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import tempfile
from dataclasses import dataclass, replace
from typing import Optional

from scanners.base import Clean, Infected, Outcome, ScanFailed, Scanner


@dataclass(frozen=True)
class Profile:
    name: str
    command: str
    args: tuple[str, ...] = ("{file}",)
    clean: frozenset[int] = frozenset({0})
    infected: frozenset[int] = frozenset({1})
    suspicious: frozenset[int] = frozenset()
    error: frozenset[int] = frozenset()
    names: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        overlap = (self.clean & (self.infected | self.suspicious | self.error)) | (
            self.infected & self.error) | (self.suspicious & self.error)
        if overlap:
            raise ValueError(f"profile {self.name}: exit code(s) {sorted(overlap)} listed twice")
        for pattern in self.names:
            compiled = re.compile(pattern, re.MULTILINE)
            if compiled.groups < 1:
                raise ValueError(f"profile {self.name}: pattern {pattern!r} needs a group for the virus name")

    def argv(self, path: str) -> list[str]:
        args = [a.replace("{file}", path) for a in self.args]
        if not any("{file}" in a for a in self.args):
            args.append(path)
        return shlex.split(self.command) + args

    def virus_names(self, output: str) -> list[str]:
        found: list[str] = []
        for pattern in self.names:
            for m in re.finditer(pattern, output, re.MULTILINE):
                name = m.group(1).strip()
                if name and name not in found:
                    found.append(name)
        return found


def _codes(*codes: int) -> frozenset[int]:
    return frozenset(codes)


BUILTIN_PROFILES: dict[str, Profile] = {p.name: p for p in (
    # ClamAV clamscan(1): "RETURN CODES 0: No virus found. 1: Virus(es) found.
    # 2: Some error(s) occurred."  Infected lines are "PATH: NAME FOUND".
    Profile(
        "clamscan", "clamscan", ("--no-summary", "--stdout", "{file}"),
        clean=_codes(0), infected=_codes(1), error=_codes(2),
        names=(r": (.+?) FOUND$",),
        description="ClamAV clamscan",
    ),
    # Trend Micro InterScan VirusWall vscan: exit 0 = clean, 1..9 = number
    # of viruses found; report line "*** Found virus NAME in file ...".
    # (File::VirusScan Engine::Command::Trend::Vscan, args -za -a.)
    Profile(
        "trend-vscan", "vscan", ("-za", "-a", "{file}"),
        clean=_codes(0), infected=frozenset(range(1, 10)),
        names=(r"^\*+ Found virus (\S+)",),
        description="Trend Micro InterScan VirusWall vscan",
    ),
    # Sophos sweep / savscan (Sophos Anti-Virus for Linux configuration guide,
    # v9, "Appendix: On-demand scan return codes"; the same in MIMEDefang's
    # interpret_sweep_code): 0 no error and no threat, 1 scan interrupted,
    # 2 an error prevented further execution (e.g. a file could not be
    # scanned), 3 a threat was detected.  Report line ">>> Virus 'NAME' found
    # in file PATH".  MIMEDefang passes 2 as clean because old sweep choked on
    # Office files; we do not deliver a message the engine could not read, so
    # 2 is an error here.
    Profile(
        "sophos-sweep", "sweep", ("-f", "-mime", "-all", "-archive", "-ss", "{file}"),
        clean=_codes(0), infected=_codes(3), error=_codes(1, 2),
        names=(r">>> Virus '([^']+)'",),
        description="Sophos sweep",
    ),
    Profile(
        "sophos-savscan", "savscan",
        ("-f", "-mime", "-all", "-cab", "-oe", "-tnef", "-archive", "-ss", "{file}"),
        clean=_codes(0), infected=_codes(3), error=_codes(1, 2),
        names=(r">>> Virus '([^']+)'",),
        description="Sophos savscan",
    ),
    # H+BEDV / Avira antivir: 0 clean, 1 virus found in a file, 2 virus in
    # a boot sector, 3 suspicious file; names in "ALERT: [NAME ...",
    # "!Virus! PATH NAME" or "VIRUS: file contains code of the virus 'NAME'"
    # (MIMEDefang interpret_hbedv_code, from H+BEDV's documentation as
    # relayed by Nels Lindquist; args --allfiles -z -rs).  qscanq's
    # run-antivir wrapper also reads 101 as "virus detected".
    Profile(
        "avira-antivir", "antivir", ("--allfiles", "-z", "-rs", "{file}"),
        clean=_codes(0), infected=_codes(1, 2, 101), suspicious=_codes(3),
        names=(r"ALERT: \[(\S+)", r"!Virus! \S+ (\S+)", r"VIRUS: file contains code of the virus '([^']+)'"),
        description="H+BEDV / Avira AntiVir",
    ),
    # Kaspersky AVPLinux / aveclient (Kaspersky Anti-Virus for Unix user
    # manual, appendix B "Scanner and Daemon: exit codes"): the low half-byte
    # is 0 no viruses, 1 scan interrupted, 2 modified or damaged virus,
    # 3 suspicious objects, 4 viruses detected, 5 all infected objects
    # disinfected, 6 infected objects deleted, 7 the scanner file is corrupted,
    # 8 corrupted files or I/O error; a non-zero high half-byte (16 and up) is
    # a program error (databases corrupt or missing, licence expired), which
    # an unlisted code already means here.  Lines "PATH INFECTED NAME"
    # (File::VirusScan Engine::Command::Kaspersky::AVP5, args -s -p
    # /var/run/aveserver).  A gateway never asks it to disinfect, so 5 and 6
    # can only mean an infection: treated as infected.  8 (corrupted object)
    # is treated as suspicious, as File::VirusScan does.
    Profile(
        "kaspersky-avp", "aveclient", ("-s", "-p", "/var/run/aveserver", "{file}"),
        clean=_codes(0), infected=_codes(2, 4, 5, 6), suspicious=_codes(3, 8), error=_codes(1, 7),
        names=(r"INFECTED (\S+)",),
        description="Kaspersky AVPLinux / aveclient",
    ),
    # Kaspersky kavscanner: two generations, one profile.  The Kaspersky
    # Anti-Virus for Unix manuals (appendix "Scanner and Daemon: exit codes")
    # give kavscanner the AVPLinux scheme above (0-8 in the low half-byte,
    # program errors in the high one); Kaspersky Anti-Virus 5.5 (kav4unix)
    # returns 0 or 10 for clean, 9 password-protected archive, 20 suspicious,
    # 21 and 25 infected (File::VirusScan
    # Engine::Command::Kaspersky::Kavscanner, args -e PASBME -o syslog -i0).
    # The codes do not collide except 5, which File::VirusScan reads as clean
    # and the manual as "all infected objects were disinfected": infected here.
    Profile(
        "kaspersky-kavscanner", "kavscanner", ("-e", "PASBME", "-o", "syslog", "-i0", "{file}"),
        clean=_codes(0, 10), infected=_codes(2, 4, 5, 6, 21, 25), suspicious=_codes(3, 8, 9, 20),
        error=_codes(1, 7),
        names=(r"INFECTED (\S+)",),
        description="Kaspersky kavscanner",
    ),
    # McAfee / NAI uvscan, the "error levels" of VirusScan Command Line as
    # File::VirusScan Engine::Command::NAI::Uvscan lists them (supplied to it
    # by Anthony Giggins): 0 no virus, 2 driver integrity check failed,
    # 6 general problem, 8 no driver found, 12 tried to clean and failed,
    # 13 virus found, 19 self-check failed, 102 user quit.  Output
    # "Found the NAME virus !!!", "Found: EICAR test file ...", "Found the NAME
    # trojan"; args --mime --noboot --secure --allole.
    Profile(
        "mcafee-uvscan", "uvscan", ("--mime", "--noboot", "--secure", "--allole", "{file}"),
        clean=_codes(0), infected=_codes(13), error=_codes(2, 6, 8, 12, 19, 102),
        names=(r"Found the (\S+) (?:\w+ )?virus", r"Found the (.+?) trojan", r"Found: (EICAR test file)",
               r"Found .* or variant (\S+)"),
        description="McAfee / NAI VirusScan uvscan",
    ),
    # Command Software (later Authentium) csav: 50 clean, 51 infected, 52
    # suspicious, 53 found and disinfected, 5 interrupted, 101 out of memory;
    # "PATH Infection: NAME".  (File::VirusScan
    # Engine::Command::Authentium::CommandAntivirus, MIMEDefang
    # interpret_csav_code.)
    Profile(
        "command-csav", "csav", ("-packed", "-archive", "{file}"),
        clean=_codes(50), infected=_codes(51, 53), suspicious=_codes(52), error=_codes(5, 101),
        names=(r"(?i)infec\w*:\s*(\S+)",),
        description="Command Software csav",
    ),
    # F-Secure fsav (WithSecure knowledge base article 5584 "On-demand scanner
    # (fsav) exit codes", and the F-Secure Linux Security manual): 0 no
    # viruses or suspicious files, 1 fatal error, 3 a boot or file virus
    # found, 4 riskware, 6 at least one virus removed and no infected files
    # left, 7 out of memory, 8 suspicious files, 9 scan error (at least one
    # file could not be scanned), 130 terminated by a signal.  2 is the
    # self-test failure older versions reported (File::VirusScan).  Lines
    # "PATH: Infected: NAME [engine]" (older: "PATH  infection: NAME";
    # MailScanner ProcessFSecureOutput).  Args --dumb --mime as File::VirusScan.
    Profile(
        "fsecure-fsav", "fsav", ("--dumb", "--mime", "--archive", "{file}"),
        clean=_codes(0), infected=_codes(3, 6), suspicious=_codes(4, 8), error=_codes(1, 2, 5, 7, 9, 130),
        names=(r": Infected: +(.+?) \[", r"(?i)infection:\s*(\S+)"),
        description="F-Secure fsav",
    ),
    # F-Prot (FRISK f-prot for Unix 3.x/4.x), as File::VirusScan
    # Engine::Command::FPROT::FPROT and MIMEDefang read it: 0 nothing found,
    # 1 unrecoverable error, 2 driver integrity check failed, 3 at least one
    # virus-infected object, 5 abnormal termination, 7 memory error, 8 at
    # least one suspicious object.  Lines "PATH  Infection: NAME"; args
    # -DUMB -ARCHIVE -PACKED.
    Profile(
        "f-prot", "f-prot", ("-DUMB", "-ARCHIVE", "-PACKED", "{file}"),
        clean=_codes(0), infected=_codes(3), suspicious=_codes(8), error=_codes(1, 2, 5, 7),
        names=(r"Infection: (\S+)",),
        description="FRISK F-Prot",
    ),
    # CA InocuLAN / InoculateIT inocucmd (README for InoculateIT UNIX Inocucmd
    # command line utility 4.0, "Command line return codes"): 100 a virus was
    # detected, >2 some file could not be scanned (open/read failure, e.g.
    # RC=4), 1 user pressed ctrl-C, 0 all scanned, nothing found.  Report line
    # "[PATH] was infected by virus [NAME]" (MailScanner ProcessInoculanOutput).
    # The README lists options without dashes after "-options": -SEC (secure,
    # whole-file scan) and -NEX (detect archives by content, advised for mail).
    Profile(
        "ca-inoculan", "inocucmd", ("-SEC", "-NEX", "{file}"),
        clean=_codes(0), infected=_codes(100), error=frozenset({1} | set(range(3, 100))),
        names=(r"was infected by virus \[([^\]]+)\]",),
        description="CA InocuLAN / InoculateIT inocucmd",
    ),
    # RAV AntiVirus (GeCAD) ravav: the engine reports 1 for a clean scan and
    # 2..5 for infected/suspicious objects, as amavisd-new's @av_scanners entry
    # ('RAV AntiVirus', 'ravav', '--all --archive --mail {}', [1], [2,3,4,5],
    # qr/Infected: (.+)/) has it; 0 never occurs in a completed scan and is
    # treated as an error.  Lines "PATH   Infected: NAME" (MailScanner
    # ProcessRavOutput sample output).
    Profile(
        "rav", "ravav", ("--all", "--archive", "--mail", "{file}"),
        clean=_codes(1), infected=_codes(2, 3, 4, 5),
        names=(r"Infected: (\S+)",),
        description="RAV AntiVirus ravav",
    ),
    # Central Command Vexira (scanner_en_vexira.pdf, "Return codes"): 0 OK,
    # 1 and 2 virus found, 3 and 5 password-protected or corrupted archive
    # (suspicious), 9 unknown file type (nothing to scan: clean).  Lines
    # "PATH: virus|iworm|macro|mutant|sequence|trojan NAME".  (MIMEDefang
    # interpret_vexira_code citing that PDF; args -qqq --log=/dev/null
    # --all-files -as.)
    Profile(
        "vexira", "vexira", ("-qqq", "--log=/dev/null", "--all-files", "-as", "{file}"),
        clean=_codes(0, 9), infected=_codes(1, 2), suspicious=_codes(3, 5),
        names=(r": (?:virus|iworm|macro|mutant|sequence|trojan) (\S+)",),
        description="Central Command Vexira",
    ),
)}


class CommandScanner(Scanner):
    engine = "command"

    def __init__(self, profile: Profile, timeout: float = 30.0, tmp_dir: str = "", name: str = ""):
        super().__init__(name or profile.name)
        self.profile = profile
        self.timeout = timeout
        self.tmp_dir = tmp_dir or None

    def describe(self) -> str:
        return f"{self.name} ({self.profile.command})"

    def scan_blocking(self, data: bytes) -> Outcome:
        workdir = tempfile.mkdtemp(prefix="mailgate-av-", dir=self.tmp_dir)
        path = os.path.join(workdir, "message.eml")
        try:
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(workdir, 0o755)  # engines often run under their own user
            os.chmod(path, 0o644)
            return self._run(path)
        finally:
            for p in (path,):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            try:
                os.rmdir(workdir)
            except OSError:
                pass

    def _run(self, path: str) -> Outcome:
        argv = self.profile.argv(path)
        try:
            # its own process group, so a wrapper script's children die with it
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return ScanFailed(f"cannot run {argv[0]}: {e.strerror or e}")
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ScanFailed(f"{argv[0]} did not finish in {self.timeout:g}s")
        output = out.decode("utf-8", "replace")
        return interpret(self.profile, proc.returncode, output)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.communicate()


def interpret(profile: Profile, code: int, output: str) -> Outcome:
    if code < 0:
        return ScanFailed(f"{profile.command} killed by signal {-code}")
    if code in profile.clean:
        return Clean()
    if code in profile.infected or code in profile.suspicious:
        names = profile.virus_names(output)
        if not names:
            kind = "suspicious" if code in profile.suspicious else "virus"
            names = [f"{profile.name}-{kind}-exit-{code}"]
        return Infected(names)
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
    return ScanFailed(f"{profile.command} exit {code}" + (f": {last[:120]}" if last else ""))


def profile_from_settings(settings) -> Profile:
    """A built-in profile with the table's overrides, or a whole new one."""
    base: Optional[Profile] = None
    if settings.profile:
        base = BUILTIN_PROFILES.get(settings.profile)
        if base is None:
            raise ValueError(f"unknown profile {settings.profile!r}; built-in: {', '.join(sorted(BUILTIN_PROFILES))}")
    changes = {}
    if settings.command:
        changes["command"] = settings.command
    if settings.args is not None:
        changes["args"] = tuple(settings.args)
    for key in ("clean", "infected", "suspicious", "error"):
        value = getattr(settings, f"{key}_codes")
        if value is not None:
            changes[key] = frozenset(value)
    if settings.names is not None:
        changes["names"] = tuple(settings.names)
    if base is not None:
        return replace(base, **changes)
    if "command" not in changes:
        raise ValueError("a command scanner needs profile = \"<built-in>\" or command = \"/path/to/scanner\"")
    name = settings.name or os.path.basename(changes["command"].split()[0])
    return Profile(name=name, **changes)
