"""The one service layer the web console, the digest links and the CLI act through.

Every change an admin (or a digest recipient) makes to the quarantine, the
queue or the Bayes model goes through ``Actions``, so each one is told to the
event sink as a typed event (``Released``, ``Deleted``, ``Learned``) and as an
``AdminAction`` naming who did it (``web:alice``, ``cli:root``,
``digest:bob@example.test``): the tracking store and the log learn of it from
there, never from the callers.

Every method blocks (spool files, fsync, the model file): the console calls
them in a thread, the CLI directly.  ``wake`` tells the running gateway that
the queue changed (SIGUSR1 from the CLI, ``queue.flush`` inside the gateway).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from gateway.errors import MailGateError
from gateway.events import AdminAction, Deleted, Learned, Released
from gateway.headers import field_name, field_value, split_message
from gateway.spool import QueueEntry, RecipientState, Spool, new_queue_id

# our verdict headers: a released copy must not be junked downstream for them
OUR_HEADERS = (b"x-spam-flag", b"x-spam-status", b"x-spam-score", b"x-spam-level")


class ActionError(MailGateError):
    """An action that cannot be done (no such message, unknown label): said to the admin as is."""


def untag_subject(value: bytes, subject_tag: str) -> bytes:
    """The subject as it was before the Finisher applied ``subject_tag`` (``SPAM*** %s``)."""
    prefix, _, suffix = subject_tag.partition("%s")
    p, s = prefix.strip().encode("utf-8"), suffix.strip().encode("utf-8")
    text = value.strip(b" \t\r\n")
    if not (p or s) or (p and not text.startswith(p)) or (s and not text.endswith(s)):
        return value  # never tagged: leave it exactly as it came
    if p:
        text = text[len(p):].lstrip(b" \t")
    if s:
        text = text[: -len(s)].rstrip(b" \t")
    return b" " + text + b"\r\n"


def released_copy(raw: bytes, subject_tag: str, by: str, original_id: str, now: float) -> bytes:
    """The message as delivered on release: without our subject tag and our
    X-Spam-* verdict headers (Exchange would junk it again for them), with
    ``X-MailGate-Released`` saying who released it and from where."""
    fields, body = split_message(raw)
    out = []
    for f in fields:
        name = field_name(f)
        if name in OUR_HEADERS:
            continue
        if name == b"subject":
            f = f.split(b":", 1)[0] + b":" + untag_subject(field_value(f), subject_tag)
        out.append(f)
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S +0000")
    note = f"X-MailGate-Released: by {by} on {stamp} from quarantine id {original_id}\r\n"
    return note.encode("utf-8", "replace") + b"".join(out) + body


def unreleased_copy(raw: bytes, subject_tag: str) -> bytes:
    """What the Bayes model learns: the message without what we added to it,
    so it learns the sender's words and not our verdict."""
    fields, body = split_message(raw)
    kept = []
    for f in fields:
        name = field_name(f)
        if name in OUR_HEADERS or name == b"x-mailgate-released":
            continue
        if name == b"subject":
            f = f.split(b":", 1)[0] + b":" + untag_subject(field_value(f), subject_tag)
        kept.append(f)
    return b"".join(kept) + body


class Learner:
    """Teaches the Bayes model one message at a time, as ``mailgate learn``
    does: load, learn, save atomically (the check reloads it by mtime).  One
    learn at a time per process (a lock) and across processes (an flock
    beside the model), so two admins never overwrite each other's lesson."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._lock = threading.Lock()

    def learn(self, raw: bytes, label: str) -> str:
        from classifiers.model import HAM, SPAM, BayesModel

        value = {"spam": SPAM, "ham": HAM}.get(label)
        if value is None:
            raise ActionError(f"learn: label must be spam or ham, not {label!r}")
        if not os.path.exists(self.model_path):
            raise ActionError(f"learn: no Bayes model at {self.model_path}; train one first (mailgate train)")
        with self._lock, self._file_lock():
            model = BayesModel.load(self.model_path)  # ModelError names the file and why
            outcome = model.learn(raw, value)
            if outcome != "same":
                model.save(self.model_path)
        return outcome

    @contextlib.contextmanager
    def _file_lock(self):
        fd = os.open(self.model_path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Done:
    """What an action did, in words for the admin (and ids for callers)."""

    text: str
    queue_id: str = ""  # the released copy's new queue id


class Actions:
    def __init__(self, spool: Spool, emit: Callable[[object], None], subject_tag: str = "SPAM*** %s",
                 learner: Optional[Learner] = None, wake: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time):
        self.spool = spool
        self.emit = emit
        self.subject_tag = subject_tag
        self.learner = learner
        self.wake = wake
        self.clock = clock

    def _audit(self, actor: str, action: str, target: str = "", detail: str = "", source_ip: str = "") -> None:
        self.emit(AdminAction(ts=self.clock(), actor=actor, action=action, target=target, detail=detail,
                              source_ip=source_ip))

    # --- quarantine --------------------------------------------------------

    def _quarantined(self, queue_id: str, what: str) -> dict:
        meta = self.spool.quarantine_meta(queue_id)
        if meta is None:
            raise ActionError(f"{what}: no message {queue_id!r} in quarantine")
        return meta

    def release(self, queue_id: str, actor: str, learn_ham: bool = False,
                recipients: Optional[Iterable[str]] = None, source_ip: str = "") -> Done:
        """Queue a clean copy for ``recipients`` (default: every one not yet
        released); the quarantined original goes once all have theirs."""
        meta = self._quarantined(queue_id, "release")
        raw = self.spool.quarantine_read(queue_id)
        done_before = set(meta.get("released_to") or [])
        waiting = [r for r in meta["recipients"] if r not in done_before]
        if recipients is not None:
            wanted = {r.lower() for r in recipients}
            chosen = [r for r in waiting if r.lower() in wanted]
            if not chosen:
                raise ActionError(f"release: {queue_id} has no unreleased recipient {', '.join(sorted(wanted))}")
        else:
            chosen = waiting
        if learn_ham:  # first: a model that cannot learn leaves the message where it is
            self._learn_raw(raw, "ham")
        now = self.clock()
        by = actor.split(":", 1)[1] if ":" in actor else actor
        data = released_copy(raw, self.subject_tag, by, queue_id, now)
        entry = QueueEntry(queue_id=new_queue_id(now), sender=meta["sender"],
                           recipients=[RecipientState(a) for a in chosen], arrival=now,
                           client=meta.get("client", ""), helo=meta.get("helo", ""), size=len(data))
        self.spool.store(entry, data)
        left = [r for r in waiting if r not in chosen]
        if left:
            meta = dict(meta, released_to=sorted(done_before | set(chosen)))
            self.spool.quarantine_store(queue_id, raw, meta)
        else:
            self.spool.quarantine_remove(queue_id)
        self.wake()
        self.emit(Released(queue_id=queue_id, ts=now, by=actor, learned_ham=learn_ham))
        if learn_ham:
            self.emit(Learned(queue_id=queue_id, ts=now, by=actor, label="ham"))
        self._audit(actor, "release_learn_ham" if learn_ham else "release", queue_id,
                    f"new queue id {entry.queue_id} to {','.join(chosen)}", source_ip)
        return Done(f"released {queue_id} as queue id {entry.queue_id}"
                    f"{' and learned it as ham' if learn_ham else ''}", entry.queue_id)

    def delete(self, queue_id: str, actor: str, source_ip: str = "") -> Done:
        self._quarantined(queue_id, "delete")
        self.spool.quarantine_remove(queue_id)
        now = self.clock()
        self.emit(Deleted(queue_id=queue_id, ts=now, by=actor, where="quarantine"))
        self._audit(actor, "delete", queue_id, "from quarantine", source_ip)
        return Done(f"deleted {queue_id} from quarantine")

    def learn(self, queue_id: str, actor: str, label: str, source_ip: str = "") -> Done:
        """Teach the model a quarantined (or still queued) message as ``label``; it stays where it is."""
        if self.spool.quarantine_meta(queue_id) is not None:
            raw = self.spool.quarantine_read(queue_id)
        elif self.spool.entry(queue_id) is not None:
            raw = self.spool.read(queue_id)
        else:
            raise ActionError(f"learn: no message {queue_id!r} in quarantine or the queue")
        outcome = self._learn_raw(raw, label)
        now = self.clock()
        self.emit(Learned(queue_id=queue_id, ts=now, by=actor, label=label))
        self._audit(actor, f"learn_{label}", queue_id, outcome, source_ip)
        return Done(f"learned {queue_id} as {label}" + (" (already learned so)" if outcome == "same" else ""))

    def _learn_raw(self, raw: bytes, label: str) -> str:
        if self.learner is None:
            raise ActionError("learn: no Bayes model is configured ([bayes] model)")
        return self.learner.learn(unreleased_copy(raw, self.subject_tag), label)

    # --- queue -------------------------------------------------------------

    def queue_hold(self, queue_id: str, actor: str, source_ip: str = "") -> Done:
        self._change(queue_id, "hold", lambda e: setattr(e, "held", True))
        self._audit(actor, "queue_hold", queue_id, "", source_ip)
        return Done(f"held {queue_id}")

    def queue_release(self, queue_id: str, actor: str, source_ip: str = "") -> Done:
        def release(e):
            e.held, e.next_try = False, 0

        self._change(queue_id, "release", release)
        self.wake()
        self._audit(actor, "queue_release", queue_id, "", source_ip)
        return Done(f"released {queue_id}")

    def queue_delete(self, queue_id: str, actor: str, source_ip: str = "") -> Done:
        self._change(queue_id, "delete", None)
        self.emit(Deleted(queue_id=queue_id, ts=self.clock(), by=actor, where="queue"))
        self._audit(actor, "queue_delete", queue_id, "", source_ip)
        return Done(f"deleted {queue_id}")

    def queue_flush(self, actor: str, source_ip: str = "") -> Done:
        ids = []
        for listed in self.spool.entries():
            with self.spool.locked(listed.queue_id) as e:
                if e is not None and not e.held:
                    e.next_try = 0
                    self.spool.update(e)
                    ids.append(e.queue_id)
        self.wake()
        self._audit(actor, "queue_flush", "", f"{len(ids)} message(s)", source_ip)
        return Done(f"flush: {len(ids)} message(s)")

    def _change(self, queue_id: str, what: str, change) -> None:
        # under the message's lock: a delivery attempt finishing now keeps this change
        if self.spool.entry(queue_id) is None:
            raise ActionError(f"queue {what}: no message {queue_id!r} in the queue")
        with self.spool.locked(queue_id) as entry:
            if entry is None:
                raise ActionError(f"queue {what}: message {queue_id!r} left the queue meanwhile")
            if change is None:
                self.spool.remove(queue_id)
            else:
                change(entry)
                self.spool.update(entry)

    # --- what admins sign in and out with ----------------------------------

    def audit(self, actor: str, action: str, target: str = "", detail: str = "", source_ip: str = "") -> None:
        """Record an action that changes no mail (login, login failure, logout)."""
        self._audit(actor, action, target, detail, source_ip)


def learner_for(config) -> Optional[Learner]:
    bayes = getattr(config, "bayes", None)
    return Learner(bayes.model) if bayes is not None and bayes.model else None


def cli_actions(config, spool: Spool, wake: Callable[[], None]) -> Actions:
    """The service layer for the CLI: the events go through the sink every
    process builds (``gateway.service.build_sink``: the log line, the
    tracking store), and the admin line is shown on stderr."""
    import logging
    import sys

    from gateway.service import build_sink

    admin = logging.getLogger("mailgate.admin")
    if not admin.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("audit: %(message)s"))
        admin.addHandler(handler)
        admin.setLevel(logging.INFO)
    return Actions(spool, build_sink(config).emit, config.spam.subject_tag, learner=learner_for(config), wake=wake)


def cli_actor() -> str:
    import getpass

    return f"cli:{os.environ.get('SUDO_USER') or getpass.getuser()}"
