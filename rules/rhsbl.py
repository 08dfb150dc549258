"""RHSBL: the sender's domain looked up in domain blocklists (``[rhsbl]``).

``<sender domain>.<zone>`` for every zone at once, bounded by
``[rhsbl] timeout``.  Answers must lie in the zone's ``answers`` networks,
by default 127.0.0.0/16 (domain lists such as Spamhaus DBL answer
127.0.1.x); 127.255.255.x error codes and anything else are ``Failed``.
Zone settings (symbol, score, codes, bits) are those of ``[rbl]``; symbols
default to ``RHSBL_<ZONE>``.  Skipped for the null sender, address-literal
senders and sessions that may relay.
"""

from __future__ import annotations

from pydantic import Field

from gateway.config import Section
from gateway.records import Stage
from rules._dnslists import Zone, ZoneCheck, ZoneSettings, flatten, query_zones, zone_symbols


class RhsblSettings(Section):
    zones: list[ZoneSettings] = Field(default_factory=list)
    timeout: float = Field(5.0, gt=0, le=60)


class Rhsbl(ZoneCheck):
    name = "rhsbl"
    stage = Stage.MAIL
    priority = 20

    @classmethod
    def declared_symbols(cls, config, services=None):
        zones = [Zone.build(z, "RHSBL_", "127.0.0.0/16") for z in config.rhsbl.zones]
        return zone_symbols(zones, "rhsbl", "Sender domain")

    @classmethod
    def from_config(cls, config, services):
        s = config.rhsbl
        if not s.zones:
            return None
        zones = [Zone.build(z, "RHSBL_", "127.0.0.0/16") for z in s.zones]
        return cls(services.resolver, zones, s.timeout)

    async def check(self, txn):
        domain = txn.envelope.sender_domain
        if txn.session.may_relay or not domain or domain.startswith("["):
            return []
        outcomes = await query_zones(self.resolver, [(z, domain) for z in self.zones], self.name, self.timeout)
        return flatten(outcomes)


CHECKS = (Rhsbl,)
SECTIONS = {"rhsbl": RhsblSettings}
