"""gateway.store: both embedded backends behave the same behind one interface."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import ConfigError
from gateway.store import MemoryStore, SqliteStore, StoreSettings, open_store, store_for


class FakeClock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def store_and_clock(request, tmp_path):
    clock = FakeClock()
    if request.param == "memory":
        store = MemoryStore(clock=clock)
    else:
        store = SqliteStore(str(tmp_path / "state" / "db.sqlite"), clock=clock)
    yield store, clock
    store.close()


def run(coro):
    return asyncio.run(coro)


def test_counter_counts_within_its_window_then_restarts(store_and_clock):
    store, clock = store_and_clock
    assert [run(store.incr("rate:a", 60)) for _ in range(3)] == [1, 2, 3]
    clock.now += 59
    assert run(store.incr("rate:a", 60)) == 4  # the window is fixed from the first hit
    clock.now += 2
    assert run(store.incr("rate:a", 60)) == 1
    assert run(store.incr("rate:b", 60, amount=5)) == 5


def test_values_expire(store_and_clock):
    store, clock = store_and_clock
    run(store.put("grey:x", {"first": 1.5, "passed": False}, 300))
    assert run(store.get("grey:x")) == {"first": 1.5, "passed": False}
    clock.now += 301
    assert run(store.get("grey:x")) is None
    assert run(store.get("never")) is None


def test_put_replaces_and_delete_removes(store_and_clock):
    store, _ = store_and_clock
    run(store.put("rcpt:a@example.test", True, 60))
    run(store.put("rcpt:a@example.test", False, 60))
    assert run(store.get("rcpt:a@example.test")) is False
    run(store.delete("rcpt:a@example.test"))
    run(store.delete("rcpt:not-there"))
    assert run(store.get("rcpt:a@example.test")) is None


def test_sqlite_state_survives_reopen(tmp_path):
    path = str(tmp_path / "s.sqlite")
    s1 = SqliteStore(path)
    run(s1.put("grey:t", {"passed": True}, 3600))
    run(s1.incr("rate:c", 3600))
    s1.close()
    s2 = SqliteStore(path)
    try:
        assert run(s2.get("grey:t")) == {"passed": True}
        assert run(s2.incr("rate:c", 3600)) == 2
    finally:
        s2.close()


def test_sqlite_refuses_unserialisable_values(tmp_path):
    s = SqliteStore(str(tmp_path / "s.sqlite"))
    try:
        with pytest.raises(TypeError):
            run(s.put("k", object(), 10))
    finally:
        s.close()


def test_memory_store_is_bounded():
    clock = FakeClock()
    s = MemoryStore(max_entries=100, clock=clock)
    for i in range(500):
        run(s.put(f"k{i}", i, 1000 + i))
    assert len(s) <= 100
    assert run(s.get("k499")) == 499  # the longest-lived survive
    assert run(s.get("k0")) is None


def test_open_store_from_settings(tmp_path):
    assert isinstance(open_store(None), MemoryStore)
    sq = open_store(StoreSettings(backend="sqlite", path=str(tmp_path / "x" / "y.sqlite")))
    try:
        assert isinstance(sq, SqliteStore)
    finally:
        sq.close()


def test_open_store_names_the_bad_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="store.path"):
        open_store(StoreSettings(backend="sqlite", path=str(blocker / "db.sqlite")))


def test_store_for_prefers_services_store_and_shares_the_fallback():
    class Services:
        def __init__(self, store=None):
            self.store = store
            self.extra = {}

    given = MemoryStore()
    assert store_for(Services(given)) is given
    services = Services()
    assert store_for(services) is store_for(services)
