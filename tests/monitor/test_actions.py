"""The service layer (monitor/actions.py) over a real spool, a real Finisher's
output and a real Bayes model file; and the CLI's queue/quarantine commands
going through it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.events import AdminAction, Deleted, Learned, Released
from gateway.headers import Finisher
from gateway.records import Action, Result, Verdict
from gateway.spool import QueueEntry, RecipientState, Spool
from monitor.actions import ActionError, Actions, Learner, released_copy, unreleased_copy, untag_subject

ORIGINAL = (b"Received: from x (x [192.0.2.1])\r\n\tby mx.gateway.test (MailGate) with ESMTP id Q1;\r\n"
            b"\tFri, 04 Dec 2026 10:00:00 +0000\r\n"
            b"From: Spammer <s@sender.test>\r\nTo: a@example.test\r\nSubject: cheap pills\r\n"
            b"Message-ID: <m1@sender.test>\r\n\r\nBuy now.\r\n")


def spam_verdict(score=12.0):
    return Verdict(Action.QUARANTINE, score, 5.0, [Result("GTUBE", score, "test string")], [])


def quarantined(spool: Spool, qid="0000000000AAAA01", rcpts=("a@example.test",), raw=ORIGINAL):
    finished = Finisher("mx.gateway.test").finish(raw, spam_verdict())
    assert b"Subject: SPAM*** " in finished and b"X-Spam-Flag: YES" in finished
    spool.quarantine_store(qid, finished, {"queue_id": qid, "sender": "s@sender.test", "recipients": list(rcpts),
                                           "arrival": 1.0, "client": "192.0.2.1", "helo": "x", "score": 12.0,
                                           "symbols": ["GTUBE"], "reasons": []})
    return qid


@pytest.fixture
def spool(tmp_path):
    return Spool(str(tmp_path / "queue"))


@pytest.fixture
def model(tmp_path):
    from classifiers.model import BayesModel

    path = str(tmp_path / "bayes.model")
    BayesModel().save(path)
    return path


@pytest.fixture
def events():
    return []


@pytest.fixture
def woken():
    return []


@pytest.fixture
def actions(spool, events, woken, model):
    return Actions(spool, events.append, "SPAM*** %s", learner=Learner(model), wake=lambda: woken.append(1),
                   clock=lambda: 1000.0)


def test_untag_subject_undoes_exactly_the_tag():
    assert untag_subject(b" SPAM*** cheap pills\r\n", "SPAM*** %s") == b" cheap pills\r\n"
    assert untag_subject(b" cheap pills\r\n", "SPAM*** %s") == b" cheap pills\r\n"  # never tagged: as it was
    assert untag_subject(b" cheap pills [SPAM]\r\n", "%s [SPAM]") == b" cheap pills\r\n"
    assert untag_subject(b" [S] x [/S]\r\n", "[S] %s [/S]") == b" x\r\n"


def test_released_copy_loses_our_tag_and_verdict_headers_and_names_who():
    finished = Finisher("mx.gateway.test").finish(ORIGINAL, spam_verdict())
    out = released_copy(finished, "SPAM*** %s", "alice", "Q1", 0.0)
    head = out.split(b"\r\n\r\n")[0]
    assert out.startswith(b"X-MailGate-Released: by alice on Thu, 01 Jan 1970 00:00:00 +0000 from quarantine id Q1\r\n")
    assert b"\r\nSubject: cheap pills\r\n" in head
    for name in (b"X-Spam-Flag", b"X-Spam-Status", b"X-Spam-Score", b"X-Spam-Level", b"SPAM***"):
        assert name not in out
    assert out.endswith(b"\r\n\r\nBuy now.\r\n")
    assert unreleased_copy(out, "SPAM*** %s") == ORIGINAL  # what Bayes learns: the sender's message


def test_release_queues_a_clean_copy_and_says_so(actions, spool, events, woken):
    qid = quarantined(spool)
    done = actions.release(qid, "web:alice", source_ip="127.0.0.1")
    assert spool.quarantine_meta(qid) is None
    entry = spool.entry(done.queue_id)
    assert [r.address for r in entry.recipients] == ["a@example.test"] and entry.sender == "s@sender.test"
    data = spool.read(done.queue_id)
    assert data.startswith(b"X-MailGate-Released: by alice ") and b"SPAM***" not in data
    assert b"X-Spam-" not in data
    assert woken == [1]
    assert events == [Released(qid, 1000.0, "web:alice", False),
                      AdminAction(1000.0, "web:alice", "release", qid,
                                  f"new queue id {done.queue_id} to a@example.test", "127.0.0.1")]


def test_release_for_one_recipient_keeps_the_others_held(actions, spool, events):
    qid = quarantined(spool, rcpts=("a@example.test", "b@example.test"))
    first = actions.release(qid, "digest:b@example.test", recipients=["B@example.test"])
    assert [r.address for r in spool.entry(first.queue_id).recipients] == ["b@example.test"]
    assert spool.quarantine_meta(qid)["released_to"] == ["b@example.test"]
    assert spool.read(first.queue_id).startswith(b"X-MailGate-Released: by b@example.test ")
    with pytest.raises(ActionError, match="no unreleased recipient b@example.test"):
        actions.release(qid, "digest:b@example.test", recipients=["b@example.test"])
    second = actions.release(qid, "web:alice")  # the rest: only a is left
    assert [r.address for r in spool.entry(second.queue_id).recipients] == ["a@example.test"]
    assert spool.quarantine_meta(qid) is None


def test_release_and_learn_ham_teaches_the_model_first(actions, spool, events, model):
    from classifiers.model import HAM, BayesModel

    qid = quarantined(spool)
    actions.release(qid, "web:alice", learn_ham=True)
    m = BayesModel.load(model)
    assert m.nham == 1 and m.nspam == 0
    assert m.learned_as(ORIGINAL) == HAM  # learned without our headers and tag
    kinds = [type(e) for e in events]
    assert kinds == [Released, Learned, AdminAction]
    assert events[0].learned_ham and events[1].label == "ham" and events[2].action == "release_learn_ham"


def test_learn_spam_leaves_the_message_held(actions, spool, events, model):
    from classifiers.model import BayesModel

    qid = quarantined(spool)
    assert actions.learn(qid, "web:alice", "spam").text == f"learned {qid} as spam"
    assert spool.quarantine_meta(qid) is not None
    assert BayesModel.load(model).nspam == 1
    assert actions.learn(qid, "web:alice", "spam").text.endswith("(already learned so)")
    assert [e.label for e in events if isinstance(e, Learned)] == ["spam", "spam"]
    with pytest.raises(ActionError, match="label must be spam or ham"):
        actions.learn(qid, "web:alice", "eggs")


def test_a_model_that_is_missing_is_said_and_nothing_moves(spool, events, tmp_path):
    acts = Actions(spool, events.append, learner=Learner(str(tmp_path / "none.model")))
    qid = quarantined(spool)
    with pytest.raises(ActionError, match="no Bayes model at .*none.model; train one first"):
        acts.release(qid, "web:alice", learn_ham=True)
    assert spool.quarantine_meta(qid) is not None and list(spool.entries()) == [] and events == []


def test_delete_and_unknown_ids(actions, spool, events):
    qid = quarantined(spool)
    actions.delete(qid, "cli:root")
    assert spool.quarantine_meta(qid) is None
    assert events[0] == Deleted(qid, 1000.0, "cli:root", "quarantine") and events[1].action == "delete"
    for call in (lambda: actions.delete(qid, "cli:root"), lambda: actions.release(qid, "cli:root")):
        with pytest.raises(ActionError, match=f"no message '{qid}' in quarantine"):
            call()
    with pytest.raises(ActionError, match="no message '../etc' in the queue"):
        actions.queue_hold("../etc", "cli:root")


def queued(spool, qid="0000000000BBBB01", next_try=500.0):
    spool.store(QueueEntry(qid, "s@sender.test", [RecipientState("a@example.test")], 1.0, next_try=next_try),
                b"Subject: x\r\n\r\nbody\r\n")
    return qid


def test_queue_hold_release_delete_flush(actions, spool, events, woken):
    qid = queued(spool)
    other = queued(spool, "0000000000BBBB02")
    actions.queue_hold(qid, "web:alice")
    assert spool.entry(qid).held
    assert actions.queue_flush("web:alice").text == "flush: 1 message(s)"  # the held one waits
    assert spool.entry(other).next_try == 0 and spool.entry(qid).next_try == 500.0
    actions.queue_release(qid, "web:alice")
    e = spool.entry(qid)
    assert not e.held and e.next_try == 0
    actions.queue_delete(qid, "web:alice")
    assert spool.entry(qid) is None
    assert [a.action for a in events if isinstance(a, AdminAction)] == \
        ["queue_hold", "queue_flush", "queue_release", "queue_delete"]
    assert Deleted(qid, 1000.0, "web:alice", "queue") in events
    assert len(woken) == 2  # flush and release wake the gateway; hold and delete need not


# --- the CLI goes through the same layer -----------------------------------------


def cli(tmp_path, *args, model=None):
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(f'[queue]\ndir = "{tmp_path}/queue"\n[web]\nenabled = false\n'
                   + (f'[bayes]\nmodel = "{model}"\n' if model else ""))
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args, "-c", str(cfg)], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "USER": "tester"})


def test_cli_quarantine_release_is_clean_and_logged_as_an_admin_action(tmp_path, spool, model):
    qid = quarantined(spool)
    p = cli(tmp_path, "quarantine", "release", qid, model=model)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"released {qid} as queue id ")
    new = p.stdout.split("queue id ")[1].split()[0]
    data = spool.read(new)
    assert data.startswith(b"X-MailGate-Released: by tester ") and b"SPAM***" not in data and b"X-Spam-" not in data
    assert "actor=cli:tester" in p.stderr and "action=release" in p.stderr  # the audit line
    p = cli(tmp_path, "quarantine", "release", qid)
    assert p.returncode == 2 and f"no message '{qid}' in quarantine" in p.stderr


def test_cli_quarantine_learn_and_queue_commands(tmp_path, spool, model):
    from classifiers.model import BayesModel

    qid = quarantined(spool)
    p = cli(tmp_path, "quarantine", "learn-spam", qid, model=model)
    assert p.returncode == 0, p.stderr
    assert BayesModel.load(model).nspam == 1
    p = cli(tmp_path, "quarantine", "delete", qid)
    assert p.returncode == 0 and spool.quarantine_meta(qid) is None
    q = queued(spool)
    assert cli(tmp_path, "queue", "hold", q).stdout == f"held {q}\n"
    assert spool.entry(q).held
    p = cli(tmp_path, "queue", "list")
    assert "HELD" in p.stdout
    assert cli(tmp_path, "queue", "release", q).returncode == 0 and not spool.entry(q).held
    p = cli(tmp_path, "queue", "delete", q)
    assert p.stdout == f"deleted {q}\n" and spool.entry(q) is None and "action=queue_delete" in p.stderr
    assert cli(tmp_path, "quarantine", "list").stdout == "-- 0 message(s) in quarantine\n"
