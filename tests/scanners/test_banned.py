"""Banned attachments: names (plain, double extension, RFC 2231, encoded
words, Windows trailing dots), executable content, names inside zips, and
bounded work on hostile archives."""

from __future__ import annotations

import base64
import io
import os
import zipfile

import pytest

from gateway.records import Failed, Message, Result, Session, Transaction
from scanners.banned import BannedAttachments, banned_reason, is_executable, zip_names, ZipBudget
from scanners.settings import AvSettings, DEFAULT_BANNED_EXTENSIONS

PE = b"MZ" + b"\x90" * 58 + (64).to_bytes(4, "little") + b"PE\x00\x00" + b"\x00" * 64


def message(*parts: bytes) -> bytes:
    out = (b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\nContent-Type: text/plain\r\n\r\nhello\r\n")
    for p in parts:
        out += b"--BB\r\n" + p
    return out + b"--BB--\r\n"


def attachment(headers: str, payload: bytes = b"data") -> bytes:
    b64 = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return headers.encode().replace(b"\n", b"\r\n") + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64


def zipped(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def check(raw: bytes, **av) -> list:
    txn = Transaction(Session("Q1", "127.0.0.1"), message=Message(raw))
    return BannedAttachments(AvSettings(**av)).check(txn)


def refused(raw: bytes, **av) -> str:
    results = check(raw, **av)
    assert len(results) == 1, results
    r = results[0]
    assert isinstance(r, Result) and r.symbol == "BANNED_ATTACHMENT" and r.refuse == "banned"
    return r.detail


def test_plain_exe():
    assert "setup.exe" in refused(message(attachment(
        'Content-Type: application/octet-stream\nContent-Disposition: attachment; filename="setup.exe"')))


def test_double_extension():
    detail = refused(message(attachment(
        'Content-Type: application/pdf\nContent-Disposition: attachment; filename="invoice.pdf.exe"')))
    assert "double extension .pdf.exe" in detail


def test_name_only_in_content_type():
    assert "run.scr" in refused(message(attachment('Content-Type: application/octet-stream; name="run.scr"')))


def test_rfc2231_encoded_and_continued_name():
    part = attachment("Content-Type: application/octet-stream\n"
                      "Content-Disposition: attachment;\n filename*0*=UTF-8''r%C3%A9sum%C3%A9;\n filename*1=\".pdf.js\"")
    assert "résumé.pdf.js" in refused(message(part))


def test_encoded_word_name():
    part = attachment('Content-Type: application/octet-stream; name="=?UTF-8?B?cGF5bWVudC52YnM=?="')
    assert "payment.vbs" in refused(message(part))


def test_trailing_dots_and_spaces_are_dropped_as_windows_does():
    assert refused(message(attachment(
        'Content-Type: application/octet-stream\nContent-Disposition: attachment; filename="a.bat. . "')))


def test_right_to_left_override_does_not_hide_the_extension():
    # "photo\u202egpj.exe" displays as photoexe.jpg
    part = attachment("Content-Type: application/octet-stream; name*=UTF-8''photo%E2%80%AEgpj.exe")
    assert refused(message(part))


def test_executable_content_with_a_harmless_name():
    detail = refused(message(attachment(
        'Content-Type: text/plain\nContent-Disposition: attachment; filename="notes.txt"', PE)))
    assert "notes.txt (Windows executable content)" in detail


def test_text_that_merely_starts_with_mz_is_fine():
    assert check(message(attachment('Content-Type: text/plain; name="mz.txt"', b"MZ is a postcode prefix"))) == []


def test_banned_name_inside_zip():
    z = zipped({"readme.txt": b"hi", "docs/invoice.pdf.exe": b"x"})
    detail = refused(message(attachment('Content-Type: application/zip; name="docs.zip"', z)))
    assert "invoice.pdf.exe" in detail and "docs.zip" in detail


def test_zip_found_by_signature_whatever_its_name():
    z = zipped({"run.cmd": b"x"})
    assert "run.cmd" in refused(message(attachment('Content-Type: application/octet-stream; name="data.bin"', z)))


def test_nested_zip_within_depth():
    inner = zipped({"evil.js": b"x"})
    outer = zipped({"inner.zip": inner})
    assert "inner.zip/evil.js" in refused(message(attachment('Content-Type: application/zip; name="a.zip"', outer)))


def test_nesting_beyond_depth_is_not_opened():
    z = zipped({"evil.js": b"x"})
    for _ in range(3):
        z = zipped({"next.zip": z})
    assert check(message(attachment('Content-Type: application/zip; name="a.zip"', z)), archive_max_depth=2) == []


def test_clean_zip_and_clean_message():
    z = zipped({"report.pdf": b"%PDF-1.4", "data.csv": b"a,b"})
    assert check(message(attachment('Content-Type: application/zip; name="r.zip"', z))) == []
    assert check(b"Subject: hi\r\n\r\nplain text, no attachments\r\n") == []


def test_entry_budget_bounds_the_work():
    many = zipped({f"f{i}.txt": b"" for i in range(50)} | {"last.exe": b"x"})
    budget = ZipBudget(10)
    assert len(list(zip_names(many, 1, 2, 10**6, budget))) == 10
    assert check(message(attachment('Content-Type: application/zip; name="m.zip"', many)),
                 archive_max_entries=20) == []


def test_nested_zip_over_the_size_bound_is_not_opened():
    # leaf entries are never inflated (names come from the directory); a
    # nested zip is, so it must fit the bound: this one is 2 MB, bound 1 MB
    inner = zipped({"evil.exe": b"x", "pad.bin": os.urandom(2 * 1024 * 1024)})
    outer = zipped({"big.zip": inner})
    raw = message(attachment('Content-Type: application/zip; name="a.zip"', outer))
    assert check(raw, archive_max_nested_size=1024 * 1024) == []
    assert "big.zip/evil.exe" in refused(raw, archive_max_nested_size=4 * 1024 * 1024)


def test_corrupt_zip_is_ignored():
    assert check(message(attachment('Content-Type: application/zip; name="a.zip"', b"PK\x03\x04garbage"))) == []


def test_configurable_list_and_switches():
    raw = message(attachment('Content-Type: application/octet-stream; name="tool.exe"', PE))
    assert check(raw, banned_extensions=["scr"], banned_executable_content=False) == []
    assert refused(raw, banned_extensions=[".EXE"])
    assert BannedAttachments.from_config(type("C", (), {"av": AvSettings(banned_attachments=False)})(), None) is None


def test_defaults_cover_the_usual_suspects():
    for ext in ("exe", "scr", "pif", "com", "bat", "cmd", "vbs", "js", "jar", "lnk", "hta"):
        assert ext in DEFAULT_BANNED_EXTENSIONS


@pytest.mark.parametrize("name, banned", [
    ("a.EXE", True), ("archive.tar.gz", False), ("noext", False), ("a.pdf", False), ("dir\\a.exe", True),
    ("a.exe.txt", False),
])
def test_banned_reason(name, banned):
    assert (banned_reason(name, frozenset(DEFAULT_BANNED_EXTENSIONS)) is not None) == banned


def test_is_executable():
    assert is_executable(PE, "text")
    assert is_executable(b"MZ\x00\x01", "application")
    assert not is_executable(b"MZ hello", "text")


def test_a_message_nested_past_the_limit_says_what_it_could_not_look_into():
    from tests.gateway.test_mime import HEAD, nested

    exe = attachment('Content-Type: application/octet-stream\nContent-Disposition: attachment; filename="a.exe"')
    # an attachment beside the deep branch is still seen; what is below the limit is not
    raw = nested(1000, inner=b'Content-Type: text/plain\r\n\r\nx\r\n', head=HEAD)
    raw = raw.replace(b'boundary="b0"\r\n\r\n--b0\r\n', b'boundary="b0"\r\n\r\n--b0\r\n' + exe + b"--b0\r\n", 1)
    results = check(raw)
    assert [type(r) for r in results] == [Result, Failed]
    assert "a.exe" in results[0].detail and results[0].refuse == "banned"
    assert results[1].check == "banned_attachments" and results[1].severity == "none"
    assert "100 levels" in results[1].reason
    assert check(message(b"Content-Type: text/plain\r\n\r\nshallow\r\n")) == []
