"""The transaction runner: judging stages, committing only for a client still there."""

import ipaddress

from twisted.internet import defer, task

from gateway.events import (ClientGone, EventSink, MessageAnswered, Quarantined, Spooled, StageJudged,
                            StageRefused)
from gateway.headers import Finisher
from gateway.pipeline import Pipeline
from gateway.plugins import Check, Symbol, SymbolTable
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


def runner(checks=(), queue=None, symbols=None):
    config = make_config()
    clock = task.Clock()
    runtime = Runtime(config, Pipeline(list(checks)), Scorer.from_config(config, symbols),
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


def test_a_refused_sender_is_an_event_and_a_reply_naming_the_queue_id():
    r, events = runner([Listed()])
    txn = Transaction(Session("Q1", "192.0.2.10"), Envelope("Q1", "bad@sender.test"))
    reply = fired(r.judge_mail(txn))
    assert (reply.code, reply.enhanced, reply.text) == (554, "5.7.1", "Access denied (queue id Q1)")
    judged, refused = events
    assert isinstance(judged, StageJudged) and judged.stage == "mail" and judged.envelope is txn.envelope
    assert [r.symbol for r in judged.records] == ["SENDER_LISTED"]
    assert [t.check for t in judged.timings] == ["listed"] and judged.timings[0].seconds >= 0
    assert isinstance(refused, StageRefused) and refused.stage == "mail" and refused.reply is reply


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
    spooled, answered = events[-2:]
    assert isinstance(spooled, Spooled) and (spooled.queue_id, spooled.size) == ("Q1", len(data))
    assert isinstance(answered, MessageAnswered) and answered.reply is reply and answered.verdict is verdict
    # what names the message in the log and the tracking store, without a parse of their own
    assert (answered.message.message_id, answered.message.subject) == ("<1@sender.test>", "hello")


def test_nothing_is_committed_for_a_client_that_left():
    queue = Queue()
    r, events = runner(queue=queue)
    txn = txn_with_message(r)
    verdict = fired(r.judge(txn))
    txn.session.closed = True
    assert fired(r.commit(txn, verdict)) is None
    assert queue.queued == [] and isinstance(events[-1], ClientGone)


def test_a_spool_failure_is_a_451_naming_the_queue_id_and_nothing_is_spooled():
    r, events = runner(queue=Queue(fail=True))
    txn = txn_with_message(r)
    reply = fired(r.commit(txn, fired(r.judge(txn))))
    assert (reply.code, reply.enhanced, reply.text) == (451, "4.3.0", f"{SPOOL_TROUBLE.text} (queue id Q1)")
    assert not any(isinstance(e, (Spooled, Quarantined)) for e in events)
    assert isinstance(events[-1], MessageAnswered) and events[-1].reply is reply


def test_helo_results_count_once_in_the_verdict():
    r, _ = runner()
    txn = txn_with_message(r)
    txn.session.helo_results = [Result("HELO_X", 3.0)]
    verdict = fired(r.judge(txn))
    assert verdict.score == 3.0 and verdict.symbols == ["HELO_X"]




class Scored(Check):
    stage = Stage.DATA

    def __init__(self, *results, name="scored"):
        self.name, self.results = name, list(results)

    def check(self, txn):
        return self.results


SYMBOLS = SymbolTable([Symbol("SPAMMY", 20.0, "test", "Says buy now in capitals"),
                       Symbol("LISTED", 0.0, "test", "Sender on the local block list")])


def test_a_spam_refused_at_data_names_the_queue_id_and_every_hit_its_description():
    queue = Queue()
    r, events = runner([Scored(Result("SPAMMY", 20.0, "BUY NOW"))], queue, SYMBOLS)
    txn = txn_with_message(r)
    verdict = fired(r.judge(txn))
    reply = fired(r.commit(txn, verdict))
    assert (reply.code, reply.enhanced, reply.text) == (554, "5.7.1", "Message refused as spam (queue id Q1)")
    assert queue.queued == [] and queue.quarantined == []
    judged, answered = events
    assert isinstance(judged, StageJudged) and judged.stage == "data" and judged.timings[0].check == "scored"
    assert isinstance(answered, MessageAnswered) and answered.reply is reply
    (hit,) = answered.verdict.results
    assert (hit.symbol, hit.score, hit.detail, hit.description) == ("SPAMMY", 20.0, "BUY NOW",
                                                                     "Says buy now in capitals")
    assert answered.verdict.action is Action.REJECT


def test_a_quarantined_message_is_told_once_it_is_durable():
    queue = Queue()
    r, events = runner([Scored(Result("VIRUS_FOUND", 100.0, "Eicar", refuse="quarantine"))], queue)
    txn = txn_with_message(r)
    reply = fired(r.commit(txn, fired(r.judge(txn))))
    assert reply.code == 250 and len(queue.quarantined) == 1
    quarantined = next(e for e in events if isinstance(e, Quarantined))
    assert (quarantined.queue_id, quarantined.reason) == ("Q1", "VIRUS_FOUND")
    assert not any(isinstance(e, Spooled) for e in events)
    assert events.index(quarantined) < len(events) - 1 and isinstance(events[-1], MessageAnswered)


def test_a_refused_recipient_is_named_with_the_queue_id():
    class Unknown(Check):
        name, stage = "unknown", Stage.RCPT

        def check(self, txn):
            return [Result("RCPT_UNKNOWN", 0.0, txn.rcpt.address, refuse="unknown_user")]

    r, events = runner([Unknown()])
    txn = Transaction(Session("S1", "192.0.2.10"), Envelope("Q2", "a@sender.test"),
                      rcpt=Recipient("nobody@example.test", "example.test"))
    reply = fired(r.judge_rcpt(txn))
    assert reply.text == "<nobody@example.test>: Recipient address rejected: User unknown (queue id Q2)"
    judged, refused = events
    assert judged.stage == "rcpt" and judged.rcpt == "nobody@example.test"
    assert refused.rcpt == "nobody@example.test" and refused.reply is reply


def test_a_stage_without_checks_tells_nothing():
    r, events = runner()
    txn = Transaction(Session("Q1", "192.0.2.10"), Envelope("Q1", "a@sender.test"))
    assert fired(r.judge_mail(txn)) is None and events == []
