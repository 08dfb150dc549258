"""Recipient verification: only recipients that exist get 250.

For recipients in ``relay.domains`` only (mail we relay outward is not ours
to verify), by the method ``[recipients] verify`` names, or the one
``verify_by_domain`` names for that domain:

- ``static``: a list per domain in a file (``static_files``): one entry a
  line, ``#`` comments; ``alice`` or ``alice@example.test`` (that user),
  ``@example.test`` (every user of that domain: a catch-all).
- ``ldap``: a search under ``ldap.base`` with ``ldap.filter`` (by default
  Active Directory's ``mail`` and ``proxyAddresses``); the ldap3 calls run in
  the gateway's thread pool, answers are cached in the store.
- ``callout``: an SMTP probe of the domain's next hop (its ``[routes]``
  entry, which must be ``smtp:...``): EHLO, ``MAIL FROM:<>``, ``RCPT TO``,
  QUIT, in the thread pool with smtplib.  2xx = exists, 5xx = unknown,
  anything else (4xx, refused connection, timeout) = could not verify.
  Answers are cached in the store, positive and negative for their own
  lifetimes; a failure is never cached.
- ``none``: no verification.

An unknown user is refused with 550 5.1.1 ("unknown_user").  When the
directory or the next hop cannot be asked, the recipient is tempfailed
(451 4.4.3, "callout"): a gateway that accepted it would have to bounce
later, which is how a gateway in front of Exchange becomes a backscatter
source.  ``on_error = "accept"`` lets it through instead (the failure is
logged as ``Failed``).  ``recipient_delimiter = "+"`` makes ``alice+tag``
verify as ``alice`` (static and LDAP; a callout asks the next hop about the
address as given).
"""

from __future__ import annotations

import asyncio
import math
import ipaddress
import smtplib
import socket
import threading
from typing import Literal

from pydantic import Field, model_validator

from gateway.config import Duration, Route, Section, route_for
from gateway.errors import ConfigError
from gateway.pipeline import in_thread
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage
from gateway.store import StoreUnavailable, could_not_check, store_for

Method = Literal["none", "static", "ldap", "callout"]


class LdapSettings(Section):
    url: str = ""  # ldap://host:389 or ldaps://host:636
    bind_dn: str = ""  # empty: anonymous
    password: str = ""
    password_file: str = ""  # read at start (and on reload), so the password stays out of the config
    base: str = ""
    # {address}, {local}, {domain} are filled in, LDAP-escaped
    filter: str = "(|(mail={address})(proxyAddresses=smtp:{address}))"
    timeout: float = Field(5.0, gt=0, le=60)
    cache_positive: Duration = 3600.0
    cache_negative: Duration = 600.0


class CalloutSettings(Section):
    timeout: float = Field(10.0, gt=0, le=120)  # per network operation of the probe
    helo: str = ""  # empty: server.hostname
    cache_positive: Duration = 86400.0
    cache_negative: Duration = 3600.0


class RecipientsSettings(Section):
    verify: Method = "none"
    verify_by_domain: dict[str, Method] = Field(default_factory=dict)
    static_files: dict[str, str] = Field(default_factory=dict)  # domain (or "*") -> file
    recipient_delimiter: str = Field("", max_length=1)
    on_error: Literal["tempfail", "accept"] = "tempfail"
    ldap: LdapSettings = Field(default_factory=LdapSettings)
    callout: CalloutSettings = Field(default_factory=CalloutSettings)

    @model_validator(mode="after")
    def _complete(self):
        methods = {self.verify, *self.verify_by_domain.values()}
        if "ldap" in methods and not (self.ldap.url and self.ldap.base):
            raise ValueError("verify = \"ldap\" needs ldap.url and ldap.base")
        if "static" in methods and not self.static_files:
            raise ValueError("verify = \"static\" needs static_files = { \"example.test\" = \"FILE\" }")
        return self


class Unverifiable(Exception):
    """The directory or next hop could not be asked (a temporary condition)."""


def strip_extension(address: str, delimiter: str) -> str:
    if not delimiter:
        return address
    local, at, domain = address.rpartition("@")
    return local.split(delimiter, 1)[0] + at + domain


# --- static lists -----------------------------------------------------------


class StaticDirectory:
    def __init__(self, files: dict[str, str]):
        self.users: set[str] = set()
        self.catch_all: set[str] = set()
        for domain, path in files.items():
            domain = domain.lower().rstrip(".")
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise ConfigError(f"recipients.static_files: cannot read {path}: {e.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"recipients.static_files: {path} is not UTF-8 text") from None
            for n, line in enumerate(lines, 1):
                entry = line.split("#", 1)[0].strip().lower()
                if not entry:
                    continue
                if entry.startswith("@"):
                    self.catch_all.add(entry[1:].rstrip("."))
                elif "@" in entry:
                    self.users.add(entry)
                elif domain == "*":
                    raise ConfigError(f"recipients.static_files: {path}:{n}: {entry!r} needs a domain "
                                      "(a file for \"*\" holds full addresses)")
                else:
                    self.users.add(f"{entry}@{domain}")

    def exists(self, address: str) -> bool:
        a = address.lower()
        return a in self.users or a.rpartition("@")[2] in self.catch_all


# --- LDAP ---------------------------------------------------------------


class LdapDirectory:
    """One ldap3 connection, used from the thread pool under a lock."""

    def __init__(self, s: LdapSettings):
        self.s = s
        self.password = s.password
        if s.password_file:
            try:
                with open(s.password_file, encoding="utf-8") as f:
                    self.password = f.read().strip()
            except OSError as e:
                raise ConfigError(f"recipients.ldap.password_file: cannot read {s.password_file}: "
                                  f"{e.strerror}") from None
        self._lock = threading.Lock()
        self._conn = None

    def _connect(self):
        import ldap3

        server = ldap3.Server(self.s.url, connect_timeout=self.s.timeout, get_info=ldap3.NONE)
        return ldap3.Connection(server, user=self.s.bind_dn or None, password=self.password or None,
                                auto_bind=True, read_only=True, receive_timeout=max(1, math.ceil(self.s.timeout)),
                                raise_exceptions=False)

    def lookup(self, address: str) -> bool:
        """Blocking: True if a directory entry has this address."""
        from ldap3.core.exceptions import LDAPException
        from ldap3.utils.conv import escape_filter_chars

        local, _, domain = address.rpartition("@")
        query = self.s.filter.format(address=escape_filter_chars(address), local=escape_filter_chars(local),
                                     domain=escape_filter_chars(domain))
        with self._lock:
            for attempt in (1, 2):  # a dropped connection gets one fresh try
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    ok = self._conn.search(self.s.base, query, attributes=[], size_limit=1,
                                           time_limit=int(self.s.timeout) or 1)
                    result = self._conn.result or {}
                    if ok or result.get("description") in ("success", "sizeLimitExceeded"):
                        return bool(self._conn.entries) or result.get("description") == "sizeLimitExceeded"
                    if result.get("description") == "noSuchObject":
                        return False
                    raise Unverifiable(f"LDAP search: {result.get('description')} {result.get('message', '')}")
                except (LDAPException, OSError, ValueError, TypeError) as e:
                    # ldap3 reports some network trouble as odd exceptions
                    self._drop()
                    if attempt == 2:
                        raise Unverifiable(f"LDAP {self.s.url}: {e}") from None
                except Unverifiable:
                    self._drop()
                    if attempt == 2:
                        raise
        return False  # pragma: no cover

    def _drop(self):
        try:
            if self._conn is not None:
                self._conn.unbind()
        except Exception:
            pass
        self._conn = None

    def close(self):
        with self._lock:
            self._drop()


# --- SMTP callout -------------------------------------------------------


def smtp_probe(hosts: list[tuple[str, int]], helo: str, address: str, timeout: float) -> tuple[bool, str]:
    """Blocking: (exists, reply) from the first host that gives a definite answer.

    Raises Unverifiable when none does (4xx, refused, timeout)."""
    problems = []
    for host, port in hosts:
        try:
            with smtplib.SMTP(timeout=timeout, local_hostname=helo) as smtp:
                code, msg = smtp.connect(host, port)
                if code != 220:
                    problems.append(f"{host}:{port} greeting {code}")
                    continue
                code, msg = smtp.ehlo()
                if code != 250:
                    code, msg = smtp.helo()
                code, msg = smtp.mail("")
                if code != 250:
                    problems.append(f"{host}:{port} MAIL {code}")
                    continue
                code, msg = smtp.rcpt(address)
                try:
                    smtp.quit()
                except smtplib.SMTPException:
                    pass
                text = f"{code} {msg.decode('utf-8', 'replace')[:120]}"
                if 200 <= code < 300:
                    return True, text
                if 500 <= code < 600:
                    return False, text
                problems.append(f"{host}:{port} RCPT {text}")
        except (smtplib.SMTPException, OSError, socket.timeout) as e:
            problems.append(f"{host}:{port} {type(e).__name__}: {e}")
    raise Unverifiable("callout: " + "; ".join(problems or ["no next hop"]))


class Callout:
    def __init__(self, s: CalloutSettings, helo: str, routes: dict, resolver, run_in_thread):
        self.s = s
        self.helo = s.helo or helo
        self.routes = routes
        self.resolver = resolver
        self.run_in_thread = run_in_thread

    async def hosts(self, domain: str) -> list[tuple[str, int]]:
        route = route_for(self.routes, domain)
        if route.kind != "smtp":
            raise Unverifiable(f"no SMTP next hop for {domain} (route {route})")
        if not route.mx_lookup:
            try:
                ipaddress.ip_address(route.host)
                return [(route.host, route.port)]
            except ValueError:
                return [(a, route.port) for a in await self.resolver.addresses(route.host)]
        mx = await self.resolver.mx(route.host)
        names = [r.split()[-1].rstrip(".") for r in mx.records] if mx.ok else [route.host]
        out = []
        for name in names:
            out.extend((a, route.port) for a in await self.resolver.addresses(name))
        return out

    async def exists(self, address: str, domain: str) -> bool:
        hosts = await self.hosts(domain)
        if not hosts:
            raise Unverifiable(f"next hop for {domain} has no address")
        # the thread cannot be cancelled; bound what the client waits for
        exists, _ = await asyncio.wait_for(
            in_thread(self.run_in_thread, smtp_probe, hosts, self.helo, address, self.s.timeout),
            timeout=self.s.timeout * 3 * len(hosts) + 1)
        return exists


# --- the check ------------------------------------------------------------


class RecipientVerify(Check):
    name = "recipient_verify"
    stage = Stage.RCPT
    symbols = (
        Symbol("RCPT_UNKNOWN", 0.0, "recipients", "Recipient does not exist here"),
        Symbol("RCPT_UNVERIFIED", 0.0, "recipients", "Recipient could not be verified now (callout or directory down)"),
        Symbol("RCPT_CACHE_FAIL", 0.0, "recipients", "Verified without the cache: the state store did not answer"),
    )
    priority = 15

    def __init__(self, settings: RecipientsSettings, domains, store, static=None, ldap=None, callout=None,
                 run_in_thread=None):
        self.s = settings
        self.run_in_thread = run_in_thread
        self.domains = set(domains)
        self.store = store
        self.static = static
        self.ldap = ldap
        self.callout = callout

    @classmethod
    def from_config(cls, config, services):
        s = config.recipients
        domains = set(config.relay.domains)
        methods = {d: s.verify_by_domain.get(d, s.verify) for d in domains}
        used = set(methods.values())
        if used <= {"none"}:
            return None
        for domain, method in methods.items():
            if method == "callout":
                route: Route = route_for(config.routes, domain)
                if route.kind != "smtp":
                    raise ConfigError(f"recipients: callout for {domain} needs an smtp: route, "
                                      f"but [routes] sends it to {route}")
        static = StaticDirectory(s.static_files) if "static" in used else None
        ldap = LdapDirectory(s.ldap) if "ldap" in used else None
        callout = Callout(s.callout, config.server.hostname, config.routes, services.resolver,
                          services.run_in_thread) if "callout" in used else None
        return cls(s, domains, store_for(services), static, ldap, callout, services.run_in_thread)

    def method_for(self, domain: str) -> str:
        return self.s.verify_by_domain.get(domain, self.s.verify)

    async def _cached(self, method: str, address: str, ask, positive: float, negative: float,
                      trouble: list) -> bool:
        """``trouble`` collects a StoreUnavailable: the directory is then asked
        itself (the cache is only a cache) and the check reports RCPT_CACHE_FAIL."""
        key = f"rcpt:{method}:{address}"
        try:
            hit = await self.store.get(key)
        except StoreUnavailable as e:
            trouble.append(e)
            hit = None
        if hit is not None:
            return bool(hit)
        exists = await ask()
        if not trouble:
            try:
                await self.store.put(key, exists, positive if exists else negative)
            except StoreUnavailable as e:
                trouble.append(e)
        return exists

    async def check(self, txn):
        rcpt = txn.rcpt
        domain = rcpt.domain.lower().rstrip(".")
        if domain not in self.domains:
            return []
        method = self.method_for(domain)
        address = rcpt.address.lower()
        trouble: list = []
        try:
            if method == "static":
                exists = self.static.exists(strip_extension(address, self.s.recipient_delimiter))
            elif method == "ldap":
                lookup_address = strip_extension(address, self.s.recipient_delimiter)
                exists = await self._cached(
                    "ldap", lookup_address,
                    lambda: in_thread(self.run_in_thread, self.ldap.lookup, lookup_address),
                    self.s.ldap.cache_positive, self.s.ldap.cache_negative, trouble)
            elif method == "callout":
                exists = await self._cached(
                    "callout", address, lambda: self.callout.exists(rcpt.address, domain),
                    self.s.callout.cache_positive, self.s.callout.cache_negative, trouble)
            else:
                return []
        except (Unverifiable, asyncio.TimeoutError) as e:
            reason = str(e) or f"{method}: no answer in time"
            if self.s.on_error == "accept":
                return [Failed(self.name, reason)]
            return [Result("RCPT_UNVERIFIED", 0.0, reason, refuse="callout")]
        noted = could_not_check(self.name, "RCPT_CACHE_FAIL", trouble[0], self.store) if trouble else []
        if exists:
            return noted
        return [Result("RCPT_UNKNOWN", 0.0, rcpt.address, refuse="unknown_user")] + noted

    def close(self) -> None:
        if self.ldap is not None:
            self.ldap.close()


CHECKS = (RecipientVerify,)
SECTIONS = {"recipients": RecipientsSettings}
