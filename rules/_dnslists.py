"""What DNSBL (IP) and RHSBL (domain) checks share: zone settings, reading
answers, and querying many zones at once within one time bound.

An answer is a listing only when every address in it lies in the zone's
``answers`` networks (default 127.0.0.0/24 for IP lists).  Spamhaus-style
error codes (127.255.255.0/24: "query refused", "typing error", "rate limited")
and anything else (a hijacked NXDOMAIN pointing at an ad server) are
``Failed``: could not check, never a listing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Optional

from pydantic import BeforeValidator, Field, field_validator, model_validator

from gateway.config import Domain, Section
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result

ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
_SYMBOL = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _symbol(v: str) -> str:
    if v and not _SYMBOL.match(v):
        raise ValueError("a symbol is upper case letters, digits and _, as RBL_SPAMCOP")
    return v


def default_symbol(prefix: str, zone: str) -> str:
    return prefix + re.sub(r"[^A-Z0-9]+", "_", zone.upper()).strip("_")


class CodeSettings(Section):
    symbol: str
    score: Optional[float] = None  # None: the zone's score

    @field_validator("symbol")
    @classmethod
    def _sym(cls, v):
        if not v:
            raise ValueError("a code needs a symbol")
        return _symbol(v)


def _code(value):
    """A code's sub-symbol may be given alone: "127.0.0.2" = "ZEN_SBL" (the zone's score)."""
    return {"symbol": value} if isinstance(value, str) else value


Code = Annotated[CodeSettings, BeforeValidator(_code)]


class ZoneSettings(Section):
    zone: Domain
    symbol: str = ""  # "" -> RBL_<ZONE> / RHSBL_<ZONE>
    score: float = 1.0  # negative for allow lists (DNSWL)
    # exact answers -> sub-symbols: {"127.0.0.4" = {symbol = "ZEN_XBL", score = 4.0}} or
    # {"127.0.0.4" = "ZEN_XBL"} (the zone's score)
    codes: dict[str, Code] = Field(default_factory=dict)
    # bits of the answer's last octet -> sub-symbols (multi-lists such as SURBL: 2, 4, 8...)
    bits: dict[int, Code] = Field(default_factory=dict)
    # networks a real answer must lie in; anything else is a failure
    answers: list[str] = Field(default_factory=list)
    # counts toward [rbl] reject_count when listed with a positive score
    reject: bool = True
    ipv6: bool = True  # query IPv6 clients (nibble form) too

    @field_validator("symbol")
    @classmethod
    def _sym(cls, v):
        return _symbol(v)

    @field_validator("codes")
    @classmethod
    def _codes(cls, v):
        for code in v:
            ipaddress.IPv4Address(code)  # raises ValueError naming it
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        for bit in v:
            if bit <= 0 or bit > 255 or bit & (bit - 1):
                raise ValueError(f"bit {bit}: expected a single bit of the last octet (1, 2, 4 ... 128)")
        return v

    @field_validator("answers")
    @classmethod
    def _answers(cls, v):
        return [str(ipaddress.IPv4Network(n, strict=False)) for n in v]

    @model_validator(mode="after")
    def _codes_and_bits(self):
        if self.codes and self.bits:
            raise ValueError("give codes (exact answers) or bits (bitmask), not both")
        return self


@dataclass(frozen=True)
class Zone:
    """A zone ready to query."""

    name: str
    symbol: str
    score: float
    codes: dict
    bits: dict
    answers: tuple
    reject: bool
    ipv6: bool

    @classmethod
    def build(cls, s: ZoneSettings, prefix: str, default_answers: str) -> "Zone":
        nets = tuple(ipaddress.IPv4Network(n) for n in (s.answers or [default_answers]))
        return cls(s.zone, s.symbol or default_symbol(prefix, s.zone), s.score, dict(s.codes), dict(s.bits),
                   nets, s.reject, s.ipv6)

    @property
    def is_allow_list(self) -> bool:
        return self.score < 0


def zone_symbols(zones: list[Zone], group: str, listed: str) -> tuple[Symbol, ...]:
    """What a list of zones may report: each zone's symbol and its codes' and
    bits' sub-symbols.  ``listed`` says what is looked up ("Client address")."""
    out: dict[str, Symbol] = {}
    for z in zones:
        what = "allow list" if z.is_allow_list else "blocklist"
        out.setdefault(z.symbol, Symbol(z.symbol, z.score, group, f"{listed} listed in the {what} {z.name}"))
        for key, code in [*z.codes.items(), *z.bits.items()]:
            score = z.score if code.score is None else code.score
            answer = f"answer {key}" if isinstance(key, str) else f"bit {key}"
            out.setdefault(code.symbol, Symbol(code.symbol, score, group, f"{listed} listed in {z.name} ({answer})"))
    return tuple(out.values())


@dataclass(frozen=True)
class Listing:
    zone: Zone
    results: tuple  # Result records
    answers: tuple = ()  # the A records, as text


class ZoneCheck(Check):
    """A check that looks names up in DNS list zones, all bounded by one timeout."""

    def __init__(self, resolver, zones: list[Zone], timeout: float):
        self.resolver = resolver
        self.zones = zones
        self.timeout = timeout


def reversed_ip(ip) -> str:
    """1.2.3.4 -> 4.3.2.1; IPv6 -> its 32 nibbles reversed, as DNSBLs expect."""
    if ip.version == 4:
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


def read_answer(zone: Zone, records, check: str, query: str):
    """A Listing, or a Failed for answers that cannot be a listing."""
    try:
        addrs = [ipaddress.IPv4Address(r) for r in records]
    except ValueError:
        return Failed(check, f"{zone.name}: answer is not an IPv4 address")
    for a in addrs:
        if a in ERROR_CODES:
            return Failed(check, f"{zone.name}: error code {a} for {query}")
        if not any(a in n for n in zone.answers):
            return Failed(check, f"{zone.name}: answer {a} outside {', '.join(map(str, zone.answers))}")
    results = []
    for a in sorted(set(addrs)):
        detail = f"{zone.name}={a}"
        if zone.codes:
            code = zone.codes.get(str(a))
            if code is not None:
                results.append(Result(code.symbol, zone.score if code.score is None else code.score, detail))
                continue
        elif zone.bits:
            octet = int(a) & 0xFF
            hits = [c for bit, c in sorted(zone.bits.items()) if octet & bit]
            if hits:
                results.extend(Result(c.symbol, zone.score if c.score is None else c.score, detail) for c in hits)
                continue
        results.append(Result(zone.symbol, zone.score, detail))
    # one answer naming several addresses that map to the same symbol counts once
    seen, unique = set(), []
    for r in results:
        if r.symbol not in seen:
            seen.add(r.symbol)
            unique.append(r)
    return Listing(zone, tuple(unique), tuple(str(a) for a in sorted(set(addrs))))


async def query_zone(resolver, zone: Zone, name: str, check: str):
    """Listing, Failed, or None (not listed)."""
    qname = f"{name}.{zone.name}"
    lookup = await resolver.query(qname, "A")
    if lookup.ok:
        return read_answer(zone, lookup.records, check, name)
    if lookup.missing:
        return None
    return Failed(check, f"{zone.name}: {lookup.status}")


async def query_zones(resolver, jobs: list[tuple[Zone, str]], check: str, total_timeout: float) -> list:
    """All zones at once, one outcome per job in job order (Listing, Failed, or None
    for not listed); whatever has not answered within ``total_timeout`` is Failed."""
    if not jobs:
        return []
    tasks = [asyncio.ensure_future(query_zone(resolver, z, name, check)) for z, name in jobs]
    done, pending = await asyncio.wait(tasks, timeout=total_timeout)
    for t in pending:
        t.cancel()
    out = []
    for (zone, _), task in zip(jobs, tasks):
        if task in pending:
            out.append(Failed(check, f"{zone.name}: no answer within {total_timeout:g}s"))
        elif task.exception() is not None:
            out.append(Failed(check, f"{zone.name}: {task.exception()!r}"))
        else:
            out.append(task.result())
    return out


def flatten(outcomes) -> list:
    """Listings and failures -> the records a check returns."""
    out = []
    for o in outcomes:
        if isinstance(o, Listing):
            out.extend(o.results)
        elif o is not None:
            out.append(o)
    return out
