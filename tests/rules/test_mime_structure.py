"""The mime_structure check: MIME_NESTING_TOO_DEEP when the parsed view had
to stop descending."""

from __future__ import annotations

from gateway.mime import MAX_MIME_DEPTH
from gateway.records import Message, Result, Session, Transaction
from rules.mime_structure import SCORE, SYMBOL, MimeStructure
from tests.gateway.test_mime import nested, rfc822_chain


def check(message: Message) -> list:
    return MimeStructure().check(Transaction(Session("Q1", "192.0.2.1"), message=message))


def test_nesting_past_the_limit_scores_the_symbol():
    for raw in (nested(1000), rfc822_chain(MAX_MIME_DEPTH + 1)):
        assert check(Message(raw)) == [Result(SYMBOL, SCORE, f"MIME parts nest deeper than {MAX_MIME_DEPTH} levels")]


def test_nesting_within_the_limit_scores_nothing():
    assert check(Message(nested(MAX_MIME_DEPTH))) == []
    assert check(Message(b"Subject: plain\r\n\r\nhello\r\n")) == []


def test_the_limit_is_the_messages():
    assert check(Message(nested(4), max_mime_depth=3))[0].detail == "MIME parts nest deeper than 3 levels"
