"""URI blocklists (Spamhaus DBL, SURBL, URIBL style) at DATA.

Links are taken from the text and HTML of the message, de-obfuscated
(``hxxp://``, ``example[.]com``, entities, ``http://bank@host``...; see
``rules.sa.uris``) and reduced to their registered domain with the public
suffix list (``publicsuffix2``'s bundled copy, no network).  Each distinct
domain, up to ``max_domains`` per message, is looked up in every configured
zone at once through the gateway's resolver; the whole message gets
``timeout`` seconds.  An answer is mapped through the zone's ``codes``
(an exact address, or ``mask:N`` for bit-field lists such as SURBL's) to a
symbol; answers outside 127.0.0.0/8 and the zone's ``ignore`` codes
(query-refused markers) never count.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from typing import Optional

from pydantic import Field, field_validator, model_validator

from gateway.config import Domain, Section
from gateway.pipeline import in_thread
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage
from rules.sa.message import MessageView
from rules.sa.uris import host_of, ip_of, registered_domain

log = logging.getLogger("mailgate.uribl")

_SYMBOL = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")


class UriblZone(Section):
    zone: Domain
    # symbol for any listing that ``codes`` does not name
    symbol: str = ""
    score: float = 2.0
    # answer -> symbol: "127.0.1.2" (exact) or "mask:8" (bit set in the last octet)
    codes: dict[str, str] = Field(default_factory=dict)
    # answers that mean "not answered" (e.g. 127.255.255.254: query refused)
    ignore: list[str] = Field(default_factory=lambda: ["127.255.255.252", "127.255.255.254",
                                                       "127.255.255.255", "127.0.1.255"])
    # also look up hosts written as IP addresses (reversed, as SURBL wants)
    ips: bool = False

    @field_validator("codes")
    @classmethod
    def _codes(cls, v: dict[str, str]) -> dict[str, str]:
        for key, sym in v.items():
            if key.startswith("mask:"):
                if not key[5:].isdigit() or not 0 < int(key[5:]) < 256:
                    raise ValueError(f"{key!r}: mask must be mask:N with N in 1..255")
            else:
                ipaddress.IPv4Address(key)
            if not _SYMBOL.match(sym):
                raise ValueError(f"{sym!r}: symbols are upper-case letters, digits and _")
        return v

    @model_validator(mode="after")
    def _default_symbol(self):
        if not self.symbol:
            object.__setattr__(self, "symbol", "URIBL_" + re.sub(r"[^A-Z0-9]", "_", self.zone.upper()))
        elif not _SYMBOL.match(self.symbol):
            raise ValueError(f"symbol {self.symbol!r}: upper-case letters, digits and _")
        return self


class UriblSettings(Section):
    zones: list[UriblZone] = Field(default_factory=list)
    max_domains: int = Field(20, gt=0, le=500)
    timeout: float = Field(5.0, gt=0, le=60)
    # never looked up (your own domains, links in every signature)
    skip_domains: list[Domain] = Field(default_factory=list)


def message_domains(raw: bytes, parsed=None, limit: int = 20, skip=()) -> list[str]:
    """Registered domains (and IP hosts) linked from the message, in order, each once."""
    view = MessageView(raw, parsed)
    skip = set(skip)
    out: dict[str, None] = {}
    for uri in view.uris:
        if uri[:7].lower() == "mailto:":
            continue  # addresses name mail domains, not linked web sites
        host = host_of(uri)
        if host is None:
            continue
        dom = registered_domain(host)
        if dom is None or dom in skip or dom in out:
            continue
        out[dom] = None
        if len(out) >= limit:
            break
    return list(out)


def symbols_for(zone: UriblZone, answers: tuple) -> list[str]:
    syms: list[str] = []
    for a in answers:
        try:
            addr = ipaddress.IPv4Address(a)
        except ValueError:
            continue
        if a in zone.ignore or not addr.is_loopback:
            continue
        matched = False
        for key, sym in zone.codes.items():
            if key.startswith("mask:"):
                if int(a.rsplit(".", 1)[1]) & int(key[5:]):
                    matched = True
                    syms.append(sym)
            elif key == a:
                matched = True
                syms.append(sym)
        if not matched:
            syms.append(zone.symbol)
    return list(dict.fromkeys(syms))


def query_name(domain: str, zone: UriblZone) -> Optional[str]:
    ip = ip_of(domain)
    if ip is not None:
        if not zone.ips or ":" in ip:
            return None
        return ".".join(reversed(ip.split("."))) + "." + zone.zone
    return f"{domain}.{zone.zone}"


class Uribl(Check):
    name = "uribl"
    stage = Stage.DATA
    priority = 60

    @classmethod
    def declared_symbols(cls, config, services=None):
        out: dict[str, Symbol] = {}
        for z in config.uribl.zones:
            for sym in [z.symbol, *z.codes.values()]:
                out.setdefault(sym, Symbol(sym, z.score, "uribl", f"Links to a domain listed in {z.zone}"))
        return tuple(out.values())

    def __init__(self, settings: UriblSettings, resolver, run_in_thread=None):
        self.settings = settings
        self.resolver = resolver
        self.run_in_thread = run_in_thread

    @classmethod
    def from_config(cls, config, services):
        s = config.uribl
        if not s.zones:
            return None
        return cls(s, services.resolver, services.run_in_thread)

    async def check(self, txn):
        s = self.settings
        # finding the URIs of a big HTML body is CPU work: not on the reactor
        domains = await in_thread(self.run_in_thread, message_domains, txn.message.raw, txn.message.parsed,
                                  s.max_domains, s.skip_domains)
        if not domains:
            return []
        jobs = []
        for dom in domains:
            for zone in s.zones:
                qname = query_name(dom, zone)
                if qname:
                    jobs.append((dom, zone, qname))
        tasks = [asyncio.ensure_future(self.resolver.query(q, "A")) for _, _, q in jobs]
        done, pending = await asyncio.wait(tasks, timeout=s.timeout) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        listed: dict[str, list[str]] = {}
        results: list = []
        failures = len(pending)
        seen: set = set()
        for (dom, zone, _), task in zip(jobs, tasks):
            if task not in done or task.cancelled():
                continue
            exc = task.exception()
            if exc is not None:
                failures += 1
                continue
            lookup = task.result()
            if lookup.failed:
                failures += 1
                continue
            if not lookup.ok:
                continue
            for sym in symbols_for(zone, lookup.records):
                listed.setdefault(dom, []).append(sym)
                if sym not in seen:  # one result per symbol, naming the first domain
                    seen.add(sym)
                    results.append(Result(sym, zone.score, f"{dom} listed in {zone.zone}"))
        txn.state["uribl"] = listed
        if failures:
            results.append(Failed(self.name, f"{failures} of {len(jobs)} URI blocklist lookups failed"))
        return results


CHECKS = (Uribl,)
SECTIONS = {"uribl": UriblSettings}
