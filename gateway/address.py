"""RFC 5321 path parsing and the relay decision.

Parsing is strict where relaying is at stake (the local part and domain of a
recipient) and lenient where Postfix is lenient (missing angle brackets,
a space after the colon), so that real clients are not refused for style.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_LITERAL = r"\[[^\[\]\\\s]+\]"
_MAILBOX = re.compile(rf"^(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})$")
# RFC 6531 3.3: with SMTPUTF8 a local part may hold any UTF-8 beyond ASCII
_ATEXT_UTF8 = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
_DOT_STRING_UTF8 = rf"{_ATEXT_UTF8}+(?:\.{_ATEXT_UTF8}+)*"
_QUOTED_UTF8 = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"'
_MAILBOX_UTF8 = re.compile(
    rf"^(?P<local>{_DOT_STRING_UTF8}|{_QUOTED_UTF8})@(?P<domain>{_DOMAIN}|{_LITERAL})$")
_ADL = re.compile(rf"^@(?:{_DOMAIN}|{_LITERAL})(?:,@(?:{_DOMAIN}|{_LITERAL}))*:")
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")


class AddressError(ValueError):
    """Bad path syntax; ``what`` says which part was wrong."""


@dataclass(frozen=True)
class Mailbox:
    local: str  # as sent (quotes kept)
    domain: str  # lower case, no trailing dot; "[...]" for literals

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def unquoted_local(self) -> str:
        if self.local.startswith('"'):
            return re.sub(r"\\(.)", r"\1", self.local[1:-1])
        return self.local


@dataclass(frozen=True)
class Path:
    mailbox: Optional[Mailbox]  # None = the null path <>
    params: dict = field(default_factory=dict)
    had_route: bool = False  # a source route was given (and ignored, RFC 5321 4.1.1.3)

    @property
    def address(self) -> str:
        return self.mailbox.address if self.mailbox else ""


def _literal_ok(lit: str) -> bool:
    inner = lit[1:-1]
    try:
        if inner.lower().startswith("ipv6:"):
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def parse_mailbox(text: str, utf8: bool = False) -> Mailbox:
    """``utf8``: the transaction carries SMTPUTF8, so the local part may be
    UTF-8 and the domain U-labels (kept as their A-label form, which is what
    DNS and the relay decision use)."""
    if not text.isascii():
        if not utf8:
            raise AddressError("needs SMTPUTF8")
        text = _ascii_domain(text)
    m = (_MAILBOX_UTF8 if utf8 else _MAILBOX).match(text)
    if not m:
        raise AddressError("address syntax")
    domain = m.group("domain")
    if domain.startswith("["):
        if not _literal_ok(domain):
            raise AddressError("address literal")
        domain = domain.lower() if domain.lower().startswith("[ipv6:") else domain
    else:
        domain = domain.lower().rstrip(".")
    if len(m.group("local").encode()) > 64 or len(domain) > 255:
        raise AddressError("address too long")
    return Mailbox(m.group("local"), domain)


def _ascii_domain(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at or domain.isascii() or domain.startswith("["):
        return text
    try:
        return f"{local}@{domain.rstrip('.').encode('idna').decode('ascii')}"
    except UnicodeError:
        raise AddressError("address syntax") from None


def parse_path(arg: str, keyword: str, allow_null: bool, utf8: bool = False,
               postmaster_domain: Optional[str] = None) -> Path:
    """``arg`` is what follows the command verb, e.g. 'FROM:<a@b> SIZE=10'.

    ``postmaster_domain``: RCPT TO:<postmaster> without a domain must be
    accepted (RFC 5321 4.5.1); it means the postmaster of this domain.
    """
    if not arg[: len(keyword) + 1].upper() == keyword + ":":
        raise AddressError("syntax")
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        inner, tail = rest[1:end], rest[end + 1 :]
    else:  # lenient: no brackets, the address is the first word
        inner, _, tail = rest.partition(" ")
        tail = " " + tail if tail else ""
    if tail and not tail.startswith(" "):
        raise AddressError("syntax")
    params = parse_params(tail.split())
    if inner == "":
        if not allow_null:
            raise AddressError("address syntax")
        return Path(None, params)
    if postmaster_domain and inner.lower() == "postmaster":
        return Path(Mailbox(inner, postmaster_domain), params)
    had_route = False
    route = _ADL.match(inner)
    if route:
        inner, had_route = inner[route.end():], True
    return Path(parse_mailbox(inner, utf8), params, had_route)


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping quoted strings."""
    quoted = escaped = False
    for i, ch in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    raise AddressError("syntax")


def parse_params(words: Iterable[str]) -> dict:
    params = {}
    for w in words:
        m = _PARAM.match(w)
        if not m:
            raise AddressError(f"parameter {w[:40]}")
        params[m.group(1).upper()] = m.group(2)
    return params


# --- relay -----------------------------------------------------------------

# Characters that other mailers treat as routing inside a local part: the
# percent hack, UUCP bang paths, and an '@' in a quoted local part.
_ROUTING_CHARS = ("%", "!", "@")


def is_local_domain(domain: str, domains: Iterable[str]) -> bool:
    return not domain.startswith("[") and domain in domains


def relay_allowed(mailbox: Mailbox, domains: Iterable[str], may_relay: bool) -> bool:
    """Default deny: only our own domains, unless the client may relay.

    For an outside client, mail to our domain must not carry routing in its
    local part (``user%other@ours``, ``other!user@ours``, ``"user@other"@ours``):
    the internal server might honour it and relay for us (Postfix's
    allow_untrusted_routing = no).
    """
    if may_relay:
        return True
    if not is_local_domain(mailbox.domain, domains):
        return False
    return not any(c in mailbox.unquoted_local for c in _ROUTING_CHARS)
