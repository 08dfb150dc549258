"""The one DNS seam: an async dnspython resolver with a bounded TTL cache.

Every lookup ends in exactly one outcome: ``Answer`` (records), ``NXDOMAIN``,
``NOANSWER`` (the name exists, no records of that type), ``SERVFAIL`` or
``TIMEOUT``.  Only NXDOMAIN/NOANSWER may count against a message; SERVFAIL
and TIMEOUT mean "could not check".  Nameservers are always explicit when
configured: the system resolver is used only when ``[dns] nameservers`` is
empty.

Coroutines here must run as asyncio tasks under the asyncio reactor
(``gateway.pipeline.as_deferred`` does that).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

NXDOMAIN = "nxdomain"
NOANSWER = "noanswer"
SERVFAIL = "servfail"
TIMEOUT = "timeout"
OK = "ok"

NEGATIVE_TTL = 300  # cap for caching NXDOMAIN/NOANSWER when the SOA gives none
FAILURE_TTL = 5  # brief, so a flapping server is not hammered


@dataclass(frozen=True)
class Lookup:
    name: str
    rdtype: str
    status: str
    records: tuple = field(default=())  # rdata text (to_text()) in answer order
    ttl: int = 0

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def failed(self) -> bool:
        """Could not tell: neither listed nor clean."""
        return self.status in (SERVFAIL, TIMEOUT)

    @property
    def missing(self) -> bool:
        return self.status in (NXDOMAIN, NOANSWER)


class Resolver:
    def __init__(
        self,
        nameservers: Sequence = (),
        timeout: float = 3.0,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ):
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [
                dns.nameserver.Do53Nameserver(str(getattr(ns, "host", ns)), int(getattr(ns, "port", 53)))
                for ns in nameservers
            ]
        else:
            r = dns.asyncresolver.Resolver()
        r.timeout = timeout
        r.lifetime = timeout
        r.cache = None  # our own cache below keeps negative answers and failures too
        self._resolver = r
        self.timeout = timeout
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[float, Lookup]] = OrderedDict()
        self._clock = clock
        # identical lookups already on the wire: checks of one stage run
        # concurrently and often ask the same question (the client's PTR)
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self.queries = 0  # sent to the network (for tests and bench)

    @classmethod
    def from_config(cls, dns_settings) -> "Resolver":
        return cls(dns_settings.nameservers, dns_settings.timeout, dns_settings.cache_size)

    def _cached(self, key) -> Optional[Lookup]:
        hit = self._cache.get(key)
        if hit is None:
            return None
        expires, lookup = hit
        if expires <= self._clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return lookup

    def _store(self, key, lookup: Lookup, ttl: float) -> None:
        if self.cache_size <= 0 or ttl <= 0:
            return
        self._cache[key] = (self._clock() + ttl, lookup)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def query(self, name: str, rdtype: str = "A") -> Lookup:
        name = name.rstrip(".").lower()
        rdtype = rdtype.upper()
        key = (name, rdtype)
        hit = self._cached(key)
        if hit is not None:
            return hit
        pending = self._inflight.get(key)
        if pending is not None and pending.get_loop() is asyncio.get_running_loop():
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # the caller that sent the query gave up (a DNSBL time bound), we did not
                return await self.query(name, rdtype)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            self.queries += 1
            lookup, ttl = await self._query(name, rdtype)
            self._store(key, lookup, ttl)
            future.set_result(lookup)
            return lookup
        except BaseException:  # cancelled: waiters must not hang
            future.cancel()
            raise
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    async def _query(self, name: str, rdtype: str) -> tuple[Lookup, float]:
        try:
            ans = await self._resolver.resolve(name + ".", rdtype, raise_on_no_answer=False, search=False)
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
            # a malformed name from the client (HELO, sender domain) cannot be looked up
            return Lookup(name, rdtype, SERVFAIL), FAILURE_TTL
        except dns.resolver.NXDOMAIN as e:
            return Lookup(name, rdtype, NXDOMAIN), self._negative_ttl(e.response(e.qnames()[0]) if e.qnames() else None)
        except (dns.exception.Timeout, dns.resolver.LifetimeTimeout):
            return Lookup(name, rdtype, TIMEOUT), FAILURE_TTL
        except (dns.resolver.NoNameservers, dns.resolver.YXDOMAIN, dns.exception.DNSException):
            return Lookup(name, rdtype, SERVFAIL), FAILURE_TTL
        if ans.rrset is None:
            return Lookup(name, rdtype, NOANSWER), self._negative_ttl(ans.response)
        records = tuple(r.to_text() for r in ans.rrset)
        return Lookup(name, rdtype, OK, records, ans.rrset.ttl), ans.rrset.ttl

    @staticmethod
    def _negative_ttl(response) -> float:
        # RFC 2308: the negative TTL is min(SOA TTL, SOA MINIMUM)
        try:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    return min(rrset.ttl, rrset[0].minimum, NEGATIVE_TTL)
        except Exception:
            pass
        return 60

    async def ptr(self, ip: str) -> Lookup:
        return await self.query(dns.reversename.from_address(ip).to_text(), "PTR")

    async def mx(self, domain: str) -> Lookup:
        """MX records sorted by preference: records are 'pref host'."""
        lookup = await self.query(domain, "MX")
        if not lookup.ok:
            return lookup
        ordered = sorted(lookup.records, key=lambda t: int(t.split()[0]))
        return Lookup(lookup.name, lookup.rdtype, lookup.status, tuple(ordered), lookup.ttl)

    async def addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of a host, empty when it has none."""
        found = await asyncio.gather(self.query(host, "A"), self.query(host, "AAAA"))
        return [rec for lookup in found if lookup.ok for rec in lookup.records]
