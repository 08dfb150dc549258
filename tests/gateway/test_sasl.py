"""SASL mechanisms fed bytes, and the per-address failure count."""

import hmac

import pytest
from twisted.internet import defer, task

from gateway.config import validate
from gateway.sasl import (AUTHZID_REFUSED, MALFORMED, NO_INITIAL_RESPONSE, NOT_UTF8, AuthGuard, Challenge,
                          CramMD5, Login, Plain, SaslError)
from gateway.store import MemoryStore


def refused(mech, *responses):
    with pytest.raises(SaslError) as e:
        for r in responses:
            mech.step(r)
    return e.value.reply


def test_plain_with_and_without_initial_response():
    assert Plain().step(None) == Challenge(b"")
    creds = Plain().step(b"\0alice\0s3cret")
    assert (creds.username, creds.password) == (b"alice", b"s3cret")
    assert Plain().step(b"alice\0alice\0s3cret").username == b"alice"  # authzid = authcid is fine


@pytest.mark.parametrize("response", [b"", b"alice", b"\0alice", b"\0alice\0", b"\0\0pw", b"a\0b\0c\0d"])
def test_plain_malformed(response):
    assert refused(Plain(), response) is MALFORMED


def test_plain_other_authzid_and_non_utf8():
    assert refused(Plain(), b"root\0alice\0pw") is AUTHZID_REFUSED
    assert refused(Plain(), b"\0\xff\xfe\0pw") is NOT_UTF8


def test_login_steps():
    m = Login()
    assert m.step(None) == Challenge(b"Username:")
    assert m.step(b"alice") == Challenge(b"Password:")
    creds = m.step(b"s3cret")
    assert (creds.username, creds.password) == (b"alice", b"s3cret")
    assert refused(Login(), None, b"") is MALFORMED
    assert refused(Login(), None, b"\xff") is NOT_UTF8


def test_cram_md5_challenge_and_response():
    m = CramMD5("mx.example.test", clock=lambda: 1234)
    challenge = m.step(None).data
    assert challenge.startswith(b"<") and challenge.endswith(b".1234@mx.example.test>")
    creds = m.step(b"alice " + hmac.new(b"s3cret", challenge, "md5").hexdigest().encode())
    assert creds.username == b"alice" and creds.checkPassword(b"s3cret") and not creds.checkPassword(b"x")
    assert CramMD5("h").step(None).data != CramMD5("h").step(None).data


@pytest.mark.parametrize("response", [b"alice", b"alice ", b" " + b"0" * 32, b"alice " + b"z" * 32,
                                      b"alice " + b"0" * 31])
def test_cram_md5_malformed(response):
    m = CramMD5("h")
    m.step(None)
    assert refused(m, response) is MALFORMED


def test_cram_md5_takes_no_initial_response():
    assert refused(CramMD5("h"), b"alice 0123") is NO_INITIAL_RESPONSE


def test_guard_counts_failures_per_address_within_the_window():
    clock = task.Clock()
    settings = validate({"auth": {"max_client_failures": 2, "client_failure_window": "10m"}}, {}).auth
    guard = AuthGuard(MemoryStore(clock=clock.seconds), defer.ensureDeferred)

    def blocked(ip):
        got = []
        guard.blocked(ip, settings).addCallback(got.append)
        return got[0]

    guard.failed("192.0.2.1", settings)
    assert not blocked("192.0.2.1")
    guard.failed("192.0.2.1", settings)
    assert blocked("192.0.2.1") and not blocked("192.0.2.2")
    clock.advance(601)
    assert not blocked("192.0.2.1")
