"""GTUBE, the Generic Test for Unsolicited Bulk Email: a message carrying the
SpamAssassin test string scores 1000, so admins can test the spam path end to
end without real spam."""

from __future__ import annotations

from gateway.plugins import Check, Symbol
from gateway.records import Result, Stage

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class Gtube(Check):
    name = "gtube"
    stage = Stage.DATA
    symbols = (Symbol("GTUBE", 1000.0, "test", "Carries the GTUBE test string (Generic Test for Unsolicited Bulk Email)"),)
    priority = 10
    blocking = True  # a search of the whole body: with the other content work, off the reactor

    def check(self, txn):
        # SpamAssassin matches it in the body; the raw bytes hold the body
        # undecoded, which is where test senders put it.
        if GTUBE in txn.message.raw:
            return [Result("GTUBE", 1000.0, "Generic Test for Unsolicited Bulk Email")]
        return []


CHECKS = (Gtube,)
