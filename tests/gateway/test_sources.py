"""Reading messages from files, Maildirs, mbox files and directory trees."""

import mailbox

import pytest

from gateway.sources import iter_messages


def test_file_maildir_mbox_and_tree(tmp_path):
    (tmp_path / "one.eml").write_bytes(b"Subject: one\n\nx\n")
    md = mailbox.Maildir(str(tmp_path / "box"))
    md.add(b"Subject: two\n\nx\n")
    mb = mailbox.mbox(str(tmp_path / "archive.mbox"))
    mb.add(b"Subject: three\n\nx\n")
    mb.add(b"Subject: four\n\nx\n")
    mb.flush()
    (tmp_path / "cmds").write_text("mv a b\n")  # the corpus' rename script is not a message
    labels = {label.rsplit("/", 1)[-1]: raw for label, raw in iter_messages([str(tmp_path)])}
    subjects = sorted(raw.split(b"\n")[0 if not raw.startswith(b"From ") else 1] for raw in labels.values())
    assert subjects == [b"Subject: four", b"Subject: one", b"Subject: three", b"Subject: two"]
    assert "archive.mbox:0" in labels and "archive.mbox:1" in labels and "cmds" not in labels


def test_single_message_with_envelope_line_keeps_its_path(tmp_path):
    p = tmp_path / "00001.abc"
    p.write_bytes(b"From someone  Sat Nov 28 10:00:00 2026\nSubject: x\n\nbody\n")
    [(label, raw)] = list(iter_messages([str(p)]))
    assert label == str(p) and b"Subject: x" in raw


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_messages([str(tmp_path / "nope")]))
