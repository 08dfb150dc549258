"""Client reverse DNS: no PTR, or a PTR that does not point back (FCrDNS).

``RDNS_NONE``: the client address has no PTR (NXDOMAIN or no PTR record).
``RDNS_MISMATCH``: none of its PTR names (the first ``[rdns] max_names``)
has an address record (A for IPv4 clients, AAAA for IPv6) equal to the
client address.  Lookup timeouts and SERVFAIL are ``Failed``: no points.
Not applied to trusted networks, nor to loopback clients unless
``[rdns] check_loopback = true``.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field

from gateway.config import Section
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage


class RdnsSettings(Section):
    # PTR names checked for forward confirmation (a client can publish many)
    max_names: int = Field(5, gt=0, le=20)
    # loopback clients are this host's own programs: not checked unless asked
    check_loopback: bool = False


class ReverseDns(Check):
    name = "rdns"
    stage = Stage.CONNECT
    symbols = (
        Symbol("RDNS_NONE", 1.0, "rdns", "Client address has no reverse DNS name"),
        Symbol("RDNS_MISMATCH", 0.8, "rdns", "Client's reverse DNS name does not resolve back to its address"),
    )
    priority = 30

    def __init__(self, resolver, max_names: int = 5, check_loopback: bool = False):
        self.resolver = resolver
        self.max_names = max_names
        self.check_loopback = check_loopback

    @classmethod
    def from_config(cls, config, services):
        return cls(services.resolver, config.rdns.max_names, config.rdns.check_loopback)

    async def check(self, txn):
        session = txn.session
        if session.may_relay or (session.ip.is_loopback and not self.check_loopback):
            return []
        ip = session.ip
        ptr = await self.resolver.ptr(str(ip))
        if ptr.missing:
            return [Result("RDNS_NONE", 1.0, str(ip))]
        if not ptr.ok:
            return [Failed(self.name, f"PTR {ip}: {ptr.status}")]
        names = [n.rstrip(".").lower() for n in ptr.records][: self.max_names]
        rdtype = "A" if ip.version == 4 else "AAAA"
        failed = False
        for name in names:
            lookup = await self.resolver.query(name, rdtype)
            if lookup.ok:
                try:
                    if any(ipaddress.ip_address(a) == ip for a in lookup.records):
                        txn.state.setdefault("rdns", name)
                        return []
                except ValueError:
                    continue
            elif lookup.failed:
                failed = True
        if failed:
            return [Failed(self.name, f"forward lookup of {', '.join(names)} failed")]
        return [Result("RDNS_MISMATCH", 0.8, f"{ip} -> {names[0] if names else '?'}")]


CHECKS = (ReverseDns,)
SECTIONS = {"rdns": RdnsSettings}
