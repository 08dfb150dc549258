"""Queue manager: retries with backoff, lifetime, bounces; time from task.Clock."""

import os
from dataclasses import dataclass

from twisted.internet import defer, task

from gateway.config import QueueSettings
from gateway.queue import QueueManager
from gateway.spool import QueueEntry, RecipientState, Spool


@dataclass
class Outcome:
    recipient: str
    status: str
    code: int
    reply: str


class ScriptedDeliverer:
    """Answers each attempt from a script: one status per call for every recipient."""

    def __init__(self, *script):
        self.script = list(script)
        self.calls = []

    def deliver(self, queue_id, sender, recipients, data, arrival=None):
        self.calls.append((queue_id, sender, list(recipients), data))
        status = self.script.pop(0) if self.script else "sent"
        code = {"sent": 250, "deferred": 451, "failed": 550}[status]
        return defer.succeed([Outcome(r, status, code, f"{code} reply") for r in recipients])


def sync(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


def manager(tmp_path, deliverer, **settings):
    clock = task.Clock()
    clock.advance(1000)
    q = QueueManager(Spool(str(tmp_path)), deliverer, clock, sync,
                     QueueSettings(retry_min=60, retry_max=240, lifetime=1000, **settings), "mx.example.test")
    return q, clock


def entry(clock, sender="alice@sender.test", rcpts=("bob@example.test",)):
    return QueueEntry(queue_id=f"Q{len(rcpts)}{sender[:1] or 'N'}", sender=sender,
                      recipients=[RecipientState(r) for r in rcpts], arrival=clock.seconds())


def test_delivered_message_leaves_the_queue(tmp_path):
    d = ScriptedDeliverer("sent")
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock), b"msg")
    clock.advance(0)
    assert d.calls[0][2:] == (["bob@example.test"], b"msg")
    assert list(q.spool.entries()) == []


def test_temporary_failure_retries_with_backoff(tmp_path):
    d = ScriptedDeliverer("deferred", "deferred", "sent")
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock), b"msg")
    clock.advance(0)
    e = q.spool.entry("Q1a")
    assert e.attempts == 1 and e.next_try == clock.seconds() + 60 and e.pending
    clock.advance(59)
    assert len(d.calls) == 1
    clock.advance(1)
    assert len(d.calls) == 2
    clock.advance(119)
    assert len(d.calls) == 2  # backoff doubled to 120 s
    clock.advance(1)
    assert len(d.calls) == 3 and q.spool.entry("Q1a") is None


def test_permanent_failure_bounces_to_the_sender_only_for_that_recipient(tmp_path):
    class Split(ScriptedDeliverer):
        def deliver(self, queue_id, sender, recipients, data, arrival=None):
            self.calls.append((queue_id, sender, list(recipients), data))
            return defer.succeed([Outcome(r, "failed" if r.startswith("bob") else "sent", 550 if r.startswith("bob")
                                          else 250, "5.1.1 no such user" if r.startswith("bob") else "ok")
                                  for r in recipients])

    d = Split()
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock, rcpts=("bob@example.test", "carol@example.test")),
              b"From: alice@sender.test\r\nSubject: hi\r\n\r\nx\r\n")
    clock.advance(0)
    bounce_call = d.calls[1]
    assert bounce_call[1] == "" and bounce_call[2] == ["alice@sender.test"]
    assert b"bob@example.test" in bounce_call[3] and b"multipart/report" in bounce_call[3]


def test_no_bounce_to_the_null_sender_and_no_bounce_of_a_bounce(tmp_path):
    d = ScriptedDeliverer("failed")
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock, sender=""), b"x")
    clock.advance(0)
    assert len(d.calls) == 1 and list(q.spool.entries()) == []


def test_lifetime_expiry_bounces(tmp_path):
    d = ScriptedDeliverer(*["deferred"] * 10)
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock), b"Subject: x\r\n\r\nx\r\n")
    for _ in range(12):
        clock.advance(240)
    senders = [c[1] for c in d.calls]
    assert "" in senders  # the DSN went out
    assert q.spool.entry("Q1a") is None


def test_held_message_is_not_tried_and_resumes_after_restart(tmp_path):
    d = ScriptedDeliverer("deferred")
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock), b"x")
    clock.advance(0)
    e = q.spool.entry("Q1a")
    e.held = True
    q.spool.update(e)
    clock.advance(60)
    assert len(d.calls) == 1
    # a new manager over the same spool (a restart) resumes what is not held
    e.held = False
    q.spool.update(e)
    d2 = ScriptedDeliverer("sent")
    q2, clock2 = manager(tmp_path, d2)
    q2.start()
    clock2.advance(120)
    assert len(d2.calls) == 1 and q2.spool.entry("Q1a") is None


def test_stop_waits_for_attempts_under_way(tmp_path):
    pending = defer.Deferred()

    class Slow:
        def deliver(self, *a, **kw):
            return pending

    q, clock = manager(tmp_path, Slow())
    q.enqueue(entry(clock), b"x")
    clock.advance(0)
    stopped = q.stop()
    assert not stopped.called
    pending.callback([Outcome("bob@example.test", "sent", 250, "ok")])
    assert stopped.called


class HeldOpen(ScriptedDeliverer):
    """Every attempt waits until the test answers it."""

    def deliver(self, queue_id, sender, recipients, data, arrival=None):
        self.calls.append((queue_id, sender, list(recipients), data))
        self.pending = defer.Deferred()
        return self.pending.addCallback(lambda status: [Outcome(r, status, 451, "451 later") for r in recipients])


def test_hold_given_during_an_attempt_survives_its_outcome(tmp_path):
    d = HeldOpen()
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock), b"msg")
    clock.advance(0)
    with q.spool.locked("Q1a") as e:  # what `mailgate queue hold` does meanwhile
        e.held = True
        q.spool.update(e)
    d.pending.callback("deferred")
    saved = q.spool.entry("Q1a")
    assert saved.held and saved.attempts == 1 and saved.last_error == "451 later"
    clock.advance(10_000)
    assert len(d.calls) == 1  # held: not tried again


def test_delete_given_during_an_attempt_is_not_undone(tmp_path):
    d = HeldOpen()
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock), b"msg")
    clock.advance(0)
    q.spool.remove("Q1a")
    d.pending.callback("deferred")
    assert q.spool.entry("Q1a") is None
    assert os.listdir(q.spool.envelopes) == []  # no envelope left without its message
    clock.advance(10_000)
    assert len(d.calls) == 1
