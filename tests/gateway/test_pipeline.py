"""The pipeline runner: concurrency, order of records, coroutines, crashes."""

import asyncio

import pytest
from twisted.internet import defer, task

from gateway.pipeline import Pipeline
from gateway.plugins import Check
from gateway.records import Failed, Result, Session, Stage, Transaction


class Fixed(Check):
    stage = Stage.DATA

    def __init__(self, name, value):
        self.name, self.value = name, value

    def check(self, txn):
        return self.value


class Crashing(Check):
    name, stage = "crashing", Stage.DATA

    def check(self, txn):
        raise ValueError("bad input handled badly")


def run(pipeline, stage=Stage.DATA):
    out = []
    pipeline.run(stage, Transaction(Session("Q", "192.0.2.1"))).addCallback(out.append)
    return out


def test_records_in_check_order_whatever_finishes_first():
    late = defer.Deferred()
    p = Pipeline([Fixed("a", late), Fixed("b", [Result("B", 1)]), Fixed("c", Result("C", 2)), Fixed("d", None)])
    out = run(p)
    assert out == []
    late.callback([Result("A", 3)])
    assert [r.symbol for r in out[0]] == ["A", "B", "C"]


def test_a_crash_is_a_failed_record_logged_with_the_queue_id(caplog):
    out = run(Pipeline([Crashing(), Fixed("ok", [Result("OK", 0)])]))
    failed, ok = out[0]
    assert isinstance(failed, Failed) and failed.severity == "error" and ok.symbol == "OK"
    assert "queue_id=Q check=crashing" in caplog.text


def test_coroutines_run_as_asyncio_tasks():
    async def coro():
        await asyncio.sleep(0)
        return [Result("CORO", 1)]

    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        p = Pipeline([Fixed("c", None)])
        p.by_stage[Stage.DATA][0].value = coro()
        d = p.run(Stage.DATA, Transaction(Session("Q", "192.0.2.1")))
        loop.run_until_complete(asyncio.sleep(0.01))
        assert d.result[0].symbol == "CORO"
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_stage_without_checks_answers_at_once():
    assert run(Pipeline([]), Stage.CONNECT) == [[]]


class Hung(Check):
    name, stage = "hung", Stage.MAIL

    def __init__(self):
        self.cancelled = False

    def check(self, txn):
        return defer.Deferred(lambda d: setattr(self, "cancelled", True))


def test_a_check_past_the_stage_deadline_is_cancelled_and_failed_tempfail():
    clock = task.Clock()
    hung = Hung()
    quick = Fixed("quick", [Result("QUICK", 1.0)])
    quick.stage = Stage.MAIL
    pipeline = Pipeline([hung, quick], {Stage.MAIL: 5.0}, clock)
    got = []
    pipeline.run(Stage.MAIL, Transaction(Session("Q", "192.0.2.1"))).addCallback(got.extend)
    clock.advance(4.9)
    assert got == []
    clock.advance(0.1)
    assert hung.cancelled
    assert got[0] == Failed("hung", "no answer within 5s", severity="tempfail")
    assert [r.symbol for r in got[1:]] == ["QUICK"]


def test_deadlines_need_a_clock():
    with pytest.raises(ValueError):
        Pipeline([], {Stage.MAIL: 1.0})
