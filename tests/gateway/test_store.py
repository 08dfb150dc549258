"""gateway.store: every backend behaves the same behind one interface (memory,
SQLite, a real Redis, a real three-master Redis Cluster, Redis through a real
Sentinel); Redis gone, slow or back; the checks that use the store when it
cannot answer; and two real gateways sharing one Redis."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.config import validate
from gateway.errors import ConfigError
from gateway.plugins import Services
from gateway.records import Envelope, Recipient, Result, Session, Transaction
from gateway.store import (MemoryStore, RedisStore, SqliteStore, StoreSettings, StoreUnavailable, open_store,
                           store_for)
from rules.scoring import Scorer
from tests.support.ports import free_port
from tests.support.redis import RedisClusterNodes, RedisSentinel, RedisServer


class FakeClock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


# One event loop per test, as the gateway has one (the asyncio reactor's):
# a Redis client's connections belong to the loop that made them.
_loop: asyncio.AbstractEventLoop = None


@pytest.fixture(autouse=True)
def _a_loop_per_test():
    global _loop
    _loop = asyncio.new_event_loop()
    yield
    _loop.close()


def run(coro):
    return _loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A server of the test's own, for tests that stop or pause it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


def redis_store(url: str, **settings) -> RedisStore:
    # a prefix per store: tests sharing one server never see each other's keys
    settings.setdefault("key_prefix", f"t{uuid.uuid4().hex[:8]}:")
    store = open_store(StoreSettings(backend="redis", url=url, **settings))
    assert isinstance(store, RedisStore)
    return store


class Backend:
    """A store and a way to let time pass: the embedded stores' fake clock
    moves; Redis keeps its own time, so the test waits."""

    def __init__(self, store, clock=None):
        self.store, self.clock = store, clock

    def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            time.sleep(seconds)


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
def backend(request, tmp_path):
    clock = FakeClock()
    if request.param == "memory":
        b = Backend(MemoryStore(clock=clock), clock)
    elif request.param == "sqlite":
        b = Backend(SqliteStore(str(tmp_path / "state" / "db.sqlite"), clock=clock), clock)
    elif request.param == "redis":
        b = Backend(redis_store(request.getfixturevalue("redis_server").url))
    else:
        b = Backend(redis_store(request.getfixturevalue("redis_cluster").url, cluster=True))
    yield b
    b.store.close()


# Windows short enough for a real Redis to expire them while the test waits,
# long enough that a busy machine does not expire them early.
TTL = 0.5


# --- the interface, on every backend -----------------------------------------------


def test_counter_counts_within_its_window_then_restarts(backend):
    store = backend.store
    assert [run(store.incr("rate:a", TTL)) for _ in range(3)] == [1, 2, 3]
    backend.advance(TTL / 2)
    assert run(store.incr("rate:a", TTL)) == 4  # the window is fixed from the first hit
    backend.advance(TTL / 2 + 0.15)
    assert run(store.incr("rate:a", TTL)) == 1
    assert run(store.incr("rate:b", TTL, amount=5)) == 5
    assert run(store.get("rate:b")) == 5  # a counter reads back as a number


def test_values_expire(backend):
    store = backend.store
    run(store.put("grey:x", {"first": 1.5, "passed": False}, TTL))
    assert run(store.get("grey:x")) == {"first": 1.5, "passed": False}
    backend.advance(TTL + 0.1)
    assert run(store.get("grey:x")) is None
    assert run(store.get("never")) is None


def test_put_replaces_and_delete_removes(backend):
    store = backend.store
    run(store.put("rcpt:a@example.test", True, 60))
    run(store.put("rcpt:a@example.test", False, 60))
    assert run(store.get("rcpt:a@example.test")) is False
    run(store.delete("rcpt:a@example.test"))
    run(store.delete("rcpt:not-there"))
    assert run(store.get("rcpt:a@example.test")) is None


def test_values_come_back_as_json_gave_them(backend):
    store = backend.store
    value = {"first": 1733333333.25, "passed": True, "tags": ["a", "ü"], "n": None, "count": 3}
    run(store.put("v", value, 60))
    value["passed"] = False  # the caller's later change is not the stored value
    assert run(store.get("v")) == {"first": 1733333333.25, "passed": True, "tags": ["a", "ü"], "n": None,
                                   "count": 3}


def test_unserialisable_values_are_refused_by_every_backend(backend):
    with pytest.raises(TypeError):
        run(backend.store.put("k", object(), 10))
    assert run(backend.store.get("k")) is None


def test_concurrent_increments_each_get_their_own_count(backend):
    async def many():
        return await asyncio.gather(*(backend.store.incr("rate:c", 60) for _ in range(40)))

    assert sorted(run(many())) == list(range(1, 41))


# --- embedded backends ----------------------------------------------------------


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


def test_sqlite_error_is_store_unavailable(tmp_path):
    path = str(tmp_path / "s.sqlite")
    s = SqliteStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        # the store waits for no lock, so a locked file fails at once
        s._executor.submit(lambda: s._db.execute("PRAGMA busy_timeout = 0")).result()
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable, match="locked"):
            run(s.incr("rate:x", 60))
        holder.execute("ROLLBACK")
        assert run(s.incr("rate:x", 60)) == 1
    finally:
        holder.close()
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
    sq = open_store(StoreSettings(backend="sqlite", path=str(tmp_path / "x" / "y.sqlite"), on_error="tempfail"))
    try:
        assert isinstance(sq, SqliteStore) and sq.on_error == "tempfail"
    finally:
        sq.close()
    r = open_store(StoreSettings(backend="redis", url="redis://127.0.0.1:1/0", timeout="2s", key_prefix="x:"))
    assert isinstance(r, RedisStore) and (r.timeout, r.key_prefix, r.on_error) == (2.0, "x:", "open")


def test_open_store_names_the_bad_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="store.path"):
        open_store(StoreSettings(backend="sqlite", path=str(blocker / "db.sqlite")))


@pytest.mark.parametrize("section, message", [
    ({"backend": "redis", "url": "http://127.0.0.1:6379"}, "store.url"),
    ({"backend": "redis", "cluster": True, "sentinels": ["127.0.0.1:26379"]}, "choose one"),
    ({"backend": "redis", "cluster": True, "url": "unix:///run/redis.sock"}, "cluster = true needs"),
    ({"backend": "redis", "sentinels": ["127.0.0.1:0"]}, "store.sentinels"),
    ({"backend": "redis", "timeout": 0}, "store.timeout"),
    ({"backend": "redis", "on_error": "accept"}, "store.on_error"),
    ({"backend": "redis", "url": "redis://127.0.0.1:6379/0?socket_timeout=soon"}, "store.url"),
])
def test_bad_redis_settings_are_refused_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        open_store(validate({"store": section}, {}).store)


def test_sentinels_default_to_port_26379():
    s = StoreSettings(backend="redis", sentinels=["127.0.0.1", "[::1]:5000"])
    assert [str(hp) for hp in s.sentinels] == ["127.0.0.1:26379", "[::1]:5000"]


def test_store_for_prefers_services_store_and_shares_the_fallback():
    class Services:
        def __init__(self, store=None):
            self.store = store
            self.extra = {}

    given = MemoryStore()
    assert store_for(Services(given)) is given
    services = Services()
    assert store_for(services) is store_for(services)


# --- Redis: what only it does ------------------------------------------------------


def test_keys_carry_the_prefix_and_values_are_json(redis_server):
    store = redis_store(redis_server.url, key_prefix="mg-test:")
    other = redis_store(redis_server.url, key_prefix="elsewhere:")
    try:
        run(store.put("grey:k", {"passed": True}, 60))
        run(store.incr("rate:k", 60))
        assert redis_server.cmd("GET", "mg-test:grey:k") == '{"passed": true}'
        assert redis_server.cmd("GET", "mg-test:rate:k") == "1"
        assert run(other.get("grey:k")) is None
    finally:
        store.close()
        other.close()


def test_incr_starts_the_window_once_and_never_extends_it(redis_server):
    store = redis_store(redis_server.url)
    try:
        run(store.incr("rate:w", 10))
        first = int(redis_server.cmd("PTTL", f"{store.key_prefix}rate:w")[1:])
        assert 0 < first <= 10_000
        time.sleep(0.05)
        run(store.incr("rate:w", 10))
        assert int(redis_server.cmd("PTTL", f"{store.key_prefix}rate:w")[1:]) < first
    finally:
        store.close()


def test_two_gateways_count_one_counter(redis_server):
    prefix = f"shared{uuid.uuid4().hex[:6]}:"
    a, b = redis_store(redis_server.url, key_prefix=prefix), redis_store(redis_server.url, key_prefix=prefix)

    async def both():
        return await asyncio.gather(*(s.incr("rate:msg:192.0.2.1", 3600) for _ in range(25) for s in (a, b)))

    try:
        assert sorted(run(both())) == list(range(1, 51))
    finally:
        a.close()
        b.close()


def test_a_cluster_spreads_the_keys_over_every_master(redis_cluster):
    store = redis_store(redis_cluster.url, cluster=True, key_prefix="spread:")
    try:
        for i in range(30):
            run(store.put(f"grey:{i}", i, 60))
            assert run(store.incr(f"rate:{i}", 60)) == 1
        assert [run(store.get(f"grey:{i}")) for i in range(30)] == list(range(30))
        held = [int(node.cmd("DBSIZE")[1:]) for node in redis_cluster.nodes]
        assert all(n > 0 for n in held) and sum(held) >= 60
    finally:
        store.close()


def test_a_cluster_master_down_then_back(redis_cluster):
    store = redis_store(redis_cluster.url, cluster=True, key_prefix="down:", timeout=0.3)
    victim = redis_cluster.nodes[1]
    # a key whose slot the victim serves
    key = next(f"grey:{i}" for i in range(1000) if _served_by(redis_cluster, f"down:grey:{i}") is victim)
    try:
        run(store.put(key, 1, 60))
        victim.stop()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            run(store.get(key))
        assert time.monotonic() - t0 < 3.0
        victim.start()  # the same nodes.conf: it comes back as the same node with its slots
        deadline = time.monotonic() + 20
        while True:  # the client finds the node again by itself, no new store
            try:
                run(store.put(key, 2, 60))
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the cluster client never recovered"
                time.sleep(0.1)
        assert run(store.get(key)) == 2
        while not all("cluster_state:ok" in n.cmd("CLUSTER", "INFO") for n in redis_cluster.nodes):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        store.close()


def _served_by(cluster, key):
    slot = int(cluster.nodes[0].cmd("CLUSTER", "KEYSLOT", key)[1:])
    for node in cluster.nodes:
        myself = next(line for line in node.cmd("CLUSTER", "NODES").splitlines() if "myself" in line)
        for part in myself.split()[8:]:
            lo, _, hi = part.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                return node
    return None


def test_sentinel_leads_to_the_master(tmp_path, redis_server):
    sentinel = RedisSentinel(tmp_path / "sentinel", redis_server).start()
    try:
        store = redis_store("redis://ignored.invalid:1/0", sentinels=[sentinel.address], key_prefix="via-sentinel:")
        run(store.put("grey:s", {"passed": False}, 60))
        assert run(store.incr("rate:s", 60)) == 1
        assert redis_server.cmd("GET", "via-sentinel:grey:s") == '{"passed": false}'
        store.close()
        # a sentinel that is not there: could not check, within the deadline
        gone = redis_store("redis://127.0.0.1:1/0", sentinels=[f"127.0.0.1:{free_port()}"], timeout=0.3)
        with pytest.raises(StoreUnavailable):
            run(gone.get("grey:s"))
    finally:
        sentinel.stop()


def test_nothing_listening_is_store_unavailable_within_the_deadline():
    store = redis_store(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    for op in (store.incr("rate:x", 60), store.get("grey:x"), store.put("grey:x", 1, 60), store.delete("grey:x")):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="redis redis://127.0.0.1:"):
            run(op)
        assert time.monotonic() - t0 < 3.0  # a refused connection, or the deadline: never a hang
    store.close()


def test_a_hung_redis_costs_the_deadline_and_it_recovers(own_redis, caplog):
    store = redis_store(own_redis.url, timeout=0.3)
    try:
        assert run(store.incr("rate:h", 60)) == 1
        own_redis.pause()  # connections stay open, nothing answers
        with caplog.at_level(logging.WARNING, logger="mailgate.store"):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no answer within 0.3s"):
                run(store.incr("rate:h", 60))
            assert time.monotonic() - t0 < 3.0
            with pytest.raises(StoreUnavailable):
                run(store.get("rate:h"))
        assert caplog.text.count("unavailable") == 1  # one line when it goes, not one per operation
        own_redis.resume()
        with caplog.at_level(logging.INFO, logger="mailgate.store"):
            # the increment that ran out of time had reached Redis and counted once
            # it woke: a limit may over-count what timed out, it never under-counts
            assert run(store.incr("rate:h", 60)) == 3
        assert "reachable again after 2 failed operation(s)" in caplog.text
    finally:
        store.close()


def test_redis_stopped_then_restarted_the_same_store_works_again(own_redis):
    store = redis_store(own_redis.url, timeout=0.3)
    try:
        run(store.put("grey:r", {"first": 1.0}, 60))
        assert run(store.incr("rate:r", 60)) == 1
        own_redis.stop()
        for op in (store.get("grey:r"), store.incr("rate:r", 60), store.put("grey:r", 2, 60)):
            with pytest.raises(StoreUnavailable):
                run(op)
        own_redis.start()  # same port, nothing kept (no persistence)
        assert run(store.get("grey:r")) is None
        assert run(store.incr("rate:r", 60)) == 1  # the restarted server had lost the script: loaded again
        run(store.put("grey:r", {"first": 2.0}, 60))
        assert run(store.get("grey:r")) == {"first": 2.0}
    finally:
        store.close()


def test_a_store_is_bound_to_one_event_loop(redis_server):
    store = redis_store(redis_server.url)
    try:
        run(store.incr("rate:l", 60))
        other = asyncio.new_event_loop()
        try:
            with pytest.raises(RuntimeError, match="another event loop"):
                other.run_until_complete(store.incr("rate:l", 60))
        finally:
            other.close()
    finally:
        store.close()


def test_a_value_that_is_not_json_is_store_unavailable(redis_server):
    store = redis_store(redis_server.url, key_prefix="raw:")
    try:
        redis_server.cmd("SET", "raw:grey:bad", "not-json")
        with pytest.raises(StoreUnavailable, match="not JSON"):
            run(store.get("grey:bad"))
    finally:
        store.close()


# --- the checks that use the store, when it cannot answer -----------------------


def txn(ip="192.0.2.66", sender="a@sender.test", rcpt="bob@example.test"):
    return Transaction(Session("Q", ip), Envelope("Q", sender), rcpt=Recipient(rcpt, rcpt.rpartition("@")[2]))


def greylist_check(store, **section):
    from rules import greylist, lists

    cfg = validate({"greylist": {"enabled": True, **section}}, {**greylist.SECTIONS, **lists.SECTIONS})
    return greylist.Greylist.from_config(cfg, Services(None, store=store))


def symbols(records):
    return [r.symbol if isinstance(r, Result) else f"failed:{r.severity}" for r in records]


@pytest.mark.parametrize("on_error, reply", [("open", None), ("tempfail", "451 4.3.0")])
def test_greylist_with_redis_gone_reports_GREYLIST_FAIL_and_then_catches_up(own_redis, on_error, reply):
    store = redis_store(own_redis.url, timeout=0.3, on_error=on_error)
    g = greylist_check(store, delay="1s")
    try:
        assert symbols(run(g.check(txn()))) == ["GREYLIST"]  # first attempt, state in Redis
        own_redis.stop()
        t0 = time.monotonic()
        records = run(g.check(txn(sender="new@sender.test")))
        assert time.monotonic() - t0 < 3.0
        assert symbols(records) == ["GREYLIST_FAIL", f"failed:{'tempfail' if on_error == 'tempfail' else 'none'}"]
        assert (records[1].check, records[1].reason) == ("greylist", "state store unavailable")
        assert "ConnectionError" in records[0].detail  # the cause, for the log and the monitor
        decided = Scorer().decide_stage(records)
        assert (str(decided)[:9] if decided else None) == reply  # through, or 451 4.3.0 when configured
        own_redis.start()
        assert symbols(run(g.check(txn(sender="new@sender.test")))) == ["GREYLIST"]  # greylisting again
    finally:
        store.close()


def test_rate_limits_with_redis_gone_fail_open(own_redis):
    from rules import lists, ratelimit

    store = redis_store(own_redis.url, timeout=0.3)
    cfg = validate({"ratelimit": {"messages_per_hour": 1}}, {**ratelimit.SECTIONS, **lists.SECTIONS})
    check = ratelimit.MessageRate.from_config(cfg, Services(None, store=store))
    try:
        assert run(check.check(txn())) == []
        assert symbols(run(check.check(txn()))) == ["RATE_MESSAGES"]
        own_redis.stop()
        assert symbols(run(check.check(txn()))) == ["RATE_MESSAGES_FAIL", "failed:none"]
    finally:
        store.close()


def test_callout_cache_with_redis_gone_asks_the_server_itself(own_redis):
    from rules import recipients
    from tests.support.sink import Sink

    downstream = Sink(known_users={"alice@example.test"}).start()
    store = redis_store(own_redis.url, timeout=0.3)
    cfg = validate({"relay": {"domains": ["example.test"]}, "server": {"hostname": "gw.example.test"},
                    "recipients": {"verify": "callout", "callout": {"timeout": 2.0}},
                    "routes": {"example.test": f"smtp:[127.0.0.1]:{downstream.port}", "*": "mx"}},
                   recipients.SECTIONS)
    check = recipients.RecipientVerify.from_config(cfg, Services(None, store=store))
    try:
        assert run(check.check(txn(rcpt="alice@example.test"))) == []
        probes = len(downstream.helos)
        assert run(check.check(txn(rcpt="alice@example.test"))) == []
        assert len(downstream.helos) == probes  # cached in Redis
        own_redis.stop()
        assert symbols(run(check.check(txn(rcpt="alice@example.test")))) == ["RCPT_CACHE_FAIL", "failed:none"]
        records = run(check.check(txn(rcpt="mallory@example.test")))
        assert symbols(records) == ["RCPT_UNKNOWN", "RCPT_CACHE_FAIL", "failed:none"]
        assert len(downstream.helos) == probes + 2  # verified all the same
    finally:
        store.close()
        downstream.stop()


def test_auth_guard_with_redis_gone_blocks_nobody(own_redis, caplog):
    from twisted.internet import defer

    from gateway.config import AuthSettings
    from gateway.sasl import AuthGuard

    store = redis_store(own_redis.url, timeout=0.3)
    settings = AuthSettings(max_client_failures=1)
    guard = AuthGuard(store, lambda coro: defer.Deferred.fromFuture(asyncio.ensure_future(coro, loop=_loop)))

    def result(d):
        out = []
        d.addBoth(out.append)
        deadline = time.monotonic() + 5
        while not out and time.monotonic() < deadline:
            run(asyncio.sleep(0.01))
        return out

    try:
        run(store.incr("authfail:192.0.2.9", 60))
        assert result(guard.blocked("192.0.2.9", settings)) == [True]
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="mailgate.smtp"):
            assert result(guard.blocked("192.0.2.9", settings)) == [False]
        assert "AUTH_GUARD_FAIL" in caplog.text
    finally:
        store.close()


# --- two real gateways, one Redis -------------------------------------------------


MESSAGE = b"From: x@sender.test\r\nTo: bob@example.test\r\nSubject: shared state\r\n\r\nhello\r\n"


def test_two_gateways_share_greylist_and_rate_limit_through_redis(mailgate, sink, own_redis):
    toml = ('[greylist]\nenabled = true\ndelay = "1s"\n[ratelimit]\nmessages_per_hour = 3\n'
            f'[store]\nbackend = "redis"\nurl = "{own_redis.url}"\nkey_prefix = "e2e:"\ntimeout = "0.3s"\n')
    a = mailgate(toml, name="a", start=False)
    b = mailgate(toml, dns=mailgate.servers[0].nameserver, name="b", start=False)
    with ThreadPoolExecutor(2) as pool:  # both start at once: most of a start is the child's own work
        list(pool.map(lambda gw: gw.start(), (a, b)))

    with a.smtp() as c:  # node A: first attempt greylisted (message 1 of 3 this hour)
        c.ehlo("client.sender.test")
        assert c.mail("x@sender.test")[0] == 250
        code, text = c.rcpt("bob@example.test")
        assert (code, text[:5]) == (451, b"4.7.1"), text
    assert own_redis.cmd("EXISTS", "e2e:grey:127.0.0.0/24|x@sender.test|bob@example.test") == ":1"
    time.sleep(1.2)  # the embargo
    with b.smtp() as c:  # node B knows A's triplet: the retry passes there (2 of 3)
        c.ehlo("client.sender.test")
        assert c.sendmail("x@sender.test", ["bob@example.test"], MESSAGE) == {}
    with a.smtp() as c:  # 3 of 3
        c.ehlo("client.sender.test")
        assert c.sendmail("x@sender.test", ["bob@example.test"], MESSAGE) == {}
    with b.smtp() as c:  # the fourth message this hour, counted on both nodes: refused on B
        c.ehlo("client.sender.test")
        code, text = c.mail("x@sender.test")
        assert code == 451 and b"Rate limit" in text, text
    assert sink.wait_for(2)

    # Redis gone mid-traffic: mail keeps flowing through A, saying what it could not check
    own_redis.stop()
    with a.smtp() as c:
        c.ehlo("client.sender.test")
        assert c.sendmail("y@sender.test", ["bob@example.test"], MESSAGE) == {}
    assert sink.wait_for(3)
    status = sink.messages[-1].data.split(b"X-Spam-Status:", 1)[1].split(b"\r\n\r\n")[0]
    assert b"GREYLIST_FAIL" in status and b"RATE_MESSAGES_FAIL" in status, status
    assert "unavailable" in a.log()

    # back: state is kept in Redis again (a new triplet is greylisted on A and known on B)
    own_redis.start()
    with a.smtp() as c:
        c.ehlo("client.sender.test")
        c.mail("z@sender.test")
        assert c.rcpt("bob@example.test")[0] == 451
    with b.smtp() as c:
        c.ehlo("client.sender.test")
        c.mail("z@sender.test")
        code, text = c.rcpt("bob@example.test")
        assert code == 451 and b"Greylisted" in text
    assert "reachable again" in a.log()
    assert len(sink.messages) == 3


def test_greylisting_renews_a_passed_triplet_once_an_hour_not_per_message():
    # every store write is a round trip in the session when the store is Redis
    clock = FakeClock()

    class Counting(MemoryStore):
        puts = 0

        async def put(self, key, value, ttl):
            Counting.puts += 1
            await super().put(key, value, ttl)

    store = Counting(clock=clock)
    g = greylist_check(store, delay="1s")
    g.clock = clock
    assert symbols(run(g.check(txn()))) == ["GREYLIST"]
    clock.now += 2
    assert symbols(run(g.check(txn()))) == ["GREYLIST_PASSED"]
    before = Counting.puts
    for _ in range(20):
        clock.now += 60
        assert run(g.check(txn())) == []
    assert Counting.puts == before  # 20 minutes of mail: the pass is not rewritten
    clock.now += 3600
    assert run(g.check(txn())) == []
    assert Counting.puts == before + 1
