"""Shared state for checks: counters with expiry and values with expiry.

One small async interface, so that the backend (embedded for one node, Redis
for several gateways) can change without touching a check:

- ``await store.incr(key, ttl, amount=1) -> int``: add to a counter and return
  the new value.  A counter that does not exist (or has expired) starts at 0
  and lives ``ttl`` seconds from that first increment (a fixed window, as
  Redis ``INCR`` + ``EXPIRE NX`` would do).
- ``await store.get(key) -> value | None``
- ``await store.put(key, value, ttl)``: a JSON-serialisable value for ``ttl`` s.
- ``await store.delete(key)``
- ``close()``

An operation the backend cannot complete (Redis unreachable, slow past
``[store] timeout``, an SQLite error) raises ``StoreUnavailable``: the check
then says it could not check (``could_not_check``: a ``*_FAIL`` symbol and a
``Failed`` record, tempfail or not by ``[store] on_error``), never hangs and
never quietly uses another store.

Rate-limit counters, greylist triplets and the callout / LDAP recipient cache
are all keys in this space, each check under its own prefix
(``rate:``, ``grey:``, ``rcpt:``).

Two embedded backends:

- ``MemoryStore`` (the default): a dict in the gateway process, bounded in
  size, lost on restart.  Operations are plain dict work (microseconds), so
  they run on the reactor thread.
- ``SqliteStore``: a file, so greylisting survives a restart.  SQLite blocks
  on disk I/O, so every operation runs on one dedicated worker thread (SQLite
  connections belong to one thread), never on the reactor.

And one shared one, ``RedisStore`` (``backend = "redis"``), for everything
that must be the same on every gateway: a single Redis (``url``), a Redis
Cluster (``cluster = true``, ``url`` naming one seed node) or the master that
Sentinel names (``sentinels``, ``sentinel_service``).  It uses redis-py's
asyncio client on the loop the checks run on (the asyncio reactor's: checks
are asyncio tasks, see ``gateway.pipeline.as_deferred``).

``open_store(config)`` builds the one named by ``[store]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import BeforeValidator, Field, field_validator, model_validator

from gateway.config import Duration, HostPort, Section, parse_hostport
from gateway.records import Failed, Result

log = logging.getLogger("mailgate.store")

SENTINEL_PORT = 26379


def _sentinel(value: Any) -> HostPort:
    return parse_hostport(value, default_port=SENTINEL_PORT)


class StoreSettings(Section):
    # "memory": in-process, lost on restart; "sqlite": a file at ``path``;
    # "redis": shared by every gateway that names the same Redis
    backend: Literal["memory", "sqlite", "redis"] = "memory"
    path: str = "var/state.sqlite"
    # the memory backend drops the entries closest to expiry beyond this many
    max_entries: int = Field(1_000_000, gt=0)
    # --- redis ---
    # redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path?db=0
    url: str = "redis://127.0.0.1:6379/0"
    # a Redis Cluster: ``url`` names one node (the others are learned from it)
    cluster: bool = False
    # Sentinel: ask these for the master of ``sentinel_service`` (``url`` then
    # only gives the db, user, password and TLS, not the address)
    sentinels: list[Annotated[HostPort, BeforeValidator(_sentinel)]] = Field(default_factory=list)
    sentinel_service: str = Field("mymaster", min_length=1)
    # every key this gateway writes starts with this (several uses can share one Redis)
    key_prefix: str = "mailgate:"
    # each operation, connecting included, gives up after this long
    timeout: Duration = Field(0.5, gt=0)
    # when the store cannot answer: "open" (the check adds its *_FAIL symbol
    # and lets the mail through) or "tempfail" (451 4.3.0 until it is back)
    on_error: Literal["open", "tempfail"] = "open"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from redis.connection import parse_url

        try:
            parse_url(value)
        except ValueError as e:
            raise ValueError(f"not a Redis URL ({e})") from None
        return value

    @model_validator(mode="after")
    def _topology(self):
        if self.cluster and self.sentinels:
            raise ValueError("cluster = true and sentinels are two ways to find Redis: choose one")
        if self.cluster and not self.url.lower().startswith(("redis://", "rediss://")):
            raise ValueError("cluster = true needs a redis:// or rediss:// url naming one node")
        return self


class StoreUnavailable(Exception):
    """The store could not answer (unreachable, past its deadline, an error of
    its own).  Not the caller's fault and not an answer: a check that gets it
    could not check."""


def could_not_check(check: str, symbol: str, error: Exception, store: Any) -> list:
    """What a check reports when its store is unavailable: ``symbol`` (its
    ``*_FAIL``, score 0, so headers and the log show it) and a ``Failed``
    record that tempfails the mail only when ``[store] on_error = "tempfail"``."""
    severity = "tempfail" if getattr(store, "on_error", "open") == "tempfail" else "none"
    # the Failed reason may reach the client in a 451 reply: it names no
    # address; what went wrong is in the store's own log line and the detail
    return [Result(symbol, 0.0, str(error)), Failed(check, "state store unavailable", severity=severity)]


class Store:
    """The interface (see the module docstring)."""

    # what checks do when this store raises StoreUnavailable ([store] on_error)
    on_error: str = "open"

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:  # pragma: no cover
        raise NotImplementedError

    async def get(self, key: str) -> Any:  # pragma: no cover
        raise NotImplementedError

    async def put(self, key: str, value: Any, ttl: float) -> None:  # pragma: no cover
        raise NotImplementedError

    async def delete(self, key: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class MemoryStore(Store):
    PURGE_EVERY = 10_000  # writes between sweeps of expired entries

    def __init__(self, max_entries: int = 1_000_000, clock: Callable[[], float] = time.monotonic):
        self._data: dict[str, tuple[float, Any]] = {}
        self._clock = clock
        self.max_entries = max_entries
        self._writes = 0

    def _live(self, key: str, now: float):
        hit = self._data.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del self._data[key]
            return None
        return hit

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % self.PURGE_EVERY == 0 or len(self._data) > self.max_entries:
            self._purge(now)

    def _purge(self, now: float) -> None:
        for k in [k for k, (exp, _) in self._data.items() if exp <= now]:
            del self._data[k]
        excess = len(self._data) - self.max_entries
        if excess > 0:
            # under a flood of new keys, forget what would expire soonest
            for k, _ in sorted(self._data.items(), key=lambda kv: kv[1][0])[:excess]:
                del self._data[k]

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        now = self._clock()
        hit = self._live(key, now)
        if hit is None:
            value, expires = amount, now + ttl
        else:
            value, expires = int(hit[1]) + amount, hit[0]
        self._data[key] = (expires, value)
        self._wrote(now)
        return value

    async def get(self, key: str) -> Any:
        hit = self._live(key, self._clock())
        return None if hit is None else hit[1]

    async def put(self, key: str, value: Any, ttl: float) -> None:
        # what the other backends could not store is refused here too, so a check
        # that works on one node works on Redis; a copy, so a caller's later
        # change to its dict does not change what is stored (as on Redis)
        value = json.loads(json.dumps(value))
        now = self._clock()
        self._data[key] = (now + ttl, value)
        self._wrote(now)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


class SqliteStore(Store):
    PURGE_EVERY = 1000

    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        # wall-clock time: expiries must mean the same after a restart
        self.path = path
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailgate-store")
        self._writes = 0
        self._db: Optional[sqlite3.Connection] = None
        try:
            self._executor.submit(self._open).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL)")
        db.execute("CREATE INDEX IF NOT EXISTS state_expires ON state (expires)")
        self._db = db

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as e:  # a locked, full or broken file: could not check
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    def _maybe_purge(self, now: float) -> None:
        self._writes += 1
        if self._writes % self.PURGE_EVERY == 0:
            self._db.execute("DELETE FROM state WHERE expires <= ?", (now,))

    def _incr(self, key: str, ttl: float, amount: int) -> int:
        now = self._clock()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value, expires FROM state WHERE key = ?", (key,)).fetchone()
            if row is None or row[1] <= now:
                value, expires = amount, now + ttl
            else:
                value, expires = int(json.loads(row[0])) + amount, row[1]
            db.execute("INSERT OR REPLACE INTO state (key, value, expires) VALUES (?, ?, ?)",
                       (key, json.dumps(value), expires))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._maybe_purge(now)
        return value

    def _get(self, key: str) -> Any:
        row = self._db.execute("SELECT value, expires FROM state WHERE key = ?", (key,)).fetchone()
        if row is None or row[1] <= self._clock():
            return None
        return json.loads(row[0])

    def _put(self, key: str, value: Any, ttl: float) -> None:
        now = self._clock()
        self._db.execute("INSERT OR REPLACE INTO state (key, value, expires) VALUES (?, ?, ?)",
                         (key, json.dumps(value), now + ttl))
        self._maybe_purge(now)

    def _delete(self, key: str) -> None:
        self._db.execute("DELETE FROM state WHERE key = ?", (key,))

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        return await self._run(self._incr, key, ttl, amount)

    async def get(self, key: str) -> Any:
        return await self._run(self._get, key)

    async def put(self, key: str, value: Any, ttl: float) -> None:
        json.dumps(value)  # refuse what cannot be stored here, in the caller's frame
        await self._run(self._put, key, value, ttl)

    async def delete(self, key: str) -> None:
        await self._run(self._delete, key)

    def close(self) -> None:
        def _close():
            if self._db is not None:
                self._db.close()
                self._db = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)


def _ms(ttl: float) -> int:
    # Redis expiries are whole milliseconds; a positive ttl never rounds to "no expiry"
    return max(1, int(round(ttl * 1000)))


# incr as one script: Redis runs a script as one command, so the count and the
# window's start are atomic (no other client's command in between, the window
# starts with the first hit and is never extended), in one round trip.  Not
# MULTI/EXEC with INCRBY + EXPIRE NX: that is as atomic, but redis-py's
# cluster transactions measured 5 to 20 times slower than this script on a
# Redis Cluster (tools/bench_store.py), and EXPIRE NX needs Redis 7.  One key
# is one slot, so it holds on a cluster too.  PTTL < 0 also gives a window to
# a key that somehow has none, instead of counting it forever.
INCR_SCRIPT = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""


class RedisStore(Store):
    """The shared backend on redis-py's asyncio client.

    ``client`` is a ``redis.asyncio.Redis`` (single Redis or a Sentinel
    master) or ``redis.asyncio.cluster.RedisCluster``; ``from_settings``
    builds the one ``[store]`` names.  Every key gets ``key_prefix``; values
    are JSON.  Every operation runs under one deadline (``timeout``): past it,
    or on any Redis or socket error, it raises ``StoreUnavailable``.  The
    client reconnects by itself on the next operation, so state catches up
    as soon as Redis is back; nothing falls back to a local store.

    The client's connections belong to the event loop they were made on: the
    store binds to the loop of its first operation (the asyncio reactor's, in
    the gateway) and refuses to be used from another one rather than fail
    obscurely inside redis-py.
    """

    def __init__(self, client, key_prefix: str = "mailgate:", timeout: float = 0.5, on_error: str = "open",
                 describe: str = "redis"):
        self._client = client
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.on_error = on_error
        self.describe = describe  # for log lines: where the state lives
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._failures = 0  # operations failed since the store was last reachable
        self._last_report = 0.0
        self._closing: Optional[asyncio.Task] = None
        # redis-py sends it as EVALSHA and loads it again by itself when the
        # server has lost it (a restart, a failover to a replica)
        self._incr = client.register_script(INCR_SCRIPT)

    REPORT_EVERY = 60.0  # seconds between "still unavailable" lines while it stays down

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> "RedisStore":
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        t = settings.timeout
        # one immediate retry on a fresh connection: after Redis restarts, the
        # pooled connections are dead and the first command on each fails
        # although the server is back.  The deadline bounds the retry too.
        # No socket_timeout: every operation already runs under the deadline
        # (``_do``), and redis-py's own per-read timer cost a quarter of the
        # client's CPU per operation (tools/bench_store.py); a read the
        # deadline cancels closes its connection.
        common = dict(socket_timeout=None, socket_connect_timeout=t, retry=Retry(NoBackoff(), 1))
        if settings.cluster:
            from redis.asyncio.cluster import RedisCluster

            client = RedisCluster.from_url(settings.url, **common)
            where = f"redis cluster via {_safe_url(settings.url)}"
        elif settings.sentinels:
            from redis.asyncio.sentinel import Sentinel
            from redis.connection import parse_url

            # the URL's db, user, password and TLS apply to the master; its host does not
            conn = {k: v for k, v in parse_url(settings.url).items() if k not in ("host", "port", "path")}
            # the sentinel pool picks its own connection class; rediss:// asks it for TLS
            if getattr(conn.pop("connection_class", None), "__name__", "") == "SSLConnection":
                conn["ssl"] = True
            sentinel = Sentinel([(hp.host, hp.port) for hp in settings.sentinels], **common)
            client = sentinel.master_for(settings.sentinel_service, **common, **conn)
            where = (f"redis master {settings.sentinel_service!r} of sentinels "
                     f"{','.join(str(hp) for hp in settings.sentinels)}")
        else:
            client = Redis.from_url(settings.url, **common)
            where = f"redis {_safe_url(settings.url)}"
        return cls(client, settings.key_prefix, t, settings.on_error, where)

    # --- plumbing ----------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("RedisStore used from another event loop than its first operation's: its "
                               "connections belong to that loop (run checks on the reactor's loop)")

    async def _do(self, what: str, op):
        self._bind_loop()
        try:
            async with asyncio.timeout(self.timeout):
                result = await op()
        except TimeoutError as e:  # the deadline (asyncio's is the builtin one since 3.11)
            raise self._unavailable(what, f"no answer within {self.timeout:g}s") from e
        except Exception as e:
            from redis.exceptions import RedisError

            if isinstance(e, (RedisError, OSError)):
                raise self._unavailable(what, f"{type(e).__name__}: {e}") from e
            raise
        if self._failures:
            log.info("store=%s reachable again after %d failed operation(s)", self.describe, self._failures)
            self._failures = 0
        return result

    def _unavailable(self, what: str, reason: str) -> StoreUnavailable:
        # one line when it goes away, then one a minute while it stays away: a
        # line per operation would be hundreds a second under load
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1 or now - self._last_report >= self.REPORT_EVERY:
            self._last_report = now
            log.warning("store=%s unavailable (%s): %d failed operation(s) so far; checks that use it %s",
                        self.describe, reason, self._failures,
                        "tempfail" if self.on_error == "tempfail" else "fail open")
        return StoreUnavailable(f"{self.describe}: {what}: {reason}")

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    # --- the interface ----------------------------------------------------------

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        k, ms = self._key(key), _ms(ttl)
        return await self._do("incr", lambda: self._incr(keys=[k], args=[amount, ms]))


    async def get(self, key: str) -> Any:
        raw = await self._do("get", lambda: self._client.get(self._key(key)))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:  # not ours: someone else writes under our prefix
            log.warning("store=%s key=%s%s holds a value that is not JSON: %s", self.describe, self.key_prefix, key, e)
            raise StoreUnavailable(f"{self.describe}: get {key}: the value is not JSON ({e})") from None

    async def put(self, key: str, value: Any, ttl: float) -> None:
        data = json.dumps(value)  # refuse what cannot be stored here, in the caller's frame
        await self._do("put", lambda: self._client.set(self._key(key), data, px=_ms(ttl)))

    async def delete(self, key: str) -> None:
        await self._do("delete", lambda: self._client.delete(self._key(key)))

    async def aclose(self) -> None:
        await self._client.aclose()

    def close(self) -> None:
        """Closes the connections on their loop: scheduled there when it runs
        (a reload or shutdown on the reactor), run to completion when it does not."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if loop.is_running():
            self._closing = loop.create_task(self.aclose())  # kept: a task nobody holds may be collected
        else:
            loop.run_until_complete(self.aclose())


def _safe_url(url: str) -> str:
    """The URL without its password, for log lines."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_store(settings: Optional[StoreSettings] = None) -> Store:
    """The store ``[store]`` names; a config object or None (defaults) is accepted too."""
    if settings is not None and not isinstance(settings, StoreSettings):
        settings = getattr(settings, "store", None)
    settings = settings or StoreSettings()
    store = _open(settings)
    store.on_error = settings.on_error
    return store


def _open(settings: StoreSettings) -> Store:
    if settings.backend == "sqlite":
        try:
            return SqliteStore(settings.path)
        except (sqlite3.Error, OSError) as e:
            from gateway.errors import ConfigError

            raise ConfigError(f"store.path = {settings.path!r}: cannot open the SQLite state file: {e}") from None
    if settings.backend == "redis":
        # connects on first use: a Redis that is down at start makes the checks
        # fail open (or tempfail) until it is up, it does not stop the gateway
        from redis.exceptions import RedisError

        try:
            return RedisStore.from_settings(settings)
        except (RedisError, ValueError, TypeError) as e:  # e.g. an option in the URL's query it refuses
            from gateway.errors import ConfigError

            raise ConfigError(f"store.url = {_safe_url(settings.url)!r}: {e}") from None
    return MemoryStore(settings.max_entries)


def store_for(services) -> Store:
    """The store checks share: ``services.store``, or one embedded MemoryStore kept
    in ``services.extra`` when the gateway did not provide one."""
    store = getattr(services, "store", None)
    if store is not None:
        return store
    extra = getattr(services, "extra", None)
    if extra is None:
        return MemoryStore()
    return extra.setdefault("store", MemoryStore())


def from_config(config) -> Store:
    """What the service wiring calls: the store of ``config.store`` (defaults when absent)."""
    return open_store(getattr(config, "store", None))
