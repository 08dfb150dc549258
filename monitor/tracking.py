"""The tracking store: every message's facts, kept for search and the console.

One small interface (``TrackingStore``) over two backends: SQLite (WAL) at
``<queue.dir>/tracking.sqlite`` by default, PostgreSQL with ``[tracking] url
= "postgresql://..."`` when several gateways share one monitor.

Why SQLAlchemy Core (with the stdlib sqlite3 driver and psycopg 3): one
library gives both backends the same tables, indexes, parameter binding and
connection pooling, and its dialects provide the one statement the two spell
differently and that we need (``INSERT ... ON CONFLICT DO UPDATE`` for the
pre-aggregated counts and the quarantine index).  With sqlite3 + psycopg
directly we would hand-write the DDL and every query twice, each with its
own placeholder style; the ORM would add nothing but cost.

Writes never touch the reactor: ``subscriber()`` returns a callable that
turns an event into a small plain record (a snapshot: sessions are mutable)
and appends it to a bounded in-memory queue.  A full queue drops the record
and counts it rather than make an SMTP session wait.  One writer thread
commits the queue every ``batch_interval`` or ``batch_size`` records, each
batch in one transaction, and prunes on a timer.  A store that cannot be
written (disk full, database down) logs and drops the batch: tracking never
fails mail.  The receiver and the delivery process each run a writer on the
same store; SQLite's WAL lets both write, each waiting up to the busy
timeout for the other.

The dashboard is cheap because it reads a small table of per-hour counts
(by action, symbol, refused client, refused sender domain) that the writer
keeps as messages are written, instead of grouping millions of messages.
The per-hour table holds every refused client of every hour (~100k distinct
ones a month on a busy gateway), so the top lists over whole days read a
per-day rollup instead (``daily_top``): for each finished UTC day the top
``top_per_day`` keys of each kind plus one "other" row (key ""), made by the
writer's timer (``rollup``).  Totals and per-hour counts by action always
come from the per-hour table: exact.  The top lists are exact for the hours
read from the per-hour table (partial days at the edges of the range, days
not rolled up yet); over rolled-up days a key's count is what it had in the
days where it was among that day's top ``top_per_day``: a lower bound, exact
when it was in every day's top (always, for a kind with no more distinct keys
a day than ``top_per_day``, e.g. the symbols).  A fact written late for a
rolled-up day (the hourly count changes) drops that day's rollup; the next
timer rolls it up again.

Text search (``search(text=...)``) is a substring search, any case, of the
Subject: on SQLite an FTS5 table with the trigram tokenizer (SQLite >= 3.34)
kept in sync by triggers on ``messages`` (so every writer, even a prune or a
process of the previous version, keeps it); on PostgreSQL a pg_trgm GIN
index.  Only the Subject: the sender and the recipients have their own exact
(indexed) searches, and indexing them too more than doubled the writer's
cost per message in tools/bench_monitor.py (each trigram is an index entry;
226 us against 107 with the Subject alone, 103 without).  Without them (an
old SQLite, a server without pg_trgm) the same search is an unindexed scan,
said once in the log.  A
trigram index cannot answer fewer than 3 characters: such a search scans
only the last ``SHORT_TEXT_WINDOW`` seconds of the range asked for.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from gateway import events as ev

log = logging.getLogger("mailgate.tracking")

HOUR = 3600
BUSY_TIMEOUT_MS = 10000  # how long a writer waits for the other process's transaction
CHUNK = 500  # rows per IN (...) list and per prune DELETE: bounded statements, short locks
REFUSED = ("reject", "tempfail")
FIRST_PRUNE = 60.0  # seconds after start: a gateway restarted often still prunes
DAY = 86400
TOP_KINDS = ("symbol", "refused_client", "refused_domain")  # the kinds the dashboard lists a top of
OTHER = ""  # daily_top's key for the sum of the keys below a day's top (no real key is empty)
ROLLUP_GRACE = 3600.0  # a day is rolled up an hour after it ends: facts arriving late are in by then
ROLLUP_INTERVAL = 600.0  # how often the writer looks for finished days to roll up
SHORT_TEXT_WINDOW = 86400.0  # a text search of < 3 characters (no trigram) scans this much of the range
MIN_TRIGRAM = 3
FTS_TRIGGERS = {  # external-content FTS5: the triggers give it the old values to delete
    "messages_fts_ai": "AFTER INSERT ON messages BEGIN INSERT INTO messages_fts(rowid, subject) "
                       "VALUES (new.id, new.subject); END",
    "messages_fts_ad": "AFTER DELETE ON messages BEGIN INSERT INTO messages_fts(messages_fts, rowid, subject) "
                       "VALUES ('delete', old.id, old.subject); END",
    "messages_fts_au": "AFTER UPDATE OF subject ON messages BEGIN "
                       "INSERT INTO messages_fts(messages_fts, rowid, subject) VALUES ('delete', old.id, old.subject); "
                       "INSERT INTO messages_fts(rowid, subject) VALUES (new.id, new.subject); END",
}


def _schema():
    """The tables and their indexes (SQLAlchemy is imported here, not when
    ``gateway.plugins.discover`` imports this module for every command)."""
    from sqlalchemy import (Boolean, Column, Double, Index, Integer, MetaData, String, Table, Text,
                            UniqueConstraint)

    md = MetaData()

    def pk():
        return Column("id", Integer, primary_key=True, autoincrement=True)

    messages = Table(
        "messages", md, pk(),
        Column("queue_id", String(64), nullable=False),
        Column("ts", Double, nullable=False),
        Column("node", String(255), nullable=False, default=""),
        Column("client", String(64), nullable=False, default=""),
        Column("helo", Text, nullable=False, default=""),
        Column("tls", Boolean, nullable=False, default=False),
        Column("auth_user", Text, nullable=True),
        Column("sender", String(512), nullable=False, default=""),
        Column("sender_domain", String(255), nullable=False, default=""),
        Column("recipients", Text, nullable=False, default="[]"),  # JSON list, for display
        Column("message_id", String(998), nullable=True),
        Column("subject", Text, nullable=True),
        Column("size", Integer, nullable=False, default=0),
        Column("score", Double, nullable=True),  # None: refused before any verdict
        Column("required", Double, nullable=True),
        Column("action", String(16), nullable=False),
        Column("stage", String(16), nullable=False, default=""),
        Column("reply", Text, nullable=False, default=""),
        Column("symbols", Text, nullable=False, default="[]"),  # JSON [{name, score, description, detail}]
        Column("label", String(8), nullable=True),  # "ham" / "spam": what admins and users said later
        UniqueConstraint("queue_id", name="uq_messages_queue_id"),
    )
    Index("ix_messages_ts", messages.c.ts)
    Index("ix_messages_sender_ts", messages.c.sender, messages.c.ts)
    Index("ix_messages_sender_domain_ts", messages.c.sender_domain, messages.c.ts)
    Index("ix_messages_client_ts", messages.c.client, messages.c.ts)
    Index("ix_messages_action_ts", messages.c.action, messages.c.ts)
    Index("ix_messages_message_id", messages.c.message_id)

    # one row per (message, recipient), carrying the message's ts so that a
    # recipient search walks (address, ts) newest first and stops at the limit
    recipients = Table(
        "recipients", md, pk(),
        Column("queue_id", String(64), nullable=False),
        Column("ts", Double, nullable=False),
        Column("address", String(512), nullable=False),
        Column("domain", String(255), nullable=False),
    )
    Index("ix_recipients_address_ts", recipients.c.address, recipients.c.ts)
    Index("ix_recipients_domain_ts", recipients.c.domain, recipients.c.ts)
    Index("ix_recipients_queue_id", recipients.c.queue_id)
    Index("ix_recipients_ts", recipients.c.ts)
    # one row per (message, recipient domain): a domain search walks (domain, ts)
    # like an address search, with no message twice
    rdomains = Table(
        "rdomains", md, pk(),
        Column("queue_id", String(64), nullable=False),
        Column("ts", Double, nullable=False),
        Column("domain", String(255), nullable=False),
    )
    Index("ix_rdomains_domain_ts", rdomains.c.domain, rdomains.c.ts)
    Index("ix_rdomains_ts", rdomains.c.ts)

    deliveries = Table(
        "deliveries", md, pk(),
        Column("queue_id", String(64), nullable=False),
        Column("ts", Double, nullable=False),
        Column("node", String(255), nullable=False, default=""),
        Column("next_hop", Text, nullable=False, default=""),
        Column("route", Text, nullable=False, default=""),
        Column("recipient", String(512), nullable=False),
        Column("status", String(16), nullable=False),
        Column("code", Integer, nullable=False, default=0),
        Column("reply", Text, nullable=False, default=""),
        Column("tls", Boolean, nullable=False, default=False),
        Column("delay", Double, nullable=False, default=0.0),
    )
    Index("ix_deliveries_queue_id", deliveries.c.queue_id)
    Index("ix_deliveries_ts", deliveries.c.ts)

    events = Table(
        "events", md, pk(),
        Column("queue_id", String(64), nullable=False),
        Column("ts", Double, nullable=False),
        Column("node", String(255), nullable=False, default=""),
        Column("kind", String(32), nullable=False),
        Column("detail", Text, nullable=False, default=""),
    )
    Index("ix_events_queue_id", events.c.queue_id)
    Index("ix_events_ts", events.c.ts)

    audit = Table(
        "audit", md, pk(),
        Column("ts", Double, nullable=False),
        Column("node", String(255), nullable=False, default=""),
        Column("actor", Text, nullable=False),
        Column("action", String(64), nullable=False),
        Column("target", String(512), nullable=False, default=""),
        Column("detail", Text, nullable=False, default=""),
        Column("source_ip", String(64), nullable=False, default=""),
    )
    Index("ix_audit_ts", audit.c.ts)
    Index("ix_audit_target", audit.c.target)

    # the quarantine's index (the bytes stay in the spool's quarantine/):
    # filled from the judged message and from the Quarantined event, in
    # whichever order they arrive
    quarantine = Table(
        "quarantine", md, pk(),
        Column("queue_id", String(64), nullable=False),
        Column("ts", Double, nullable=False),
        Column("node", String(255), nullable=False, default=""),
        Column("subject", Text, nullable=True),
        Column("sender", String(512), nullable=False, default=""),
        Column("recipients", Text, nullable=False, default="[]"),
        Column("score", Double, nullable=True),
        Column("symbols", Text, nullable=False, default="[]"),
        Column("reason", Text, nullable=False, default=""),
        Column("expires", Double, nullable=False),
        UniqueConstraint("queue_id", name="uq_quarantine_queue_id"),
    )
    Index("ix_quarantine_ts", quarantine.c.ts)
    Index("ix_quarantine_expires", quarantine.c.expires)

    # per-hour counts the dashboard reads instead of grouping the messages:
    # kind "action", "symbol", "refused_client", "refused_domain"
    Table(
        "hourly", md,
        Column("kind", String(16), primary_key=True),
        Column("hour_ts", Integer, primary_key=True),
        Column("key", String(512), primary_key=True),
        Column("count", Integer, nullable=False),
    )
    # the per-day rollup of the TOP_KINDS (see the module docstring) and the days it holds
    Table(
        "daily_top", md,
        Column("kind", String(16), primary_key=True),
        Column("day_ts", Integer, primary_key=True),
        Column("key", String(512), primary_key=True),
        Column("count", Integer, nullable=False),
    )
    Table("rolled_days", md, Column("day_ts", Integer, primary_key=True))
    return md, {t.name: t for t in md.sorted_tables}


_FLUSH = object()  # a flush() marker in the writer's queue
_TRACKED = frozenset((ev.MessageAnswered, ev.ClientGone, ev.StageRefused, ev.Spooled, ev.Quarantined,
                      ev.DeliveryAttempted, ev.Deferred, ev.Bounced, ev.Released, ev.Deleted, ev.Learned,
                      ev.AdminAction))


def _hour(ts: float) -> int:
    return int(ts // HOUR) * HOUR


def _day(ts: float) -> int:
    return int(ts // DAY) * DAY


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


def _facts(event, message, envelope, name: str):
    """Message-ID / Subject wherever the writers put them: on the event, on
    its Message, or on the envelope (they are being added as this is written)."""
    for holder in (event, message, envelope):
        value = getattr(holder, name, None) if holder is not None else None
        if value:
            return str(value)
    return None


def _reply_text(reply) -> str:
    return "" if reply is None else str(reply)


def _action_of_reply(reply) -> str:
    code = getattr(reply, "code", 0) or 0
    return "reject" if code >= 500 else "tempfail"


def _session_fields(s) -> dict:
    return {"client": s.peer_ip or "", "helo": s.helo or "", "tls": bool(s.tls), "auth_user": s.auth_user}


class TrackingStore:
    """The store; see the module docstring.  Query methods block: the web
    console calls them in a thread, never on the reactor."""

    def __init__(self, url: str, *, node: str = "", retention: float = 30 * 86400.0,
                 quarantine_retention: float = 14 * 86400.0, batch_size: int = 500,
                 batch_interval: float = 0.5, max_pending: int = 100000, prune_interval: float = 3600.0,
                 clock: Callable[[], float] = time.time, describe: Optional[Callable[[str], str]] = None,
                 prune_on_timer: bool = True, top_per_day: int = 100):
        from sqlalchemy import create_engine, event

        if url.startswith("postgresql://"):  # psycopg 3, not SQLAlchemy's default psycopg2
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        self.url = url
        self.node = node
        self.retention = retention
        self.quarantine_retention = quarantine_retention
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.max_pending = max_pending
        self.prune_interval = prune_interval
        self.prune_on_timer = prune_on_timer  # and roll up on the same timer thread
        self.top_per_day = top_per_day
        self.text_index: Optional[str] = None  # "fts5", "pg_trgm", or None: text search scans; set by ensure_schema
        self._next_rollup: Optional[float] = None
        self.clock = clock
        # symbol name -> its declared one-line description (gateway.plugins.SymbolTable.description)
        self.describe = describe
        self.metadata, self.t = _schema()
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url[len("sqlite:///"):]
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writers, two processes write
                cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints; a lost fact is not lost mail
                cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                cur.close()
        else:
            # a database that does not answer fails the batch in 10 s instead of hanging the writer
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                                        connect_args={"connect_timeout": 10})
        self._pending: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._ready = False
        self._next_prune: Optional[float] = None
        self.dropped = 0  # records dropped because the queue was full
        self.failed = 0  # records lost because a batch could not be written
        self.written = 0
        self._last_drop_log = 0.0
        self._last_fail_log = 0.0
        self._stamp_log = 0.0

    @classmethod
    def from_config(cls, config, *, clock: Callable[[], float] = time.time,
                    describe: Optional[Callable[[str], str]] = None,
                    queue_dir: Optional[str] = None) -> "TrackingStore":
        """``queue_dir``: the spool's root, when it is not ``queue.dir`` (the delivery process is told it)."""
        t = config.tracking
        url = t.url or "sqlite:///" + os.path.join(os.path.abspath(queue_dir or config.queue.dir), "tracking.sqlite")
        return cls(url, node=t.node or config.server.hostname, retention=t.retention,
                   quarantine_retention=t.quarantine_retention, batch_size=t.batch_size,
                   batch_interval=t.batch_interval, max_pending=t.max_pending, prune_interval=t.prune_interval,
                   clock=clock, describe=describe)

    # --- schema ----------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Creates what is missing.  Two processes starting at once may race on
        CREATE: the loser finds the winner's tables on its retry."""
        if self._ready:
            return
        with self._schema_lock:  # the writer and a query of this process: one of them creates
            if self._ready:
                return
            self._create_schema_exclusively()
            self._ready = True

    def _create_schema_exclusively(self) -> None:
        """CREATE under a lock every process of every node takes: the receiver and
        the delivery process start together, and create_all's "does it exist?"
        then "CREATE" is not atomic (one lost the race with "table events
        already exists" and dropped its first batch)."""
        if self.is_sqlite:
            path = self.url[len("sqlite:///"):]
            if not path or path == ":memory:":
                self.metadata.create_all(self.engine)
                return
            import fcntl

            with open(os.path.abspath(path) + ".schema-lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.metadata.create_all(self.engine)
                self._create_fts()
            return
        from sqlalchemy import text

        with self.engine.begin() as conn:  # the advisory lock ends with this transaction
            conn.execute(text("SELECT pg_advisory_xact_lock(7316520)"))  # any constant: "mailgate schema"
            self.metadata.create_all(conn)
            self._create_trgm(conn)

    def _create_fts(self) -> None:
        """The FTS5 trigram table and its triggers, if missing; filled from the
        messages already there when the table is new (a store of the previous
        version).  Under the schema lock."""
        import sqlite3

        from sqlalchemy.exc import OperationalError

        if sqlite3.sqlite_version_info < (3, 34, 0):
            log.warning("tracking: SQLite %s has no trigram tokenizer (3.34+): text search scans the messages",
                        sqlite3.sqlite_version)
            return
        try:
            with self.engine.begin() as conn:
                have = {r[0] for r in conn.exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE name = 'messages_fts' OR name LIKE 'messages_fts_a_'")}
                if "messages_fts" not in have:
                    conn.exec_driver_sql(
                        "CREATE VIRTUAL TABLE messages_fts USING fts5(subject, content='messages', "
                        "content_rowid='id', tokenize='trigram', columnsize=0)")
                    conn.exec_driver_sql("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")  # the backfill
                for name, body in FTS_TRIGGERS.items():
                    if name not in have:
                        conn.exec_driver_sql(f"CREATE TRIGGER {name} {body}")
        except OperationalError as e:  # e.g. built without FTS5
            log.warning("tracking: no FTS5 trigram index (%s): text search scans the messages",
                        str(e).splitlines()[0][:200])
            return
        self.text_index = "fts5"

    def _create_trgm(self, conn) -> None:
        """pg_trgm and the GIN index on the searched text, if the server has
        the extension (CREATE EXTENSION needs the right; a DBA may have done it)."""
        from sqlalchemy import text
        from sqlalchemy.exc import DBAPIError

        try:
            with conn.begin_nested():  # a refusal must not abort the schema's transaction
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
        except DBAPIError as e:
            log.warning("tracking: PostgreSQL has no pg_trgm (%s): text search scans the messages",
                        str(e.orig).splitlines()[0][:200] if e.orig else e)
            return
        conn.execute(text("CREATE INDEX IF NOT EXISTS ix_messages_subject_trgm ON messages "
                          "USING gin (subject gin_trgm_ops)"))
        self.text_index = "pg_trgm"

    # --- writing: the subscriber and the writer thread ------------------------------

    def subscriber(self) -> Callable[[Any], None]:
        """The callable for the EventSink (the store itself): snapshots the
        event and queues it; never blocks."""
        self.start()
        return self

    def __call__(self, event) -> None:
        self.offer(event)

    def reconfigure(self, config) -> None:
        """A reload: retention and batching follow; the URL needs a restart."""
        t = config.tracking
        self.retention, self.quarantine_retention = t.retention, t.quarantine_retention
        self.batch_size, self.batch_interval, self.max_pending = t.batch_size, t.batch_interval, t.max_pending
        self.prune_interval = t.prune_interval

    def offer(self, event) -> None:
        """On the emitting thread (the reactor): a snapshot of what may still
        change after the event (the session: a new EHLO, STARTTLS, AUTH; a
        refused transaction's envelope: more RCPTs) and the time; the rest
        of the work is the writer thread's."""
        if type(event) not in _TRACKED:
            return  # connections, stage timings: the metrics' business
        pending = self._pending
        if len(pending) >= self.max_pending:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.warning("tracking: writer is behind (%d facts waiting); dropped=%d so far",
                            len(pending), self.dropped)
            return
        s = getattr(event, "session", None)
        snap = None
        if s is not None:
            env = event.envelope
            snap = (_session_fields(s), [r.address for r in env.recipients]
                    if env is not None and type(event) is ev.StageRefused else None, self.clock())
        pending.append((event, snap))
        if len(pending) >= self.batch_size:
            self._wake.set()

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name="mailgate-tracking", daemon=True)
                self._thread.start()
                # a command (mailgate quarantine release) that ends without close() still writes its facts
                atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if not self._closing:
            self.flush(timeout=10)

    def flush(self, timeout: float = 60.0) -> None:
        """Blocks until everything offered before the call is written (or dropped)."""
        if self._closing:
            return
        if self._thread is None:
            self.start()
        done = threading.Event()
        self._pending.append((_FLUSH, done))
        self._wake.set()
        if not done.wait(timeout):
            log.error("tracking: flush timed out after %.0fs", timeout)

    def close(self) -> None:
        """Writes what is queued, stops the writer, closes the connections."""
        if self._thread is not None and not self._closing:
            self.flush()
            atexit.unregister(self._at_exit)
        with self._lock:
            self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        self.engine.dispose()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.batch_interval)
            self._wake.clear()
            self._drain()
            self._maybe_prune()
            self._maybe_rollup()
            if self._closing and not self._pending:
                return

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            batch, flushes = [], []
            while pending and len(batch) < self.batch_size * 4:
                item = pending.popleft()
                if item[0] is _FLUSH:
                    flushes.append(item[1])
                    break  # everything before the marker goes in this batch
                batch.append(item)
            if batch:
                self._write_safely(batch)
            for done in flushes:
                done.set()

    def _write_safely(self, batch: list) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        records = []
        for event, snap in batch:
            try:
                records.extend(self._records(event, snap))
            except Exception:  # a malformed event is a bug in its writer; the others still go in
                log.exception("tracking: cannot record %s", type(event).__name__)
        try:
            self.ensure_schema()
            with self.engine.begin() as conn:
                self._write(conn, records)
            self.written += len(batch)
        except (SQLAlchemyError, OSError) as e:
            self.failed += len(batch)
            now = time.monotonic()
            if now - self._last_fail_log > 10:
                self._last_fail_log = now
                log.error("tracking: cannot write %d facts (%s); dropped, mail is unaffected; lost=%d so far",
                          len(batch), str(e).splitlines()[0][:300], self.failed)
        except Exception:
            self.failed += len(batch)
            log.exception("tracking: writing a batch failed; %d facts dropped", len(batch))

    def _maybe_prune(self) -> None:
        if not self.prune_on_timer:
            return
        now = self.clock()
        if self._next_prune is None:  # the first a minute after start, then every prune_interval
            self._next_prune = now + min(FIRST_PRUNE, self.prune_interval)
        if now < self._next_prune:
            return
        self._next_prune = now + self.prune_interval
        from sqlalchemy.exc import SQLAlchemyError

        try:
            self.ensure_schema()
            removed = self.prune(now)
            if removed:
                log.info("tracking: pruned %d entries", removed)
        except SQLAlchemyError as e:
            log.error("tracking: prune failed: %s", str(e).splitlines()[0][:300])

    def _maybe_rollup(self) -> None:
        if not self.prune_on_timer:
            return
        now = self.clock()
        if self._next_rollup is not None and now < self._next_rollup:
            return
        self._next_rollup = now + ROLLUP_INTERVAL
        from sqlalchemy.exc import SQLAlchemyError

        try:
            self.rollup(now)
        except SQLAlchemyError as e:  # e.g. the other process rolled the same day up first: the next timer
            log.warning("tracking: daily rollup failed: %s", str(e).splitlines()[0][:300])

    def rollup(self, now: float) -> int:
        """Rolls up every finished day within the retention that is not yet
        (the top ``top_per_day`` keys of each TOP_KINDS plus "other"); one
        short transaction per day.  Returns how many days it rolled up."""
        from sqlalchemy import func, select

        self.ensure_schema()
        h, d, rd = self.t["hourly"], self.t["daily_top"], self.t["rolled_days"]
        first, last = _day(now - self.retention), _day(now - ROLLUP_GRACE) - DAY  # last: the last finished day
        with self.engine.connect() as conn:
            done = {r[0] for r in conn.execute(select(rd.c.day_ts).where(rd.c.day_ts >= first))}
        rolled = 0
        for day in range(first, last + 1, DAY):
            if day in done:
                continue
            with self.engine.begin() as conn:
                rows = []
                for kind in TOP_KINDS:
                    total = func.sum(h.c.count)
                    counts = conn.execute(
                        select(h.c.key, total).where(h.c.kind == kind, h.c.hour_ts >= day, h.c.hour_ts < day + DAY)
                        .group_by(h.c.key).having(total > 0).order_by(total.desc(), h.c.key)).all()
                    top = counts[:self.top_per_day]
                    rows.extend({"kind": kind, "day_ts": day, "key": k, "count": int(n)} for k, n in top)
                    other = sum(int(n) for _, n in counts[self.top_per_day:])
                    if other:
                        rows.append({"kind": kind, "day_ts": day, "key": OTHER, "count": other})
                if rows:
                    self._executemany(conn, d.insert(), rows)
                conn.execute(rd.insert().values(day_ts=day))
            rolled += 1
        return rolled

    # --- event -> records (on the emitting thread: cheap, a snapshot) ---------------

    def _records(self, e, snap=None) -> list:
        """The rows an event makes; ``snap`` is what ``offer`` saved of it
        (None: read the event as it is now)."""
        node = self.node
        if isinstance(e, ev.MessageAnswered) or isinstance(e, ev.ClientGone):
            return [("msg", self._message_record(e, snap))]
        if isinstance(e, ev.StageRefused):
            s, env = e.session, e.envelope
            qid = env.queue_id if env is not None else s.queue_id
            if snap is not None:
                session, rcpts, ts = snap[0], list(snap[1] or ()), getattr(e, "ts", 0.0) or snap[2]
            else:
                session, ts = _session_fields(s), getattr(e, "ts", 0.0) or self.clock()
                rcpts = [r.address for r in env.recipients] if env is not None else []
            if e.rcpt:
                rcpts.append(e.rcpt)
            rec = {"queue_id": qid, "ts": ts, "node": node, **session,
                   "sender": env.sender if env is not None else "", "rcpts": rcpts,
                   "size": env.size if env is not None else 0, "action": _action_of_reply(e.reply),
                   "stage": e.stage, "reply": _reply_text(e.reply), "score": None, "required": None,
                   "symbols": [], "message_id": None, "subject": None, "final": False}
            detail = f"{e.stage}{' <' + e.rcpt + '>' if e.rcpt else ''}: {e.reply}"
            return [("msg", rec), ("event", {"queue_id": qid, "ts": ts, "node": node, "kind": "refused",
                                             "detail": detail})]
        if isinstance(e, ev.Spooled):
            return [("event", {"queue_id": e.queue_id, "ts": e.ts, "node": node, "kind": "spooled",
                               "detail": f"size={e.size}"})]
        if isinstance(e, ev.Quarantined):
            expires = e.expires or e.ts + self.quarantine_retention
            return [("quarantine", {"queue_id": e.queue_id, "ts": e.ts, "node": node, "reason": e.reason,
                                    "expires": expires, "given": bool(e.expires)}),
                    ("event", {"queue_id": e.queue_id, "ts": e.ts, "node": node, "kind": "quarantined",
                               "detail": e.reason})]
        if isinstance(e, ev.DeliveryAttempted):
            rows = [{"queue_id": e.queue_id, "ts": e.ts, "node": node, "next_hop": e.next_hop or "",
                     "route": getattr(e, "route", "") or "", "recipient": o.recipient, "status": o.status,
                     "code": int(o.code or 0), "reply": o.reply or "", "tls": bool(e.tls),
                     "delay": float(e.delay or 0.0)} for o in e.outcomes]
            return [("delivery", r) for r in rows]
        if isinstance(e, ev.Deferred):
            detail = (f"{len(e.recipients)} recipient(s), attempt {e.attempts}, next try "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(e.next_try))} UTC: {e.reason}")
            return [("event", {"queue_id": e.queue_id, "ts": e.ts, "node": node, "kind": "deferred",
                               "detail": detail})]
        if isinstance(e, ev.Bounced):
            detail = f"{', '.join(e.recipients)}: {e.reason}" + (f" (bounce {e.bounce_id})" if e.bounce_id else "")
            return [("event", {"queue_id": e.queue_id, "ts": e.ts, "node": node, "kind": "bounced",
                               "detail": detail})]
        if isinstance(e, ev.Released):
            out = [("event", {"queue_id": e.queue_id, "ts": e.ts, "node": node, "kind": "released",
                              "detail": f"by {e.by}" + (", learned as ham" if e.learned_ham else "")}),
                   ("unquarantine", e.queue_id), ("label", (e.queue_id, "ham"))]
            return out
        if isinstance(e, ev.Deleted):
            out = [("event", {"queue_id": e.queue_id, "ts": e.ts, "node": node, "kind": "deleted",
                              "detail": f"from the {e.where} by {e.by}"})]
            if e.where == "quarantine":
                out.append(("unquarantine", e.queue_id))
            return out
        if isinstance(e, ev.Learned):
            return [("event", {"queue_id": e.queue_id, "ts": e.ts, "node": node, "kind": "learned",
                               "detail": f"as {e.label} by {e.by}"}),
                    ("label", (e.queue_id, e.label))]
        if isinstance(e, ev.AdminAction):
            return [("audit", {"ts": e.ts, "node": node, "actor": e.actor, "action": e.action,
                               "target": e.target or "", "detail": e.detail or "", "source_ip": e.source_ip or ""})]
        return []

    def _message_record(self, e, snap=None) -> dict:
        s, env, v = e.session, e.envelope, e.verdict
        message = getattr(e, "message", None)
        describe = self.describe
        symbols = []
        for r in v.results:
            name = getattr(r, "symbol", None)
            if name is None:
                continue
            desc = getattr(r, "description", None) or (describe(name) if describe else "") or ""
            symbols.append({"name": name, "score": r.score, "description": desc, "detail": r.detail or ""})
        failures = [f"{f.check}: {f.reason}" for f in getattr(v, "failures", ())]
        if isinstance(e, ev.ClientGone):
            action, reply = "dropped", "client disconnected before the reply; nothing queued"
        else:
            action, reply = v.action.value, _reply_text(e.reply)
            code = getattr(e.reply, "code", 250) or 250
            if code >= 400 and action not in REFUSED:  # e.g. the spool could not be written
                action = _action_of_reply(e.reply)
        ts = getattr(e, "ts", None) or (snap[2] if snap is not None else self.clock())
        session = snap[0] if snap is not None else _session_fields(s)
        return {"queue_id": env.queue_id, "ts": ts, "node": self.node, **session,
                "sender": env.sender, "rcpts": [r.address for r in env.recipients], "size": env.size,
                "action": action, "stage": "data", "reply": reply, "score": v.score, "required": v.required,
                "symbols": symbols, "failures": failures,
                "message_id": _facts(e, message, env, "message_id"), "subject": _facts(e, message, env, "subject"),
                "final": True, "refuse": [r.refuse for r in v.results if getattr(r, "refuse", None)]}

    # --- the writer's one transaction per batch --------------------------------------

    def _upsert(self, table, rows: list[dict], keys: list[str], update: Callable):
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        stmt = insert(table)
        return stmt.on_conflict_do_update(index_elements=keys, set_=update(stmt.excluded)), rows

    def _write(self, conn, batch: list) -> None:
        from sqlalchemy import bindparam, select

        t = self.t
        msgs: dict[str, dict] = {}
        events, deliveries, audit, quarantine, labels, unquarantine = [], [], [], [], [], []
        for kind, rec in batch:
            if kind == "msg":
                prev = msgs.get(rec["queue_id"])
                msgs[rec["queue_id"]] = rec if prev is None else _merge(prev, rec)
            elif kind == "event":
                events.append(rec)
            elif kind == "delivery":
                deliveries.append(rec)
            elif kind == "audit":
                audit.append(rec)
            elif kind == "quarantine":
                quarantine.append(rec)
            elif kind == "label":
                labels.append(rec)
            elif kind == "unquarantine":
                unquarantine.append(rec)

        deltas: collections.Counter = collections.Counter()
        if msgs:
            m = t["messages"]
            cols = [m.c.queue_id, m.c.ts, m.c.client, m.c.helo, m.c.tls, m.c.auth_user, m.c.sender, m.c.recipients,
                    m.c.message_id, m.c.subject, m.c.size, m.c.score, m.c.required, m.c.action, m.c.stage,
                    m.c.reply, m.c.symbols]
            existing = {}
            qids = list(msgs)
            for i in range(0, len(qids), CHUNK):
                for row in conn.execute(select(*cols).where(m.c.queue_id.in_(qids[i:i + CHUNK]))):
                    existing[row.queue_id] = _stored(row._mapping)
            inserts, updates, new_rcpts, new_domains = [], [], [], []
            for qid, rec in msgs.items():
                old = existing.get(qid)
                if old is not None:
                    for key, n in _contributions(old).items():
                        deltas[key] -= n
                    rec = _merge(old, rec)
                for key, n in _contributions(rec).items():
                    deltas[key] += n
                known = set(old["rcpts"]) if old is not None else set()
                known_domains = {_domain(a) for a in known}
                for a in dict.fromkeys(x.lower() for x in rec["rcpts"]):
                    if a not in known:
                        d = _domain(a)
                        new_rcpts.append({"queue_id": qid, "ts": rec["ts"], "address": a, "domain": d})
                        if d not in known_domains:
                            known_domains.add(d)
                            new_domains.append({"queue_id": qid, "ts": rec["ts"], "domain": d})
                row = _row(rec)
                if old is not None:
                    updates.append({k: v for k, v in row.items() if k != "node"})  # the writer's node stays
                else:
                    inserts.append(row)
                if rec["action"] == "quarantine" and rec.get("final"):
                    quarantine.append({"queue_id": qid, "ts": rec["ts"], "node": rec["node"],
                                       "reason": ", ".join(rec.get("refuse") or ()) or "score",
                                       "expires": rec["ts"] + self.quarantine_retention, "given": False,
                                       "subject": rec["subject"], "sender": rec["sender"],
                                       "recipients": row["recipients"], "score": rec["score"],
                                       "symbols": row["symbols"]})
                for f in rec.get("failures") or ():
                    events.append({"queue_id": qid, "ts": rec["ts"], "node": rec["node"], "kind": "check_failed",
                                   "detail": f})
            if inserts:
                self._executemany(conn, m.insert(), inserts)
            if updates:
                stmt = m.update().where(m.c.queue_id == bindparam("b_queue_id")).values(
                    {k: bindparam("b_" + k) for k in updates[0] if k != "queue_id"})
                conn.execute(stmt, [{"b_" + k: v for k, v in u.items()} for u in updates])
            if new_rcpts:
                self._executemany(conn, t["recipients"].insert(), new_rcpts)
            if new_domains:
                self._executemany(conn, t["rdomains"].insert(), new_domains)

        if quarantine:
            self._write_quarantine(conn, quarantine)
        for qid in unquarantine:
            conn.execute(t["quarantine"].delete().where(t["quarantine"].c.queue_id == qid))
        if labels:
            m = t["messages"]
            for qid, label in labels:
                conn.execute(m.update().where(m.c.queue_id == qid).values(label=label))
        if events:
            self._executemany(conn, t["events"].insert(), events)
        if deliveries:
            self._executemany(conn, t["deliveries"].insert(), deliveries)
        if audit:
            self._executemany(conn, t["audit"].insert(), audit)
        rows = [{"kind": k, "hour_ts": h, "key": key[:512], "count": n} for (k, h, key), n in deltas.items() if n]
        today = _day(self.clock())
        stale = {_day(r["hour_ts"]) for r in rows if r["kind"] in TOP_KINDS and r["hour_ts"] < today}
        if stale:  # a late fact for a day that may be rolled up: that day is rolled up again
            d, rd = t["daily_top"], t["rolled_days"]
            conn.execute(d.delete().where(d.c.day_ts.in_(sorted(stale))))
            conn.execute(rd.delete().where(rd.c.day_ts.in_(sorted(stale))))
        if rows:
            h = t["hourly"]
            stmt, rows = self._upsert(h, rows, ["kind", "hour_ts", "key"],
                                      lambda ex: {"count": h.c.count + ex.count})
            self._executemany(conn, stmt, rows)

    def _write_quarantine(self, conn, items: list[dict]) -> None:
        q = self.t["quarantine"]
        detail_cols = ("subject", "sender", "recipients", "score", "symbols")
        judged, told = [], []  # from the judged messages / from Quarantined events (given an expiry or not)
        for item in items:
            full = {"queue_id": item["queue_id"], "ts": item["ts"], "node": item["node"], "reason": item["reason"],
                    "expires": item["expires"], **{c: item.get(c) for c in detail_cols}}
            full["sender"] = full["sender"] or ""
            full["recipients"] = full["recipients"] or "[]"
            full["symbols"] = full["symbols"] or "[]"
            (judged if "subject" in item else told).append((full, item["given"]))
        groups = [
            ([f for f, _ in judged], lambda ex: {c: getattr(ex, c) for c in detail_cols}),  # its details
            ([f for f, g in told if g], lambda ex: {"reason": ex.reason, "expires": ex.expires}),  # why, until when
            ([f for f, g in told if not g], lambda ex: {"reason": ex.reason}),  # why
        ]
        for rows, update in groups:
            if rows:
                stmt, rows = self._upsert(q, rows, ["queue_id"], update)
                self._executemany(conn, stmt, rows)

    def _executemany(self, conn, stmt, rows: list[dict]) -> None:
        """``rows`` through the DBAPI cursor's executemany, the statement
        compiled once by SQLAlchemy for the dialect.  Hand-written because
        SQLAlchemy's per-row parameter processing was half the writer's CPU
        (a thread that shares the interpreter lock with the reactor); every
        row must carry every column the statement names."""
        compiled = stmt.compile(dialect=self.engine.dialect, column_keys=list(rows[0]))
        sql = str(compiled)
        if compiled.positional:
            order = compiled.positiontup
            params = [tuple(r[k] for k in order) for r in rows]
        else:
            params = rows
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(sql, params)
        finally:
            cursor.close()

    # --- queries ------------------------------------------------------------------------

    def _conn(self):
        self.ensure_schema()
        return self.engine.connect()

    def search(self, *, since: Optional[float] = None, until: Optional[float] = None, queue_id: Optional[str] = None,
               message_id: Optional[str] = None, sender: Optional[str] = None, recipient: Optional[str] = None,
               client: Optional[str] = None, action: Optional[str] = None, text: Optional[str] = None,
               limit: int = 100, offset: int = 0) -> list[dict]:
        """Newest first.  ``sender``/``recipient``: a whole address, or a domain
        as "example.test" or "@example.test".  ``text``: part of the
        Subject, any case (see the module
        docstring); of fewer than 3 characters it can use no trigram index,
        so it looks only at the last ``SHORT_TEXT_WINDOW`` seconds of the
        range (``until``, or now, back): a bounded scan."""
        from sqlalchemy import select

        m, r = self.t["messages"], self.t["recipients"]
        q = select(*self._summary_cols())
        order_ts = m.c.ts
        if recipient:
            addr = recipient.strip().lower()
            if "@" in addr and not addr.startswith("@"):
                # walk the (address, ts) index newest first, joining each to its
                # message (an address is stored once per message)
                q = q.select_from(r.join(m, m.c.queue_id == r.c.queue_id)).where(r.c.address == addr)
                order_ts = r.c.ts
                if since is not None:
                    q = q.where(r.c.ts >= since)
                if until is not None:
                    q = q.where(r.c.ts < until)
            else:  # a domain: its own table, one row per message and domain
                rd = self.t["rdomains"]
                q = q.select_from(rd.join(m, m.c.queue_id == rd.c.queue_id)).where(
                    rd.c.domain == addr.lstrip("@").rstrip("."))
                order_ts = rd.c.ts
                if since is not None:
                    q = q.where(rd.c.ts >= since)
                if until is not None:
                    q = q.where(rd.c.ts < until)
        if since is not None:
            q = q.where(m.c.ts >= since)
        if until is not None:
            q = q.where(m.c.ts < until)
        if queue_id:
            q = q.where(m.c.queue_id == queue_id.strip())
        if message_id:
            mid = message_id.strip()
            q = q.where(m.c.message_id.in_({mid, f"<{mid.strip('<>')}>", mid.strip("<>")}))
        if sender:
            s = sender.strip().lower()
            if "@" in s and not s.startswith("@"):
                q = q.where(m.c.sender == s)
            elif s in ("<>", "null"):
                q = q.where(m.c.sender == "")
            else:
                q = q.where(m.c.sender_domain == s.lstrip("@").rstrip("."))
        if client:
            q = q.where(m.c.client == client.strip())
        if action:
            q = q.where(m.c.action == action.strip().lower())
        text = (text or "").strip()
        if text and len(text) < MIN_TRIGRAM:
            end = until if until is not None else self.clock()
            q = q.where(m.c.ts >= end - SHORT_TEXT_WINDOW)
        q = q.order_by(order_ts.desc()).limit(max(0, int(limit))).offset(max(0, int(offset)))
        with self._conn() as conn:
            if text:
                q = self._text_filter(conn, q, text)
            return [_summary(row._mapping) for row in conn.execute(q)]

    FTS_PROBE = 5000  # matches beyond which a text is "common": walk the ts index instead

    def _text_filter(self, conn, q, text: str):
        from sqlalchemy import text as sql

        m = self.t["messages"]
        like = f"%{_escape_like(text)}%"
        if self.text_index == "fts5" and len(text) >= MIN_TRIGRAM:
            phrase = '"' + text.replace('"', '""') + '"'  # one phrase of trigrams: a substring
            hits = sql("SELECT rowid FROM messages_fts WHERE messages_fts MATCH :fts").bindparams(fts=phrase)
            n = conn.exec_driver_sql("SELECT count(*) FROM (SELECT rowid FROM messages_fts WHERE messages_fts "
                                     "MATCH ? LIMIT ?)", (phrase, self.FTS_PROBE)).scalar()
            if n < self.FTS_PROBE:
                # a rare text: its few rows, then sorted (a walk of the ts index would check them all)
                return q.where(m.c.id.in_(list(conn.execute(hits).scalars())) if n else m.c.id.is_(None))
            # common: the newest ones come soon in the ts index; "+ 0" keeps SQLite from driving the
            # query by the (rowid) IN list instead, which would fetch and sort every match
            return q.where((m.c.id + 0).in_(hits))
        # SQLite's LIKE ignores ASCII case by itself; on PostgreSQL pg_trgm's GIN index answers ILIKE
        return q.where(m.c.subject.like(like, escape="\\") if self.is_sqlite else
                       m.c.subject.ilike(like, escape="\\"))

    def _summary_cols(self):
        m = self.t["messages"]
        return [m.c.queue_id, m.c.ts, m.c.node, m.c.client, m.c.sender, m.c.recipients, m.c.subject, m.c.message_id,
                m.c.size, m.c.score, m.c.required, m.c.action, m.c.stage, m.c.reply, m.c.label]

    def message(self, queue_id: str) -> Optional[dict]:
        """Everything known of one message, or None."""
        from sqlalchemy import select

        t = self.t
        m = t["messages"]
        qid = (queue_id or "").strip()
        with self._conn() as conn:
            row = conn.execute(select(m).where(m.c.queue_id == qid)).first()
            d_rows = conn.execute(select(t["deliveries"]).where(t["deliveries"].c.queue_id == qid)
                                  .order_by(t["deliveries"].c.ts, t["deliveries"].c.id)).all()
            e_rows = conn.execute(select(t["events"]).where(t["events"].c.queue_id == qid)
                                  .order_by(t["events"].c.ts, t["events"].c.id)).all()
            a_rows = conn.execute(select(t["audit"]).where(t["audit"].c.target == qid)
                                  .order_by(t["audit"].c.ts, t["audit"].c.id)).all()
            q_row = conn.execute(select(t["quarantine"]).where(t["quarantine"].c.queue_id == qid)).first()
        if row is None and not (d_rows or e_rows):
            return None
        out: dict[str, Any] = {"queue_id": qid}
        if row is not None:
            mm = row._mapping
            out.update(_summary(mm))
            out.update({"helo": mm["helo"], "tls": bool(mm["tls"]), "auth_user": mm["auth_user"],
                        "symbols": json.loads(mm["symbols"] or "[]")})
        else:  # only the delivery side is known (a bounce we made, or a pruned message)
            out.update({"ts": None, "client": "", "sender": "", "recipients": [], "subject": None, "score": None,
                        "action": None, "reply": "", "helo": "", "tls": False, "auth_user": None,
                        "message_id": None, "size": 0, "required": None, "symbols": [], "node": "",
                        "stage": "", "label": None})
        out["deliveries"] = [{"ts": d.ts, "next_hop": d.next_hop, "route": d.route, "recipient": d.recipient,
                              "status": d.status, "code": d.code, "reply": d.reply, "tls": bool(d.tls),
                              "delay": d.delay, "node": d.node} for d in d_rows]
        out["events"] = [{"ts": e.ts, "kind": e.kind, "detail": e.detail, "node": e.node} for e in e_rows]
        out["audit"] = [_audit(a._mapping) for a in a_rows]
        out["quarantine"] = None if q_row is None else {"reason": q_row.reason, "expires": q_row.expires}
        return out

    def dashboard(self, since: float, until: float) -> dict:
        """From the per-hour counts: hours that start in [since, until)."""
        from sqlalchemy import func, select

        from sqlalchemy import and_, or_, union_all

        h, dt, rd = self.t["hourly"], self.t["daily_top"], self.t["rolled_days"]
        lo, hi = _hour(since), until

        def top(kind: str, n: int = 10):
            # whole rolled-up days from daily_top, every other hour from hourly
            parts = [select(h.c.key, h.c.count).where(h.c.kind == kind, or_(
                *[and_(h.c.hour_ts >= a, h.c.hour_ts < b) for a, b in segments]))] if segments else []
            if days:
                parts.append(select(dt.c.key, dt.c.count).where(dt.c.kind == kind, dt.c.day_ts.in_(days),
                                                                dt.c.key != OTHER))
            if not parts:
                return []
            u = (union_all(*parts) if len(parts) > 1 else parts[0]).subquery()
            total = func.sum(u.c.count)
            q = select(u.c.key, total.label("n")).group_by(u.c.key).having(total > 0).order_by(
                total.desc(), u.c.key).limit(n)
            return [(k, int(c)) for k, c in conn.execute(q)]

        with self._conn() as conn:
            first = -(-lo // DAY) * DAY
            days = sorted(r[0] for r in conn.execute(select(rd.c.day_ts).where(
                rd.c.day_ts >= first, rd.c.day_ts + DAY <= hi)))
            segments, start = [], lo  # [lo, hi) less the rolled-up days
            for day in days:
                if day > start:
                    segments.append((start, day))
                start = day + DAY
            if start < hi:
                segments.append((start, hi))
            per_hour = [{"hour_ts": int(r.hour_ts), "action": r.key, "count": int(r.count)} for r in conn.execute(
                select(h.c.hour_ts, h.c.key, h.c.count)
                .where(h.c.kind == "action", h.c.hour_ts >= lo, h.c.hour_ts < hi, h.c.count > 0)
                .order_by(h.c.hour_ts, h.c.key))]
            out = {"per_hour": per_hour, "top_symbols": top("symbol"), "top_refused_clients": top("refused_client"),
                   "top_refused_sender_domains": top("refused_domain")}
        totals: dict[str, int] = {}
        for row in per_hour:
            totals[row["action"]] = totals.get(row["action"], 0) + row["count"]
        out["totals"] = totals
        return out

    def quarantine_items(self, *, recipient: Optional[str] = None, since: Optional[float] = None, limit: int = 100,
                         offset: int = 0) -> list[dict]:
        """What is in quarantine and not yet expired, newest first."""
        from sqlalchemy import select

        q, r = self.t["quarantine"], self.t["recipients"]
        stmt = select(q).where(q.c.expires > self.clock())
        if since is not None:
            stmt = stmt.where(q.c.ts >= since)
        if recipient:
            addr = recipient.strip().lower()
            stmt = stmt.where(q.c.queue_id.in_(select(r.c.queue_id).where(r.c.address == addr)))
        stmt = stmt.order_by(q.c.ts.desc(), q.c.id.desc()).limit(max(0, int(limit))).offset(max(0, int(offset)))
        with self._conn() as conn:
            return [{"queue_id": x.queue_id, "ts": x.ts, "subject": x.subject, "sender": x.sender,
                     "recipients": json.loads(x.recipients or "[]"), "score": x.score,
                     "symbols": json.loads(x.symbols or "[]"), "reason": x.reason, "expires": x.expires,
                     "node": x.node} for x in conn.execute(stmt)]

    def verdicts(self, since: float, until: float) -> list[tuple[str, float, str, Optional[str]]]:
        """(queue_id, score, action, label) of every judged message in [since, until)."""
        from sqlalchemy import select

        m = self.t["messages"]
        stmt = (select(m.c.queue_id, m.c.score, m.c.action, m.c.label)
                .where(m.c.ts >= since, m.c.ts < until, m.c.score.is_not(None)).order_by(m.c.ts))
        with self._conn() as conn:
            return [(r.queue_id, float(r.score), r.action, r.label) for r in conn.execute(stmt)]

    def audit(self, *, since: Optional[float] = None, limit: int = 100) -> list[dict]:
        from sqlalchemy import select

        a = self.t["audit"]
        stmt = select(a)
        if since is not None:
            stmt = stmt.where(a.c.ts >= since)
        stmt = stmt.order_by(a.c.ts.desc(), a.c.id.desc()).limit(max(0, int(limit)))
        with self._conn() as conn:
            return [_audit(r._mapping) for r in conn.execute(stmt)]

    def prune(self, now: float) -> int:
        """Drops what is older than the retention, and expired quarantine
        entries; returns how many messages and quarantine entries went.
        Deletes in chunks, each its own short transaction, so the receiver's
        writer never waits long for the lock."""
        from sqlalchemy import select

        self.ensure_schema()
        t = self.t
        cutoff = now - self.retention
        removed = 0
        jobs = [(t["messages"], t["messages"].c.ts < cutoff, True),
                (t["recipients"], t["recipients"].c.ts < cutoff, False),
                (t["rdomains"], t["rdomains"].c.ts < cutoff, False),
                (t["deliveries"], t["deliveries"].c.ts < cutoff, False),
                (t["events"], t["events"].c.ts < cutoff, False),
                (t["audit"], t["audit"].c.ts < cutoff, False),
                (t["quarantine"], t["quarantine"].c.expires <= now, True)]
        for table, cond, counted in jobs:
            while True:
                with self.engine.begin() as conn:
                    ids = select(table.c.id).where(cond).limit(CHUNK).scalar_subquery()
                    n = conn.execute(table.delete().where(table.c.id.in_(ids))).rowcount
                if counted:
                    removed += n
                if n < CHUNK:
                    break
        h = t["hourly"]
        with self.engine.begin() as conn:  # hours (days) that ended before the cutoff
            conn.execute(h.delete().where(h.c.hour_ts + HOUR <= cutoff))
            conn.execute(t["daily_top"].delete().where(t["daily_top"].c.day_ts + DAY <= cutoff))
            conn.execute(t["rolled_days"].delete().where(t["rolled_days"].c.day_ts + DAY <= cutoff))
        return removed

    # --- for the metrics and the bench ----------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _merge(old: dict, new: dict) -> dict:
    """A later fact about the same queue id: a verdict wins over refusals
    before it; recipients accumulate; the first ts stays."""
    out = dict(old)
    for k, v in new.items():
        if k == "rcpts":
            out["rcpts"] = list(dict.fromkeys(list(old.get("rcpts", ())) + list(v)))
        elif k == "ts":
            out["ts"] = min(old["ts"], v)
        elif k in ("action", "stage", "reply", "final"):
            if new.get("final") or not old.get("final"):
                out[k] = v
        elif v not in (None, "", [], 0) or k not in old:
            out[k] = v
    return out


def _stored(mm) -> dict:
    return {"queue_id": mm["queue_id"], "ts": mm["ts"], "client": mm["client"], "helo": mm["helo"],
            "tls": bool(mm["tls"]), "auth_user": mm["auth_user"], "sender": mm["sender"],
            "rcpts": json.loads(mm["recipients"] or "[]"), "message_id": mm["message_id"],
            "subject": mm["subject"], "size": mm["size"], "score": mm["score"], "required": mm["required"],
            "action": mm["action"], "stage": mm["stage"], "reply": mm["reply"],
            "symbols": json.loads(mm["symbols"] or "[]"), "final": mm["score"] is not None, "node": ""}


def _row(rec: dict) -> dict:
    sender = (rec["sender"] or "").lower()
    row = {"queue_id": rec["queue_id"], "ts": rec["ts"], "client": rec["client"], "helo": rec["helo"],
           "tls": rec["tls"], "auth_user": rec["auth_user"], "sender": sender, "sender_domain": _domain(sender),
           "recipients": json.dumps([a.lower() for a in dict.fromkeys(rec["rcpts"])]),
           "message_id": (rec["message_id"] or None) and rec["message_id"][:998], "subject": rec["subject"],
           "size": int(rec["size"] or 0), "score": rec["score"], "required": rec["required"],
           "action": rec["action"], "stage": rec["stage"], "reply": rec["reply"],
           "symbols": json.dumps(rec["symbols"])}
    row["node"] = rec.get("node") or ""
    return row


def _contributions(rec: dict) -> collections.Counter:
    """What one message adds to the per-hour counts."""
    h = _hour(rec["ts"])
    c = collections.Counter({("action", h, rec["action"]): 1})
    for name in dict.fromkeys(s["name"] for s in rec["symbols"]):
        c[("symbol", h, name)] += 1
    if rec["action"] in REFUSED:
        if rec["client"]:
            c[("refused_client", h, rec["client"])] += 1
        domain = _domain(rec["sender"] or "")
        if domain:
            c[("refused_domain", h, domain)] += 1
    return c


def _summary(mm) -> dict:
    return {"queue_id": mm["queue_id"], "ts": mm["ts"], "node": mm["node"], "client": mm["client"],
            "sender": mm["sender"], "recipients": json.loads(mm["recipients"] or "[]"), "subject": mm["subject"],
            "message_id": mm["message_id"], "size": mm["size"], "score": mm["score"], "required": mm["required"],
            "action": mm["action"], "stage": mm["stage"], "reply": mm["reply"], "label": mm["label"]}


def _audit(mm) -> dict:
    return {"ts": mm["ts"], "node": mm["node"], "actor": mm["actor"], "action": mm["action"],
            "target": mm["target"], "detail": mm["detail"], "source_ip": mm["source_ip"]}
