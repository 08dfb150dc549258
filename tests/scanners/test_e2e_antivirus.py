"""End to end through `mailgate run`: real clamd (our signature database),
the gateway as a subprocess, a real downstream sink.  Viruses and banned
attachments are refused in the SMTP session and never delivered; a scanner
that is down or hangs makes the sender retry (451)."""

from __future__ import annotations

import re
import smtplib
import time


from scanners.base import EICAR
from tests.scanners.test_banned import PE
from tests.scanners.test_clamd import mime_with_attachment, zipped
from tests.support.clamd import MARKER, MARKER_NAME, start_clamd
from tests.support.programs import require_program

SENDER = "alice@sender.test"
RCPT = "bob@example.test"


def only_av_checks(*keep: str) -> str:
    """[checks] switching off every check but ours (and ``keep``): these tests
    are about the anti-virus path, and must not depend on DNS or spam rules."""
    from gateway.plugins import discover

    others = sorted(set(discover().checks) - {"antivirus", "banned_attachments", *keep})
    return "[checks]\ndisabled = [" + ", ".join(f'"{n}"' for n in others) + "]\n"


def av_toml(scanners: str, av: str = "") -> str:
    return scanners + f"[av]\nself_test_interval = 0\n{av}" + only_av_checks()


def clamd_toml(socket_path: str, timeout: float = 10, av: str = "") -> str:
    return av_toml(f'[[scanners]]\ntype = "clamd"\nsocket = "{socket_path}"\ntimeout = {timeout}\n', av)


def text_message(subject: str, body: bytes) -> bytes:
    return (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\nMessage-ID: <{subject}@sender.test>\r\n\r\n"
            .encode() + body + b"\r\n")


def send(gw, data: bytes) -> tuple[int, str]:
    """(code, text) of the reply to the end of DATA."""
    with gw.smtp(timeout=60) as client:
        client.ehlo("client.sender.test")
        try:
            client.sendmail(SENDER, [RCPT], data)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode(errors="replace")
    return 250, ""


def delivered_subjects(sink) -> list[str]:
    import email

    return [email.message_from_bytes(m.data)["Subject"] for m in sink.messages]


def test_viruses_refused_with_554_570_and_never_delivered(mailgate, sink, clamd_server):
    gw = mailgate(clamd_toml(clamd_server.socket_path))
    cases = {
        "plain": text_message("plain", EICAR),
        "base64": mime_with_attachment("eicar.com", EICAR),
        "zip": mime_with_attachment("files.zip", zipped("docs/eicar.com", EICAR)),
    }
    for label, data in cases.items():
        code, text = send(gw, data)
        assert code == 554, (label, code, text)
        assert text.startswith("5.7.0") and "EICAR" in text.upper(), (label, text)
    code, text = send(gw, text_message("custom", b"hello " + MARKER))
    assert code == 554 and re.fullmatch(rf"5\.7\.0 Message contains a virus: {re.escape(MARKER_NAME)} "
                                        r"\(queue id [0-9A-Za-z]+\)", text), text
    # a clean message afterwards is the only thing that arrives
    assert send(gw, text_message("clean", b"nothing to see")) == (250, "")
    sink.wait_for(1, timeout=20)
    time.sleep(0.2)
    assert delivered_subjects(sink) == ["clean"]


def test_clean_mail_delivered_with_x_virus_scanned(mailgate, sink, clamd_server):
    gw = mailgate(clamd_toml(clamd_server.socket_path))
    forged = b"X-Virus-Scanned: clean by the sender, trust me\r\n"
    assert send(gw, forged + text_message("hello", b"a clean note")) == (250, "")
    sink.wait_for(1, timeout=20)
    data = sink.messages[0].data
    assert b"X-Virus-Scanned: MailGate (clamd)" in data
    assert b"trust me" not in data
    assert "scanner=clamd self_test=ok" in gw.log()


def test_a_scanner_blind_to_eicar_is_reported_loudly_at_startup(mailgate, sink):
    # "true" exits 0 for everything: an engine with no signatures
    true = require_program("true")
    gw = mailgate(f'[[scanners]]\ntype = "command"\nname = "blind"\ncommand = "{true}"\n'
                  'clean_codes = [0]\ninfected_codes = [1]\n[av]\nself_test_interval = "10m"\n'
                  + only_av_checks())
    deadline = time.monotonic() + 20
    while "self_test=FAILED" not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(ln for ln in gw.log().splitlines() if "self_test=FAILED" in ln)
    assert "ERROR" in line and "scanner=blind" in line and "did NOT detect the EICAR" in line


def test_banned_exe_refused_with_554_571(mailgate, sink, clamd_server):
    gw = mailgate(clamd_toml(clamd_server.socket_path))
    code, text = send(gw, mime_with_attachment("invoice.pdf.exe", PE))
    assert code == 554 and text.startswith("5.7.1") and "invoice.pdf.exe" in text
    assert send(gw, text_message("after", b"clean")) == (250, "")
    sink.wait_for(1, timeout=20)
    assert delivered_subjects(sink) == ["after"]


def test_clamd_down_tempfails_then_the_retry_goes_through(mailgate, sink, tmp_path):
    clamd = start_clamd(str(tmp_path / "clamd"), require_program("clamd"))
    try:
        gw = mailgate(clamd_toml(clamd.socket_path, timeout=5))
        message = text_message("retried", b"please scan me")
        clamd.stop()
        code, text = send(gw, message)
        assert code == 451 and text.startswith("4.3.0"), (code, text)
        time.sleep(0.5)
        assert sink.messages == []
        clamd.start()
        assert send(gw, message) == (250, "")
        sink.wait_for(1, timeout=20)
        assert delivered_subjects(sink) == ["retried"]
        assert b"X-Virus-Scanned: MailGate (clamd)" in sink.messages[0].data
    finally:
        clamd.stop()


def test_hanging_scanner_tempfails_within_its_timeout(mailgate, sink, silent_unix):
    gw = mailgate(clamd_toml(silent_unix, timeout=2))
    # the reply names the scanner's deadline: the gateway answered on its own,
    # long before the client's patience (60 s) would have run out
    code, text = send(gw, text_message("stuck", b"anyone there?"))
    assert code == 451 and "timed out after 2s" in text, (code, text)
    time.sleep(0.5)
    assert sink.messages == []


def test_hanging_command_scanner_accept_tagged(mailgate, sink, fake_bin):
    # a command-line engine that hangs, with a site that prefers delivery:
    # the message goes through and says it was not scanned
    gw = mailgate(av_toml(f'[[scanners]]\ntype = "command"\nprofile = "sophos-savscan"\n'
                          f'command = "{fake_bin / "sophos-savscan"}"\ntimeout = 2\n',
                          'on_error = "accept-tagged"\n'))
    assert send(gw, text_message("tagged", b"FAKE-AV-TRIGGER-HANG")) == (250, "")
    sink.wait_for(1, timeout=20)
    data = sink.messages[0].data
    # the reactor's deadline or the killed child, whichever is noticed first
    assert b"X-Virus-Scanned: unscanned (sophos-savscan: " in data and b" 2s)" in data


def test_three_real_engines_in_parallel(mailgate, sink, clamd_server, icap_server):
    from scanners.command import BUILTIN_PROFILES

    clamscan = require_program("clamscan")
    args = ", ".join(f'"{a}"' for a in ("-d", clamd_server.db_dir, *BUILTIN_PROFILES["clamscan"].args))
    gw = mailgate(av_toml(
        f'[[scanners]]\ntype = "clamd"\naddress = "127.0.0.1:{clamd_server.port}"\n'
        f'[[scanners]]\ntype = "command"\nprofile = "clamscan"\ncommand = "{clamscan}"\nargs = [{args}]\n'
        f'timeout = 60\n'
        f'[[scanners]]\ntype = "icap"\naddress = "127.0.0.1:{icap_server.port}"\n'))
    code, text = send(gw, mime_with_attachment("a.zip", zipped("x.com", EICAR)))
    assert code == 554 and text.startswith("5.7.0"), (code, text)
    assert send(gw, text_message("three", b"clean")) == (250, "")
    sink.wait_for(1, timeout=20)
    assert b"X-Virus-Scanned: MailGate (clamd, clamscan, icap)" in sink.messages[0].data


def test_quarantine_policy_accepts_but_never_delivers(mailgate, sink, clamd_server):
    gw = mailgate(clamd_toml(clamd_server.socket_path, av='on_infected = "quarantine"\n'))
    code, _ = send(gw, text_message("infected", EICAR))
    assert code == 250
    assert send(gw, text_message("clean", b"fine")) == (250, "")
    sink.wait_for(1, timeout=20)
    time.sleep(0.3)
    assert delivered_subjects(sink) == ["clean"]
    held = [p for p in (gw.queue_dir() / "quarantine").iterdir() if not p.name.endswith(".json")]
    assert len(held) == 1 and EICAR in held[0].read_bytes()


def test_no_scanners_configured_the_gateway_still_delivers(mailgate, sink):
    gw = mailgate(only_av_checks())
    assert send(gw, text_message("unscanned", b"no engines here")) == (250, "")
    sink.wait_for(1, timeout=20)
    assert b"X-Virus-Scanned" not in sink.messages[0].data
    # banned attachments are refused even without a virus engine
    code, text = send(gw, mime_with_attachment("run.bat", b"@echo off"))
    assert code == 554 and text.startswith("5.7.1")


def test_allow_lists_do_not_let_a_virus_through(mailgate, sink, clamd_server):
    lists = ("ip_lists", "sender_lists", "recipient_lists")  # rules/lists.py
    gw = mailgate(f'[[scanners]]\ntype = "clamd"\nsocket = "{clamd_server.socket_path}"\n'
                  "[av]\nself_test_interval = 0\n"
                  f'[lists]\nallow_ips = ["127.0.0.0/8"]\nallow_senders = ["{SENDER}"]\n'
                  f'allow_recipients = ["{RCPT}"]\n' + only_av_checks(*lists))
    code, text = send(gw, text_message("allowed-but-infected", EICAR))
    assert code == 554 and text.startswith("5.7.0 Message contains a virus"), (code, text)
    assert send(gw, text_message("allowed-clean", b"fine")) == (250, "")
    sink.wait_for(1, timeout=20)
    assert delivered_subjects(sink) == ["allowed-clean"]
