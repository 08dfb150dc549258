"""The shared plumbing: timeouts, size limit, retries, circuit breaker,
self-test and the mapping of outcomes to records."""

from __future__ import annotations

import logging

from twisted.internet import defer

from gateway.records import Failed, Result
from scanners.base import (
    EICAR,
    Clean,
    GuardedScanner,
    Infected,
    ScanFailed,
    Scanner,
    scan_all,
    to_records,
)
from tests.scanners.conftest import result_of, sync_threads


class Scripted(Scanner):
    """Answers from a list, one outcome per call; records what it was sent."""

    engine = "scripted"

    def __init__(self, *outcomes, name=""):
        super().__init__(name)
        self.outcomes = list(outcomes)
        self.seen = []

    def scan_blocking(self, data):
        self.seen.append(data)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class Signatures(Scanner):
    engine = "sigs"

    def scan_blocking(self, data):
        return Infected(["Eicar-Test"]) if EICAR in data else Clean()


def guarded(adapter, clock, run=sync_threads, **kw):
    return GuardedScanner(adapter, clock, run, **kw)


def test_outcomes_pass_through(clock):
    assert result_of(guarded(Signatures(), clock).scan(b"hello")) == Clean()
    assert result_of(guarded(Signatures(), clock).scan(b"x" + EICAR)) == Infected(["Eicar-Test"])


def test_infected_accepts_a_single_name_and_never_empty():
    assert Infected("X").names == ("X",)
    assert Infected([]).names == ("unknown",)


def test_hanging_engine_fails_at_the_timeout(clock):
    never = defer.Deferred()
    g = guarded(Scripted(Clean()), clock, run=lambda fn, *a: never, timeout=5)
    d = g.scan(b"msg")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    outcome = result_of(d)
    assert isinstance(outcome, ScanFailed) and "timed out after 5s" in outcome.reason
    assert g.stats.timeouts == 1
    # the stuck thread's late answer is dropped, not delivered twice
    never.callback(Clean())


def test_oversize_message_is_a_failure_without_asking_the_engine(clock):
    adapter = Scripted(Clean())
    outcome = result_of(guarded(adapter, clock, max_size=10).scan(b"x" * 11))
    assert isinstance(outcome, ScanFailed) and "over the scanner's limit of 10" in outcome.reason
    assert adapter.seen == []


def test_quick_failure_is_retried_once(clock):
    adapter = Scripted(ScanFailed("refused", retry=True), Infected(["V"]))
    assert result_of(guarded(adapter, clock, retries=1).scan(b"m")) == Infected(["V"])
    assert len(adapter.seen) == 2


def test_retries_are_bounded_and_engine_errors_not_retried(clock):
    adapter = Scripted(ScanFailed("refused", retry=True))
    assert isinstance(result_of(guarded(adapter, clock, retries=2).scan(b"m")), ScanFailed)
    assert len(adapter.seen) == 3
    adapter = Scripted(ScanFailed("engine error"))
    result_of(guarded(adapter, clock, retries=2).scan(b"m"))
    assert len(adapter.seen) == 1


def test_adapter_exception_is_a_failure_not_clean(clock):
    outcome = result_of(guarded(Scripted(RuntimeError("bug")), clock).scan(b"m"))
    assert isinstance(outcome, ScanFailed) and "bug" in outcome.reason


def test_adapter_returning_nonsense_is_a_failure(clock):
    outcome = result_of(guarded(Scripted(None), clock).scan(b"m"))
    assert isinstance(outcome, ScanFailed)


def test_circuit_opens_after_repeated_failures_then_probes(clock):
    adapter = Scripted(ScanFailed("down"))
    g = guarded(adapter, clock, failure_threshold=3, circuit_reset=30, retries=0)
    for _ in range(3):
        result_of(g.scan(b"m"))
    assert len(adapter.seen) == 3 and g.breaker.is_open
    outcome = result_of(g.scan(b"m"))
    assert isinstance(outcome, ScanFailed) and "not asked after 3 failures" in outcome.reason
    assert "down" in outcome.reason
    assert len(adapter.seen) == 3
    clock.advance(30)
    adapter.outcomes = [Clean()]
    assert result_of(g.scan(b"m")) == Clean()  # the probe goes through and closes it
    assert len(adapter.seen) == 4 and not g.breaker.is_open


def test_failed_probe_reopens_the_circuit(clock):
    adapter = Scripted(ScanFailed("down"))
    g = guarded(adapter, clock, failure_threshold=2, circuit_reset=10, retries=0)
    result_of(g.scan(b"m"))
    result_of(g.scan(b"m"))
    clock.advance(10)
    result_of(g.scan(b"m"))  # probe fails
    result_of(g.scan(b"m"))  # short-circuited again
    assert len(adapter.seen) == 3
    assert g.stats.short_circuited == 1


def test_success_resets_the_failure_count(clock):
    adapter = Scripted(ScanFailed("x"), ScanFailed("x"), Clean(), ScanFailed("x"), ScanFailed("x"), Clean())
    g = guarded(adapter, clock, failure_threshold=3, retries=0)
    for _ in range(6):
        result_of(g.scan(b"m"))
    assert len(adapter.seen) == 6 and not g.breaker.is_open


def test_timeouts_count_towards_the_breaker(clock):
    g = guarded(Scripted(Clean()), clock, run=lambda fn, *a: defer.Deferred(), timeout=1,
                failure_threshold=2)
    for _ in range(2):
        d = g.scan(b"m")
        clock.advance(1)
        result_of(d)
    assert g.breaker.is_open


def test_self_test_sees_eicar(clock, caplog):
    g = guarded(Signatures(name="sigs"), clock)
    with caplog.at_level(logging.INFO, "mailgate.scanners"):
        assert result_of(g.self_test()) is True
    assert g.stats.self_test_ok is True
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_self_test_blind_engine_is_reported_loudly(clock, caplog):
    g = guarded(Scripted(Clean(), name="blind"), clock)
    with caplog.at_level(logging.INFO, "mailgate.scanners"):
        assert result_of(g.self_test()) is False
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("blind" in m and "did NOT detect the EICAR" in m for m in errors)
    assert g.stats.self_test_ok is False


def test_self_test_runs_at_start_and_every_interval(clock):
    adapter = Scripted(Infected(["E"]))
    g = guarded(adapter, clock)
    g.start_self_test(600)
    assert adapter.seen == [EICAR]
    clock.advance(600)
    assert len(adapter.seen) == 2
    g.stop()
    clock.advance(600)
    assert len(adapter.seen) == 2


def test_scan_all_runs_every_scanner(clock):
    a, b = guarded(Signatures(name="a"), clock), guarded(Scripted(ScanFailed("x"), name="b"), clock)
    pairs = result_of(scan_all([a, b], EICAR))
    assert [(s.name, type(o)) for s, o in pairs] == [("a", Infected), ("b", ScanFailed)]


# --- outcomes -> records ---------------------------------------------------


def test_clean_records_the_engines_in_the_header():
    records = to_records([("clamd", Clean()), ("icap", Clean())])
    assert records == [Result("AV_CLEAN", 0.0, "clamd, icap", header=("X-Virus-Scanned", "MailGate (clamd, icap)"))]


def test_infected_refuses_naming_every_virus_once():
    records = to_records([("clamd", Infected(["Eicar", "Other"])), ("icap", Infected(["Eicar"])),
                          ("sophie", Clean())])
    main = records[0]
    assert (main.symbol, main.refuse, main.detail) == ("VIRUS_FOUND", "virus", "Eicar, Other")
    assert {r.symbol for r in records[1:]} == {"VIRUS_CLAMD", "VIRUS_ICAP"}
    assert all(r.refuse is None for r in records[1:])
    assert not any(r.header for r in records if isinstance(r, Result))


def test_infected_wins_over_a_failed_engine():
    records = to_records([("clamd", ScanFailed("down")), ("icap", Infected(["V"]))])
    assert records[0].refuse == "virus"
    assert [f.severity for f in records if isinstance(f, Failed)] == ["none"]


def test_infected_quarantine_policy():
    assert to_records([("clamd", Infected(["V"]))], on_infected="quarantine")[0].refuse == "quarantine"


def test_failure_tempfails_by_default():
    records = to_records([("clamd", ScanFailed("timed out after 5s")), ("icap", Clean())])
    assert records == [Failed("antivirus", "virus scan failed (clamd: timed out after 5s)", severity="tempfail")]


def test_failure_accept_tagged_says_so_in_the_header():
    records = to_records([("clamd", ScanFailed("cannot reach clamd"))], on_error="accept-tagged")
    result, failed = records
    assert result.header == ("X-Virus-Scanned", "unscanned (clamd: cannot reach clamd)")
    assert failed.severity == "none" and "cannot reach clamd" in failed.reason


def test_unscanned_header_is_one_ascii_line():
    records = to_records([("c", ScanFailed("bad\r\nthing \u00e9"))], on_error="accept-tagged")
    value = records[0].header[1]
    assert "\n" not in value and value.isascii()
