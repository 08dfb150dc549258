"""The durable spool: 250 is sent only after a message is here.

Layout under the queue dir::

    tmp/             files being written; removed at start-up
    messages/ID      one line of envelope JSON, then the message bytes as they
                     will be delivered - written once, never changed
    envelopes/ID     the envelope with its delivery state (JSON), written
                     only once an attempt has changed it; it wins over the
                     first line of the message file
    quarantine/ID    quarantined message + ID.json verdict

Changes to a message's envelope (a delivery attempt's outcome, ``mailgate
queue hold/release/delete``) are made under ``Spool.locked``, an flock on
its message file, so two processes never overwrite each other's change.

A message is committed by one rename: the file is written in tmp/, fsynced,
renamed into messages/, and the directory fsynced.  A crash before the rename
leaves only a tmp file, which start-up removes: half a message is never
delivered.  One file and two fsyncs per message keep the disk from being the
bottleneck under load.  Every method here blocks; the gateway calls them
through a thread pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

PENDING, SENT, FAILED = "pending", "sent", "failed"


def new_queue_id(now: Optional[float] = None) -> str:
    """Sortable by arrival, unique without coordination: time + randomness."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:014X}{secrets.token_hex(3).upper()}"


@dataclass
class RecipientState:
    address: str
    status: str = PENDING
    code: int = 0
    reply: str = ""


@dataclass
class QueueEntry:
    queue_id: str
    sender: str
    recipients: list[RecipientState]
    arrival: float
    client: str = ""
    helo: str = ""
    size: int = 0
    attempts: int = 0
    next_try: float = 0.0
    last_error: str = ""
    held: bool = False
    bounce_of: str = ""  # set on our own bounces: never bounce a bounce
    # the client sent MAIL FROM:<..> SMTPUTF8 (RFC 6531): the next hop must offer it too.
    # Entries written before this field existed read as False
    smtputf8: bool = False
    verdict: dict = field(default_factory=dict)

    @property
    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status == PENDING]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "QueueEntry":
        raw = json.loads(data)
        raw["recipients"] = [RecipientState(**r) for r in raw["recipients"]]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def fsync_dir(path: str) -> None:
    """Makes renames and unlinks in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.tmp = os.path.join(self.root, "tmp")
        self.messages = os.path.join(self.root, "messages")
        self.envelopes = os.path.join(self.root, "envelopes")
        self.quarantine = os.path.join(self.root, "quarantine")
        for d in (self.tmp, self.messages, self.envelopes, self.quarantine):
            os.makedirs(d, exist_ok=True)

    # --- writing -----------------------------------------------------------

    def _write_durably(self, path: str, data: bytes) -> None:
        tmp = os.path.join(self.tmp, f"{os.path.basename(path)}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)

    def store(self, entry: QueueEntry, data: bytes) -> None:
        """Commit a new message; returns only once it survives a crash."""
        self._write_durably(os.path.join(self.messages, entry.queue_id), entry.to_json() + b"\n" + data)
        fsync_dir(self.messages)

    def update(self, entry: QueueEntry) -> None:
        self._write_durably(os.path.join(self.envelopes, entry.queue_id), entry.to_json())
        fsync_dir(self.envelopes)

    def remove(self, queue_id: str) -> None:
        """Message file first: it is the commit record.  No directory fsync:
        if a crash undoes the unlink the message is delivered again, a
        duplicate that SMTP allows, never a loss."""
        for d in (self.messages, self.envelopes):
            try:
                os.unlink(os.path.join(d, queue_id))
            except FileNotFoundError:
                pass

    @contextlib.contextmanager
    def locked(self, queue_id: str) -> Iterator[Optional[QueueEntry]]:
        """The message's current entry (None: not in the queue), held
        exclusively against other processes until the block ends."""
        if not _valid_id(queue_id):
            yield None
            return
        try:
            fd = os.open(os.path.join(self.messages, queue_id), os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.entry(queue_id)
        finally:
            os.close(fd)  # releases the lock

    # --- reading -----------------------------------------------------------

    def read(self, queue_id: str) -> bytes:
        with open(os.path.join(self.messages, queue_id), "rb") as f:
            f.readline()  # the envelope line
            return f.read()

    def entry(self, queue_id: str) -> Optional[QueueEntry]:
        if not _valid_id(queue_id):
            return None
        try:
            with open(os.path.join(self.messages, queue_id), "rb") as f:
                first = f.readline()
        except FileNotFoundError:
            return None
        try:
            with open(os.path.join(self.envelopes, queue_id), "rb") as f:
                return QueueEntry.from_json(f.read())
        except FileNotFoundError:
            return QueueEntry.from_json(first)

    def entries(self) -> Iterator[QueueEntry]:
        for name in sorted(os.listdir(self.messages)):
            e = self.entry(name)
            if e is not None:
                yield e

    def clean_tmp(self) -> None:
        """Unfinished writes of a process that died.  Only the process that
        writes (the SMTP side) may call this, and only before it listens."""
        for name in os.listdir(self.tmp):
            os.unlink(os.path.join(self.tmp, name))

    def recover(self, clean_tmp: bool = True) -> list[QueueEntry]:
        """At start-up: drop unfinished writes and stale state; return the queue."""
        if clean_tmp:
            self.clean_tmp()
        committed = set(os.listdir(self.messages))
        for name in os.listdir(self.envelopes):
            if name not in committed:  # its message was delivered; the unlink of this was lost
                os.unlink(os.path.join(self.envelopes, name))
        return list(self.entries())

    # --- quarantine --------------------------------------------------------

    def quarantine_store(self, queue_id: str, data: bytes, meta: dict) -> None:
        self._write_durably(os.path.join(self.quarantine, queue_id), data)
        self._write_durably(os.path.join(self.quarantine, queue_id + ".json"), json.dumps(meta).encode())
        fsync_dir(self.quarantine)

    def quarantine_list(self) -> list[dict]:
        out = []
        for name in sorted(os.listdir(self.quarantine)):
            if name.endswith(".json"):
                meta = self.quarantine_meta(name[:-5])
                if meta is not None:
                    out.append(meta)
        return out

    def quarantine_meta(self, queue_id: str) -> Optional[dict]:
        if not _valid_id(queue_id):
            return None
        try:
            with open(os.path.join(self.quarantine, queue_id + ".json"), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def quarantine_read(self, queue_id: str) -> bytes:
        with open(os.path.join(self.quarantine, queue_id), "rb") as f:
            return f.read()

    def quarantine_remove(self, queue_id: str) -> None:
        for name in (queue_id + ".json", queue_id):
            try:
                os.unlink(os.path.join(self.quarantine, name))
            except FileNotFoundError:
                pass
        fsync_dir(self.quarantine)


def _valid_id(queue_id: str) -> bool:
    return bool(queue_id) and queue_id.isalnum() and len(queue_id) < 64
