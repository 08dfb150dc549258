"""The transaction runner: judging stages, committing only for a client still there."""

import ipaddress
import logging

from twisted.internet import defer, task

from gateway.events import ClientGone, EventSink, MessageAnswered, StageRefused
from gateway.headers import Finisher
from gateway.pipeline import Pipeline
from gateway.plugins import Check
from gateway.records import Action, Envelope, Recipient, Result, Session, Stage, Transaction
from gateway.runtime import Runtime
from gateway.transaction import SPOOL_TROUBLE, TransactionRunner
from rules.scoring import Scorer
from tests.gateway.test_smtp import HAM, make_config


class Listed(Check):
    name, stage = "listed", Stage.MAIL

    def check(self, txn):
        return [Result("SENDER_LISTED", 0.0, "blocked sender", refuse="blocklist")]


class Queue:
    def __init__(self, fail=False):
        self.queued, self.quarantined, self.fail = [], [], fail

    def enqueue(self, entry, data):
        if self.fail:
            return defer.fail(OSError(28, "No space left on device"))
        self.queued.append((entry, data))
        return defer.succeed(None)

    def quarantine(self, entry, data, verdict):
        self.quarantined.append((entry, data))
        return defer.succeed(None)


def runner(checks=(), queue=None):
    config = make_config()
    clock = task.Clock()
    runtime = Runtime(config, Pipeline(list(checks)), Scorer.from_config(config),
                      Finisher(config.server.hostname, config.spam.subject_tag), frozenset(config.relay.domains),
                      tuple(ipaddress.ip_network(n) for n in config.relay.trusted_networks))
    events = []
    return TransactionRunner(runtime, clock, queue or Queue(), EventSink([events.append])), events


def txn_with_message(r):
    session = Session(queue_id="Q1", peer_ip="192.0.2.10", helo="client.sender.test", esmtp=True)
    envelope = Envelope(queue_id="Q1", sender="a@sender.test", recipients=[Recipient("bob@example.test",
                                                                                     "example.test")])
    txn = Transaction(session, envelope)
    r.message(txn, HAM, rdns="client.sender.test")
    return txn


def fired(d):
    got = []
    d.addBoth(got.append)
    assert got, "not answered"
    return got[0]


def test_a_refused_sender_is_an_event_and_a_reply():
    r, events = runner([Listed()])
    txn = Transaction(Session("Q1", "192.0.2.10"), Envelope("Q1", "bad@sender.test"))
    reply = fired(r.judge_mail(txn))
    assert reply.code == 554
    assert isinstance(events[0], StageRefused) and events[0].stage == "mail"


def test_accepted_message_is_committed_with_our_received_header():
    queue = Queue()
    r, events = runner(queue=queue)
    txn = txn_with_message(r)
    verdict = fired(r.judge(txn))
    assert verdict.action is Action.ACCEPT
    reply = fired(r.commit(txn, verdict))
    assert reply.code == 250 and "Q1" in reply.text
    entry, data = queue.queued[0]
    assert data.startswith(b"Received: from client.sender.test (client.sender.test [192.0.2.10])")
    assert isinstance(events[-1], MessageAnswered) and events[-1].reply is reply


def test_nothing_is_committed_for_a_client_that_left():
    queue = Queue()
    r, events = runner(queue=queue)
    txn = txn_with_message(r)
    verdict = fired(r.judge(txn))
    txn.session.closed = True
    assert fired(r.commit(txn, verdict)) is None
    assert queue.queued == [] and isinstance(events[-1], ClientGone)


def test_a_spool_failure_is_a_451():
    r, events = runner(queue=Queue(fail=True))
    txn = txn_with_message(r)
    assert fired(r.commit(txn, fired(r.judge(txn)))) is SPOOL_TROUBLE


def test_helo_results_count_once_in_the_verdict():
    r, _ = runner()
    txn = txn_with_message(r)
    txn.session.helo_results = [Result("HELO_X", 3.0)]
    verdict = fired(r.judge(txn))
    assert verdict.score == 3.0 and verdict.symbols == ["HELO_X"]


def test_a_failing_subscriber_is_logged_not_raised(caplog):
    def broken(event):
        raise RuntimeError("subscriber exploded")

    seen = []
    sink = EventSink([broken, seen.append])
    with caplog.at_level(logging.ERROR):
        sink.emit("fact")
    assert seen == ["fact"] and "subscriber exploded" in caplog.text
