"""The tracking store, the same tests against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import events as ev
from gateway.errors import Reply
from gateway.records import Action, Envelope, Failed, Recipient, Result, Session, Verdict
from monitor.tracking import TrackingStore
from tests.support.ports import free_port
from tests.support.postgres import postgres  # noqa: F401 - the session fixture

REPO = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000.0  # a fixed "now": hour-aligned (1800000000 = 500000 * 3600)
DESCRIPTIONS = {"BAYES_99": "Bayes spam probability is 99 to 100%", "RBL_TEST": "Listed in the test DNSBL"}


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path):
    made = []

    def make(url=None, **kw):  # url: another store on the same database
        if url is None and request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/t{len(made)}.sqlite"
        elif url is None:
            url = request.getfixturevalue("postgres").create_database()
        kw.setdefault("clock", Clock())
        kw.setdefault("batch_interval", 0.05)
        kw.setdefault("describe", DESCRIPTIONS.get)
        kw.setdefault("prune_on_timer", False)  # the tests that prune say when
        store = TrackingStore(url, node="mx1.test", **kw)
        made.append(store)
        return store

    yield make
    for s in made:
        s.close()


def session(ip="192.0.2.10", helo="client.test", tls=False, auth=None, qid="S1"):
    return Session(queue_id=qid, peer_ip=ip, helo=helo, tls=tls, auth_user=auth)


def envelope(qid, sender="alice@sender.test", rcpts=("bob@example.test",), size=1234):
    env = Envelope(queue_id=qid, sender=sender, size=size)
    env.recipients = [Recipient(r, r.rpartition("@")[2]) for r in rcpts]
    return env


class Msg:
    """Stands for gateway.records.Message's Message-ID and Subject views."""

    def __init__(self, message_id, subject):
        self.message_id, self.subject = message_id, subject


def answered(qid, action=Action.ACCEPT, score=0.5, symbols=(), ip="192.0.2.10", sender="alice@sender.test",
             rcpts=("bob@example.test",), subject="Hello", message_id=None, reply=None, helo="client.test",
             tls=False, auth=None, failures=()):
    results = [Result(name, pts, f"{name} detail") for name, pts in symbols]
    verdict = Verdict(action, score, 5.0, results, list(failures))
    if reply is None:
        reply = Reply(250, "2.0.0", f"Ok: queued as {qid}") if action not in (Action.REJECT, Action.TEMPFAIL) \
            else Reply(554, "5.7.1", f"Message refused as spam (queue id {qid})")
    e = ev.MessageAnswered(session(ip, helo, tls, auth), envelope(qid, sender, rcpts), verdict, reply)
    object.__setattr__(e, "message", Msg(message_id or f"<{qid.lower()}@sender.test>", subject))
    return e


def emit(store, clock, *items):
    """(ts, event) pairs, each offered at its time."""
    for ts, e in items:
        clock.now = ts
        store.offer(e)
    store.flush()


# --- search ---------------------------------------------------------------------------


def test_search_by_each_field_newest_first(make_store):
    store = make_store()
    clock = store.clock
    emit(store, clock,
         (T0 + 10, answered("Q1", sender="alice@sender.test", rcpts=("bob@example.test",), subject="Invoice 42",
                            ip="192.0.2.10")),
         (T0 + 20, answered("Q2", Action.TAG, 7.0, [("BAYES_99", 3.5)], sender="spam@bad.test",
                            rcpts=("bob@example.test", "carol@example.test"), subject="Cheap pills",
                            ip="198.51.100.7")),
         (T0 + 30, answered("Q3", Action.REJECT, 20.0, [("RBL_TEST", 20.0)], sender="spam@bad.test",
                            rcpts=("dave@other.test",), subject="More pills", ip="198.51.100.7")),
         (T0 + 40, answered("Q4", sender="Alice@Sender.TEST", rcpts=("Carol@Example.test",),
                            subject="Re: Invoice 42", message_id="<abc-123@sender.test>")))

    def ids(**kw):
        return [r["queue_id"] for r in store.search(**kw)]

    assert ids() == ["Q4", "Q3", "Q2", "Q1"]
    assert ids(queue_id="Q2") == ["Q2"]
    assert ids(message_id="<abc-123@sender.test>") == ["Q4"]
    assert ids(message_id="abc-123@sender.test") == ["Q4"]  # without the angle brackets too
    assert ids(sender="alice@sender.test") == ["Q4", "Q1"]  # addresses are kept lower-case
    assert ids(sender="bad.test") == ["Q3", "Q2"] == ids(sender="@bad.test")
    assert ids(recipient="bob@example.test") == ["Q2", "Q1"]
    assert ids(recipient="carol@example.test") == ["Q4", "Q2"]
    assert ids(recipient="@example.test") == ["Q4", "Q2", "Q1"]
    assert ids(client="198.51.100.7") == ["Q3", "Q2"]
    assert ids(action="reject") == ["Q3"]
    assert ids(action="accept") == ["Q4", "Q1"]
    assert ids(text="invoice") == ["Q4", "Q1"]  # any case, in the subject
    assert ids(text="INVOICE 42") == ["Q4", "Q1"]
    assert ids(text="100%") == []  # LIKE wildcards are literal
    assert ids(since=T0 + 20, until=T0 + 40) == ["Q3", "Q2"]
    assert ids(recipient="bob@example.test", since=T0 + 15) == ["Q2"]
    assert ids(sender="spam@bad.test", action="tag") == ["Q2"]
    assert ids(limit=2) == ["Q4", "Q3"]
    assert ids(limit=2, offset=2) == ["Q2", "Q1"]
    assert ids(sender="nobody@nowhere.test") == []

    row = store.search(queue_id="Q2")[0]
    assert row["ts"] == T0 + 20 and row["client"] == "198.51.100.7" and row["sender"] == "spam@bad.test"
    assert row["recipients"] == ["bob@example.test", "carol@example.test"]
    assert row["subject"] == "Cheap pills" and row["score"] == 7.0 and row["action"] == "tag"
    assert row["reply"] == "250 2.0.0 Ok: queued as Q2"


def test_message_detail_has_session_symbols_deliveries_events_and_audit(make_store):
    store = make_store()
    clock = store.clock
    emit(store, clock,
         (T0, answered("QD", Action.TAG, 8.5, [("BAYES_99", 3.5), ("RBL_TEST", 5.0)], helo="mx.client.test",
                       tls=True, auth="carol", subject="Pills", message_id="<m1@x.test>",
                       rcpts=("bob@example.test", "eve@example.test"),
                       failures=[Failed("uribl", "multi.uribl.test: timeout")])),
         (T0 + 1, ev.Spooled("QD", T0 + 1, 2048)),
         (T0 + 5, ev.DeliveryAttempted("QD", T0 + 5, "10.0.0.5:25", (
             ev.RecipientOutcome("bob@example.test", "sent", 250, "2.0.0 Ok"),
             ev.RecipientOutcome("eve@example.test", "deferred", 451, "4.2.0 try later")),
             tls=True, delay=4.0, route="smtp:[10.0.0.5]:25")),
         (T0 + 6, ev.Deferred("QD", T0 + 6, ("eve@example.test",), T0 + 306, 1, "4.2.0 try later")),
         (T0 + 9, ev.AdminAction(T0 + 9, "web:admin", "hold", "QD", "held for review", "127.0.0.1")))
    d = store.message("QD")
    assert d["helo"] == "mx.client.test" and d["tls"] is True and d["auth_user"] == "carol"
    assert d["message_id"] == "<m1@x.test>" and d["subject"] == "Pills" and d["size"] == 1234
    assert d["score"] == 8.5 and d["required"] == 5.0 and d["action"] == "tag"
    assert [(s["name"], s["score"], s["description"]) for s in d["symbols"]] == [
        ("BAYES_99", 3.5, DESCRIPTIONS["BAYES_99"]), ("RBL_TEST", 5.0, DESCRIPTIONS["RBL_TEST"])]
    assert [(x["recipient"], x["status"], x["code"], x["next_hop"], x["tls"], x["delay"]) for x in d["deliveries"]] \
        == [("bob@example.test", "sent", 250, "10.0.0.5:25", True, 4.0),
            ("eve@example.test", "deferred", 451, "10.0.0.5:25", True, 4.0)]
    kinds = [e["kind"] for e in d["events"]]
    assert kinds == ["check_failed", "spooled", "deferred"]
    assert "multi.uribl.test: timeout" in d["events"][0]["detail"]
    assert [(a["actor"], a["action"], a["detail"]) for a in d["audit"]] == [("web:admin", "hold", "held for review")]
    assert store.message("NOPE") is None


def test_refusals_and_the_verdict_of_one_transaction_are_one_message(make_store):
    store = make_store()
    clock = store.clock
    s, env = session(), envelope("QR", rcpts=())
    refusal = Reply(550, "5.1.1", "<nobody@example.test>: Recipient address rejected: User unknown")
    emit(store, clock, (T0, ev.StageRefused(s, env, "rcpt", refusal, "nobody@example.test")))
    first = store.search(queue_id="QR")
    assert [(r["action"], r["stage"], r["recipients"]) for r in first] == [("reject", "rcpt", ["nobody@example.test"])]
    assert store.dashboard(T0, T0 + 3600)["totals"] == {"reject": 1}
    emit(store, clock, (T0 + 2, answered("QR", rcpts=("bob@example.test",))))
    [row] = store.search(queue_id="QR")
    assert row["action"] == "accept" and row["ts"] == T0
    assert row["recipients"] == ["nobody@example.test", "bob@example.test"]
    assert [r["queue_id"] for r in store.search(recipient="nobody@example.test")] == ["QR"]
    dash = store.dashboard(T0, T0 + 3600)
    assert dash["totals"] == {"accept": 1}  # moved, not counted twice
    assert dash["top_refused_clients"] == []
    assert [e["kind"] for e in store.message("QR")["events"]] == ["refused"]


def test_what_the_session_was_at_the_event_is_kept(make_store):
    """The writer works later: the session may have said EHLO again, the envelope gained recipients."""
    store = make_store(batch_interval=3600)
    s, env = session(helo="first.test"), envelope("QS", rcpts=("a@example.test",))
    store.offer(ev.StageRefused(s, env, "rcpt", Reply(550, "5.1.1", "unknown"), "x@example.test"))
    s.helo, s.tls, s.auth_user = "second.test", True, "mallory"
    env.recipients.append(Recipient("later@example.test", "example.test"))
    store.flush()
    d = store.message("QS")
    assert (d["helo"], d["tls"], d["auth_user"]) == ("first.test", False, None)
    assert d["recipients"] == ["a@example.test", "x@example.test"]


def test_client_gone_is_tracked_as_dropped(make_store):
    store = make_store()
    a = answered("QG")
    emit(store, store.clock, (T0, ev.ClientGone(a.session, a.envelope, a.verdict)))
    [row] = store.search(queue_id="QG")
    assert row["action"] == "dropped" and "nothing queued" in row["reply"]


def fts_consistent(store):
    """SQLite: FTS5's own check of the index against the messages (raises if they differ)."""
    if store.is_sqlite:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")


def test_text_search_is_an_indexed_substring_search_kept_in_sync(make_store):
    store = make_store(retention=10 * 86400)
    clock = store.clock
    assert store.search() == [] and store.text_index == ("fts5" if store.is_sqlite else "pg_trgm")
    emit(store, clock,
         (T0 - 20 * 86400, answered("OLD", subject="Quarterly transfer report")),
         (T0 - 3 * 86400, answered("MID", subject="The answer is 42")),
         (T0 + 10, answered("Q1", subject="Invoice 42 overdue")),
         (T0 + 20, answered("Q2", subject="Cheap PILLS now")),
         (T0 + 30, answered("Q3", subject=None)))

    def ids(**kw):
        return [r["queue_id"] for r in store.search(**kw)]

    assert ids(text="nvoice 4") == ["Q1"]  # a substring, across words
    assert ids(text="pills") == ["Q2"] == ids(text="ILLS N") == ids(text="  cheap ")
    assert ids(text="transfer") == ["OLD"]
    assert ids(text="answer is 42") == ["MID"]  # 3+ characters: the whole range
    assert ids(text="50% off") == [] and ids(text='"quoted"') == []
    # fewer than 3 characters: only the last day of the range is scanned
    assert ids(text="42") == ["Q1"]
    assert ids(text="42", until=T0 - 3 * 86400 + 60) == ["MID"]
    assert ids(text="is", since=T0 - 4 * 86400) == []  # "is" is in MID, older than a day before now
    assert ids(text="nvoice", since=T0 + 15) == [] and ids(text="nvoice", until=T0 + 15) == ["Q1"]
    fts_consistent(store)

    # a new message, and a refusal whose message gets its Subject later (an update)
    emit(store, clock, (T0 + 40, answered("Q4", subject="Another invoice")),
         (T0 + 50, ev.StageRefused(session(qid="R1"), envelope("R1"), "rcpt", Reply(450, "4.2.0", "later"),
                                   rcpt="x@example.test")))
    assert ids(text="invoice") == ["Q4", "Q1"]
    assert ids(text="late subj") == []
    emit(store, clock, (T0 + 51, answered("R1", subject="Late subject")))
    assert ids(text="late subj") == ["R1"]
    fts_consistent(store)

    assert store.prune(T0) == 1  # OLD goes, and with it its text
    assert ids(text="transfer") == []
    fts_consistent(store)


def test_a_common_text_walks_the_time_index_newest_first(make_store):
    store = make_store(batch_size=2000)
    store.FTS_PROBE = 5  # "common" after 5 matches, without writing thousands
    clock = store.clock
    emit(store, clock, *[(T0 + i, answered(f"C{i}", subject=f"weekly digest {i}")) for i in range(12)])
    assert [r["queue_id"] for r in store.search(text="DIGEST", limit=3)] == ["C11", "C10", "C9"]
    assert [r["queue_id"] for r in store.search(text="digest 1", limit=3)] == ["C11", "C10", "C1"]
    assert len(store.search(text="weekly")) == 12


def test_a_store_of_the_previous_version_gets_the_new_indexes_and_tables(make_store):
    from sqlalchemy import inspect

    old = make_store()
    emit(old, old.clock, (T0 + 10, answered("Q1", subject="Invoice 42")),
         (T0 + 20, answered("Q2", Action.REJECT, 20, ip="203.0.113.9", subject="Pills")))
    old.close()
    with old.engine.begin() as conn:  # what the previous version had not
        if old.is_sqlite:
            for name in ("messages_fts_ai", "messages_fts_ad", "messages_fts_au"):
                conn.exec_driver_sql(f"DROP TRIGGER {name}")
            conn.exec_driver_sql("DROP TABLE messages_fts")
        else:
            conn.exec_driver_sql("DROP INDEX ix_messages_subject_trgm")
        conn.exec_driver_sql("DROP TABLE daily_top")
        conn.exec_driver_sql("DROP TABLE rolled_days")
    old.engine.dispose()
    store = make_store(url=old.url)
    assert [r["queue_id"] for r in store.search(text="NVOICE")] == ["Q1"]  # backfilled from the rows there
    assert store.text_index == ("fts5" if store.is_sqlite else "pg_trgm")
    fts_consistent(store)
    names = set(inspect(store.engine).get_table_names())
    assert {"daily_top", "rolled_days"} <= names
    if not store.is_sqlite:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_indexes WHERE indexname = "
                                        "'ix_messages_subject_trgm'").scalar() == 1
    assert store.dashboard(T0, T0 + 3600)["top_refused_clients"] == [("203.0.113.9", 1)]


def test_without_a_trigram_tokenizer_text_search_scans_and_says_so_once(tmp_path, monkeypatch, caplog):
    import sqlite3 as sqlite

    monkeypatch.setattr(sqlite, "sqlite_version_info", (3, 31, 1))
    store = TrackingStore(f"sqlite:///{tmp_path}/t.sqlite", clock=Clock(), batch_interval=0.05, prune_on_timer=False)
    try:
        with caplog.at_level("WARNING", logger="mailgate.tracking"):
            emit(store, store.clock, (T0 + 10, answered("Q1", subject="Invoice 42")))
            assert [r["queue_id"] for r in store.search(text="nvoice")] == ["Q1"]
            assert [r["queue_id"] for r in store.search(text="voice 4")] == ["Q1"]
        assert store.text_index is None
        said = [r.getMessage() for r in caplog.records if "trigram" in r.getMessage()]
        assert len(said) == 1 and "text search scans the messages" in said[0]
    finally:
        store.close()


# --- dashboard ----------------------------------------------------------------------------


def test_dashboard_counts_per_hour_top_symbols_and_refused(make_store):
    store = make_store()
    clock = store.clock
    items = [
        (T0 + 60, answered("A1", symbols=[("BAYES_99", 3.5)])),
        (T0 + 120, answered("A2", Action.TAG, 6, [("BAYES_99", 3.5), ("RBL_TEST", 2)])),
        (T0 + 180, answered("A3", Action.REJECT, 20, [("RBL_TEST", 20)], ip="203.0.113.9", sender="x@bad.test")),
        (T0 + 3600 + 5, answered("A4", Action.REJECT, 20, [("RBL_TEST", 20)], ip="203.0.113.9",
                                 sender="y@bad.test")),
        (T0 + 3600 + 6, answered("A5", Action.TEMPFAIL, 0, ip="203.0.113.50", sender="z@worse.test",
                                 reply=Reply(451, "4.7.1", "greylisted"))),
        (T0 + 7200 + 1, answered("A6")),  # outside the range asked for
    ]
    emit(store, clock, *items)
    emit(store, clock, (T0 + 3600 + 7, ev.StageRefused(session("203.0.113.9"), envelope("A7", "w@bad.test", ()),
                                                     "mail", Reply(554, "5.7.1", "blocked"))))
    d = store.dashboard(T0, T0 + 7200)
    assert d["per_hour"] == [
        {"hour_ts": int(T0), "action": "accept", "count": 1}, {"hour_ts": int(T0), "action": "reject", "count": 1},
        {"hour_ts": int(T0), "action": "tag", "count": 1},
        {"hour_ts": int(T0) + 3600, "action": "reject", "count": 2},
        {"hour_ts": int(T0) + 3600, "action": "tempfail", "count": 1}]
    assert d["totals"] == {"accept": 1, "tag": 1, "reject": 3, "tempfail": 1}
    assert d["top_symbols"] == [("RBL_TEST", 3), ("BAYES_99", 2)]
    assert d["top_refused_clients"] == [("203.0.113.9", 3), ("203.0.113.50", 1)]
    assert d["top_refused_sender_domains"] == [("bad.test", 3), ("worse.test", 1)]
    assert store.dashboard(T0 + 7200, T0 + 10800)["totals"] == {"accept": 1}


DAY0 = int(T0 // 86400) * 86400 - 3 * 86400  # a UTC midnight, three days before T0


def refused(qid, ip, ts, sym="RBL_TEST"):
    e = answered(qid, Action.REJECT, 20, [(sym, 20)], ip=ip, sender=f"x@{ip.rpartition('.')[2]}.bad.test")
    object.__setattr__(e, "ts", ts)  # written later than it happened: the clock is the writer's
    return e


def test_dashboard_top_lists_over_several_days_from_the_daily_rollup(make_store):
    store = make_store(top_per_day=2)
    clock = store.clock
    a, b, c = "203.0.113.1", "203.0.113.2", "203.0.113.3"
    per_day = {DAY0 + 13 * 3600: [a, a, a, b, b, c], DAY0 + 86400 + 3600: [c, c, a, b],
               DAY0 + 2 * 86400 + 7200: [c]}
    clock.now = DAY0 + 4 * 86400
    for ts, ips in per_day.items():
        for i, ip in enumerate(ips):
            store.offer(refused(f"{ts}-{i}", ip, ts + i))
    store.offer(answered("OK1"))  # an accepted one: in the counts, not in the refused lists
    object.__setattr__(store._pending[-1][0], "ts", DAY0 + 86400 + 5)
    store.flush()
    span = (DAY0, DAY0 + 3 * 86400)

    before = store.dashboard(*span)
    assert before["top_refused_clients"] == [(a, 4), (c, 4), (b, 3)]  # exact: all from the per-hour counts
    assert before["top_refused_sender_domains"] == [("1.bad.test", 4), ("3.bad.test", 4), ("2.bad.test", 3)]
    assert before["totals"] == {"reject": 11, "accept": 1}

    assert store.rollup(clock.now) >= 3 and store.rollup(clock.now) == 0  # each finished day once
    after = store.dashboard(*span)
    # per day only the top 2 are kept: day 0 a3 b2 (c1 in "other"), day 1 c2 a1 (b1: a tie, lost on the
    # key's order), day 2 c1 -- so b and c are each one short; the counts by hour and action stay exact
    assert after["top_refused_clients"] == [(a, 4), (c, 3), (b, 2)]
    assert after["per_hour"] == before["per_hour"] and after["totals"] == before["totals"]
    assert after["top_symbols"] == before["top_symbols"] == [("RBL_TEST", 11)]  # one symbol: exact
    with store.engine.connect() as conn:
        others = conn.exec_driver_sql("SELECT day_ts, count FROM daily_top WHERE kind = 'refused_client' "
                                      "AND key = '' ORDER BY day_ts").all()
    assert [tuple(r) for r in others] == [(DAY0, 1), (DAY0 + 86400, 1)]  # each day's sum stays exact

    # a partial day at an edge comes from the per-hour counts: exact there
    assert store.dashboard(DAY0 + 12 * 3600, DAY0 + 3 * 86400)["top_refused_clients"] == [(a, 4), (c, 4), (b, 2)]
    assert store.dashboard(DAY0 + 86400, DAY0 + 86400 + 7200)["top_refused_clients"] == [(c, 2), (a, 1), (b, 1)]

    # a fact written late for a rolled-up day: that day is read from the hours until rolled up again
    store.offer(refused("LATE", b, DAY0 + 86400 + 4000))
    store.flush()
    assert store.dashboard(*span)["top_refused_clients"] == [(a, 4), (b, 4), (c, 3)]
    assert store.rollup(clock.now) == 1
    assert store.dashboard(*span)["top_refused_clients"] == [(b, 4), (a, 3), (c, 3)]  # day 1: b2 c2 (a1 other)

    store.prune(DAY0 + 40 * 86400)  # the rollup goes with the retention
    assert store.dashboard(*span)["top_refused_clients"] == [] and store.rollup(DAY0 + 40 * 86400) >= 1


# --- quarantine ------------------------------------------------------------------------------


@pytest.mark.parametrize("event_first", [True, False])
def test_quarantine_index_whatever_the_order_of_the_facts(make_store, event_first):
    store = make_store(quarantine_retention=14 * 86400)
    clock = store.clock
    judged = (T0, answered("QQ", Action.QUARANTINE, 9.0, [("BAYES_99", 3.5), ("RBL_TEST", 5.5)],
                           subject="You won", rcpts=("bob@example.test", "carol@example.test")))
    fact = (T0 + 1, ev.Quarantined("QQ", T0 + 1, "score"))
    emit(store, clock, *([fact, judged] if event_first else [judged, fact]))
    emit(store, clock, (T0 + 2, answered("QOTHER", Action.QUARANTINE, 9.0, rcpts=("dave@example.test",))))
    items = store.quarantine_items()
    assert [i["queue_id"] for i in items] == ["QOTHER", "QQ"]
    q = items[1]
    assert q["subject"] == "You won" and q["sender"] == "alice@sender.test" and q["score"] == 9.0
    assert q["recipients"] == ["bob@example.test", "carol@example.test"]
    assert [s["name"] for s in q["symbols"]] == ["BAYES_99", "RBL_TEST"]
    assert q["reason"] == "score"
    assert q["expires"] == pytest.approx((T0 if not event_first else T0 + 1) + 14 * 86400, abs=1.5)
    assert [i["queue_id"] for i in store.quarantine_items(recipient="carol@example.test")] == ["QQ"]
    assert [i["queue_id"] for i in store.quarantine_items(since=T0 + 2)] == ["QOTHER"]
    assert [i["queue_id"] for i in store.quarantine_items(limit=1, offset=1)] == ["QQ"]
    assert store.message("QQ")["quarantine"]["reason"] == "score"


def test_quarantine_expiry_release_and_delete(make_store):
    store = make_store(quarantine_retention=86400)
    clock = store.clock
    emit(store, clock,
         (T0, answered("E1", Action.QUARANTINE, 9.0)),
         (T0, answered("E2", Action.QUARANTINE, 9.0)),
         (T0, answered("E3", Action.QUARANTINE, 9.0)),
         (T0 + 1, ev.Quarantined("E3", T0 + 1, "virus", expires=T0 + 10 * 86400)))
    emit(store, clock, (T0 + 10, ev.Released("E1", T0 + 10, "web:admin")),
         (T0 + 11, ev.Deleted("E2", T0 + 11, "cli:root", "quarantine")))
    assert [(i["queue_id"], i["reason"]) for i in store.quarantine_items()] == [("E3", "virus")]
    clock.now = T0 + 5 * 86400  # past the default expiry, not past E3's own
    assert [i["queue_id"] for i in store.quarantine_items()] == ["E3"]
    clock.now = T0 + 10 * 86400 + 1
    assert store.quarantine_items() == []
    assert store.prune(clock.now) == 1  # the index entry; the messages are within retention
    assert store.message("E3")["quarantine"] is None and store.message("E3")["action"] == "quarantine"
    assert [e["kind"] for e in store.message("E1")["events"]] == ["released"]


# --- labels for the what-if ----------------------------------------------------------------------


def test_verdicts_carry_what_admins_said_later(make_store):
    store = make_store()
    clock = store.clock
    emit(store, clock,
         (T0, answered("V1", Action.QUARANTINE, 6.0)),
         (T0 + 1, answered("V2", Action.TAG, 7.5)),
         (T0 + 2, answered("V3", Action.ACCEPT, 1.0)),
         (T0 + 3, answered("V4", Action.ACCEPT, 4.0)),
         (T0 + 4, ev.StageRefused(session(), envelope("V5"), "rcpt", Reply(550, "5.1.1", "unknown"), "x@example.test")))
    emit(store, clock,
         (T0 + 10, ev.Released("V1", T0 + 10, "web:admin", learned_ham=True)),
         (T0 + 11, ev.Learned("V2", T0 + 11, "web:admin", "spam")),
         (T0 + 12, ev.Learned("V4", T0 + 12, "digest:bob@example.test", "ham")))
    assert store.verdicts(T0, T0 + 100) == [("V1", 6.0, "quarantine", "ham"), ("V2", 7.5, "tag", "spam"),
                                            ("V3", 1.0, "accept", None), ("V4", 4.0, "accept", "ham")]
    assert store.verdicts(T0 + 1, T0 + 3) == [("V2", 7.5, "tag", "spam"), ("V3", 1.0, "accept", None)]


def test_audit_trail_newest_first(make_store):
    store = make_store()
    clock = store.clock
    emit(store, clock, *[(T0 + i, ev.AdminAction(T0 + i, f"web:u{i}", "login", "", "", "127.0.0.1"))
                         for i in range(3)])
    assert [a["actor"] for a in store.audit()] == ["web:u2", "web:u1", "web:u0"]
    assert [a["actor"] for a in store.audit(since=T0 + 1, limit=1)] == ["web:u2"]
    assert store.audit()[0]["node"] == "mx1.test"


# --- retention -----------------------------------------------------------------------------------


def test_prune_drops_what_is_older_than_the_retention(make_store):
    store = make_store(retention=10 * 86400)
    clock = store.clock
    old, new = T0 - 20 * 86400, T0 - 86400
    emit(store, clock,
         (old, answered("OLD", Action.TAG, 6, [("BAYES_99", 3.5)])),
         (old + 1, ev.Spooled("OLD", old + 1, 10)),
         (old + 2, ev.DeliveryAttempted("OLD", old + 2, "h:25", (ev.RecipientOutcome("bob@example.test", "sent",
                                                                                     250, "ok"),))),
         (old + 3, ev.AdminAction(old + 3, "cli:root", "flush")),
         (new, answered("NEW")))
    assert store.dashboard(old - 3600, T0)["totals"] == {"tag": 1, "accept": 1}
    assert store.prune(T0) == 1
    assert [r["queue_id"] for r in store.search()] == ["NEW"]
    assert store.message("OLD") is None
    assert store.search(recipient="bob@example.test") == [store.search(queue_id="NEW")[0]]
    assert store.audit() == []
    assert store.dashboard(old - 3600, T0)["totals"] == {"accept": 1}
    assert store.prune(T0) == 0


def test_the_writer_prunes_on_a_timer(make_store):
    store = make_store(retention=86400, prune_interval=1, prune_on_timer=True)
    clock = store.clock
    emit(store, clock, (T0, answered("T1")))
    assert len(store.search()) == 1
    clock.now = T0 + 2 * 86400  # the writer's next look finds T1 past the retention
    deadline = time.monotonic() + 30
    while store.search() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.search() == []


def test_the_writer_rolls_finished_days_up_on_its_timer(make_store):
    store = make_store(prune_interval=1, prune_on_timer=True)
    clock = store.clock
    emit(store, clock, (DAY0 + 3600, refused("D1", "203.0.113.1", DAY0 + 3600)))
    clock.now = DAY0 + 2 * 86400  # day 0 is finished (and its grace hour past); the next look rolls it up
    deadline = time.monotonic() + 30
    with store.engine.connect() as conn:
        while time.monotonic() < deadline:
            days = [r[0] for r in conn.exec_driver_sql("SELECT day_ts FROM rolled_days")]
            conn.rollback()  # a fresh snapshot each look
            if DAY0 in days:
                break
            time.sleep(0.05)
    assert DAY0 in days and DAY0 + 86400 not in days
    assert store.dashboard(DAY0, DAY0 + 86400)["top_refused_clients"] == [("203.0.113.1", 1)]


# --- the writer ------------------------------------------------------------------------------------


def test_records_are_written_in_batches_off_the_caller(make_store):
    store = make_store(batch_interval=3600, batch_size=1000)
    sub = store.subscriber()
    for i in range(5):
        sub(answered(f"B{i}"))
    time.sleep(0.2)
    assert store.search() == [] and store.pending == 5  # waiting for the interval or the batch size
    store.flush()
    assert len(store.search()) == 5 and store.pending == 0


def test_a_full_batch_is_written_without_a_flush(make_store):
    store = make_store(batch_interval=3600, batch_size=10)
    sub = store.subscriber()
    for i in range(10):
        sub(answered(f"F{i}"))
    deadline = time.monotonic() + 30
    while len(store.search()) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(store.search()) == 10


def test_a_full_queue_drops_and_counts_instead_of_waiting(make_store, caplog):
    store = make_store(max_pending=3)  # the writer is not started: nothing drains the queue
    for i in range(5):
        store.offer(answered(f"D{i}"))
    assert store.pending == 3 and store.dropped == 2
    assert "writer is behind" in caplog.text
    store.flush()
    assert len(store.search()) == 3


def test_a_store_that_cannot_be_written_logs_and_drops(caplog):
    port = free_port()  # nothing listens there: the database is down
    store = TrackingStore(f"postgresql://mailgate@127.0.0.1:{port}/x", batch_interval=0.05, clock=Clock())
    try:
        sub = store.subscriber()
        sub(answered("X1"))  # returns at once, as for a healthy store
        store.flush()
        assert store.failed == 1 and store.written == 0
        assert "cannot write 1 facts" in caplog.text and "mail is unaffected" in caplog.text
    finally:
        store.close()


def test_another_process_writes_the_same_store(make_store):
    """The delivery process writes deliveries while the receiver writes messages."""
    store = make_store()
    code = (
        "import sys\n"
        "from gateway import events as ev\n"
        "from monitor.tracking import TrackingStore\n"
        "s = TrackingStore(sys.argv[1], node='deliverd', batch_size=50)\n"
        "sub = s.subscriber()\n"
        "for i in range(300):\n"
        "    sub(ev.DeliveryAttempted(f'P{i}', 1800000000.0 + i, 'h:25',\n"
        "        (ev.RecipientOutcome('bob@example.test', 'sent', 250, 'ok'),)))\n"
        "s.close()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, store.url.replace("+psycopg", "")], cwd=REPO)
    sub = store.subscriber()
    for i in range(300):
        sub(answered(f"P{i}"))
    store.flush()
    assert child.wait(120) == 0
    assert len(store.search(limit=1000)) == 300
    assert all(len(store.message(f"P{i}")["deliveries"]) == 1 for i in (0, 150, 299))


def test_from_config_puts_a_wal_sqlite_under_the_queue_dir(tmp_path):
    from gateway import config as cfg

    config = cfg.validate({"queue": {"dir": str(tmp_path / "q")}, "server": {"hostname": "mx9.test"},
                           "tracking": {"retention": "7d", "batch_size": 7}}, {})
    store = TrackingStore.from_config(config)
    try:
        store.offer(answered("C1"))
        store.flush()
        assert store.node == "mx9.test" and store.retention == 7 * 86400 and store.batch_size == 7
        path = tmp_path / "q" / "tracking.sqlite"
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("SELECT queue_id, node FROM messages").fetchall() == [("C1", "mx9.test")]
    finally:
        store.close()


def test_bad_tracking_urls_are_refused_with_the_key():
    from gateway import config as cfg
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tracking.url = 'mysql://x': expected"):
        cfg.validate({"tracking": {"url": "mysql://x"}}, {})
    with pytest.raises(ConfigError, match=r"tracking.retention = '-1d'"):
        cfg.validate({"tracking": {"retention": "-1d"}}, {})


def test_a_running_gateway_tracks_a_message_and_its_delivery(mailgate, sink):
    """`mailgate run` writes the message, its delivery process the delivery, to one store."""
    gw = mailgate()
    ham = (b"From: a@sender.test\r\nTo: bob@example.test\r\nSubject: =?utf-8?q?d=C3=A9jeuner?=\r\n"
           b"Message-ID: <lunch-7@sender.test>\r\n\r\nnoon?\r\n")
    with gw.smtp() as c:
        c.sendmail("alice@sender.test", ["bob@example.test"], ham)
    assert sink.wait_for(1, timeout=30)
    store = TrackingStore(f"sqlite:///{gw.queue_dir()}/tracking.sqlite", clock=Clock(), prune_on_timer=False)
    try:
        deadline = time.monotonic() + 30
        found = None
        while time.monotonic() < deadline:
            rows = store.search(message_id="<lunch-7@sender.test>")
            if rows:
                found = store.message(rows[0]["queue_id"])
                if found["deliveries"]:
                    break
            time.sleep(0.2)
        assert found is not None, gw.log()
        assert found["sender"] == "alice@sender.test" and found["recipients"] == ["bob@example.test"]
        assert found["subject"] == "déjeuner" and found["action"] == "accept" and found["client"] == "127.0.0.1"
        assert [(d["recipient"], d["status"], d["code"]) for d in found["deliveries"]] == [
            ("bob@example.test", "sent", 250)]
        assert "spooled" in [e["kind"] for e in found["events"]]
        assert store.dashboard(time.time() - 3600, time.time() + 3600)["totals"] == {"accept": 1}
    finally:
        store.close()
