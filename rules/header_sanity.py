"""Header checks that need no network: the headers RFC 5322 requires, and a
From that parses to exactly one address."""

from __future__ import annotations

from gateway.mime import getaddresses
from gateway.plugins import Check, Symbol
from gateway.records import Result, Stage


class HeaderSanity(Check):
    name = "header_sanity"
    stage = Stage.DATA
    symbols = (
        Symbol("MISSING_DATE", 1.0, "headers", "Missing Date: header"),
        Symbol("MISSING_MID", 0.5, "headers", "Missing Message-ID: header"),
        Symbol("MISSING_FROM", 1.5, "headers", "Missing From: header"),
        Symbol("FROM_MALFORMED", 1.5, "headers", "From: is not exactly one valid address"),
    )
    priority = 20
    blocking = True  # reads the parsed view, which the pool thread makes first

    def check(self, txn):
        msg = txn.message.parsed
        out = []
        if msg.get("Date") is None:
            out.append(Result("MISSING_DATE", 1.0, "no Date: header"))
        if msg.get("Message-ID") is None:
            out.append(Result("MISSING_MID", 0.5, "no Message-ID: header"))
        froms = msg.get_all("From") or []
        if not froms:
            out.append(Result("MISSING_FROM", 1.5, "no From: header"))
        elif len(froms) > 1 or not _one_address(str(froms[0])):
            out.append(Result("FROM_MALFORMED", 1.5, "From: is not one valid address"))
        return out


def _one_address(value: str) -> bool:
    pairs = [(n, a) for n, a in getaddresses([value]) if n or a]
    if len(pairs) != 1:
        return False
    local, _, domain = pairs[0][1].rpartition("@")
    return bool(local) and "." in domain and " " not in pairs[0][1]


CHECKS = (HeaderSanity,)
