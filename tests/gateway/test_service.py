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


def test_score_takes_the_session_from_the_received_chain(tmp_path):
    """`score` judges a file as if our gateway had been the hop that took it in from
    the Internet: ALL_TRUSTED never fires on Internet mail, the relay rules see that hop."""
    from tests.rules.test_sender_auth import only_checks

    rules = tmp_path / "cf"  # not "rules": the command runs here, and would import it as our package
    rules.mkdir()
    (rules / "relay.cf").write_text(
        "header ALL_TRUSTED eval:check_all_trusted()\ntflags ALL_TRUSTED nice\nscore ALL_TRUSTED -1.0\n"
        "header T_RDNS_NONE X-Spam-Relays-External =~ /^[^\\]]+ rdns= /\nscore T_RDNS_NONE 0.7\n")
    config = tmp_path / "mailgate.toml"
    config.write_text(f'[rules]\ndirs = ["{rules}"]\n' + only_checks("sa_rules"))
    local = (b"Received: from localhost (localhost [127.0.0.1])\r\n\tby mx.example.test (Postfix) with ESMTP id "
             b"A1B2C3;\r\n\tTue, 12 Mar 2024 10:01:05 +0000\r\n")
    internet = (b"Delivered-To: bob@example.test\r\nReceived: from mail1.sender.test ([198.51.100.23])\r\n\tby "
                b"mx.example.test (8.15.2/8.15.2) with ESMTP id h2F0c2x31856;\r\n\tTue, 12 Mar 2024 10:01:03 +0000\r\n")
    (tmp_path / "local.eml").write_bytes(local + HAM)
    (tmp_path / "internet.eml").write_bytes(local + internet + HAM)

    def score(*options):
        p = subprocess.run([os.sys.executable, "-m", "gateway.cli", "score", "-c", str(config), "--json", *options,
                            str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        return {os.path.basename(r["path"]): r for r in map(json.loads, p.stdout.splitlines())}

    rows = score()
    assert rows["local.eml"]["tests"] == {"ALL_TRUSTED": -1.0}  # it really came from this host
    assert rows["internet.eml"]["tests"] == {"T_RDNS_NONE": 0.7}
    assert rows["internet.eml"]["session"] == {
        "client_ip": "198.51.100.23", "client_rdns": "", "helo": "mail1.sender.test", "from": "received[1]",
        "rcpt": "bob@example.test", "rcpt_from": "Delivered-To", "sender": ""}
    given = score("--client-ip", "192.0.2.9", "--helo", "given.test", "--rcpt", "carol@example.test")
    assert given["local.eml"]["session"]["client_ip"] == "192.0.2.9" and "ALL_TRUSTED" not in given["local.eml"]["tests"]
    assert given["local.eml"]["session"]["rcpt"] == "carol@example.test"
    bad = subprocess.run([os.sys.executable, "-m", "gateway.cli", "score", "-c", str(config), "--client-ip", "nope",
                          str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "--client-ip 'nope': not an IPv4 or IPv6 address" in bad.stderr
    assert "Traceback" not in bad.stderr


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


# --- reload means reload (issue 10, item 5) ------------------------------------------

def reloads(gw) -> int:
    return gw.log().count("reloaded config=")


def sighup(gw, expect: str = "reloaded config=") -> None:
    """SIGHUP, then wait until the gateway has logged one more ``expect`` line."""
    before = gw.log().count(expect)
    gw.signal(signal.SIGHUP)
    assert wait_until(lambda: gw.log().count(expect) > before), gw.log()


def auth_plain(conn, user: str, password: str) -> int:
    import base64

    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return conn.docmd("AUTH", f"PLAIN {token}")[0]


def test_sighup_rereads_the_users_file(mailgate, tmp_path):
    from gateway.auth import hash_password

    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}s3cret\n")
    gw = mailgate(f'[auth]\nusers_file = "{users}"\n')
    with gw.smtp() as early:  # open across the reload: the revocation reaches it too
        early.ehlo("client.sender.test")
        with gw.smtp() as c:
            c.ehlo("client.sender.test")
            assert auth_plain(c, "alice", "s3cret") == 235
        users.write_text(f"carol:{hash_password('n3w', iterations=1000)}\n")
        sighup(gw)
        assert auth_plain(early, "alice", "s3cret") == 535
    for user, password, code in (("alice", "s3cret", 535), ("carol", "n3w", 235)):
        with gw.smtp() as c:
            c.ehlo("client.sender.test")
            assert auth_plain(c, user, password) == code, user
    assert "auth=1 users" in gw.log()


def served_certificate_cn(gw) -> str:
    import ssl

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with gw.smtp() as c:
        c.ehlo("client.sender.test")
        c.starttls(context=ssl._create_unverified_context())
        der = c.sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_sighup_serves_a_renewed_certificate(mailgate, tmp_path):
    from tests.support.sink import make_self_signed

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    cert, key = make_self_signed(str(tmp_path / "old"), "old.gateway.test")
    gw = mailgate(server_extra=f'tls_certificate = "{cert}"\ntls_key = "{key}"\n')
    assert served_certificate_cn(gw) == "old.gateway.test"
    new_cert, new_key = make_self_signed(str(tmp_path / "new"), "new.gateway.test")
    os.replace(new_key, key)  # renewed in place, as certbot's hooks do: the config is unchanged
    os.replace(new_cert, cert)
    sighup(gw)
    assert served_certificate_cn(gw) == "new.gateway.test"


def test_sighup_names_what_needs_a_restart_and_applies_the_rest(mailgate):
    gw = mailgate()
    spam = HAM.replace(b"Shall we meet at noon?", GTUBE)
    other = free_port()
    text = gw.config_path.read_text().replace(f'listen = ["127.0.0.1:{gw.port}"]',
                                              f'listen = ["127.0.0.1:{other}"]')
    gw.config_path.write_text(text + "\n[spam]\nreject_threshold = 5000\n")
    sighup(gw)
    line = [l for l in gw.log().splitlines() if "reloaded config=" in l][-1]
    assert "needs a restart: server.listen" in line and "changed=server,spam" in line
    assert send(gw, spam) == {}  # the threshold took effect, on the address still bound


@pytest.mark.parametrize("broken", ["tls_certificate", "users_file"])
def test_sighup_with_an_unreadable_file_is_refused_whole(mailgate, sink, tmp_path, broken):
    from tests.support.sink import make_self_signed

    cert, key = make_self_signed(str(tmp_path), "mx.gateway.test")
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}s3cret\n")
    gw = mailgate(f'[auth]\nusers_file = "{users}"\n', server_extra=f'tls_certificate = "{cert}"\ntls_key = "{key}"\n')
    missing = str(tmp_path / "gone")
    text = gw.config_path.read_text().replace(str(cert) if broken == "tls_certificate" else str(users), missing)
    gw.config_path.write_text(text + "\n[spam]\nreject_threshold = 5000\n")
    sighup(gw, expect="reload refused")
    assert f"{broken} = '{missing}': no such file" in gw.log()
    with pytest.raises(smtplib.SMTPDataError):  # the old threshold stays with the old files
        send(gw, HAM.replace(b"Shall we meet at noon?", GTUBE))
    with gw.smtp() as c:
        c.ehlo("client.sender.test")
        assert c.has_extn("starttls") and auth_plain(c, "alice", "s3cret") == 235
    assert reloads(gw) == 0


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_missing_tls_certificate_is_refused_at_start(tmp_path, command):
    from tests.support.gateway import base_config

    path = tmp_path / "m.toml"
    path.write_text(base_config(free_port(), str(tmp_path / "queue"), None, server_extra=(
        f'tls_certificate = "{tmp_path}/cert.pem"\ntls_key = "{tmp_path}/key.pem"\n')))
    p = subprocess.run([os.sys.executable, "-m", "gateway.cli", command, "-c", str(path)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2
    assert f"server.tls_certificate = '{tmp_path}/cert.pem': no such file" in p.stderr
    assert f"server.tls_key = '{tmp_path}/key.pem': no such file" in p.stderr and "Traceback" not in p.stderr


# --- fail fast at start (issue 10, item 11) ------------------------------------------

def delivery_processes(queue_dir) -> list[int]:
    """Live `mailgate deliver` processes working ``queue_dir`` (their config is in it)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"deliver" in argv and any(str(queue_dir).encode() in a for a in argv):
            found.append(int(name))
    return found


def test_run_exits_1_when_a_listen_address_is_taken(mailgate, sink):
    import socket as _socket

    from gateway.spool import QueueEntry, RecipientState, Spool
    from tests.support.gateway import MAILGATE

    gw = mailgate(start=False)
    free = free_port()
    gw.config_path.write_text(gw.config_path.read_text().replace(
        f'listen = ["127.0.0.1:{gw.port}"]', f'listen = ["127.0.0.1:{free}", "127.0.0.1:{gw.port}"]'))
    Spool(str(gw.queue_dir())).store(QueueEntry("waiting1", "alice@sender.test", [RecipientState("bob@example.test")],
                                                time.time()), HAM)
    with _socket.socket() as taken, open(gw.log_path, "wb") as out:
        taken.bind(("127.0.0.1", gw.port))
        taken.listen()
        p = subprocess.Popen(MAILGATE + ["run", "-c", str(gw.config_path)], cwd=str(gw.workdir), stdout=out,
                             stderr=subprocess.STDOUT)
        try:
            assert p.wait(timeout=60) == 1
        finally:
            p.kill()
            p.wait()
    assert f"cannot listen on 127.0.0.1:{gw.port}: Address already in use" in gw.log()
    assert "Traceback" not in gw.log()
    assert delivery_processes(gw.queue_dir()) == []
    assert [e.queue_id for e in Spool(str(gw.queue_dir())).entries()] == ["waiting1"]
    assert sink.messages == []


# --- reload, piece by piece -------------------------------------------------------------

def settings(**sections):
    from gateway import config as cfg

    return cfg.validate(sections, {})


def test_needs_restart_names_only_what_cannot_be_swapped():
    from gateway.service import needs_restart

    running = settings(server={"listen": ["127.0.0.1:2525"], "hostname": "mx.gateway.test"})
    swappable = settings(server={"listen": ["127.0.0.1:2525"], "hostname": "mx2.gateway.test", "max_connections": 5},
                         spam={"threshold": 3}, dns={"nameservers": ["127.0.0.1:53"]}, auth={"users_file": "u"})
    assert needs_restart(running, swappable) == []
    fixed = settings(server={"listen": ["127.0.0.1:2526"]}, queue={"dir": "elsewhere", "delivery_process": False},
                     store={"backend": "sqlite"})
    assert needs_restart(running, fixed) == ["server.listen", "queue.dir", "queue.delivery_process", "store"]


class FakeReactor:
    """What Gateway needs of a reactor before it runs: a thread pool, callLater."""

    class Pool:
        def adjustPoolsize(self, low, high):
            pass

    def __init__(self):
        self.later = []

    def getThreadPool(self):
        return self.Pool()

    def callLater(self, delay, fn, *args):
        self.later.append(fn)


def nameservers(resolver) -> list[tuple[str, int]]:
    return [(ns.address, ns.port) for ns in resolver._resolver.nameservers]


def test_reload_rebuilds_the_resolver_only_when_dns_changed(tmp_path):
    from types import SimpleNamespace

    from gateway import config as cfg
    from gateway.service import Gateway

    path = tmp_path / "m.toml"
    path.write_text('[dns]\nnameservers = ["127.0.0.1:5301"]\n[store]\nbackend = "memory"\n')
    gw = Gateway(cfg.load(str(path)), str(path), FakeReactor())
    front = gw._build_front(gw.config)
    gw.factory = SimpleNamespace()  # what a reload swaps: attributes the protocol reads per connection
    gw._apply(front)
    from gateway.delivery import Deliverer
    from gateway.queue import QueueManager
    from gateway.spool import Spool

    gw.queue = QueueManager(Spool(str(tmp_path / "queue")),  # the in-process queue manager, never started
                            Deliverer.from_config(gw.config, gw.reactor, gw.resolver, None, False), gw.reactor,
                            None, gw.config.queue, gw.config.server.hostname)
    first = gw.resolver
    path.write_text('[dns]\nnameservers = ["127.0.0.1:5301"]\n[spam]\nthreshold = 4.0\n')
    gw.reload()
    assert gw.factory.runtime.config.spam.threshold == 4.0 and gw.resolver is first  # its cache kept

    path.write_text('[dns]\nnameservers = ["127.0.0.1:5302"]\ntimeout = 1.5\n')
    gw.reload()
    assert gw.resolver is not first and nameservers(gw.resolver) == [("127.0.0.1", 5302)]
    assert gw.resolver.timeout == 1.5
    sender_checks = [c for checks in gw.factory.runtime.pipeline.by_stage.values() for c in checks
                     if c.name == "sender_domain"]
    assert sender_checks and all(c.resolver is gw.resolver for c in sender_checks)
    assert gw.queue.deliverer.resolver is gw.resolver


def test_in_process_delivery_delivers_before_and_after_a_reload(mailgate, sink):
    gw = mailgate(start=False)
    gw.config_path.write_text(gw.config_path.read_text().replace("[queue]\n", "[queue]\ndelivery_process = false\n"))
    gw.start()
    assert send(gw) == {}
    assert sink.wait_for(1)
    gw.config_path.write_text(gw.config_path.read_text() + "\n[spam]\nthreshold = 4.0\n")
    sighup(gw)
    assert send(gw) == {}
    assert sink.wait_for(2)
    assert "delivery process started" not in gw.log() and "Traceback" not in gw.log()


def test_password_checks_run_in_their_own_low_priority_threads():
    import threading

    from gateway.service import PASSWORD_NICE, password_pool

    class Reactor:
        triggers = []

        def addSystemEventTrigger(self, phase, event, fn):
            self.triggers.append(fn)

        def callFromThread(self, fn, *args, **kw):
            fn(*args, **kw)

    reactor = Reactor()
    run = password_pool(reactor)
    done = threading.Event()
    seen = {}

    def probe():
        seen["thread"] = threading.current_thread().name
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return "checked"

    run(probe).addCallback(lambda v: (seen.update(result=v), done.set()))
    assert done.wait(10)
    reactor.triggers[0]()  # the pool stops with the reactor
    assert seen["result"] == "checked" and "mailgate-password" in seen["thread"]
    assert seen["nice"] == PASSWORD_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0  # the caller's thread is untouched


def test_slowloris_clients_are_cut_at_the_deadline_and_others_are_served(mailgate, sink):
    """One byte every half second never completes a command in time: each such
    client is closed at idle_timeout (3 s here), however steadily it trickles,
    and a normal client is served meanwhile."""
    import socket as _socket

    gw = mailgate(server_extra='idle_timeout = "3s"\nmax_connections = 6')
    slow = []
    for _ in range(5):
        s = _socket.create_connection((gw.host, gw.port), timeout=5)
        assert s.recv(512).startswith(b"220")
        slow.append(s)
    line = b"EHLO a-name-that-takes-a-long-time-to-arrive.sender.test\r\n"
    for i, byte in enumerate(line[:16]):  # 8 s of trickling: well past the deadline, far from the line's end
        for s in slow:
            try:
                s.send(bytes([byte]))
            except OSError:
                pass  # closed on us: what this test wants
        if i == 2:
            assert send(gw) == {}  # the sixth slot still serves a normal client
        time.sleep(0.5)
    got = [s.recv(512) for s in slow]
    assert all(g.startswith(b"421 4.4.2") for g in got), got
    assert sink.wait_for(1, timeout=20)
    for s in slow:
        s.close()
