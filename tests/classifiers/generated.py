"""A small labelled corpus made up in the tests: spam and ham that differ in
vocabulary, senders, URLs and mailers, with shared filler words so that the
classes overlap the way real mail does."""

from __future__ import annotations

import mailbox
import os
import random

SPAM_WORDS = ("free offer winner cash prize click unsubscribe limited deal money credit loan cheap "
              "pills guaranteed bonus casino lottery urgent discount exclusive").split()
HAM_WORDS = ("meeting project review patch build release schedule lunch report agenda python kernel "
             "mailing thanks regards branch merge tests deadline minutes").split()
FILLER = "the and for with this that you your have will from about please today there".split()


def message(rng: random.Random, spam: bool, n: int, words: tuple[str, ...] = ()) -> bytes:
    vocab = SPAM_WORDS if spam else HAM_WORDS
    body = rng.choices(vocab, k=25) + rng.choices(FILLER, k=25) + list(words)
    rng.shuffle(body)
    if spam:
        sender = f"Best Deals <promo{n}@offers{rng.randint(1, 30)}.example>"
        subject = " ".join(rng.choices(SPAM_WORDS, k=4)).upper()
        extra = f"\nhttp://offers{rng.randint(1, 30)}.example/buy?id={n}\n"
        mailer = "X-Mailer: MassMailer 3.{}\n".format(rng.randint(0, 9))
    else:
        sender = f"Alice Smith <alice{n % 7}@corp.example>"
        subject = "Re: " + " ".join(rng.choices(HAM_WORDS, k=3))
        extra = "\n-- \nAlice, https://wiki.corp.example/team\n"
        mailer = "User-Agent: Mutt/1.{}\n".format(rng.randint(0, 9))
    text = (
        f"From: {sender}\nTo: bob@example.test\nSubject: {subject}\n"
        f"Message-ID: <{n}.{'s' if spam else 'h'}.{rng.getrandbits(32):x}@gen.example>\n"
        f"Date: Mon, 01 Jan 2024 10:00:00 +0000\n{mailer}"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n"
        + " ".join(body) + extra
    )
    return text.encode()


def corpus(seed: int, nspam: int, nham: int) -> list[tuple[int, bytes]]:
    """[(1 for spam / 0 for ham, raw)]"""
    rng = random.Random(seed)
    out = [(1, message(rng, True, seed * 100000 + i)) for i in range(nspam)]
    out += [(0, message(rng, False, seed * 100000 + nspam + i)) for i in range(nham)]
    return out


def write_maildir(path: str, messages: list[bytes]) -> str:
    md = mailbox.Maildir(path, create=True)
    for raw in messages:
        md.add(raw)
    return path


def write_mbox(path: str, messages: list[bytes]) -> str:
    box = mailbox.mbox(path, create=True)
    for raw in messages:
        box.add(raw)
    box.flush()
    box.close()
    return path


def write_files(path: str, messages: list[bytes]) -> str:
    os.makedirs(path, exist_ok=True)
    for i, raw in enumerate(messages):
        with open(os.path.join(path, f"{i:05d}.eml"), "wb") as f:
            f.write(raw)
    return path
