"""Banned attachments, independent of virus signatures: the DATA check
"banned_attachments".

A part is banned when

* its file name (Content-Disposition ``filename`` or Content-Type ``name``,
  including RFC 2231 ``filename*=`` continuations and RFC 2047 encoded words)
  ends in a banned extension once Windows' own normalisation is applied
  (trailing dots and spaces are dropped, so ``invoice.pdf.exe .`` is an
  ``exe``); a name with a harmless-looking extension in front of the banned
  one (``invoice.pdf.exe``) is reported as a double extension;
* its decoded bytes are a DOS/Windows executable (``MZ`` header), whatever it
  is called;
* it is a zip archive (by name or by its ``PK`` signature) holding a banned
  name, read from the archive's directory only; nested zips are opened up to
  a depth and a size, and at most N entries are looked at, so an archive
  bomb costs bounded work and is never decompressed wholesale.

-> ``Result("BANNED_ATTACHMENT", refuse="banned")``: 554 5.7.1.  Parts nested
below the parsed view's depth limit are opaque bytes, so their names are not
seen: the check then also says ``Failed`` (no points; mime_structure scores
the nesting).
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import io
import logging
import re
import zipfile
from typing import Iterator, Optional

from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage
from scanners.settings import AvSettings

log = logging.getLogger("mailgate.scanners")

SYMBOL = "BANNED_ATTACHMENT"
MZ = b"MZ"
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# characters that make a name display differently from what it is
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\x00-\x1f]")


def decode_filename(raw) -> str:
    """A file name as the recipient's mail client would show it."""
    if raw is None:
        return ""
    if isinstance(raw, tuple):  # RFC 2231 (charset, language, value) from get_param
        raw = email.utils.collapse_rfc2231_value(raw)
    text = str(raw)
    if "=?" in text:
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except (email.errors.HeaderParseError, LookupError, UnicodeDecodeError, ValueError):
            pass
    return text


def part_filenames(part) -> list[str]:
    names = []
    for getter in (lambda: part.get_filename(None), lambda: part.get_param("name", None)):
        try:
            value = getter()
        except Exception:  # a broken header must not stop the check
            value = None
        name = decode_filename(value)
        if name and name not in names:
            names.append(name)
    return names


def normalise(name: str) -> str:
    name = _INVISIBLE.sub("", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    # Windows ignores trailing dots and spaces: "a.exe. " opens as a.exe
    return name.rstrip(" .").lower()


def banned_reason(name: str, banned: frozenset[str]) -> Optional[str]:
    clean = normalise(name)
    if "." not in clean:
        return None
    parts = [p.strip() for p in clean.split(".")]
    ext = parts[-1]
    if ext not in banned:
        return None
    if len(parts) >= 3 and parts[-2] and parts[-2] not in banned:
        return f"{name} (double extension .{parts[-2]}.{ext})"
    return f"{name} (.{ext})"


def is_executable(payload: bytes, maintype: str = "application") -> bool:
    """A DOS/Windows executable: "MZ", and a PE header where the DOS header
    points; a non-text part starting with "MZ" counts too (old DOS .exe)."""
    if payload[:2] != MZ:
        return False
    if len(payload) >= 64:
        pe_at = int.from_bytes(payload[0x3C:0x40], "little")
        if pe_at + 4 <= len(payload) and payload[pe_at:pe_at + 4] == b"PE\0\0":
            return True
    return maintype != "text"


class ZipBudget:
    def __init__(self, max_entries: int):
        self.entries_left = max_entries


def zip_names(data: bytes, depth: int, max_depth: int, max_nested: int, budget: ZipBudget) -> Iterator[str]:
    """Names inside a zip (and nested zips within the bounds), outermost first."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return
    with archive:
        for info in archive.infolist():
            if budget.entries_left <= 0:
                return
            budget.entries_left -= 1
            yield info.filename
            if (depth < max_depth and info.filename.lower().endswith(".zip")
                    and info.file_size <= max_nested and not info.flag_bits & 0x1):
                try:
                    # ZipExtFile stops at the declared size, so this is bounded
                    with archive.open(info) as inner:
                        nested = inner.read(max_nested + 1)
                except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError):
                    continue
                if len(nested) <= max_nested:
                    for name in zip_names(nested, depth + 1, max_depth, max_nested, budget):
                        yield f"{info.filename}/{name}"


class BannedAttachments(Check):
    name = "banned_attachments"
    stage = Stage.DATA
    symbols = (Symbol(SYMBOL, 0.0, "attachments", "Carries an attachment of a banned name or type"),)
    priority = 15

    blocking = True  # walking every part and opening zips inside zips: not on the reactor

    def __init__(self, av: AvSettings):
        self.av = av
        self.banned = frozenset(av.banned_extensions)

    @classmethod
    def from_config(cls, config, services):
        av = getattr(config, "av", None) or AvSettings()
        if not av.banned_attachments:
            return None
        return cls(av)

    def check(self, txn):
        reasons = self.find(txn.message.parsed)
        out = [Result(SYMBOL, 0.0, "; ".join(reasons[:3]), refuse="banned")] if reasons else []
        if txn.message.mime_truncated:
            # parts below the nesting limit are opaque bytes: their names were not seen
            out.append(Failed(self.name, f"parts nested deeper than {txn.message.max_mime_depth} levels "
                                         "were not looked into"))
        return out

    def find(self, msg) -> list[str]:
        reasons: list[str] = []
        budget = ZipBudget(self.av.archive_max_entries)
        for part in msg.walk():
            if part.is_multipart():
                continue
            names = part_filenames(part)
            for n in names:
                r = banned_reason(n, self.banned)
                if r and r not in reasons:
                    reasons.append(r)
            if not (self.av.banned_executable_content or self.av.banned_in_archives):
                continue
            payload = self._payload(part)
            if not payload:
                continue
            label = names[0] if names else (part.get_content_type() or "part")
            if self.av.banned_executable_content and is_executable(payload, part.get_content_maintype()):
                reasons.append(f"{label} (Windows executable content)")
            if self.av.banned_in_archives and (payload[:4] in ZIP_MAGIC or label.lower().endswith(".zip")):
                for inner in zip_names(payload, 1, self.av.archive_max_depth, self.av.archive_max_nested_size,
                                       budget):
                    r = banned_reason(inner, self.banned)
                    if r:
                        reasons.append(f"{r} in {label}")
                        break
        return reasons

    @staticmethod
    def _payload(part) -> bytes:
        try:
            payload = part.get_payload(decode=True)
        except Exception:
            return b""
        return payload if isinstance(payload, bytes) else b""


CHECKS = (BannedAttachments,)
