"""rules.greylist: triplets, embargo, retry, auto-allow, exemptions, state in the store."""

from __future__ import annotations

import asyncio

from gateway.config import validate
from gateway.plugins import Services
from gateway.records import Envelope, Failed, Recipient, Session, Transaction
from gateway.store import MemoryStore, SqliteStore
from rules import greylist, lists
from rules.greylist import Greylist


class FakeClock:
    def __init__(self):
        self.now = 100000.0

    def __call__(self):
        return self.now


def build(store, clock, lists_section=None, **section):
    data = {"greylist": {"enabled": True, **section}}
    if lists_section:
        data["lists"] = lists_section
    cfg = validate(data, {**greylist.SECTIONS, **lists.SECTIONS})
    check = Greylist.from_config(cfg, Services(None, store=store))
    if check is not None:
        check.clock = clock
    return check


def run(check, ip="192.0.2.66", sender="a@sender.test", rcpt="bob@example.test", trusted=False, auth=None):
    t = Transaction(Session("Q", ip, trusted=trusted, auth_user=auth), Envelope("Q", sender),
                    rcpt=Recipient(rcpt, rcpt.rpartition("@")[2]))
    return asyncio.run(check.check(t))


def refused(records):
    return any(getattr(r, "refuse", None) == "greylist" for r in records)


def world(**section):
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    return build(store, clock, **section), clock, store


def test_first_attempt_refused_retry_after_delay_passes():
    g, clock, _ = world()
    assert refused(run(g))
    clock.now += 60
    assert refused(run(g))  # too early
    clock.now += 241
    [r] = run(g)
    assert r.symbol == "GREYLIST_PASSED" and r.refuse is None
    clock.now += 86400
    assert run(g) == []  # remembered


def test_triplet_parts_and_network():
    g, clock, _ = world()
    assert refused(run(g))
    clock.now += 301
    assert not refused(run(g, ip="192.0.2.200"))  # same /24: a pool of sending hosts
    assert refused(run(g, ip="192.0.3.1"))
    assert refused(run(g, sender="other@sender.test"))
    assert refused(run(g, rcpt="carol@example.test"))
    assert refused(run(g, sender=""))


def test_retry_window_expires():
    g, clock, _ = world(retry_window="1h")
    assert refused(run(g))
    clock.now += 3601
    assert refused(run(g))  # too late: a new first attempt


def test_auto_allow_after_n_passes():
    g, clock, _ = world(auto_allow_after=2)
    for rcpt in ("u1@example.test", "u2@example.test"):
        assert refused(run(g, rcpt=rcpt))
    clock.now += 301
    for rcpt in ("u1@example.test", "u2@example.test"):
        assert not refused(run(g, rcpt=rcpt))
    assert run(g, rcpt="new@example.test", sender="x@else.test") == []


def test_never_for_trusted_authenticated_or_allow_listed():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    g = build(store, clock, lists_section={"allow_recipients": ["abuse@example.test"]})
    assert run(g, trusted=True) == []
    assert run(g, auth="alice") == []
    assert run(g, rcpt="abuse@example.test") == []
    assert len(store) == 0


def test_off_unless_enabled():
    clock = FakeClock()
    cfg = validate({}, greylist.SECTIONS)
    assert Greylist.from_config(cfg, Services(None, store=MemoryStore(clock=clock))) is None


def test_state_survives_a_restart_with_sqlite(tmp_path):
    clock = FakeClock()
    path = str(tmp_path / "grey.sqlite")
    store = SqliteStore(path, clock=clock)
    assert refused(run(build(store, clock)))
    store.close()
    clock.now += 301
    store = SqliteStore(path, clock=clock)
    try:
        assert not refused(run(build(store, clock)))
    finally:
        store.close()


def test_store_down_lets_mail_through(tmp_path):
    clock = FakeClock()
    store = SqliteStore(str(tmp_path / "s.sqlite"), clock=clock)
    g = build(store, clock)
    store.close()
    [r] = run(g)
    assert isinstance(r, Failed)


def test_e2e_greylisted_then_accepted_on_retry(mailgate, sink):
    import smtplib
    import time

    import pytest

    gw = mailgate('[greylist]\nenabled = true\ndelay = "1s"\n')
    message = b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: later\r\n\r\nhi\r\n"
    with gw.smtp() as c, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        c.sendmail("alice@sender.test", ["bob@example.test"], message)
    code, text = refused.value.recipients["bob@example.test"]
    assert code == 451 and text.startswith(b"4.7.1")
    time.sleep(1.2)
    with gw.smtp() as c:
        assert c.sendmail("alice@sender.test", ["bob@example.test"], message) == {}
    assert sink.wait_for(1)
