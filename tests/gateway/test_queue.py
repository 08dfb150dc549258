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
    relay: str = "mx.example.test[192.0.2.1]:25"
    remote: bool = True  # a server said it (False: could not connect)
    tls: bool = False


def by_domain(recipient):
    return recipient.rpartition("@")[2]


class ScriptedDeliverer:
    """Answers each attempt from a script: one status per call for every recipient."""

    destination = staticmethod(by_domain)

    def __init__(self, *script):
        self.script = list(script)
        self.calls = []

    def deliver(self, queue_id, sender, recipients, data, arrival=None, smtputf8=False):
        self.calls.append((queue_id, sender, list(recipients), data))
        status = self.script.pop(0) if self.script else "sent"
        code = {"sent": 250, "deferred": 451, "failed": 550}[status]
        return defer.succeed([Outcome(r, status, code, f"{code} reply") for r in recipients])


def sync(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


def manager(tmp_path, deliverer, events=None, **settings):
    clock = task.Clock()
    clock.advance(1000)
    q = QueueManager(Spool(str(tmp_path)), deliverer, clock, sync,
                     QueueSettings(retry_min=60, retry_max=240, lifetime=1000, **settings), "mx.example.test",
                     events=events)
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
        def deliver(self, queue_id, sender, recipients, data, arrival=None, smtputf8=False):
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
        destination = staticmethod(by_domain)

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

    def deliver(self, queue_id, sender, recipients, data, arrival=None, smtputf8=False):
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


# -- per-destination slots and dead next hops (task.Clock) -------------------------------


class Answerable(ScriptedDeliverer):
    """Every attempt waits until the test answers it; calls are kept per recipient domain."""

    def __init__(self):
        super().__init__()
        self.open = []  # (domain, deferred)

    def deliver(self, queue_id, sender, recipients, data, arrival=None, smtputf8=False):
        self.calls.append((queue_id, sender, list(recipients), data))
        d = defer.Deferred()
        self.open.append((by_domain(recipients[0]), d))
        return d.addCallback(lambda o: [Outcome(r, *o) for r in recipients])

    def waiting(self, domain):
        return [d for dom, d in self.open if dom == domain and not d.called]

    def answer(self, domain, *outcome):
        for d in self.waiting(domain):
            d.callback(outcome)


REFUSED = ("deferred", 451, "4.4.1 connect to hung.test[192.0.2.9]:25: Connection refused", "", False)


def queued(q, clock, n, domain, first=0):
    for i in range(first, first + n):
        q.enqueue(QueueEntry(queue_id=f"Q{domain[:1].upper()}{i:03d}", sender="alice@sender.test",
                             recipients=[RecipientState(f"u{i}@{domain}")], arrival=clock.seconds()), b"msg")
    clock.advance(0)


def test_a_hung_destination_takes_its_own_slots_not_everyones(tmp_path):
    d = Answerable()
    q, clock = manager(tmp_path, d, delivery_concurrency=5, destination_concurrency=2)
    queued(q, clock, 10, "hung.test")
    queued(q, clock, 3, "ok.test")
    assert len(d.waiting("hung.test")) == 2  # its limit, though 5 slots exist
    assert len(d.waiting("ok.test")) == 2  # a group waiting for hung.test holds no global slot
    d.answer("ok.test", "sent", 250, "ok")
    assert len(d.waiting("ok.test")) == 1  # the third, as a slot came free
    d.answer("ok.test", "sent", 250, "ok")
    assert [e.queue_id for e in q.spool.entries()] == [f"QH{i:03d}" for i in range(10)]
    assert len(d.waiting("hung.test")) == 2


def test_the_global_limit_still_holds(tmp_path):
    d = Answerable()
    q, clock = manager(tmp_path, d, delivery_concurrency=3, destination_concurrency=20)
    queued(q, clock, 4, "a.test")
    queued(q, clock, 4, "b.test")
    assert len(d.waiting("a.test")) + len(d.waiting("b.test")) == 3
    d.answer("a.test", "sent", 250, "ok")
    # round robin: b.test's waiting groups are not starved by a.test's
    assert len(d.waiting("b.test")) >= 1 and len(d.waiting("a.test")) + len(d.waiting("b.test")) == 3


def test_a_next_hop_failing_repeatedly_is_dead_for_a_while(tmp_path, caplog):
    import logging

    d = Answerable()
    q, clock = manager(tmp_path, d, destination_dead_after=3, destination_dead_time=30)
    queued(q, clock, 3, "hung.test")  # t=1000
    with caplog.at_level(logging.INFO):
        d.answer("hung.test", *REFUSED)
        assert "next_hop=hung.test status=dead for=30s failures=3" in caplog.text
        queued(q, clock, 2, "hung.test", first=3)  # new mail for it: deferred at once, no connection
    assert len(d.calls) == 3
    e = q.spool.entry("QH003")
    assert e.attempts == 1 and e.pending and e.next_try == 1060
    assert e.last_error.startswith("4.4.1 delivery to hung.test suspended for 30s: 3 failed connections in a row")
    assert "Connection refused" in e.last_error
    assert "to=u3@hung.test relay=none status=deferred code=451" in caplog.text
    # t=1060, past the dead time, all five due: one probe, the others wait for it
    clock.advance(60)
    assert len(d.waiting("hung.test")) == 1 and len(d.calls) == 4
    d.answer("hung.test", *REFUSED)  # dead again: the waiting four are deferred without connecting
    assert len(d.calls) == 4
    assert [e.attempts for e in q.spool.entries()] == [2] * 5
    assert q.spool.entry("QH004").last_error.startswith("4.4.1 delivery to hung.test suspended for 30s: 4 failed")
    # t=1180: the probe gets through, and the next hop has its full concurrency again
    clock.advance(120)
    assert len(d.waiting("hung.test")) == 1
    d.answer("hung.test", "sent", 250, "ok")
    assert len(d.waiting("hung.test")) == 4
    d.answer("hung.test", "sent", 250, "ok")
    assert list(q.spool.entries()) == []


def test_a_server_reply_is_not_a_failed_connection(tmp_path):
    d = Answerable()
    q, clock = manager(tmp_path, d, destination_dead_after=2)
    queued(q, clock, 3, "busy.test")
    d.answer("busy.test", "deferred", 451, "4.3.0 try later", "mx[192.0.2.1]:25", True)
    queued(q, clock, 1, "busy.test", first=3)
    assert len(d.waiting("busy.test")) == 1  # tried: a 4xx says the host is there


def test_stop_answers_groups_waiting_for_a_slot_and_leaves_them_untouched(tmp_path):
    d = Answerable()
    q, clock = manager(tmp_path, d, destination_concurrency=1)
    queued(q, clock, 3, "hung.test")
    stopped = q.stop()
    assert not stopped.called  # the one being tried
    d.answer("hung.test", "sent", 250, "ok")
    assert stopped.called and len(d.calls) == 1
    assert [(e.queue_id, e.attempts) for e in q.spool.entries()] == [("QH001", 0), ("QH002", 0)]


# -- nothing is stranded ----------------------------------------------------------------


def full_disk(*a, **kw):
    raise OSError(28, "No space left on device")


def test_an_outcome_that_cannot_be_saved_is_retried(tmp_path, monkeypatch, caplog):
    import logging

    d = ScriptedDeliverer("deferred", "deferred", "sent")
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock), b"msg")
    with caplog.at_level(logging.ERROR, logger="mailgate.queue"):
        monkeypatch.setattr(q.spool, "update", full_disk)
        clock.advance(0)
    assert "queue_id=Q1a cannot record the attempt: [Errno 28] No space left on device; retry_in=60s" in caplog.text
    assert q.spool.entry("Q1a").attempts == 0  # the disk still has the state before the attempt
    clock.advance(60)
    assert len(d.calls) == 2  # tried again, though nothing could be written
    monkeypatch.undo()  # space again
    clock.advance(60)
    assert len(d.calls) == 3 and q.spool.entry("Q1a") is None


def test_a_bounce_that_cannot_be_spooled_is_retried(tmp_path, monkeypatch):
    d = ScriptedDeliverer("failed", "failed")
    q, clock = manager(tmp_path, d)
    q.enqueue(entry(clock), b"Subject: x\r\n\r\nx\r\n")
    monkeypatch.setattr(q.spool, "store", full_disk)
    clock.advance(0)
    assert q.spool.entry("Q1a").pending  # not bounced, not lost
    monkeypatch.undo()
    clock.advance(60)
    assert q.spool.entry("Q1a") is None and [c[1] for c in d.calls] == ["alice@sender.test"] * 2 + [""]


def test_an_attempt_that_breaks_is_retried(tmp_path, monkeypatch):
    d = ScriptedDeliverer("sent")
    q, clock = manager(tmp_path, d)
    q.spool.store(entry(clock), b"msg")
    monkeypatch.setattr(q.spool, "read", full_disk)  # EIO, say
    q.schedule("Q1a", 0)
    clock.advance(0)
    assert d.calls == []
    monkeypatch.undo()
    clock.advance(60)
    assert len(d.calls) == 1 and q.spool.entry("Q1a") is None


def test_the_sweep_schedules_what_nothing_would_try(tmp_path, caplog):
    import logging

    d = ScriptedDeliverer("sent", "sent")
    q, clock = manager(tmp_path, d, sweep_interval=30)
    q.start()
    # in the spool but never scheduled: a lost "look now" from the receiving side
    q.spool.store(entry(clock), b"msg")
    held = entry(clock, sender="held@sender.test")
    held.held = True
    q.spool.store(held, b"msg")
    with caplog.at_level(logging.WARNING, logger="mailgate.queue"):
        clock.advance(29)
        assert d.calls == []
        clock.advance(1)
    assert [c[0] for c in d.calls] == ["Q1a"] and q.spool.entry("Q1a") is None
    assert "queue sweep rescheduled=1" in caplog.text
    clock.advance(30)
    assert len(d.calls) == 1  # the held one stays held


def test_the_sweep_leaves_scheduled_and_running_attempts_alone(tmp_path):
    d = Answerable()
    q, clock = manager(tmp_path, d, sweep_interval=30)
    q.start()
    queued(q, clock, 1, "a.test")
    queued(q, clock, 1, "b.test")
    d.answer("b.test", "deferred", 451, "4.3.0 later")  # scheduled again in 60 s
    clock.advance(30)  # a sweep while a.test's is still being tried and b.test's waits for its time
    assert len(d.calls) == 2
    clock.advance(29)
    assert len(d.calls) == 2
    clock.advance(1)
    assert len(d.calls) == 3  # b.test's retry, once


# --- what the queue tells (gateway.events): the one writer of delivery facts -----------


def collecting():
    from gateway.events import EventSink

    got = []
    return got, EventSink([got.append])


def of(events, kind):
    return [e for e in events if isinstance(e, kind)]


def test_an_attempt_and_its_deferral_are_told_then_the_delivery(tmp_path):
    from gateway.events import Deferred, DeliveryAttempted, RecipientOutcome

    events, sink = collecting()
    d = ScriptedDeliverer("deferred", "sent")
    q, clock = manager(tmp_path, d, events=sink)
    e = entry(clock)
    e.arrival -= 5  # it arrived 5 s before this attempt
    q.enqueue(e, b"msg")
    clock.advance(0)
    (attempt,) = of(events, DeliveryAttempted)
    assert (attempt.queue_id, attempt.next_hop, attempt.route, attempt.tls) == (
        "Q1a", "mx.example.test[192.0.2.1]:25", "example.test", False)
    assert attempt.outcomes == (RecipientOutcome("bob@example.test", "deferred", 451, "451 reply"),)
    assert attempt.ts == 1000 and attempt.delay == 5
    (deferred,) = of(events, Deferred)
    assert (deferred.recipients, deferred.next_try, deferred.attempts, deferred.reason) == (
        ("bob@example.test",), 1060, 1, "451 reply")
    clock.advance(60)
    assert [a.outcomes[0].status for a in of(events, DeliveryAttempted)] == ["deferred", "sent"]
    assert len(of(events, Deferred)) == 1 and of(events, DeliveryAttempted)[1].delay == 65


def test_a_bounce_is_told_with_its_dsn_id_once_spooled_and_a_suppressed_one_without(tmp_path):
    from gateway.events import Bounced

    events, sink = collecting()
    d = ScriptedDeliverer("failed", "sent", "failed")
    q, clock = manager(tmp_path, d, events=sink)
    q.enqueue(entry(clock), b"Subject: x\r\n\r\nx\r\n")
    clock.advance(0)
    (bounced,) = of(events, Bounced)
    assert (bounced.queue_id, bounced.recipients, bounced.reason, bounced.sender) == (
        "Q1a", ("bob@example.test",), "550 reply", "alice@sender.test")
    dsn_call = d.calls[1]
    assert bounced.bounce_id and dsn_call[0] == bounced.bounce_id  # the DSN that went out is the one named
    q.enqueue(entry(clock, sender=""), b"x")
    clock.advance(0)
    suppressed = of(events, Bounced)[1]
    assert (suppressed.queue_id, suppressed.bounce_id, suppressed.sender) == ("Q1N", "", "")


def test_a_dead_next_hop_is_an_attempt_that_tried_nothing(tmp_path):
    from gateway.events import DeliveryAttempted

    events, sink = collecting()
    d = Answerable()
    q, clock = manager(tmp_path, d, events=sink, destination_dead_after=3, destination_dead_time=30)
    queued(q, clock, 3, "hung.test")
    d.answer("hung.test", *REFUSED)
    queued(q, clock, 1, "hung.test", first=3)
    skipped = [a for a in of(events, DeliveryAttempted) if a.queue_id == "QH003"]
    (attempt,) = skipped
    assert (attempt.next_hop, attempt.route) == ("none", "hung.test")
    assert attempt.outcomes[0].reply.startswith("4.4.1 delivery to hung.test suspended")
