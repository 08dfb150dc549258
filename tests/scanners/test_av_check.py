"""The "antivirus" check: config, parallel scanners, and the policy the
decider applies to its records (rules.scoring.Scorer is the one decider)."""

from __future__ import annotations

import tomllib

import pytest
from twisted.internet import defer

from gateway.config import validate
from gateway.errors import ConfigError, Reject, TempFail
from gateway.plugins import Services, discover
from gateway.records import Action, Failed, Message, Result, Session, Transaction
from rules.scoring import Scorer
from scanners.av_check import AntivirusCheck, build_scanners
from scanners.base import EICAR, Clean, GuardedScanner, Infected, ScanFailed, Scanner
from scanners.settings import AvSettings
from tests.scanners.conftest import result_of, sync_threads


class Fixed(Scanner):
    def __init__(self, name, outcome):
        super().__init__(name)
        self.outcome = outcome
        self.calls = 0

    def scan_blocking(self, data):
        self.calls += 1
        return self.outcome


class Hangs(Scanner):
    engine = "hangs"

    def scan_blocking(self, data):  # never reached: run_in_thread never returns
        raise AssertionError


def txn(raw=b"Subject: hi\r\n\r\nhello\r\n"):
    return Transaction(Session("Q1", "127.0.0.1"), message=Message(raw))


def make_check(clock, *adapters, av=None, run=sync_threads, **kw):
    return AntivirusCheck([GuardedScanner(a, clock, run, **kw) for a in adapters], av or AvSettings())


def decide(records, extra=()):
    return Scorer().decide(list(records) + list(extra))


def test_clean_message_is_tagged_and_accepted(clock):
    records = result_of(make_check(clock, Fixed("clamd", Clean()), Fixed("icap", Clean())).check(txn()))
    verdict = decide(records)
    assert verdict.action == Action.ACCEPT
    assert [r.header for r in records] == [("X-Virus-Scanned", "MailGate (clamd, icap)")]


def test_infected_is_rejected_554_570_naming_the_virus(clock):
    records = result_of(make_check(clock, Fixed("clamd", Infected(["Eicar-Signature"]))).check(txn()))
    verdict = decide(records)
    assert verdict.action == Action.REJECT
    assert verdict.reply == Reject(554, "5.7.0", "Message contains a virus: Eicar-Signature")


def test_allow_list_does_not_save_an_infected_message(clock):
    records = result_of(make_check(clock, Fixed("clamd", Infected(["V"]))).check(txn()))
    verdict = decide(records, [Result("ALLOWLISTED_SENDER", -1000.0)])
    assert verdict.action == Action.REJECT and verdict.reply.enhanced == "5.7.0"


def test_infected_quarantine_policy(clock):
    records = result_of(make_check(clock, Fixed("clamd", Infected(["V"])),
                                   av=AvSettings(on_infected="quarantine")).check(txn()))
    assert decide(records).action == Action.QUARANTINE


def test_one_engine_infected_another_clean(clock):
    records = result_of(make_check(clock, Fixed("a", Clean()), Fixed("b", Infected(["V"]))).check(txn()))
    assert decide(records).action == Action.REJECT


def test_failed_scanner_tempfails_451_430(clock):
    records = result_of(make_check(clock, Fixed("clamd", ScanFailed("cannot reach clamd"))).check(txn()))
    verdict = decide(records)
    assert verdict.action == Action.TEMPFAIL
    assert isinstance(verdict.reply, TempFail) and (verdict.reply.code, verdict.reply.enhanced) == (451, "4.3.0")
    assert "cannot reach clamd" in verdict.reply.text


def test_failed_scanner_accept_tagged(clock):
    check = make_check(clock, Fixed("clamd", ScanFailed("cannot reach clamd")),
                       av=AvSettings(on_error="accept-tagged"))
    records = result_of(check.check(txn()))
    verdict = decide(records)
    assert verdict.action == Action.ACCEPT
    headers = [r.header for r in records if isinstance(r, Result) and r.header]
    assert headers == [("X-Virus-Scanned", "unscanned (clamd: cannot reach clamd)")]
    assert [f.check for f in verdict.failures] == ["antivirus"]  # still logged and counted


def test_hanging_scanner_fails_within_its_timeout(clock):
    check = make_check(clock, Hangs(), Fixed("clamd", Clean()), run=lambda fn, *a: (
        defer.Deferred() if fn.__self__.adapter.engine == "hangs" else defer.maybeDeferred(fn, *a)), timeout=7)
    d = check.check(txn())
    clock.advance(6.9)
    assert not d.called
    clock.advance(0.1)
    verdict = decide(result_of(d))
    assert verdict.action == Action.TEMPFAIL and "hangs: timed out after 7s" in verdict.reply.text


def test_circuit_breaker_stops_asking_a_dead_engine(clock):
    dead = Fixed("clamd", ScanFailed("cannot reach clamd"))
    check = make_check(clock, dead, failure_threshold=3, retries=0, circuit_reset=60)
    for _ in range(5):
        verdict = decide(result_of(check.check(txn())))
        assert verdict.action == Action.TEMPFAIL
    assert dead.calls == 3
    clock.advance(60)
    dead.outcome = Clean()
    assert decide(result_of(check.check(txn()))).action == Action.ACCEPT
    assert dead.calls == 4


def test_every_scanner_sees_the_raw_message(clock):
    seen = []

    class Recorder(Scanner):
        def scan_blocking(self, data):
            seen.append(data)
            return Clean()

    raw = b"Subject: x\r\n\r\n" + EICAR
    result_of(make_check(clock, Recorder("a"), Recorder("b")).check(txn(raw)))
    assert seen == [raw, raw]


# --- config ----------------------------------------------------------------


def config(toml: str):
    return validate(tomllib.loads(toml), discover().sections)


def test_no_scanners_switches_the_check_off(clock):
    cfg = config("")
    assert cfg.scanners == []
    assert AntivirusCheck.from_config(cfg, Services(reactor=clock, run_in_thread=sync_threads)) is None


def test_from_config_builds_every_type_and_self_tests(clock, tmp_path, caplog):
    cfg = config(f"""
[[scanners]]
type = "clamd"
socket = "{tmp_path}/clamd.sock"
timeout = 5
[[scanners]]
type = "clamd"
address = "127.0.0.1:3310"
[[scanners]]
type = "command"
profile = "sophos-savscan"
[[scanners]]
type = "sophie"
socket = "{tmp_path}/sophie.sock"
[[scanners]]
type = "trophie"
socket = "{tmp_path}/trophie.sock"
[[scanners]]
type = "icap"
address = "127.0.0.1:1344"
service = "srv_clamav"
method = "REQMOD"
[av]
on_infected = "quarantine"
on_error = "accept-tagged"
self_test_interval = "5m"
""")
    calls = []

    def no_threads(fn, *args):
        calls.append(fn)
        return defer.succeed(ScanFailed("not started in this test"))

    check = AntivirusCheck.from_config(cfg, Services(reactor=clock, run_in_thread=no_threads))
    try:
        names = [s.name for s in check.scanners]
        assert names == ["clamd", "clamd#2", "sophos-savscan", "sophie", "trophie", "icap"]
        assert check.scanners[0].timeout == 5
        assert check.av.on_infected == "quarantine"
        assert len(calls) == 6  # the startup self-test of each
        clock.advance(300)
        assert len(calls) == 12
        assert any("did not detect" in r.getMessage() or "could not scan the EICAR" in r.getMessage()
                   for r in caplog.records)
    finally:
        check.close()
    clock.advance(300)
    assert len(calls) == 12


@pytest.mark.parametrize("toml, message", [
    ('[[scanners]]\ntype = "clamd"', "needs socket"),
    ('[[scanners]]\ntype = "clamav"\nsocket = "/x"', "scanners.0.type"),
    ('[[scanners]]\ntype = "sophie"', "needs socket"),
    ('[[scanners]]\ntype = "icap"', "needs address"),
    ('[[scanners]]\ntype = "icap"\naddress = "nohost"', "port is required"),
    ('[[scanners]]\ntype = "clamd"\nsocket = "/x"\ntimeout = 0', "more than 0"),
    ('[[scanners]]\ntype = "clamd"\nsocket = "/x"\nbogus = 1', "unknown key"),
    ('[av]\non_infected = "drop"', "av.on_infected"),
    ('[av]\nbanned_extensions = [""]', "not a file name extension"),
])
def test_bad_config_is_refused_with_key_and_reason(toml, message):
    with pytest.raises(ConfigError, match=message):
        config(toml)


def test_build_scanners_names_duplicates(clock):
    cfg = config('[[scanners]]\ntype = "clamd"\nsocket = "/a"\n[[scanners]]\ntype = "clamd"\nsocket = "/b"\nname = "backup"')
    assert [s.name for s in build_scanners(cfg.scanners, clock, sync_threads)] == ["clamd", "backup"]
