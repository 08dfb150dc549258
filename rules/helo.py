"""HELO/EHLO argument checks (HELO stage).

- ``HELO_INVALID``: not a syntactically valid host name or address literal
  (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``); refused when
  ``[helo] reject_invalid`` (554 5.7.1), else scored.
- ``HELO_LITERAL_MISMATCH``: an address literal that is not the client's
  address; refused when ``reject_literal_mismatch``.
- ``HELO_FORGED_US``: an outside client claiming to be us: our
  ``server.hostname``, one of ``relay.domains``, one of ``[helo] our_names``,
  or one of our addresses (listen addresses, the address it connected to),
  bare or as a literal; refused when ``reject_forged``.
- ``HELO_BARE_IP`` (an address without brackets), ``HELO_NO_FQDN``
  (``localhost`` or a single label): scored.
- ``HELO_NXDOMAIN``: the name has no A or AAAA record (scored; lookups that
  time out or fail are ``Failed``, no points), when ``check_dns``.

Trusted networks, allow-listed clients (``[lists] allow_ips``) and
loopback clients (unless ``check_loopback``) are not checked.  The symbols' default scores can be changed in ``[scores]``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re

from pydantic import Field, field_validator

from gateway.config import Section
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage
from rules.lists import access_lists

# Letters, digits, hyphens; underscores too, which Windows hosts send and
# Postfix accepts.  Labels of 1-63 characters, an optional final dot.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
LOCALHOST = {"localhost", "localhost.localdomain", "localhost6", "localhost6.localdomain6"}


class HeloSettings(Section):
    reject_invalid: bool = True
    reject_literal_mismatch: bool = True
    reject_forged: bool = True
    check_dns: bool = True
    # more names and addresses that are us (a cluster's other hostnames, a NAT address)
    our_names: list[str] = Field(default_factory=list)
    # loopback clients are this host's own programs (a re-injecting filter, cron
    # mail), which say "localhost" and have no PTR; like trusted networks, not checked
    check_loopback: bool = False

    @field_validator("our_names")
    @classmethod
    def _names(cls, v):
        return [n.strip().lower().rstrip(".") for n in v]


def _parse_literal(text: str):
    inner = text[1:-1]
    if inner.lower().startswith("ipv6:"):
        return ipaddress.IPv6Address(inner[5:])
    return ipaddress.IPv4Address(inner)


def _unwrap(ip):
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


class Helo(Check):
    name = "helo"
    stage = Stage.HELO
    symbols = (
        Symbol("HELO_INVALID", 2.0, "helo", "HELO/EHLO name is empty or not a valid host name"),
        Symbol("HELO_FORGED_US", 3.0, "helo", "HELO/EHLO claims to be this gateway"),
        Symbol("HELO_LITERAL_MISMATCH", 2.0, "helo", "HELO/EHLO address literal is not the client's address"),
        Symbol("HELO_BARE_IP", 1.5, "helo", "HELO/EHLO is a bare IP address, not a host name"),
        Symbol("HELO_NO_FQDN", 1.5, "helo", "HELO/EHLO is not a fully qualified domain name"),
        Symbol("HELO_NXDOMAIN", 1.0, "helo", "HELO/EHLO name has no address in DNS"),
    )
    priority = 10

    def __init__(self, resolver, settings: HeloSettings, our_names=(), our_ips=(), lists=None):
        self.resolver = resolver
        self.settings = settings
        self.our_names = {n.lower().rstrip(".") for n in our_names}
        self.our_ips = set(our_ips)
        for n in settings.our_names:
            try:
                self.our_ips.add(_unwrap(ipaddress.ip_address(n)))
            except ValueError:
                self.our_names.add(n)
        self.lists = lists

    @classmethod
    def from_config(cls, config, services):
        names = [config.server.hostname, *config.relay.domains]
        ips = []
        for listen in config.server.listen:
            try:
                ip = ipaddress.ip_address(listen.host)
            except ValueError:
                continue
            if not ip.is_unspecified:
                ips.append(_unwrap(ip))
        return cls(services.resolver, config.helo, names, ips, access_lists(config, services))

    def _refuse_or_score(self, symbol, score, detail, refuse: bool):
        if refuse:
            return [Result(symbol, 0.0, detail, refuse="helo")]
        return [Result(symbol, score, detail)]

    def _is_us(self, ip, session) -> bool:
        if ip in self.our_ips:
            return True
        try:
            return bool(session.local_ip) and ip == _unwrap(ipaddress.ip_address(session.local_ip))
        except ValueError:
            return False

    async def check(self, txn):
        session = txn.session
        s = self.settings
        if session.may_relay or (self.lists is not None and self.lists.allow_ips.match(session.ip)):
            return []
        if session.ip.is_loopback and not s.check_loopback:
            return []
        helo = (session.helo or "").strip()
        shown = helo[:64]
        if not helo:
            return self._refuse_or_score("HELO_INVALID", 2.0, "empty", s.reject_invalid)
        if helo.startswith("[") and helo.endswith("]"):
            try:
                literal = _unwrap(_parse_literal(helo))
            except ValueError:
                return self._refuse_or_score("HELO_INVALID", 2.0, shown, s.reject_invalid)
            if literal != session.ip and self._is_us(literal, session):
                return self._refuse_or_score("HELO_FORGED_US", 3.0, shown, s.reject_forged)
            if literal != session.ip:
                return self._refuse_or_score("HELO_LITERAL_MISMATCH", 2.0, shown, s.reject_literal_mismatch)
            return []
        try:
            bare = _unwrap(ipaddress.ip_address(helo))
        except ValueError:
            bare = None
        if bare is not None:
            if bare != session.ip and self._is_us(bare, session):
                return self._refuse_or_score("HELO_FORGED_US", 3.0, shown, s.reject_forged)
            return [Result("HELO_BARE_IP", 1.5, shown)]
        if len(helo) > 255 or not _HOSTNAME.match(helo):
            return self._refuse_or_score("HELO_INVALID", 2.0, shown, s.reject_invalid)
        name = helo.lower().rstrip(".")
        if name in self.our_names:
            return self._refuse_or_score("HELO_FORGED_US", 3.0, shown, s.reject_forged)
        if name in LOCALHOST or "." not in name:
            return [Result("HELO_NO_FQDN", 1.5, shown)]
        if not s.check_dns:
            return []
        a, aaaa = await asyncio.gather(self.resolver.query(name, "A"), self.resolver.query(name, "AAAA"))
        if a.ok or aaaa.ok:
            return []
        if a.failed or aaaa.failed:
            return [Failed(self.name, f"A/AAAA {name}: {a.status}/{aaaa.status}")]
        return [Result("HELO_NXDOMAIN", 1.0, f"{shown} ({a.status})")]


CHECKS = (Helo,)
SECTIONS = {"helo": HeloSettings}
