"""Rate limits per client: new connections per minute, messages per hour.

Counted in the shared store (``gateway.store``) under ``rate:``, fixed
windows from the first hit.  Over the limit, the connection (CONNECT stage)
or the transaction (MAIL stage) gets 451 4.7.1 ("ratelimit"); refused
attempts count too, so a client that keeps hammering stays limited until
its window ends.  IPv6 clients are counted per ``ipv6_prefix`` network.
Trusted networks, authenticated sessions (for messages) and
``[lists] allow_ips`` are exempt.  The concurrent-connection caps (total and
per IP, 421) are the SMTP server's, not these checks'.
"""

from __future__ import annotations

from pydantic import Field

from gateway.config import Section
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage
from gateway.store import StoreUnavailable, could_not_check, store_for
from rules._netkey import client_net
from rules.lists import access_lists


class RateLimitSettings(Section):
    connections_per_minute: int = Field(0, ge=0)  # per client address; 0 = no limit
    messages_per_hour: int = Field(0, ge=0)  # MAIL FROM per client address; 0 = no limit
    ipv6_prefix: int = Field(64, ge=32, le=128)


class _Limit(Check):
    window: float
    key_prefix: str
    symbol: str
    limit_setting: str  # the [ratelimit] key giving this limit; 0 switches the check off

    def __init__(self, store, limit: int, ipv6_prefix: int = 64, lists=None):
        self.store = store
        self.limit = limit
        self.ipv6_prefix = ipv6_prefix
        self.lists = lists

    @classmethod
    def from_config(cls, config, services):
        s = config.ratelimit
        limit = getattr(s, cls.limit_setting)
        if not limit:
            return None
        return cls(store_for(services), limit, s.ipv6_prefix, access_lists(config, services))

    async def check(self, txn):
        session = txn.session
        if session.may_relay or (self.lists is not None and self.lists.allow_ips.match(session.ip)):
            return []
        net = client_net(session.ip, 32, self.ipv6_prefix)
        try:
            count = await self.store.incr(f"{self.key_prefix}{net}", self.window)
        except StoreUnavailable as e:  # fail open ([store] on_error), and say so
            return could_not_check(self.name, f"{self.symbol}_FAIL", e, self.store)
        except Exception as e:  # state unavailable: do not limit, do not refuse
            return [Failed(self.name, f"store: {e!r}")]
        if count > self.limit:
            return [Result(self.symbol, 0.0, f"{net}: {count} > {self.limit}", refuse="ratelimit")]
        return []


class ConnectionRate(_Limit):
    name = "connection_rate"
    stage = Stage.CONNECT
    symbols = (Symbol("RATE_CONNECTIONS", 0.0, "ratelimit", "Client network opened too many connections"),
               Symbol("RATE_CONNECTIONS_FAIL", 0.0, "ratelimit", "Not counted: the state store did not answer"))
    priority = 1
    window = 60.0
    key_prefix = "rate:conn:"
    symbol = "RATE_CONNECTIONS"
    limit_setting = "connections_per_minute"


class MessageRate(_Limit):
    name = "message_rate"
    stage = Stage.MAIL
    symbols = (Symbol("RATE_MESSAGES", 0.0, "ratelimit", "Client network sent too many messages"),
               Symbol("RATE_MESSAGES_FAIL", 0.0, "ratelimit", "Not counted: the state store did not answer"))
    priority = 1
    window = 3600.0
    key_prefix = "rate:msg:"
    symbol = "RATE_MESSAGES"
    limit_setting = "messages_per_hour"


CHECKS = (ConnectionRate, MessageRate)
SECTIONS = {"ratelimit": RateLimitSettings}
