"""Durability rules of the spool: the envelope is the commit record."""

import os

from gateway.spool import QueueEntry, RecipientState, Spool, new_queue_id


def entry(qid="A1"):
    return QueueEntry(queue_id=qid, sender="a@b.test", recipients=[RecipientState("c@d.test")], arrival=1.0)


def test_store_read_update_remove(tmp_path):
    s = Spool(str(tmp_path))
    s.store(entry(), b"data")
    assert s.read("A1") == b"data"
    e = s.entry("A1")
    e.held = True
    s.update(e)
    assert s.entry("A1").held
    assert [x.queue_id for x in s.entries()] == ["A1"]
    s.remove("A1")
    assert s.entry("A1") is None and list(s.entries()) == []


def test_recover_drops_half_written_messages_and_stale_state(tmp_path):
    s = Spool(str(tmp_path))
    s.store(entry("GOOD"), b"ok")
    (tmp_path / "tmp" / "X.partial").write_bytes(b"half: a crash before the rename")
    (tmp_path / "envelopes" / "GONE").write_bytes(entry("GONE").to_json())  # message already removed
    assert [e.queue_id for e in Spool(str(tmp_path)).recover()] == ["GOOD"]
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "envelopes") == []
    assert s.read("GOOD") == b"ok"


def test_state_file_wins_over_the_first_line(tmp_path):
    s = Spool(str(tmp_path))
    s.store(entry("A2"), b"line1\nline2\n")
    e = s.entry("A2")
    e.attempts = 3
    s.update(e)
    assert s.entry("A2").attempts == 3 and s.read("A2") == b"line1\nline2\n"


def test_ids_are_unique_and_sortable():
    a, b = new_queue_id(1000.0), new_queue_id(1001.0)
    assert a < b and a.isalnum() and new_queue_id(1.0) != new_queue_id(1.0)


def test_bad_ids_are_not_paths(tmp_path):
    s = Spool(str(tmp_path))
    assert s.entry("../etc/passwd") is None and s.quarantine_meta("../x") is None


def test_quarantine_store_list_remove(tmp_path):
    s = Spool(str(tmp_path))
    s.quarantine_store("Q1", b"msg", {"queue_id": "Q1", "score": 9})
    assert s.quarantine_list() == [{"queue_id": "Q1", "score": 9}]
    assert s.quarantine_read("Q1") == b"msg"
    s.quarantine_remove("Q1")
    assert s.quarantine_list() == []


def test_locked_gives_the_entry_and_excludes_other_lockers(tmp_path):
    import fcntl

    s = Spool(str(tmp_path))
    e = QueueEntry(queue_id="Q1", sender="a@x.test", recipients=[RecipientState("b@y.test")], arrival=1.0)
    s.store(e, b"m")
    with s.locked("Q1") as current:
        assert current.queue_id == "Q1" and current.sender == "a@x.test"
        other = os.open(os.path.join(s.messages, "Q1"), os.O_RDONLY)  # another process's view
        try:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("a second locker got the lock")
            except BlockingIOError:
                pass
        finally:
            os.close(other)
    other = os.open(os.path.join(s.messages, "Q1"), os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    os.close(other)
    with s.locked("NOPE") as missing, s.locked("../etc") as bad:
        assert missing is None and bad is None


def test_smtputf8_is_kept_and_old_entries_read_without_it(tmp_path):
    import json

    s = Spool(str(tmp_path))
    e = entry("U1")
    e.smtputf8 = True
    s.store(e, b"data")
    assert s.entry("U1").smtputf8 is True
    old = json.loads(entry("U2").to_json())
    del old["smtputf8"]  # as written before the field existed
    (tmp_path / "messages" / "U2").write_bytes(json.dumps(old).encode() + b"\ndata")
    assert s.entry("U2").smtputf8 is False and s.read("U2") == b"data"
