"""Reads messages from the places admins keep them: single files, Maildir
folders, mbox files and directory trees of any of these.

Yields ``(label, raw_bytes)``; ``label`` is the file path, or
``path:N`` for the N-th message of an mbox.  Unreadable entries are skipped
with a warning rather than stopping a long training run.
"""

from __future__ import annotations

import logging
import mailbox
import os
from typing import Iterable, Iterator

log = logging.getLogger("mailgate.sources")

MAX_MESSAGE = 64 * 1024 * 1024


def _is_maildir(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, d)) for d in ("cur", "new", "tmp"))


def _is_mbox(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(5) == b"From "
    except OSError:
        return False


def _mbox(path: str) -> Iterator[tuple[str, bytes]]:
    box = mailbox.mbox(path, create=False)
    try:
        keys = list(box.keys())
        # a file with one "From " line is just a message with an envelope line
        # (the SpamAssassin corpus is like that): keep its path as the label
        for n, key in enumerate(keys):
            label = path if len(keys) == 1 else f"{path}:{n}"
            yield label, box.get_bytes(key)
    finally:
        box.close()


def _file(path: str) -> Iterator[tuple[str, bytes]]:
    if os.path.getsize(path) > MAX_MESSAGE:
        log.warning("skipped=%s reason=larger than %d bytes", path, MAX_MESSAGE)
        return
    if _is_mbox(path):
        yield from _mbox(path)
        return
    with open(path, "rb") as f:
        yield path, f.read()


def iter_messages(paths: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    for path in paths:
        if os.path.isdir(path):
            if _is_maildir(path):
                for sub in ("cur", "new"):
                    d = os.path.join(path, sub)
                    for name in sorted(os.listdir(d)):
                        yield from _safe(os.path.join(d, name))
                continue
            for root, dirs, files in os.walk(path):
                dirs.sort()
                if _is_maildir(root):
                    dirs[:] = [d for d in dirs if d not in ("cur", "new", "tmp")]
                    yield from iter_messages([root]) if root != path else ()
                    continue
                for name in sorted(files):
                    if name.startswith(".") or name == "cmds":
                        continue  # dotfiles and the corpus' rename script
                    yield from _safe(os.path.join(root, name))
        elif os.path.exists(path):
            yield from _safe(path)
        else:
            raise FileNotFoundError(path)


def _safe(path: str) -> Iterator[tuple[str, bytes]]:
    try:
        yield from _file(path)
    except (OSError, mailbox.Error) as e:
        log.warning("skipped=%s reason=%s", path, e)
