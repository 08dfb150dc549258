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


class Parses(Check):
    """A blocking check that sees whether the parsed view was made before it ran."""

    stage, blocking = Stage.DATA, True

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def check(self, txn):
        self.calls.append((self.name, "parsed" in vars(txn.message)))
        return [Result(self.name.upper(), 1.0)]


def test_blocking_checks_run_in_one_trip_to_the_pool_after_the_parse():
    from gateway.records import Message
    from tests.gateway.test_auth import HeldThreads

    calls = []
    threads = HeldThreads()
    pipeline = Pipeline([Parses("first", calls), Fixed("inline", [Result("INLINE", 0.5)]),
                         Parses("second", calls)], run_in_thread=threads)
    txn = Transaction(Session("Q", "192.0.2.1"), message=Message(b"Subject: x\r\n\r\nbody\r\n"))
    out = []
    pipeline.run(Stage.DATA, txn).addCallback(out.extend)
    assert calls == [] and len(threads.pending) == 1 and "parsed" not in vars(txn.message)
    threads.run_all()
    assert calls == [("first", True), ("second", True)]
    assert [r.symbol for r in out] == ["FIRST", "INLINE", "SECOND"]  # check order, wherever they ran


def test_a_blocking_check_that_raises_is_a_failed_record_and_the_others_still_run():
    class Raises(Check):
        name, stage, blocking = "raises", Stage.DATA, True

        def check(self, txn):
            raise RuntimeError("blocking check exploded")

    from gateway.records import Message

    calls = []
    out = []
    txn = Transaction(Session("Q", "192.0.2.1"), message=Message(b"Subject: x\r\n\r\nbody\r\n"))
    Pipeline([Raises(), Parses("after", calls)]).run(Stage.DATA, txn).addCallback(out.extend)
    assert out[0].check == "raises" and out[0].severity == "error"
    assert out[1].symbol == "AFTER"


def test_a_pool_past_the_stage_deadline_makes_its_checks_late():
    from tests.gateway.test_auth import HeldThreads

    clock = task.Clock()
    threads = HeldThreads()
    calls = []
    pipeline = Pipeline([Parses("slow", calls)], {Stage.DATA: 2.0}, clock, threads)
    from gateway.records import Message

    out = []
    pipeline.run(Stage.DATA, Transaction(Session("Q", "192.0.2.1"), message=Message(b"\r\n"))).addCallback(
        out.extend)
    clock.advance(2.0)
    assert out == [Failed("slow", "no answer within 2s", severity="tempfail")]
    threads.run_all()  # the thread finishing later changes nothing
    assert len(out) == 1 and not clock.getDelayedCalls()


# --- what each check cost (StageJudged's timings) -------------------------------------


class Ticks:
    """A timer that moves only when told: each check's cost is known exactly."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Costs(Check):
    """A blocking check that costs ``seconds`` on the test's timer."""

    stage, blocking = Stage.DATA, True

    def __init__(self, name, ticks, seconds):
        self.name, self.ticks, self.seconds = name, ticks, seconds

    def check(self, txn):
        self.ticks.now += self.seconds
        return [Result(self.name.upper(), 1.0)]


def test_each_check_is_timed_inline_from_start_to_answer_and_blocking_inside_the_trip():
    from gateway.events import CheckTiming
    from gateway.records import Message
    from tests.gateway.test_auth import HeldThreads

    ticks, threads = Ticks(), HeldThreads()
    answer = defer.Deferred()
    pipeline = Pipeline([Costs("rules", ticks, 0.25), Fixed("dns", answer), Costs("bayes", ticks, 0.5)],
                        run_in_thread=threads, timer=ticks)
    out = []
    txn = Transaction(Session("Q", "192.0.2.1"), message=Message(b"Subject: x\r\n\r\nbody\r\n"))
    pipeline.run_timed(Stage.DATA, txn).addCallback(out.append)
    ticks.now += 3.0  # the pool is busy for 3 s before the trip starts: charged to no check
    threads.run_all()
    ticks.now += 1.0
    answer.callback([Result("DNS", 0.1)])
    (run,) = out
    assert [r.symbol for r in run.records] == ["RULES", "DNS", "BAYES"]
    assert run.timings == (CheckTiming("rules", 0.25), CheckTiming("dns", 4.75), CheckTiming("bayes", 0.5))
    assert run.seconds == 4.75


def test_a_late_check_is_charged_the_wait_until_the_deadline():
    ticks, clock = Ticks(), task.Clock()
    pipeline = Pipeline([Hung()], {Stage.MAIL: 5.0}, clock, timer=ticks)
    out = []
    pipeline.run_timed(Stage.MAIL, Transaction(Session("Q", "192.0.2.1"))).addCallback(out.append)
    ticks.now += 5.0
    clock.advance(5.0)
    assert [(t.check, t.seconds) for t in out[0].timings] == [("hung", 5.0)] and out[0].seconds == 5.0
