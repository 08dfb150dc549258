"""Metrics from known events, scraped as text and read back with prometheus_client's own parser."""

from __future__ import annotations

import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task

from gateway import events as ev
from gateway.errors import Reply
from gateway.plugins import Symbol, SymbolTable
from gateway.records import Action, Envelope, Failed, Recipient, Result, Session, Verdict
from gateway.spool import QueueEntry, RecipientState, Spool
from monitor.metrics import Dumper, Metrics, metrics_resource

SYMBOLS = SymbolTable([Symbol("BAYES_99", 3.5, "bayes", "Bayes 99%"), Symbol("RBL_TEST", 2.0, "dnsbl", "listed"),
                       Symbol("VIRUS_*", 100.0, "av", "a virus")])


def samples(metrics_or_text) -> dict:
    """{(sample name, ((label, value), ...)): value} of a scrape."""
    text = metrics_or_text if isinstance(metrics_or_text, str) else metrics_or_text.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: dict, name: str, **labels) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def session(ip="192.0.2.1"):
    return Session(queue_id="S", peer_ip=ip, helo="c.test")


def answered(qid, action, symbols=(), code=250):
    env = Envelope(queue_id=qid, sender="a@s.test", recipients=[Recipient("b@example.test", "example.test")])
    verdict = Verdict(action, 1.0, 5.0, [Result(n, 1.0) for n in symbols])
    return ev.MessageAnswered(session(), env, verdict, Reply(code, "", "x"))


def test_counters_from_known_traffic_are_exact():
    m = Metrics(symbols=SYMBOLS)
    s = session()
    for e in [
        ev.ConnectionOpened(s, 1.0), ev.ConnectionOpened(s, 1.0), ev.ConnectionOpened(s, 1.0),
        ev.ConnectionClosed(s, 2.0, "quit"),
        answered("M1", Action.ACCEPT),
        answered("M2", Action.TAG, ["BAYES_99", "RBL_TEST"]),
        answered("M3", Action.TAG, ["BAYES_99", "MADE_UP_SYMBOL", "VIRUS_CLAMD"]),
        answered("M4", Action.REJECT, ["RBL_TEST"], code=554),
        answered("M5", Action.ACCEPT, code=451),  # the spool could not be written: a tempfail in fact
        ev.ClientGone(s, Envelope("M6", "a@s.test"), Verdict(Action.ACCEPT, 0, 5)),
        ev.StageRefused(s, None, "rcpt", Reply(550, "5.1.1", "unknown")),
        ev.StageRefused(s, None, "rcpt", Reply(550, "5.1.1", "unknown")),
        ev.StageRefused(s, None, "mail", Reply(451, "4.7.1", "greylisted")),
        ev.Quarantined("M7", 3.0, "score"), ev.Quarantined("M8", 3.0, "virus"),
        ev.Released("M7", 4.0, "web:admin"), ev.Deleted("M8", 4.0, "cli:root", "quarantine"),
        ev.Learned("M7", 4.0, "web:admin", "ham"),
        ev.AdminAction(4.0, "web:admin", "release", "M7"),
        ev.DeliveryAttempted("M1", 5.0, "10.0.0.5:25", (ev.RecipientOutcome("b@example.test", "sent", 250, "ok"),
                                                       ev.RecipientOutcome("c@example.test", "deferred", 451, "x")),
                             delay=0.3, route="smtp:[10.0.0.5]:25"),
        ev.DeliveryAttempted("M2", 5.0, "mx.other.test:25",
                             (ev.RecipientOutcome("d@other.test", "failed", 550, "no"),), delay=2.0,
                             route="mx:other.test"),
        ev.Deferred("M1", 5.0, ("c@example.test",), 300.0, 1, "x"),
        ev.Bounced("M2", 5.0, ("d@other.test",), "no", "B1"),
    ]:
        m(e)
    got = samples(m)
    assert value(got, "mailgate_connections_total") == 3
    assert value(got, "mailgate_connections_current") == 2
    assert value(got, "mailgate_messages_total", action="accept") == 1
    assert value(got, "mailgate_messages_total", action="tag") == 2
    assert value(got, "mailgate_messages_total", action="reject") == 1
    assert value(got, "mailgate_messages_total", action="tempfail") == 1
    assert value(got, "mailgate_messages_total", action="dropped") == 1
    assert value(got, "mailgate_refusals_total", stage="rcpt", code_class="5xx") == 2
    assert value(got, "mailgate_refusals_total", stage="mail", code_class="4xx") == 1
    assert value(got, "mailgate_refusals_total", stage="data", code_class="5xx") == 1
    assert value(got, "mailgate_refusals_total", stage="data", code_class="4xx") == 1
    assert value(got, "mailgate_symbol_hits_total", symbol="BAYES_99") == 2
    assert value(got, "mailgate_symbol_hits_total", symbol="RBL_TEST") == 2
    assert value(got, "mailgate_symbol_hits_total", symbol="VIRUS_CLAMD") == 1  # a declared family's member
    assert value(got, "mailgate_symbol_hits_total", symbol="other") == 1
    assert ("mailgate_symbol_hits_total", (("symbol", "MADE_UP_SYMBOL"),)) not in got
    assert value(got, "mailgate_quarantined_total", reason="score") == 1
    assert value(got, "mailgate_quarantined_total", reason="virus") == 1
    assert value(got, "mailgate_released_total") == 1
    assert value(got, "mailgate_deleted_total", where="quarantine") == 1
    assert value(got, "mailgate_learned_total", label="ham") == 1
    assert value(got, "mailgate_admin_actions_total", action="release") == 1
    assert value(got, "mailgate_deliveries_total", route="smtp:[10.0.0.5]:25", status="sent") == 1
    assert value(got, "mailgate_deliveries_total", route="smtp:[10.0.0.5]:25", status="deferred") == 1
    assert value(got, "mailgate_deliveries_total", route="mx", status="failed") == 1  # not one label per domain
    assert value(got, "mailgate_delivery_delay_seconds_count", route="smtp:[10.0.0.5]:25") == 1
    assert value(got, "mailgate_delivery_delay_seconds_sum", route="smtp:[10.0.0.5]:25") == pytest.approx(0.3)
    assert value(got, "mailgate_delivery_delay_seconds_bucket", route="smtp:[10.0.0.5]:25", le="0.25") == 0
    assert value(got, "mailgate_delivery_delay_seconds_bucket", route="smtp:[10.0.0.5]:25", le="0.5") == 1
    assert value(got, "mailgate_deferred_total") == 1
    assert value(got, "mailgate_bounced_total") == 1


def test_check_and_stage_latency_and_dnsbl_errors_from_stage_judged():
    m = Metrics()
    timings = (ev.CheckTiming("dnsbl", 0.02), ev.CheckTiming("helo", 0.0001))
    records = (Failed("dnsbl", "zen.test: timeout"), Failed("dnsbl", "zen.test: error code 127.255.255.254 for x"),
               Failed("rhsbl", "dbl.test: SERVFAIL"), Failed("av", "clamd: refused"), Result("RBL_X", 1.0))
    m(ev.StageJudged(session(), None, "connect", records, timings, 1.0, seconds=0.03))
    m(ev.StageJudged(session(), None, "connect", (), (ev.CheckTiming("dnsbl", 2.0),), 1.0))
    got = samples(m)
    assert value(got, "mailgate_check_duration_seconds_count", stage="connect", check="dnsbl") == 2
    assert value(got, "mailgate_check_duration_seconds_sum", stage="connect", check="dnsbl") == pytest.approx(2.02)
    assert value(got, "mailgate_check_duration_seconds_bucket", stage="connect", check="dnsbl", le="0.025") == 1
    assert value(got, "mailgate_check_duration_seconds_count", stage="connect", check="helo") == 1
    assert value(got, "mailgate_stage_duration_seconds_count", stage="connect") == 2
    # the whole stage as measured, or (not given) its slowest check
    assert value(got, "mailgate_stage_duration_seconds_sum", stage="connect") == pytest.approx(2.03)
    assert value(got, "mailgate_dnsbl_errors_total", zone="zen.test") == 2
    assert value(got, "mailgate_dnsbl_errors_total", zone="dbl.test") == 1
    assert ("mailgate_dnsbl_errors_total", (("zone", "clamd"),)) not in got  # not a DNS list


def test_labels_are_bounded(monkeypatch):
    import monitor.metrics as mm

    monkeypatch.setattr(mm, "MAX_LABELS", 3)
    m = Metrics()
    for i in range(5):
        m(ev.StageJudged(session(), None, "connect", (Failed("dnsbl", f"z{i}.test: timeout"),), (), 1.0))
    got = samples(m)
    assert [value(got, "mailgate_dnsbl_errors_total", zone=f"z{i}.test") for i in range(5)] == [1, 1, 1, 0, 0]
    assert value(got, "mailgate_dnsbl_errors_total", zone="other") == 2


def test_queue_depth_and_quarantine_size_are_read_from_the_spool(tmp_path):
    spool = Spool(str(tmp_path / "q"))
    now = time.time()

    def put(qid, **kw):
        e = QueueEntry(qid, "a@s.test", [RecipientState("b@example.test")], now, **kw)
        spool.store(e, b"Subject: x\r\n\r\nbody\r\n")

    put("A1")
    put("A2", attempts=1, next_try=now - 5)  # due again: active
    put("D1", attempts=2, next_try=now + 600)
    put("H1", held=True)
    spool.quarantine_store("Q1", b"x", {"queue_id": "Q1"})
    spool.quarantine_store("Q2", b"x", {"queue_id": "Q2"})
    m = Metrics(spool_root=spool.root, delivering=False)
    got = samples(m)
    assert value(got, "mailgate_queue_messages", state="active") == 2
    assert value(got, "mailgate_queue_messages", state="deferred") == 1
    assert value(got, "mailgate_queue_messages", state="held") == 1
    assert value(got, "mailgate_quarantine_messages") == 2


def test_scanner_health_and_bayes_model_age(tmp_path):
    from scanners.base import Clean, GuardedScanner, Infected

    class Engine:
        name = "clamd"

        def __init__(self, sees_eicar):
            self.sees_eicar = sees_eicar

        def scan_blocking(self, data):
            return Infected("Eicar-Signature") if self.sees_eicar else Clean()

        def describe(self):
            return "test engine"

    clock = task.Clock()
    run = defer.maybeDeferred  # the adapter answers at once
    good = GuardedScanner(Engine(True), clock, run)
    blind = GuardedScanner(Engine(False), clock, run)
    blind.adapter.name = "blind"

    class AvCheck:
        scanners = [good, blind]

    model = tmp_path / "bayes.model"
    model.write_bytes(b"x")
    os.utime(model, (1000.0, 1000.0))
    m = Metrics(checks=lambda: [AvCheck()], bayes_model=lambda: str(model), clock=lambda: 1600.0, delivering=False)
    got = samples(m)
    assert value(got, "mailgate_scanner_up", scanner="clamd") == 1
    assert ("mailgate_scanner_self_test_ok", (("scanner", "clamd"),)) not in got  # not run yet
    good.self_test()
    blind.self_test()
    got = samples(m)
    assert value(got, "mailgate_scanner_self_test_ok", scanner="clamd") == 1
    assert value(got, "mailgate_scanner_self_test_ok", scanner="blind") == 0
    assert value(got, "mailgate_scanner_up", scanner="blind") == 0
    assert value(got, "mailgate_scanner_scans_total", scanner="clamd", result="infected") == 1
    assert value(got, "mailgate_scanner_scans_total", scanner="blind", result="clean") == 1
    assert value(got, "mailgate_bayes_model_age_seconds") == 600.0


def test_the_delivery_process_file_is_merged_into_the_receivers_scrape(tmp_path):
    """The delivery process's families reach the receiver's /metrics through the file it writes."""
    path = str(tmp_path / "metrics" / "deliverd.prom")
    child = Metrics(receiving=False, delivering=True)
    clock = task.Clock()
    dumper = Dumper(child, path, clock, run_in_thread=defer.maybeDeferred, interval=5)
    dumper.start()
    parent = Metrics(delivering=False, delivery_file=path)
    assert value(samples(parent), "mailgate_deliveries_total", route="mx", status="sent") == 0
    for _ in range(3):
        child(ev.DeliveryAttempted("M", 1.0, "h:25", (ev.RecipientOutcome("b@x.test", "sent", 250, "ok"),),
                                   route="mx:x.test", delay=1.0))
    assert value(samples(parent), "mailgate_deliveries_total", route="mx", status="sent") == 0  # not yet written
    clock.advance(5)
    got = samples(parent)
    assert value(got, "mailgate_deliveries_total", route="mx", status="sent") == 3
    assert value(got, "mailgate_delivery_delay_seconds_count", route="mx") == 3
    assert value(got, "mailgate_messages_total", action="accept") == 0  # the receiver's own families are there too
    names = [f.name for f in text_string_to_metric_families(parent.exposition().decode())]
    assert len(names) == len(set(names))  # no family twice
    child(ev.Bounced("M", 1.0, ("b@x.test",), "no"))
    dumper.stop()  # the process ends: the last counts are written at once
    assert value(samples(parent), "mailgate_bounced_total") == 1


def test_registries_are_per_instance():
    a, b = Metrics(), Metrics()
    a(answered("M1", Action.ACCEPT))
    assert value(samples(a), "mailgate_messages_total", action="accept") == 1
    assert value(samples(b), "mailgate_messages_total", action="accept") == 0


def test_metrics_resource_serves_the_exposition():
    from twisted.web.test.requesthelper import DummyRequest

    m = Metrics()
    m(answered("M1", Action.TAG, ["BAYES_99"]))
    res = metrics_resource(m.registry, run_in_thread=defer.maybeDeferred)
    req = DummyRequest([b""])
    req.method = b"GET"
    res.render(req)
    assert req.finished
    assert req.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    got = samples(b"".join(req.written).decode())
    assert value(got, "mailgate_messages_total", action="tag") == 1


def test_a_running_gateway_serves_exact_counters_for_known_traffic(mailgate, sink):
    """Through `mailgate run` and its delivery process: /metrics on its own address."""
    import smtplib
    import urllib.request

    from rules.gtube import GTUBE
    from tests.support.ports import free_port

    port = free_port()
    gw = mailgate(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    ham = (b"From: a@sender.test\r\nTo: bob@example.test\r\nSubject: lunch\r\nMessage-ID: <m@sender.test>\r\n"
           b"\r\nnoon?\r\n")
    for _ in range(2):
        with gw.smtp() as c:
            c.sendmail("alice@sender.test", ["bob@example.test"], ham)
    with gw.smtp() as c, pytest.raises(smtplib.SMTPDataError) as refused:
        c.sendmail("alice@sender.test", ["bob@example.test"], ham.replace(b"noon?", GTUBE))
    assert refused.value.smtp_code == 554
    with gw.smtp() as c, pytest.raises(smtplib.SMTPRecipientsRefused):
        c.sendmail("alice@sender.test", ["someone@elsewhere.test"], ham)  # relay denied at RCPT
    assert sink.wait_for(2, timeout=30)

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return samples(r.read().decode())

    deadline = time.monotonic() + 30  # the delivery process writes its counts every few seconds
    got = scrape()
    while sum(v for (n, _), v in got.items() if n == "mailgate_deliveries_total") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        got = scrape()
    route = f"smtp:[127.0.0.1]:{sink.port}"
    assert value(got, "mailgate_deliveries_total", route=route, status="sent") == 2
    assert value(got, "mailgate_delivery_delay_seconds_count", route=route) == 2
    assert value(got, "mailgate_messages_total", action="accept") == 2
    assert value(got, "mailgate_messages_total", action="reject") == 1
    assert value(got, "mailgate_refusals_total", stage="data", code_class="5xx") == 1
    assert value(got, "mailgate_refusals_total", stage="rcpt", code_class="5xx") == 1
    assert value(got, "mailgate_symbol_hits_total", symbol="GTUBE") == 1
    assert value(got, "mailgate_connections_total") == 5  # ours and the start-up probe's (it waits for the 220)
    assert value(got, "mailgate_connections_current") == 0
    assert value(got, "mailgate_stage_duration_seconds_count", stage="data") == 3
    assert value(got, "mailgate_queue_messages", state="active") == 0
    assert value(got, "mailgate_quarantine_messages") == 0
    assert value(got, "mailgate_tracking_dropped_total") == 0
