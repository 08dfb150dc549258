"""Shared state for checks: counters with expiry and values with expiry.

One small async interface so a later backend (Redis, for several gateways)
can replace the embedded ones without touching a check:

- ``await store.incr(key, ttl, amount=1) -> int``: add to a counter and return
  the new value.  A counter that does not exist (or has expired) starts at 0
  and lives ``ttl`` seconds from that first increment (a fixed window, as
  Redis ``INCR`` + ``EXPIRE NX`` would do).
- ``await store.get(key) -> value | None``
- ``await store.put(key, value, ttl)``: a JSON-serialisable value for ``ttl`` s.
- ``await store.delete(key)``
- ``close()``

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

``open_store(config)`` builds the one named by ``[store]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, Optional

from pydantic import Field

from gateway.config import Section


class StoreSettings(Section):
    # "memory": in-process, lost on restart; "sqlite": a file at ``path``
    backend: Literal["memory", "sqlite"] = "memory"
    path: str = "var/state.sqlite"
    # the memory backend drops the entries closest to expiry beyond this many
    max_entries: int = Field(1_000_000, gt=0)


class Store:
    """The interface (see the module docstring)."""

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
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

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


def open_store(settings: Optional[StoreSettings] = None) -> Store:
    """The store ``[store]`` names; a config object or None (defaults) is accepted too."""
    if settings is not None and not isinstance(settings, StoreSettings):
        settings = getattr(settings, "store", None)
    settings = settings or StoreSettings()
    if settings.backend == "sqlite":
        try:
            return SqliteStore(settings.path)
        except (sqlite3.Error, OSError) as e:
            from gateway.errors import ConfigError

            raise ConfigError(f"store.path = {settings.path!r}: cannot open the SQLite state file: {e}") from None
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
