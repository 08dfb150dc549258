"""DNSBL / DNSWL: the client address looked up in any number of IP lists.

``dnsbl`` (MAIL stage) adds each listing's score: the zone's symbol, or the
sub-symbol its return code (``codes``) or bits (``bits``) map to.  Zones with
a negative score are allow lists (DNSWL).  All zones are asked at once and
the whole lookup is bounded by ``[rbl] timeout``; a zone that times out,
fails, or answers with an error code (127.255.255.x) or outside its
``answers`` networks is ``Failed`` (no points, never a listing).

``dnsbl_reject`` (RCPT stage) refuses each recipient (554 5.7.1 naming the
zones) when the client is listed on at least ``reject_count`` zones that
have a positive score and ``reject = true``, unless a DNSWL zone lists it
too or ``[lists]`` allows the client, sender or recipient; postscreen's
"reject when listed on N lists".  It reuses what ``dnsbl`` found for this
transaction (``txn.state``), so a zone that timed out at MAIL costs no
second wait; without it (dnsbl disabled) it asks itself.

Neither applies to trusted networks or authenticated sessions
(``session.may_relay``); that is why the scores come at MAIL, once the
client had its chance to authenticate.  IPv6 clients are looked up in
nibble form (zones with ``ipv6 = false`` skip them).
"""

from __future__ import annotations

from pydantic import Field

from gateway.config import Section
from gateway.plugins import Check, Symbol
from gateway.records import Result, Stage
from rules._dnslists import (Listing, Zone, ZoneCheck, ZoneSettings, flatten, query_zones, reversed_ip,
                             zone_symbols)
from rules.lists import access_lists


class RblSettings(Section):
    zones: list[ZoneSettings] = Field(default_factory=list)
    # refuse at RCPT when listed on this many zones; 0 = never
    reject_count: int = Field(0, ge=0)
    # total time for all zones of one client, seconds
    timeout: float = Field(5.0, gt=0, le=60)


STATE_KEY = "dnsbl_outcomes"  # txn.state: (client ip, {zone: Listing | Failed | None}) from MAIL
PUBLIC_KEY = "dnsbl"  # txn.state: {zone: {"a": [answers], "txt": []}} for content rules


def build_zones(settings: RblSettings) -> list[Zone]:
    return [Zone.build(z, "RBL_", "127.0.0.0/24") for z in settings.zones]


def jobs_for(zones: list[Zone], ip) -> list[tuple[Zone, str]]:
    name = reversed_ip(ip)
    return [(z, name) for z in zones if ip.version == 4 or z.ipv6]


class Dnsbl(ZoneCheck):
    name = "dnsbl"
    stage = Stage.MAIL
    priority = 20

    @classmethod
    def declared_symbols(cls, config, services=None):
        return zone_symbols(build_zones(config.rbl), "dnsbl", "Client address")

    @classmethod
    def from_config(cls, config, services):
        s = config.rbl
        if not s.zones:
            return None
        return cls(services.resolver, build_zones(s), s.timeout)

    async def check(self, txn):
        if txn.session.may_relay:
            return []
        jobs = jobs_for(self.zones, txn.session.ip)
        outcomes = await query_zones(self.resolver, jobs, self.name, self.timeout)
        # dnsbl_reject at RCPT reads these instead of asking (and maybe waiting) again
        txn.state[STATE_KEY] = (str(txn.session.ip), {z.name: o for (z, _), o in zip(jobs, outcomes)})
        # for DATA-stage rules (SpamAssassin's check_rbl): {zone: {"a": [answers]}} of listed zones
        listed = txn.state.setdefault(PUBLIC_KEY, {})
        for o in outcomes:
            if isinstance(o, Listing):
                listed[o.zone.name] = {"a": list(o.answers), "txt": []}
        return flatten(outcomes)


class DnsblReject(Check):
    name = "dnsbl_reject"
    stage = Stage.RCPT
    symbols = (Symbol("RBL_REJECT", 0.0, "dnsbl", "Client listed on enough DNS blocklists to be refused"),)
    priority = 20

    def __init__(self, resolver, zones: list[Zone], timeout: float, reject_count: int, lists=None):
        self.resolver = resolver
        self.zones = [z for z in zones if (z.reject and z.score > 0) or z.is_allow_list]
        self.timeout = timeout
        self.reject_count = reject_count
        self.lists = lists

    @classmethod
    def from_config(cls, config, services):
        s = config.rbl
        if not s.zones or s.reject_count <= 0:
            return None
        return cls(services.resolver, build_zones(s), s.timeout, s.reject_count, access_lists(config, services))

    async def check(self, txn):
        if txn.session.may_relay or (self.lists is not None and self.lists.allowed(txn)):
            return []
        jobs = jobs_for(self.zones, txn.session.ip)
        known = txn.state.get(STATE_KEY)
        if known is not None and known[0] == str(txn.session.ip):
            seen = known[1]
            outcomes = [seen[z.name] for z, _ in jobs if z.name in seen]
            jobs = [(z, n) for z, n in jobs if z.name not in seen]
        else:
            outcomes = []
        outcomes += await query_zones(self.resolver, jobs, self.name, self.timeout)
        listings = [o for o in outcomes if isinstance(o, Listing)]
        if any(li.zone.is_allow_list for li in listings):
            return []
        blocking = [li.zone.name for li in listings if any(r.score > 0 for r in li.results)]
        if len(blocking) >= self.reject_count:
            return [Result("RBL_REJECT", 0.0, ", ".join(blocking), refuse="rbl")]
        return []


CHECKS = (Dnsbl, DnsblReject)
SECTIONS = {"rbl": RblSettings}
