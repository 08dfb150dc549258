"""SMTP AUTH: the users file, the checker, and AUTH through the protocol."""

import base64
import hashlib
import hmac

import pytest
from twisted.cred import credentials, error

from gateway.auth import UsersFileChecker, hash_password, make_portal, read_users
from gateway.errors import ConfigError
from tests.gateway.test_smtp import OK_RCPT, Harness, RELAY_DENIED

AUTH_OK = b"235 2.7.0"
AUTH_FAILED = b"535 5.7.8"
NEED_TLS = b"538 5.7.11"


@pytest.fixture
def users_file(tmp_path):
    p = tmp_path / "users"
    p.write_text(f"# comment\nalice:{{PLAIN}}s3cret\nbob:{hash_password('hunter2', iterations=1000)}\n")
    return str(p)


def test_read_users_and_bad_lines(tmp_path, users_file):
    assert set(read_users(users_file)) == {"alice", "bob"}
    bad = tmp_path / "bad"
    bad.write_text("no-colon-here\n")
    with pytest.raises(ConfigError, match="bad:1: expected user:password"):
        read_users(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        read_users(str(tmp_path / "missing"))


def test_checker_plain_and_pbkdf2(users_file):
    c = UsersFileChecker(read_users(users_file))
    assert c.requestAvatarId(credentials.UsernamePassword(b"alice", b"s3cret")).result == "alice"
    assert c.requestAvatarId(credentials.UsernamePassword(b"bob", b"hunter2")).result == "bob"
    for user, pw in ((b"bob", b"wrong"), (b"nobody", b"x")):
        d = c.requestAvatarId(credentials.UsernamePassword(user, pw))
        d.addErrback(lambda f: f.trap(error.UnauthorizedLogin))


def harness(users_file, peer):
    h = Harness(peer=peer)
    h.factory.portal, h.factory.challengers = make_portal(users_file)
    c = h.connect()
    c.cmd(b"EHLO client.test")
    return c


def test_auth_plain_on_loopback_then_relay(users_file):
    c = harness(users_file, "127.0.0.1")
    assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret")).startswith(AUTH_OK)
    assert c.cmd(b"MAIL FROM:<alice@example.test>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<someone@other.test>").startswith(OK_RCPT)


def test_auth_login_wrong_password(users_file):
    c = harness(users_file, "127.0.0.1")
    assert c.cmd(b"AUTH LOGIN").startswith(b"334 ")
    assert c.cmd(base64.b64encode(b"alice")).startswith(b"334 ")
    assert c.cmd(base64.b64encode(b"nope")).startswith(AUTH_FAILED)
    c.cmd(b"MAIL FROM:<a@sender.test>")
    assert c.cmd(b"RCPT TO:<someone@other.test>").startswith(RELAY_DENIED)


def test_plain_and_login_need_tls_off_loopback_but_cram_md5_is_offered(users_file):
    c = harness(users_file, "192.0.2.7")
    ehlo = c.send(b"EHLO client.test\r\n")
    assert b"250-AUTH CRAM-MD5" in ehlo or b"250 AUTH CRAM-MD5" in ehlo
    assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret")).startswith(NEED_TLS)


def test_cram_md5(users_file):
    c = harness(users_file, "192.0.2.7")
    challenge = base64.b64decode(c.cmd(b"AUTH CRAM-MD5")[4:])
    digest = hmac.new(b"s3cret", challenge, hashlib.md5).hexdigest()
    assert c.cmd(base64.b64encode(b"alice " + digest.encode())).startswith(AUTH_OK)
