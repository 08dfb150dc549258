"""Greylisting: the first attempt of a (client network, sender, recipient)
triplet gets 451 4.7.1; a retry after ``delay`` (and within
``retry_window``) passes, and the triplet then passes at once for
``pass_lifetime``.  A client network that has passed ``auto_allow_after``
distinct triplets is not greylisted any more for ``auto_allow_lifetime``.

Off unless ``[greylist] enabled = true``.  Never for trusted networks,
authenticated sessions, or anything ``[lists]`` allows (client, sender or
recipient).  State is in the shared store under ``grey:`` (triplets) and
``greyok:`` (passes per client network).  Clients count per /24 (IPv4) and
/64 (IPv6) by default, since big senders retry from another host of the
same pool.
"""

from __future__ import annotations

import time
from typing import Callable

from pydantic import Field

from gateway.config import Duration, Section
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage
from gateway.store import StoreUnavailable, could_not_check, store_for
from rules._netkey import client_net
from rules.lists import access_lists


class GreylistSettings(Section):
    enabled: bool = False
    delay: Duration = 300.0
    retry_window: Duration = 2 * 86400.0
    pass_lifetime: Duration = 35 * 86400.0
    auto_allow_after: int = Field(5, ge=0)  # 0 = never
    auto_allow_lifetime: Duration = 35 * 86400.0
    ipv4_prefix: int = Field(24, ge=8, le=32)
    ipv6_prefix: int = Field(64, ge=32, le=128)


REFRESH_EVERY = 3600.0  # seconds: a passed triplet's lifetime is renewed this often while in use


class Greylist(Check):
    name = "greylist"
    stage = Stage.RCPT
    symbols = (
        Symbol("GREYLIST", 0.0, "greylist", "First attempt from this client, sender and recipient: try again later"),
        Symbol("GREYLIST_PASSED", 0.0, "greylist", "Came back after the greylisting delay"),
        Symbol("GREYLIST_FAIL", 0.0, "greylist", "Greylisting could not check: the state store did not answer"),
    )
    priority = 50  # after recipient checks: an unknown user gets 550, not 451

    def __init__(self, store, settings: GreylistSettings, lists=None, clock: Callable[[], float] = time.time):
        self.store = store
        self.s = settings
        self.lists = lists
        self.clock = clock

    @classmethod
    def from_config(cls, config, services):
        s = config.greylist
        if not s.enabled:
            return None
        return cls(store_for(services), s, access_lists(config, services))

    async def check(self, txn):
        if txn.session.may_relay or (self.lists is not None and self.lists.allowed(txn)):
            return []
        try:
            return await self._greylist(txn)
        except StoreUnavailable as e:  # fail open ([store] on_error), and say so
            return could_not_check(self.name, "GREYLIST_FAIL", e, self.store)
        except Exception as e:  # state unavailable: let the mail through rather than tempfail it forever
            return [Failed(self.name, f"store: {e!r}")]

    async def _greylist(self, txn):
        s = self.s
        net = client_net(txn.session.ip, s.ipv4_prefix, s.ipv6_prefix)
        ok_key = f"greyok:{net}"
        if s.auto_allow_after and (await self.store.get(ok_key) or 0) >= s.auto_allow_after:
            return []
        sender = txn.envelope.sender.lower() or "<>"
        key = f"grey:{net}|{sender}|{txn.rcpt.address.lower()}"
        now = self.clock()
        record = await self.store.get(key)
        if record is None:
            await self.store.put(key, {"first": now, "passed": False}, s.retry_window)
            return [Result("GREYLIST", 0.0, "first attempt", refuse="greylist")]
        if record.get("passed"):
            # extend the pass at most once per REFRESH_EVERY, not on every
            # message: with a shared store each write is a round trip in the session
            if now - record.get("seen", record["first"]) >= min(REFRESH_EVERY, s.pass_lifetime / 10):
                await self.store.put(key, {**record, "seen": now}, s.pass_lifetime)
            return []
        waited = now - record["first"]
        if waited < s.delay:
            return [Result("GREYLIST", 0.0, f"retry in {s.delay - waited:.0f}s", refuse="greylist")]
        await self.store.put(key, {"first": record["first"], "passed": True, "seen": now}, s.pass_lifetime)
        if s.auto_allow_after:
            await self.store.incr(ok_key, s.auto_allow_lifetime)
        return [Result("GREYLIST_PASSED", 0.0, f"delayed {waited:.0f}s")]


CHECKS = (Greylist,)
# [store] is declared here until the gateway takes it among its core sections
SECTIONS = {"greylist": GreylistSettings}
