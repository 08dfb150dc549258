"""MIME structure that honest mail never has (DATA stage).

- ``MIME_NESTING_TOO_DEEP``: multiparts or message/* parts nest deeper than
  the parsed view's limit (``[server] max_mime_depth``, 100 levels by default).
  The parts below the limit are opaque bytes to every content check, so a
  message built to hide something there, or to exhaust a parser's stack, is
  evidence in itself.  Scored, not refused: the score can be changed in
  ``[scores]``.
"""

from __future__ import annotations

from gateway.plugins import Check, Symbol
from gateway.records import Result, Stage

SYMBOL = "MIME_NESTING_TOO_DEEP"
SCORE = 1.5


class MimeStructure(Check):
    name = "mime_structure"
    stage = Stage.DATA
    symbols = (Symbol(SYMBOL, SCORE, "mime", "MIME parts nest deeper than the gateway looks (server.max_mime_depth)"),)
    priority = 20
    blocking = True  # reads the parsed view, which the pool thread makes first

    def check(self, txn):
        message = txn.message
        if not message.mime_truncated:
            return []
        return [Result(SYMBOL, SCORE, f"MIME parts nest deeper than {message.max_mime_depth} levels")]


CHECKS = (MimeStructure,)
