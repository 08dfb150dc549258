"""Typed outcomes and errors.  SMTP codes live here as data; only
``gateway/smtp.py`` turns them into reply lines."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def lines(self) -> list[bytes]:
        """The reply as wire lines without CRLF (multi-line aware)."""
        texts = self.text.splitlines() or [""]
        out = []
        for i, t in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            enh = f"{self.enhanced} " if self.enhanced else ""
            out.append(f"{self.code}{sep}{enh}{t}".encode("utf-8", "replace"))
        return out

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


class Reject(Reply):
    """A permanent refusal (5xx)."""


class TempFail(Reply):
    """A temporary refusal (4xx): the client should retry."""


class MailGateError(Exception):
    """Base class for errors we report to a person, never as a traceback."""


class ConfigError(MailGateError):
    """A config file that cannot be used: names the key, the value and why."""

    def __init__(self, problems: list[str] | str, path: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = problems
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(problems))


class CheckError(MailGateError):
    """A check was mis-configured or failed in a way it wants named."""
