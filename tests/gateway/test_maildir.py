"""gateway.maildir: the Maildir contract, headers added, errors as MaildirError."""

from __future__ import annotations

import errno
import mailbox
import os
import re
import threading

import pytest

from gateway import maildir

MESSAGE = b"From: a@s.test\r\nSubject: hi\r\n\r\nbody line\r\n.\r\n"


def test_delivers_into_new_with_return_path_and_delivered_to(tmp_path):
    box = tmp_path / "mail"
    path = maildir.deliver(str(box), "bob@example.test", "alice@sender.test", MESSAGE, "mx.test")
    assert os.path.dirname(path) == str(box / "new")
    assert sorted(os.listdir(box)) == ["cur", "new", "tmp"]
    assert os.listdir(box / "tmp") == []
    assert open(path, "rb").read() == (
        b"Return-Path: <alice@sender.test>\nDelivered-To: bob@example.test\n"
        + MESSAGE.replace(b"\r\n", b"\n"))
    # a standard reader sees it as one message with our headers
    (msg,) = list(mailbox.Maildir(str(box), create=False))
    assert msg["Delivered-To"] == "bob@example.test"
    assert msg["Subject"] == "hi"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_null_sender_return_path(tmp_path):
    path = maildir.deliver(str(tmp_path / "m"), "b@x.test", "", MESSAGE)
    assert open(path, "rb").read().startswith(b"Return-Path: <>\n")


def test_names_are_unique_and_follow_the_spec(tmp_path):
    box = str(tmp_path / "m")
    names = set()
    lock = threading.Lock()

    def many():
        for _ in range(50):
            p = maildir.deliver(box, "b@x.test", "a@s.test", MESSAGE, "host/with:odd")
            with lock:
                names.add(os.path.basename(p))

    workers = [threading.Thread(target=many) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(names) == 200 == len(os.listdir(os.path.join(box, "new")))
    for name in names:
        assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+R[0-9a-f]{16}\.host\\057with\\072odd", name), name


def test_loop_is_refused_permanently(tmp_path):
    looping = b"Delivered-To: <Bob@Example.test>\r\n" + MESSAGE
    with pytest.raises(maildir.DeliveryLoop) as e:
        maildir.deliver(str(tmp_path / "m"), "bob@example.test", "a@s.test", looping)
    assert not e.value.temporary and e.value.enhanced == "5.4.6"
    # the header only counts in the header block
    in_body = MESSAGE + b"Delivered-To: bob@example.test\r\n"
    maildir.deliver(str(tmp_path / "m"), "bob@example.test", "a@s.test", in_body)


def test_unwritable_place_is_a_temporary_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(maildir.MaildirError) as e:
        maildir.deliver(str(blocker / "box"), "b@x.test", "a@s.test", MESSAGE)
    assert e.value.temporary and e.value.enhanced == "4.3.0"
    assert "cannot create Maildir" in str(e.value)


def test_failure_after_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    box = tmp_path / "m"

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir.os, "rename", disk_full)
    with pytest.raises(maildir.MaildirError) as e:
        maildir.deliver(str(box), "b@x.test", "a@s.test", MESSAGE)
    assert e.value.temporary and e.value.enhanced == "4.3.1"
    assert "No space left" in str(e.value)
    assert os.listdir(box / "tmp") == [] and os.listdir(box / "new") == []
