"""SMTP AUTH: the users file, the checker, and AUTH through the protocol."""

import base64
import hashlib
import hmac

import pytest
from twisted.cred import credentials, error
from twisted.internet import defer

from gateway.auth import UsersFileChecker, hash_password, make_portal, read_users
from gateway.errors import ConfigError
from tests.gateway.test_smtp import OK_RCPT, Harness, RELAY_DENIED

AUTH_OK = b"235 2.7.0"
AUTH_FAILED = b"535 5.7.8"


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


def inline(fn, *args, **kw):
    """run_in_thread for tests that need no thread: the answer at once."""
    return defer.maybeDeferred(fn, *args, **kw)


class HeldThreads:
    """run_in_thread whose work waits until ``run_all``: shows what did not run inline."""

    def __init__(self):
        self.pending = []

    def __call__(self, fn, *args, **kw):
        d = defer.Deferred()
        self.pending.append((fn, args, kw, d))
        return d

    def run_all(self):
        pending, self.pending = self.pending, []
        for fn, args, kw, d in pending:
            d.callback(fn(*args, **kw))


def outcome(d):
    """'refused' or the avatar id of a fired Deferred."""
    got = []
    d.addCallbacks(got.append, lambda f: got.append("refused" if f.check(error.UnauthorizedLogin) else f))
    assert got, "not answered"
    return got[0]


def test_checker_plain_and_pbkdf2(users_file):
    c = UsersFileChecker(inline, read_users(users_file))
    assert outcome(c.requestAvatarId(credentials.UsernamePassword(b"alice", b"s3cret"))) == "alice"
    assert outcome(c.requestAvatarId(credentials.UsernamePassword(b"bob", b"hunter2"))) == "bob"
    for user, pw in ((b"bob", b"wrong"), (b"nobody", b"x"), (b"\xff\xfe", b"x")):
        assert outcome(c.requestAvatarId(credentials.UsernamePassword(user, pw))) == "refused"


@pytest.mark.parametrize("user,password", [(b"bob", b"hunter2"), (b"alice", b"s3cret"), (b"bob", b"wrong")])
def test_passwords_are_verified_off_the_calling_thread(users_file, user, password):
    threads = HeldThreads()
    c = UsersFileChecker(threads, read_users(users_file))
    d = c.requestAvatarId(credentials.UsernamePassword(user, password))
    assert not d.called and len(threads.pending) == 1  # nothing verified inline
    threads.run_all()
    assert outcome(d) == ("refused" if password == b"wrong" else user.decode())


def test_replace_revokes_and_adds_users(users_file):
    c = UsersFileChecker(inline, read_users(users_file))
    c.replace({"carol": "{PLAIN}new"})
    assert outcome(c.requestAvatarId(credentials.UsernamePassword(b"alice", b"s3cret"))) == "refused"
    assert outcome(c.requestAvatarId(credentials.UsernamePassword(b"carol", b"new"))) == "carol"


def test_users_file_not_utf8_is_a_config_error(tmp_path):
    p = tmp_path / "users"
    p.write_bytes(b"al\xffce:{PLAIN}x\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_users(str(p))


def harness(users_file, peer="127.0.0.1", run_in_thread=inline):
    """The protocol with our checker behind its portal (the exchanges themselves
    are tested in test_smtp.py); no delay after a failure, to keep these short."""
    h = Harness(peer=peer, auth={"failure_delay": 0})
    h.factory.portal = make_portal(UsersFileChecker(run_in_thread, read_users(users_file)))
    c = h.connect()
    c.cmd(b"EHLO client.test")
    return h, c


def test_auth_reply_waits_for_the_thread(users_file):
    threads = HeldThreads()
    h, c = harness(users_file, run_in_thread=threads)
    assert c.send(b"AUTH PLAIN " + base64.b64encode(b"\0bob\0hunter2") + b"\r\n") == []
    threads.run_all()
    assert c.replies()[-1].startswith(AUTH_OK)


def test_auth_plain_on_loopback_then_relay(users_file):
    h, c = harness(users_file)
    assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret")).startswith(AUTH_OK)
    assert c.cmd(b"MAIL FROM:<alice@example.test>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<someone@other.test>").startswith(OK_RCPT)


def test_auth_login_wrong_password(users_file):
    h, c = harness(users_file)
    assert c.cmd(b"AUTH LOGIN").startswith(b"334 ")
    assert c.cmd(base64.b64encode(b"alice")).startswith(b"334 ")
    c.cmd(base64.b64encode(b"nope"))
    h.clock.advance(0)
    assert c.replies()[-1].startswith(AUTH_FAILED)
    c.cmd(b"MAIL FROM:<a@sender.test>")
    assert c.cmd(b"RCPT TO:<someone@other.test>").startswith(RELAY_DENIED)


@pytest.mark.parametrize("user,secret,expected", [("alice", b"s3cret", AUTH_OK), ("bob", b"hunter2", AUTH_FAILED)])
def test_cram_md5_needs_a_plain_secret(users_file, user, secret, expected):
    h, c = harness(users_file)
    challenge = base64.b64decode(c.cmd(b"AUTH CRAM-MD5")[4:])
    digest = hmac.new(secret, challenge, hashlib.md5).hexdigest()
    c.cmd(base64.b64encode(f"{user} {digest}".encode()))
    h.clock.advance(0)
    assert c.replies()[-1].startswith(expected)


def test_an_unknown_user_is_checked_as_slowly_as_a_known_one(users_file):
    threads = HeldThreads()
    c = UsersFileChecker(threads, read_users(users_file))
    d = c.requestAvatarId(credentials.UsernamePassword(b"nobody", b"guess"))
    assert not d.called and len(threads.pending) == 1
    fn, args, _, _ = threads.pending[0]
    assert args[0].startswith("{PBKDF2-SHA256}600000$")  # the decoy costs what a default hash costs
    threads.run_all()
    assert outcome(d) == "refused"
