"""rules.ratelimit: connections per minute and messages per hour per client."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import validate
from gateway.plugins import Services
from gateway.records import Envelope, Failed, Session, Transaction
from gateway.store import MemoryStore, SqliteStore
from rules import lists, ratelimit
from rules.ratelimit import ConnectionRate, MessageRate


class FakeClock:
    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


def build(cls, store, lists_section=None, **section):
    data = {"ratelimit": section}
    if lists_section:
        data["lists"] = lists_section
    cfg = validate(data, {**ratelimit.SECTIONS, **lists.SECTIONS})
    return cls.from_config(cfg, Services(None, store=store))


def run(check, ip="192.0.2.66", trusted=False, auth=None):
    t = Transaction(Session("Q", ip, trusted=trusted, auth_user=auth), Envelope("Q", "a@sender.test"))
    return asyncio.run(check.check(t))


def test_connections_per_minute():
    clock = FakeClock()
    c = build(ConnectionRate, MemoryStore(clock=clock), connections_per_minute=3)
    assert [run(c) for _ in range(3)] == [[], [], []]
    [r] = run(c)
    assert (r.symbol, r.refuse) == ("RATE_CONNECTIONS", "ratelimit")
    assert run(c, ip="192.0.2.67") == []  # another client has its own count
    clock.now += 61
    assert run(c) == []


def test_messages_per_hour_and_ipv6_networks():
    clock = FakeClock()
    c = build(MessageRate, MemoryStore(clock=clock), messages_per_hour=2)
    assert run(c, "2001:db8:1:2::1") == [] and run(c, "2001:db8:1:2::99") == []
    [r] = run(c, "2001:db8:1:2:ffff::5")  # same /64
    assert (r.symbol, r.refuse) == ("RATE_MESSAGES", "ratelimit")
    assert run(c, "2001:db8:1:3::1") == []
    clock.now += 3601
    assert run(c, "2001:db8:1:2::1") == []


def test_exempt_clients():
    store = MemoryStore()
    c = build(MessageRate, store, lists_section={"allow_ips": ["192.0.2.0/24"]}, messages_per_hour=1)
    for _ in range(3):
        assert run(c, trusted=True) == [] and run(c, "198.51.100.1", auth="alice") == []
        assert run(c, "192.0.2.5") == []
    assert len(store) == 0


def test_off_when_zero():
    assert build(ConnectionRate, MemoryStore()) is None
    assert build(MessageRate, MemoryStore()) is None


def test_store_down_neither_limits_nor_refuses(tmp_path):
    store = SqliteStore(str(tmp_path / "s.sqlite"))
    c = build(ConnectionRate, store, connections_per_minute=1)
    store.close()  # its worker thread is gone: every operation fails
    [r] = run(c)
    assert isinstance(r, Failed)


@pytest.mark.parametrize("section", [{"connections_per_minute": -1}, {"ipv6_prefix": 12}])
def test_bad_settings(section):
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError):
        validate({"ratelimit": section}, ratelimit.SECTIONS)
