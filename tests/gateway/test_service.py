"""End to end: `mailgate run` as a real process between smtplib/swaks and a
real downstream SMTP server, all on loopback."""

from __future__ import annotations

import email
import json
import os
import signal
import smtplib
import subprocess
import time

import pytest

from rules.gtube import GTUBE
from tests.support.ports import free_port
from tests.support.programs import require_program
from tests.support.sink import Sink

HAM = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: lunch\r\n"
       b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <lunch-1@sender.test>\r\n"
       b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, forged by the sender\r\n"
       b"\r\nShall we meet at noon?\r\n\r\n-- \r\nAlice\r\n")


# what the gateway adds; everything else must arrive byte for byte
OUR_HEADERS = (b"Received: from ", b"X-Spam-", b"Authentication-Results: mx.gateway.test;", b"X-Virus-Scanned:")


def send(gw, body=HAM, sender="alice@sender.test", rcpts=("bob@example.test",), **kw):
    with gw.smtp(**kw) as c:
        return c.sendmail(sender, list(rcpts), body)


def headers_of(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data)


def wait_until(predicate, timeout=15.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_ham_passes_untouched_but_for_our_headers(mailgate, sink):
    gw = mailgate()
    assert send(gw) == {}
    assert sink.wait_for(1)
    got = sink.messages[0]
    assert got.mail_from == "alice@sender.test" and got.rcpt_tos == ["bob@example.test"]
    head, _, body = got.data.partition(b"\r\n\r\n")
    assert body == b"Shall we meet at noon?\r\n\r\n-- \r\nAlice\r\n"
    ours = [l for l in head.split(b"\r\n") if not l.startswith((b"\t", b" "))]
    theirs = [l for l in ours if not l.startswith(OUR_HEADERS)]
    assert theirs == [b"From: Alice <alice@sender.test>", b"To: bob@example.test", b"Subject: lunch",
                      b"Date: Sat, 28 Nov 2026 10:00:00 +0000", b"Message-ID: <lunch-1@sender.test>"]
    msg = headers_of(got.data)
    assert msg.get_all("X-Spam-Flag") is None  # the forged one is gone
    assert msg["X-Spam-Status"].startswith("No, score=") and float(msg["X-Spam-Score"]) < 5.0
    qid = msg["Received"].split(" id ")[1].split()[0]
    assert f"queue_id={qid}" in gw.log()


def test_gtube_at_reject_threshold_is_refused(mailgate, sink):
    gw = mailgate()
    with pytest.raises(smtplib.SMTPDataError) as err:
        send(gw, HAM.replace(b"Shall we meet at noon?", GTUBE))
    assert err.value.smtp_code == 554 and err.value.smtp_error.startswith(b"5.7.1")
    time.sleep(0.5)
    assert sink.messages == []
    assert "action=reject" in gw.log()


def test_gtube_below_reject_threshold_is_tagged_once(mailgate, sink):
    gw = mailgate("[spam]\nreject_threshold = 5000\n")
    body = HAM.replace(b"Shall we meet at noon?", GTUBE)
    send(gw, body)
    send(gw, body.replace(b"Subject: lunch", b"Subject: SPAM*** lunch"))
    assert sink.wait_for(2)
    first, second = (headers_of(m.data) for m in sink.messages)
    assert first["Subject"] == "SPAM*** lunch" and second["Subject"] == "SPAM*** lunch"
    assert first["X-Spam-Flag"] == "YES"
    assert first["X-Spam-Status"].startswith("Yes, score=100") and "tests=GTUBE=1000" in first["X-Spam-Status"]


@pytest.mark.parametrize("rcpt", ["user@other.test", "user%other.test@example.test",
                                  "other.test!user@example.test", '"user@other.test"@example.test',
                                  "@example.test:user@other.test", "user@other.test.", "user@[127.0.0.1]"])
def test_not_an_open_relay(mailgate, sink, rcpt):
    gw = mailgate()
    with gw.smtp() as c:  # raw commands: smtplib would rewrite source routes
        c.ehlo("client.sender.test")
        assert c.mail("alice@sender.test")[0] == 250
        code, text = c.docmd("RCPT", f"TO:<{rcpt}>")
    assert code == 554 and b"5.7.1" in text and b"Relay access denied" in text


def test_downstream_down_then_back_delivers_once_and_no_bounce(mailgate):
    port = free_port()
    gw = mailgate(downstream_port=port)
    assert send(gw) == {}
    assert wait_until(lambda: "deferred=1" in gw.log())
    listing = gw.cli("queue", "list").stdout.decode()
    assert "<bob@example.test> pending" in listing and "1 message(s) in queue" in listing
    with Sink(port=port) as back:
        assert back.wait_for(1, timeout=20)
        time.sleep(1.5)
        assert [m.mail_from for m in back.messages] == ["alice@sender.test"]  # no bounce to the sender
    assert wait_until(lambda: "0 message(s) in queue" in gw.cli("queue", "list").stdout.decode())


def test_permanent_failure_sends_a_dsn(mailgate, sink):
    sink.rcpt_reply = {"bob@example.test": "550 5.1.1 <bob@example.test>: no such user"}
    gw = mailgate()
    send(gw, rcpts=["bob@example.test", "carol@example.test"])
    assert sink.wait_for(2, timeout=20)
    by_sender = {m.mail_from: m for m in sink.messages}
    assert by_sender["alice@sender.test"].rcpt_tos == ["carol@example.test"]
    bounce = by_sender[""]
    assert bounce.rcpt_tos == ["alice@sender.test"]
    dsn = headers_of(bounce.data)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    text = bounce.data.decode(errors="replace")
    assert "Final-Recipient: rfc822; bob@example.test" in text or "Final-Recipient: rfc822;bob@example.test" in text
    assert "5.1.1" in text


def test_kill_9_after_250_delivers_after_restart(mailgate):
    port = free_port()
    gw = mailgate(downstream_port=port)
    assert send(gw) == {}  # 250: it is on disk
    gw.kill()
    with Sink(port=port) as back:
        gw.start()
        assert back.wait_for(1, timeout=20)
        assert back.messages[0].data.endswith(b"Alice\r\n")


def test_sigterm_exits_zero_and_sighup_reloads(mailgate, sink):
    gw = mailgate()
    body = HAM.replace(b"Shall we meet at noon?", GTUBE)
    with pytest.raises(smtplib.SMTPDataError):
        send(gw, body)
    # raise the reject threshold and reload: GTUBE is now tagged, not refused
    gw.config_path.write_text(gw.config_path.read_text() + "\n[spam]\nreject_threshold = 5000\n")
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: "reloaded config" in gw.log())
    assert send(gw, body) == {}
    # a broken file on SIGHUP is refused and the running config stays
    good = gw.config_path.read_text()
    gw.config_path.write_text(good + "\n[server]\nbogus = 1\n")
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in gw.log())
    assert send(gw, body) == {}
    assert gw.stop() == 0
    assert "Traceback" not in gw.log()


def test_bad_config_is_refused_with_key_value_reason(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["127.0.0.1:99999"]\n[routes]\n"x.test" = "ftp:nowhere"\n')
    for sub in ("run", "check-config"):
        p = subprocess.run([os.sys.executable, "-m", "gateway.cli", sub, "-c", str(bad)], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2
        assert "server.listen.0 = '127.0.0.1:99999': port must be between 1 and 65535" in p.stderr
        assert "routes.x.test" in p.stderr and "Traceback" not in p.stderr


def test_swaks_pipelined_message(mailgate, sink):
    swaks = require_program("swaks")
    gw = mailgate()
    p = subprocess.run([swaks, "-s", "127.0.0.1", "-p", str(gw.port), "-f", "alice@sender.test", "-t",
                        "bob@example.test", "--pipeline", "--h-Subject", "via swaks", "--silent", "2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sink.wait_for(1)
    assert headers_of(sink.messages[0].data)["Subject"] == "via swaks"


def test_quarantine_then_release(mailgate, sink):
    gw = mailgate("[spam]\nquarantine_threshold = 500\nreject_threshold = 5000\n")
    assert send(gw, HAM.replace(b"Shall we meet at noon?", GTUBE)) == {}
    time.sleep(0.5)
    assert sink.messages == []
    listing = gw.cli("quarantine", "list").stdout.decode()
    assert "1 message(s) in quarantine" in listing and "score=1000" in listing
    qid = listing.split()[0]
    released = gw.cli("quarantine", "release", qid)
    assert released.returncode == 0, released.stderr
    assert sink.wait_for(1, timeout=20)
    assert sink.messages[0].data.startswith(b"X-MailGate-Released: by ")
    assert "0 message(s) in quarantine" in gw.cli("quarantine", "list").stdout.decode()


def test_queue_hold_release_delete(mailgate):
    gw = mailgate(downstream_port=free_port())
    send(gw)
    assert wait_until(lambda: "deferred=1" in gw.log())
    qid = gw.cli("queue", "list").stdout.decode().split()[0]
    assert gw.cli("queue", "hold", qid).returncode == 0
    assert "HELD" in gw.cli("queue", "list").stdout.decode()
    assert gw.cli("queue", "release", qid).returncode == 0
    assert b"alice@sender.test" in gw.cli("queue", "show", qid).stdout
    assert gw.cli("queue", "delete", qid).returncode == 0
    missing = gw.cli("queue", "show", qid)
    assert missing.returncode == 2 and b"no message" in missing.stderr


def test_score_command_prints_json_per_message(tmp_path):
    (tmp_path / "ham.eml").write_bytes(HAM)
    (tmp_path / "spam.eml").write_bytes(HAM.replace(b"Shall we meet at noon?", GTUBE))
    p = subprocess.run([os.sys.executable, "-m", "gateway.cli", "score", "--json", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = {os.path.basename(r["path"]): r for r in map(json.loads, p.stdout.splitlines())}
    assert rows["spam.eml"]["action"] == "reject" and "GTUBE" in rows["spam.eml"]["symbols"]
    assert rows["ham.eml"]["action"] == "accept" and rows["ham.eml"]["score"] < 5


def test_starttls_then_mail_is_marked_esmtps(mailgate, sink, tmp_path):
    from tests.support.sink import make_self_signed

    cert, key = make_self_signed(str(tmp_path), "mx.gateway.test")
    gw = mailgate(server_extra=f'tls_certificate = "{cert}"\ntls_key = "{key}"\n')
    import ssl

    with gw.smtp() as c:
        c.ehlo("client.sender.test")
        assert c.has_extn("starttls")
        c.starttls(context=ssl._create_unverified_context())
        c.ehlo("client.sender.test")
        assert c.sendmail("alice@sender.test", ["bob@example.test"], HAM) == {}
    assert sink.wait_for(1)
    assert b"with ESMTPS id" in sink.messages[0].data


def test_disconnect_mid_data_leaves_nothing_queued(mailgate, sink):
    gw = mailgate()
    import socket as _socket

    with _socket.create_connection((gw.host, gw.port)) as s:
        f = s.makefile("rwb")
        f.readline()
        for line in (b"EHLO client.sender.test", b"MAIL FROM:<alice@sender.test>", b"RCPT TO:<bob@example.test>",
                     b"DATA"):
            f.write(line + b"\r\n")
            f.flush()
            while True:
                reply = f.readline()
                if reply[3:4] == b" ":
                    break
        f.write(HAM[:60])
        f.flush()
        f.close()  # the file object holds the socket open until closed itself
    assert wait_until(lambda: "lost connection during DATA" in gw.log())
    assert list((gw.queue_dir() / "messages").iterdir()) == []
    assert sink.messages == []


def test_embedded_default_config_is_what_make_run_uses(tmp_path):
    env = dict(os.environ)
    env.pop("MAILGATE_CONFIG", None)
    p = subprocess.run([os.sys.executable, "-m", "gateway.cli", "check-config"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "listen=127.0.0.1:2525 domains=example.test" in p.stdout
