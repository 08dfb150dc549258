"""Config for the anti-virus scanners: ``[[scanners]]`` tables and ``[av]``.

Kept apart from the check so adapters and tools can build scanners from
settings without the pipeline.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from gateway.config import Duration, HostPort, Section, parse_hostport

DEFAULT_BANNED_EXTENSIONS = (
    "exe", "scr", "pif", "com", "bat", "cmd", "vbs", "vbe", "js", "jse", "jar", "lnk", "hta",
    "cpl", "msi", "msp", "msc", "wsf", "wsh", "ws", "ps1", "psc1", "reg", "scf", "inf", "gadget",
    "application", "appref-ms", "iso", "img", "vhd", "vhdx", "chm", "dll", "sys", "url",
)

SCANNER_TYPES = ("clamd", "command", "sophie", "trophie", "icap")


def _address(value):
    if value is None or isinstance(value, HostPort):
        return value
    return parse_hostport(value)


class ScannerSettings(Section):
    type: Literal["clamd", "command", "sophie", "trophie", "icap"]
    name: str = ""  # label in logs and in X-Virus-Scanned; default: the type or profile
    socket: str = ""  # unix socket (clamd, sophie, trophie)
    address: Optional[HostPort] = None  # host:port (clamd, icap)
    timeout: Duration = 30.0
    max_size: int = Field(64 * 1024 * 1024, gt=0)
    retries: int = Field(1, ge=0, le=5)
    failure_threshold: int = Field(5, ge=1)
    circuit_reset: Duration = 30.0
    tmp_dir: str = ""  # where sophie/trophie/command scanners get their file
    # command scanners
    profile: str = ""
    command: str = ""
    args: Optional[list[str]] = None
    clean_codes: Optional[list[int]] = None
    infected_codes: Optional[list[int]] = None
    suspicious_codes: Optional[list[int]] = None
    error_codes: Optional[list[int]] = None
    names: Optional[list[str]] = None  # regexes, group 1 = virus name
    # icap
    service: str = "avscan"
    method: Literal["RESPMOD", "REQMOD", "respmod", "reqmod"] = "RESPMOD"

    @field_validator("address", mode="before")
    @classmethod
    def _addr(cls, v):
        return _address(v)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v):
        if v <= 0:
            raise ValueError("must be more than 0 seconds")
        return v

    @field_validator("names")
    @classmethod
    def _names(cls, v):
        for pattern in v or ():
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {e}") from None
            if compiled.groups < 1:
                raise ValueError(f"{pattern!r} needs a (group) that captures the virus name")
        return v

    @model_validator(mode="after")
    def _per_type(self):
        t = self.type
        if t == "clamd" and not (self.socket or self.address):
            raise ValueError('clamd needs socket = "/path/clamd.ctl" or address = "host:port"')
        if t == "clamd" and self.socket and self.address:
            raise ValueError("clamd: give socket or address, not both")
        if t in ("sophie", "trophie") and not self.socket:
            raise ValueError(f'{t} needs socket = "/path/to/{t}.sock"')
        if t == "icap" and not self.address:
            raise ValueError('icap needs address = "host:port" (ICAP servers listen on 1344)')
        if t == "command":
            from scanners.command import BUILTIN_PROFILES

            if self.profile and self.profile not in BUILTIN_PROFILES:
                raise ValueError(f"unknown profile {self.profile!r}; built-in profiles: "
                                 f"{', '.join(sorted(BUILTIN_PROFILES))}")
            if not self.profile and not self.command:
                raise ValueError('command scanners need profile = "<built-in>" or command = "/path/to/scanner"'
                                 " with clean_codes, infected_codes and names")
            if not self.profile and (self.clean_codes is None or self.infected_codes is None):
                raise ValueError("a new command profile needs clean_codes and infected_codes")
            try:
                from scanners.command import profile_from_settings

                profile_from_settings(self)
            except ValueError as e:
                raise ValueError(str(e)) from None
        return self

    @property
    def label(self) -> str:
        return self.name or (self.profile if self.type == "command" and self.profile else "") or (
            self.command.split("/")[-1].split()[0] if self.type == "command" and self.command else self.type)


class AvSettings(Section):
    on_infected: Literal["reject", "quarantine"] = "reject"
    on_error: Literal["tempfail", "accept-tagged"] = "tempfail"
    self_test_interval: Duration = 600.0  # 0 = only at startup
    # banned attachments (independent of signatures)
    banned_attachments: bool = True
    banned_extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_BANNED_EXTENSIONS))
    banned_executable_content: bool = True  # an MZ (DOS/Windows) executable whatever its name
    banned_in_archives: bool = True  # file names inside zip archives
    archive_max_entries: int = Field(1000, gt=0)
    archive_max_depth: int = Field(2, ge=1, le=5)
    archive_max_nested_size: int = Field(5 * 1024 * 1024, gt=0)  # a nested zip is only opened up to this

    @field_validator("banned_extensions")
    @classmethod
    def _exts(cls, v):
        out = []
        for e in v:
            e = e.strip().lower().lstrip(".")
            if not e or "/" in e:
                raise ValueError(f"{e!r} is not a file name extension")
            out.append(e)
        return out
