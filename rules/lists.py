"""Block and allow lists: client IPs, senders, and recipients that want everything.

Entries come inline from ``[lists]`` and from files (one entry per line, ``#``
starts a comment); files are read when the checks are built, so a SIGHUP
reload re-reads them.  A block hit refuses (554 5.7.1 "Access denied", the
matched entry only in the log); an allow hit adds ``allow_score`` (a large
negative score) and lets greylisting, DNSBL refusals and HELO refusals pass
the client, but never skips content or virus checks: a virus is a refusal,
and no score outweighs a refusal.

IP entries: single addresses or CIDR networks, IPv4 and IPv6.
Address entries (senders, recipients): ``user@example.com`` (that address),
``@example.com`` or ``example.com`` (that domain), ``*.example.com`` (its
subdomains, not the domain itself), ``<>`` (the null sender).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional

from pydantic import Field, field_validator

from gateway.config import Section, normalize_domain
from gateway.errors import ConfigError
from gateway.plugins import Check, Symbol
from gateway.records import Result, Stage


def _check_ip(entry: str) -> str:
    return str(ipaddress.ip_network(entry.strip(), strict=False))


def _check_address_pattern(entry: str) -> str:
    e = entry.strip().lower()
    if e == "<>":
        return e
    local, at, domain = e.rpartition("@")
    if local == "*":  # "*@example.com" reads as the whole domain
        local = ""
    wildcard = domain.startswith("*.")
    if wildcard:
        domain = domain[2:]
        if local or at:
            raise ValueError(f"{entry!r}: a wildcard entry takes no local part, as *.example.com")
    if any(c.isspace() or c in "<>" for c in local):
        raise ValueError(f"{entry!r}: spaces and angle brackets are not allowed")
    try:
        domain = normalize_domain(domain)
    except ValueError:
        raise ValueError(f"{entry!r}: expected user@domain, @domain, domain or *.domain") from None
    return ("*." if wildcard else "") + (local + at if at else "") + domain


class ListsSettings(Section):
    block_ips: list[str] = Field(default_factory=list)
    allow_ips: list[str] = Field(default_factory=list)
    block_senders: list[str] = Field(default_factory=list)
    allow_senders: list[str] = Field(default_factory=list)
    # recipients that want everything (no greylisting, the allow score)
    allow_recipients: list[str] = Field(default_factory=list)
    # files with more entries of the same kind (one a line, # comments)
    block_ips_files: list[str] = Field(default_factory=list)
    allow_ips_files: list[str] = Field(default_factory=list)
    block_senders_files: list[str] = Field(default_factory=list)
    allow_senders_files: list[str] = Field(default_factory=list)
    allow_recipients_files: list[str] = Field(default_factory=list)
    allow_score: float = -100.0

    @field_validator("block_ips", "allow_ips")
    @classmethod
    def _ips(cls, v):
        return [_check_ip(e) for e in v]

    @field_validator("block_senders", "allow_senders", "allow_recipients")
    @classmethod
    def _addresses(cls, v):
        return [_check_address_pattern(e) for e in v]


def read_entries(path: str, parse) -> list[str]:
    """Entries of a list file, each checked with ``parse``; errors name file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"lists: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"lists: {path} is not UTF-8 text") from None
    out = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            out.append(parse(text))
        except ValueError as e:
            raise ConfigError(f"lists: {path}:{n}: {e}") from None
    return out


class IpSet:
    """CIDR membership with one set lookup per distinct prefix length."""

    def __init__(self, networks: Iterable[str]):
        self._by_len: dict[tuple[int, int], dict[int, str]] = {}
        for text in networks:
            net = ipaddress.ip_network(text, strict=False)
            self._by_len.setdefault((net.version, net.prefixlen), {})[int(net.network_address)] = str(net)
        self._lens = sorted(self._by_len, key=lambda k: -k[1])

    def match(self, ip) -> Optional[str]:
        value, version = int(ip), ip.version
        bits = 32 if version == 4 else 128
        for v, plen in self._lens:
            if v != version:
                continue
            masked = value >> (bits - plen) << (bits - plen) if plen else 0
            hit = self._by_len[(v, plen)].get(masked)
            if hit is not None:
                return hit
        return None

    def __bool__(self) -> bool:
        return bool(self._by_len)


class AddressSet:
    """``user@domain``, ``@domain``, ``*.domain`` and ``<>`` patterns."""

    def __init__(self, patterns: Iterable[str]):
        self.addresses: set[str] = set()
        self.domains: set[str] = set()
        self.parents: set[str] = set()
        self.null = False
        for p in patterns:
            if p == "<>":
                self.null = True
            elif p.startswith("*."):
                self.parents.add(p[2:])
            elif p.startswith("@"):
                self.domains.add(p[1:])
            elif "@" in p:
                self.addresses.add(p)
            else:
                self.domains.add(p)

    def match(self, address: str) -> Optional[str]:
        if address == "":
            return "<>" if self.null else None
        a = address.lower()
        if a in self.addresses:
            return a
        domain = a.rpartition("@")[2].rstrip(".")
        if domain in self.domains:
            return "@" + domain
        if self.parents:
            labels = domain.split(".")
            for i in range(1, len(labels)):
                parent = ".".join(labels[i:])
                if parent in self.parents:
                    return "*." + parent
        return None

    def __bool__(self) -> bool:
        return bool(self.addresses or self.domains or self.parents or self.null)


class AccessLists:
    """All of ``[lists]`` with its files read, ready to match."""

    def __init__(self, settings: ListsSettings):
        s = settings

        def files(paths, parse):
            return [e for p in paths for e in read_entries(p, parse)]

        self.block_ips = IpSet(s.block_ips + files(s.block_ips_files, _check_ip))
        self.allow_ips = IpSet(s.allow_ips + files(s.allow_ips_files, _check_ip))
        self.block_senders = AddressSet(s.block_senders + files(s.block_senders_files, _check_address_pattern))
        self.allow_senders = AddressSet(s.allow_senders + files(s.allow_senders_files, _check_address_pattern))
        self.allow_recipients = AddressSet(
            s.allow_recipients + files(s.allow_recipients_files, _check_address_pattern))
        self.allow_score = s.allow_score

    def allowed(self, txn) -> Optional[str]:
        """Why this transaction is allow-listed (client, sender or the recipient), or None."""
        hit = self.allow_ips.match(txn.session.ip)
        if hit:
            return f"client {hit}"
        if txn.envelope is not None:
            hit = self.allow_senders.match(txn.envelope.sender)
            if hit:
                return f"sender {hit}"
        if txn.rcpt is not None:
            hit = self.allow_recipients.match(txn.rcpt.address)
            if hit:
                return f"recipient {hit}"
        return None


def access_lists(config, services) -> AccessLists:
    """One ``AccessLists`` per loaded config, shared by every check that asks."""
    settings = getattr(config, "lists", None) or ListsSettings()
    extra = getattr(services, "extra", None)
    if extra is None:
        return AccessLists(settings)
    cached = extra.get("access_lists")
    if cached is not None and cached[0] is settings:
        return cached[1]
    lists = AccessLists(settings)
    extra["access_lists"] = (settings, lists)
    return lists


class _BlockAllow(Check):
    """A block list refuses; an allow list adds the (large negative) allow
    score.  Subclasses name the lists and say what of the transaction to match."""

    priority = 5
    block: str
    allow: str
    prefix: str  # symbol prefix: IP_BLOCKLISTED, SENDER_ALLOWLISTED...

    def __init__(self, lists: AccessLists):
        self.lists = lists

    @classmethod
    def from_config(cls, config, services):
        lists = access_lists(config, services)
        if not (getattr(lists, cls.block) or getattr(lists, cls.allow)):
            return None
        return cls(lists)

    def subject(self, txn):
        raise NotImplementedError

    def check(self, txn):
        value = self.subject(txn)
        hit = getattr(self.lists, self.block).match(value)
        if hit:
            return [Result(f"{self.prefix}_BLOCKLISTED", 0.0, hit, refuse="blocklist")]
        hit = getattr(self.lists, self.allow).match(value)
        if hit:
            return [Result(f"{self.prefix}_ALLOWLISTED", self.lists.allow_score, hit)]
        return []


class IpLists(_BlockAllow):
    name = "ip_lists"
    stage = Stage.CONNECT
    symbols = (
        Symbol("IP_BLOCKLISTED", 0.0, "lists", "Client address is on the local block list"),
        Symbol("IP_ALLOWLISTED", -100.0, "lists", "Client address is on the local allow list"),
    )
    block, allow, prefix = "block_ips", "allow_ips", "IP"

    def subject(self, txn):
        return txn.session.ip


class SenderLists(_BlockAllow):
    name = "sender_lists"
    stage = Stage.MAIL
    symbols = (
        Symbol("SENDER_BLOCKLISTED", 0.0, "lists", "Sender is on the local block list"),
        Symbol("SENDER_ALLOWLISTED", -100.0, "lists", "Sender is on the local allow list"),
    )
    block, allow, prefix = "block_senders", "allow_senders", "SENDER"

    def subject(self, txn):
        return txn.envelope.sender


class RecipientAllowList(Check):
    """A recipient who wants everything: the allow score for the message.

    The score is per message: a message to an allow-listed and an ordinary
    recipient gets it for both (per-recipient verdicts would split the
    message, which the gateway does not do).
    """

    name = "recipient_lists"
    stage = Stage.RCPT
    symbols = (Symbol("RCPT_ALLOWLISTED", -100.0, "lists", "Recipient is on the local allow list (takes all mail)"),)
    priority = 5

    def __init__(self, lists: AccessLists):
        self.lists = lists

    @classmethod
    def from_config(cls, config, services):
        lists = access_lists(config, services)
        if not lists.allow_recipients:
            return None
        return cls(lists)

    def check(self, txn):
        hit = self.lists.allow_recipients.match(txn.rcpt.address)
        if hit:
            return [Result("RCPT_ALLOWLISTED", self.lists.allow_score, hit)]
        return []


CHECKS = (IpLists, SenderLists, RecipientAllowList)
SECTIONS = {"lists": ListsSettings}
