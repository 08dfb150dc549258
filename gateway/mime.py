"""Message bytes to ``email`` objects, with the recursion bounded.

The email package recurses wherever the input nests: its parser once per
multipart or message/* level (about 980 levels exhaust Python's stack, fewer
under a deep caller), ``walk()`` and the generator likewise, and its address
parser once per nested ``(comment)``.  Hostile mail nests as deep as it
likes, so every check parses and reads addresses through here:

- ``parse_mime``: compat32 (never raises on broken input, keeps header bytes
  as sent), a container at ``max_depth`` kept as opaque bytes;
- ``getaddresses``: ``email.utils.getaddresses`` with comments nested deeper
  than ``MAX_COMMENT_DEPTH`` dropped (a comment is never an address).

A leaf module: rules/, classifiers/ and scanners/ may import it.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import functools
from typing import Iterable, Iterator

# Honest mail nests a handful of levels; this keeps walk() and the
# generator well inside the stack as well.
MAX_MIME_DEPTH = 100
MAX_COMMENT_DEPTH = 50
_CONTAINERS = ("multipart", "message")


class MimePart(email.message.Message):
    """A compat32 part that knows how deep it is nested.

    A container (multipart/*, message/*) at ``max_depth`` is opaque: its
    content type reads as application/octet-stream, so the parser keeps its
    body as bytes instead of descending, and so does every check after it.
    Its headers stay as sent.
    """

    depth = 0

    def __init__(self, policy=email.policy.compat32, max_depth: int = MAX_MIME_DEPTH):
        super().__init__(policy)
        self.max_depth = max_depth

    def attach(self, payload) -> None:
        # The feed parser links each new part to its parent through attach()
        # before it reads the part's headers, so the depth is known by the
        # time the parser asks the part for its content type.
        payload.depth = self.depth + 1
        super().attach(payload)

    @property
    def opaque(self) -> bool:
        """A container the parsed view does not descend into."""
        return self.depth >= self.max_depth and self.declared_type.partition("/")[0] in _CONTAINERS

    @property
    def declared_type(self) -> str:
        """The content type as sent (or defaulted), even for an opaque part."""
        return super().get_content_type()

    def get_content_type(self) -> str:
        return "application/octet-stream" if self.opaque else self.declared_type

    def walk(self) -> Iterator[email.message.Message]:
        """Every part, depth first as email's walk(), without recursing."""
        stack: list = [self]
        while stack:
            part = stack.pop()
            yield part
            if part.is_multipart():
                stack.extend(reversed(part.get_payload()))


def parse_mime(raw: bytes, max_depth: int = MAX_MIME_DEPTH) -> MimePart:
    if max_depth < 1:
        raise ValueError("max_depth must be at least 1")
    factory = functools.partial(MimePart, max_depth=max_depth)
    return email.message_from_bytes(raw, _class=factory, policy=email.policy.compat32)


def getaddresses(values: Iterable) -> list[tuple[str, str]]:
    """(display name, address) pairs of header values, as email.utils gives them."""
    return email.utils.getaddresses([shallow_comments(str(v)) for v in values])


def shallow_comments(value: str, limit: int = MAX_COMMENT_DEPTH) -> str:
    """``value`` with every comment that nests deeper than ``limit`` replaced by
    a space.  Quotes are not honoured, so parentheses inside a quoted string
    count too: the nesting seen here is never less than the address parser's."""
    if value.count("(") <= limit:  # cannot nest deeper
        return value
    out: list[str] = []
    depth = deepest = 0
    start = i = 0
    while i < len(value):
        c = value[i]
        if depth and c == "\\":
            i += 2  # a quoted pair inside a comment nests nothing
            continue
        if c == "(":
            if not depth:
                out.append(value[start:i])
                start, deepest = i, 0
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")" and depth:
            depth -= 1
            if not depth:
                out.append(value[start:i + 1] if deepest <= limit else " ")
                start = i + 1
        i += 1
    # the rest: plain text, or a comment left open to the end
    out.append(value[start:] if not depth or deepest <= limit else " ")
    return "".join(out)
