"""The ``sa_rules`` check: SpamAssassin-compatible content rules at DATA.

``[rules] dirs`` lists rule directories (or single ``.cf`` files) in load
order; a later file overrides the scores of an earlier one, as in
SpamAssassin.  Without ``dirs`` the gateway loads its own rules
(``rules/default_rules``) and, with ``stock_rules = true`` and the
``spamassassin`` package installed, its stock rules: the newest
``sa-update`` directory under ``/var/lib/spamassassin/<version>/`` when there
is one (as SpamAssassin itself prefers), otherwise ``/usr/share/spamassassin``.
The stock set is opt-in because it costs ~7 ms of CPU per message (with the
Hyperscan prefilter) and 5-15 s at start-up (docs/rules.md), which alone
would hold the gateway under its throughput target on a 2-core machine.

Rules that cannot run (a Perl regex Python cannot take, an ``eval:`` we do
not implement) are logged once at startup with file and line and skipped.
Every rule hit with a non-zero score becomes a ``Result`` named after the
rule, so ``X-Spam-Status tests=`` lists SpamAssassin's names.
"""

from __future__ import annotations

import glob
import ipaddress
import logging
import os
import re
from typing import Optional

from pydantic import Field, field_validator

from gateway.config import Section
from gateway.plugins import Check, Symbol
from gateway.records import Result, Stage
from rules.sa import ruleset as sa_ruleset
from rules.sa.engine import DEFAULT_SCORE_SET, Engine, hits_report
from rules.sa.evals import EvalContext
from rules.sa.message import MessageView
from rules.sa.received import (INFERRED, Relay, RelayChain, TrustConfig, is_private, parse_all, parse_network,
                               received_headers, strip_chars, walk)

log = logging.getLogger("mailgate.rules.sa")

SHIPPED_RULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_rules")
STOCK_RULES = "/usr/share/spamassassin"
SA_UPDATE_ROOT = "/var/lib/spamassassin"

# Symbols other checks report themselves: their SpamAssassin namesakes are
# still evaluated (meta rules use them) but never scored twice.
OWNED_ELSEWHERE = frozenset({
    "GTUBE",  # rules/gtube.py
    "MISSING_DATE", "MISSING_MID", "MISSING_FROM",  # rules/header_sanity.py
    # rules/sender_auth.py
    "SPF_PASS", "SPF_FAIL", "SPF_SOFTFAIL", "SPF_NEUTRAL", "SPF_NONE", "SPF_PERMERROR",
    "DKIM_VALID", "DKIM_INVALID", "DKIM_NONE", "DMARC_PASS", "DMARC_FAIL_REJECT",
    "DMARC_FAIL_QUARANTINE", "DMARC_FAIL_NONE", "DMARC_NONE",
})


def stock_dirs() -> list[str]:
    """SpamAssassin's own rules on this machine, if any (read at call time)."""
    updates = sorted(glob.glob(os.path.join(SA_UPDATE_ROOT, "[0-9]*", "*")))
    channels = [d for d in updates if os.path.isdir(d) and glob.glob(os.path.join(d, "*.cf"))]
    if channels:
        newest = os.path.dirname(channels[-1])
        return [d for d in channels if os.path.dirname(d) == newest]
    if glob.glob(os.path.join(STOCK_RULES, "*.cf")):
        return [STOCK_RULES]
    return []


def default_dirs(stock: bool = True) -> list[str]:
    return [SHIPPED_RULES] + (stock_dirs() if stock else [])


class RulesSettings(Section):
    # None: our shipped rules, then (stock_rules) SpamAssassin's stock rules when installed
    dirs: Optional[list[str]] = None
    stock_rules: bool = False
    # SpamAssassin score set: 0 no net/no Bayes, 1 net, 2 Bayes, 3 both; None:
    # picked as SpamAssassin does, (net ? 1 : 0) + (trained Bayes ? 2 : 0)
    score_set: Optional[int] = Field(None, ge=0, le=3)
    # whitelist_from / blacklist_from in SpamAssassin's glob syntax
    welcomelist_from: list[str] = Field(default_factory=list)
    blocklist_from: list[str] = Field(default_factory=list)
    # DNSBL rules (check_rbl) feed meta rules; scoring them too would count
    # the listing twice beside the gateway's own DNSBL check
    score_dnsbl_rules: bool = False
    # compiled Hyperscan databases of the rules' prefilter, reused across
    # starts and reloads ("" = compile every time)
    cache_dir: str = "var/cache/rules"
    # SpamAssassin's trusted_networks / internal_networks / msa_networks, in its
    # syntax ("10.0.0.0/8", "192.168.", "!10.0.1.5", IPv6); None: not configured,
    # and the trust boundary of the Received chain is inferred as SpamAssassin does
    trusted_networks: Optional[list[str]] = None
    internal_networks: Optional[list[str]] = None
    msa_networks: list[str] = Field(default_factory=list)

    # symbol weights learned from the site's mail (`mailgate fit-scores`), a
    # [scores] TOML file read by rules/scoring.py ("" = none); [scores] in
    # the config still overrides it
    learned_scores: str = ""

    @field_validator("trusted_networks", "internal_networks", "msa_networks")
    @classmethod
    def _networks(cls, v):
        for entry in v or ():
            parse_network(entry)  # a ValueError names the entry
        return v

    def trust(self) -> TrustConfig:
        if self.trusted_networks is None and self.internal_networks is None and not self.msa_networks:
            return INFERRED
        return TrustConfig.from_lists(self.trusted_networks, self.internal_networks, self.msa_networks)

    @field_validator("welcomelist_from", "blocklist_from")
    @classmethod
    def _lower(cls, v):
        return [p.strip().lower() for p in v if p.strip()]


def rule_dirs(settings: RulesSettings) -> list[str]:
    return list(settings.dirs) if settings.dirs is not None else default_dirs(settings.stock_rules)


def load_engine(settings: RulesSettings) -> Engine:
    rs = sa_ruleset.load(rule_dirs(settings))
    owned = owned_rules(rs, settings)
    # unless the config fixes the set, the Bayes bit is known per message (a
    # model may be trained or replaced while we run): every set is prepared
    others = () if settings.score_set is not None else (0, 1, 2, 3)
    return Engine(rs, default_score_set(settings), owned_elsewhere=owned, cache_dir=settings.cache_dir or None, score_sets=others)


def default_score_set(settings: RulesSettings) -> int:
    """The set scores are reported in when no message picks one: the config's, else SpamAssassin's default."""
    return DEFAULT_SCORE_SET if settings.score_set is None else settings.score_set


def owned_rules(rs, settings: RulesSettings) -> set:
    """Rules evaluated but never scored here: another check reports them."""
    owned = set(OWNED_ELSEWHERE)
    if not settings.score_dnsbl_rules:
        owned |= {n for n, r in rs.rules.items()
                  if r.eval is not None and r.eval[0].startswith("check_rbl")}
    return owned


# the checks whose answers SpamAssassin's network tests stand for: with all of
# them off the gateway runs "local tests only" (SpamAssassin's -L)
NETWORK_CHECKS = ("dnsbl", "rhsbl", "uribl", "sender_auth")


def network_tests_on(config) -> bool:
    disabled = set(getattr(getattr(config, "checks", None), "disabled", ()) or ())
    return not all(c in disabled for c in NETWORK_CHECKS)


def pick_score_set(settings: RulesSettings, net: bool, bayes: bool) -> int:
    """SpamAssassin's choice (Mail::SpamAssassin::init, PerMsgStatus::check):
    bit 1 unless local tests only, bit 2 when a Bayes model can scan."""
    if settings.score_set is not None:
        return settings.score_set
    return (1 if net else 0) + (2 if bayes else 0)


_OUR_RECEIVED = re.compile(
    rb"^Received: from (\S+) \((?:(\S+) )?\[(?:IPv6:)?([^\]]+)\]\)", re.I)


def client_relay(txn) -> dict:
    """The hop we saw: client IP, HELO, forward-confirmed rDNS, trust as
    SpamAssassin infers it (a private or loopback address, or an authenticated
    client).

    The rDNS name comes from our own Received header (the first line of the
    message), where the SMTP server records it only when forward-confirmed.
    """
    s = txn.session
    rdns = ""
    m = _OUR_RECEIVED.match(txn.message.raw[:512]) if txn.message is not None else None
    if m and m.group(2) and m.group(3).decode("ascii", "replace") == str(s.ip):
        rdns = m.group(2).decode("ascii", "replace").lower()
    return {"ip": str(s.ip), "rdns": rdns, "helo": s.helo or "",
            "trusted": bool(is_private(str(s.ip)) or s.auth_user), "auth": s.auth_user or ""}


# our own Received header (gateway/headers.py received_header), first in the message
_OURS = re.compile(rb"^Received: from [^\r\n]*\r?\n\tby \S+ \(MailGate\) with \S+ id ([^\s;]+)")


def session_relay(txn, hostname: str) -> Relay:
    """Our own hop as a relay, from the session's typed facts: what SpamAssassin
    reads from the Received header we write (gateway/transaction.py message())."""
    s = txn.session
    facts = client_relay(txn)
    auth = ""
    if s.auth_user:
        # as SpamAssassin names an authenticated hop (ESMTPA/ESMTPSA; it does not read RFC 6531's UTF8SMTPA)
        auth = ("ESMTP" if s.esmtp else "SMTP") + ("S" if s.tls else "") + "A"
    ip = facts["ip"]
    # Received.pm's stripped characters: a "[192.0.2.1]" HELO reads "!192.0.2.1!"
    relay = Relay(ip=ip, rdns=strip_chars(facts["rdns"]), helo=strip_chars(facts["helo"] or "unknown"),
                  by=strip_chars(hostname), id=txn.queue_id, auth=auth, index=0)
    relay.ip_private = is_private(ip)
    relay.no_reverse_dns = not relay.rdns  # we always look the name up
    return relay


def _same_ip(a: str, b: str) -> bool:
    if a == b:
        return True
    if ":" not in a and ":" not in b:
        return False
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def relay_chain(txn, trust: TrustConfig = INFERRED, hostname: str = "localhost",
                originating_headers=()) -> RelayChain:
    """The message's Received chain as SpamAssassin would read it behind us.

    Live, our own Received header is first: that hop is the session (its typed
    facts, not the header parsed back) and the message's other headers are the
    earlier hops, walked through while each is trusted.  Without our header (a
    message file scored offline) the file's chain is read as SpamAssassin reads
    it; a session client found nowhere in it (``score --client-ip``) is put
    before it as the newest hop, and an unspecified one (0.0.0.0: a file without
    any Received header) adds nothing.
    """
    raw = txn.message.raw
    headers = received_headers(raw, originating_headers)
    m = _OURS.match(raw)
    if m and headers and m.group(1).decode("ascii", "replace") == txn.queue_id:
        return walk(parse_all(headers[1:], start=1), trust, first=session_relay(txn, hostname))
    parsed = parse_all(headers)
    ip = str(txn.session.ip)
    if txn.session.ip.is_unspecified or any(isinstance(r, Relay) and _same_ip(r.ip, ip) for r in parsed):
        return walk(parsed, trust)
    return walk(parsed, trust, first=session_relay(txn, hostname), first_has_header=False)


def rules_signature(settings: RulesSettings) -> tuple:
    """What the loaded rules depend on: settings plus every file's size and mtime."""
    files = []
    for d in rule_dirs(settings):
        paths = [d] if os.path.isfile(d) else sorted(glob.glob(os.path.join(d, "*")))
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            files.append((p, st.st_size, st.st_mtime_ns))
    return (settings.model_dump_json(), tuple(files))


def cached_engine(settings: RulesSettings, store: Optional[dict]) -> Engine:
    """The engine for these settings, reused across config reloads (SIGHUP)
    while no rule file changed: loading the stock rules takes seconds."""
    if store is None:
        return load_engine(settings)
    signature = rules_signature(settings)
    cached = store.get("sa_rules.engine")
    if cached is not None and cached[0] == signature:
        return cached[1]
    engine = load_engine(settings)
    store["sa_rules.engine"] = (signature, engine)
    return engine


def relays_header(txn, hostname: str, trust: TrustConfig = INFERRED) -> dict[str, bytes]:
    """SpamAssassin's X-Spam-Relays-* pseudo-headers of the message's chain."""
    return relay_chain(txn, trust, hostname).pseudo_headers()


_LISTING = re.compile(r"^([a-z0-9_.-]+)=(\d{1,3}(?:\.\d{1,3}){3})$")


def dnsbl_answers(txn) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """What the gateway's DNSBL check found: zone -> A records, zone -> TXT.

    rules/dnsbl.py reports each listing at the MAIL stage as a Result whose
    detail is ``zone=answer`` (``zen.test=127.0.0.2``); those records are in
    ``txn.envelope.results`` (and ``session.results`` for connect-stage
    checks) by the time DATA runs.  ``txn.state["dnsbl"]`` (``{zone: [a...]}``
    or ``{zone: {"a": [...], "txt": [...]}}``) is read too.  TXT answers are
    only known through the latter, so ``check_rbl_txt`` rules hit only then.
    """
    a: dict[str, list[str]] = {}
    txt: dict[str, list[str]] = {}
    earlier = list(getattr(txn.session, "results", []) or [])
    if txn.envelope is not None:
        earlier += list(txn.envelope.results or [])
    for r in earlier:
        m = _LISTING.match(getattr(r, "detail", "") or "")
        if isinstance(r, Result) and m:
            zone = m.group(1).rstrip(".").lower()
            if m.group(2) not in a.setdefault(zone, []):
                a[zone].append(m.group(2))
    for zone, value in (txn.state.get("dnsbl") or {}).items():
        z = str(zone).rstrip(".").lower()
        if isinstance(value, dict):
            a.setdefault(z, []).extend(str(x) for x in value.get("a", ()))
            txt.setdefault(z, []).extend(str(x) for x in value.get("txt", ()))
        else:
            a.setdefault(z, []).extend(str(x) for x in value)
    return a, txt


def sender_dns(txn) -> Optional[str]:
    """"nxdomain" when rules/sender.py found at MAIL that the envelope
    sender's domain does not exist (SENDER_DOMAIN_UNKNOWN, "no such domain"),
    else None (it exists, has no records, or was not looked up)."""
    env = txn.envelope
    for r in (env.results or ()) if env is not None else ():
        if isinstance(r, Result) and r.symbol == "SENDER_DOMAIN_UNKNOWN" and (r.detail or "").endswith(
                "(no such domain)"):
            return "nxdomain"
    return None


class SaRules(Check):
    name = "sa_rules"
    stage = Stage.DATA
    priority = 50
    blocking = True  # thousands of regexes: the pipeline runs it in the thread pool

    @classmethod
    def declared_symbols(cls, config, services=None):
        """Every rule of the loaded rule files that can be reported (not a
        ``__`` sub-rule, not one another check owns), with its score in the
        configured score set and its ``describe`` text.  The engine the
        check was built from (``services.extra``) is reused; without one
        (check-config, the check switched off) the rule files alone are read:
        compiling an engine would only cost time."""
        settings = config.rules
        cached = (getattr(services, "extra", None) or {}).get("sa_rules.engine")
        if cached is not None and cached[0] == rules_signature(settings):
            rs, owned = cached[1].rs, cached[1].owned_elsewhere
        else:
            rs = sa_ruleset.load(rule_dirs(settings))
            owned = owned_rules(rs, settings)
        score_set = default_score_set(settings)
        return tuple(Symbol(name, rs.score_of(name, score_set), "spamassassin", rs.describes.get(name, ""))
                     for name in rs.rules if not name.startswith("__") and name not in owned)

    def __init__(self, engine: Engine, settings: RulesSettings, hostname: str = "localhost",
                 network_tests: bool = True, bayes_ready: Optional[dict] = None):
        """``bayes_ready``: the services' shared dict where the Bayes check
        publishes ``"bayes.ready"`` (a callable: is a trained model loaded?);
        looked up per message, since checks are built in any order."""
        self.engine = engine
        self.settings = settings
        self.hostname = hostname
        self.network_tests = network_tests
        self.bayes_ready = bayes_ready if bayes_ready is not None else {}
        # the config's welcome/block lists joined to the rule files' lists once:
        # every message gets the same list objects
        lists = {k: v for k, v in (("welcome", list(settings.welcomelist_from)),
                                   ("block", list(settings.blocklist_from))) if v}
        for k, v in engine.rs.lists.items():
            lists[k] = lists.get(k, []) + v
        self.lists = lists
        self.trust = settings.trust()
        # the rules' originating_ip_headers (X-Originating-IP and friends): SpamAssassin
        # appends their addresses to the Received chain as the oldest hops
        self.originating_headers = tuple(lists.get("originating_ip_headers", ()))

    @classmethod
    def from_config(cls, config, services):
        settings = config.rules
        engine = cached_engine(settings, getattr(services, "extra", None))
        rs = engine.rs
        for s in rs.skipped.values():
            log.warning("rule skipped: %s (%s) at %s: %s", s.name, s.kind, s.source, s.reason)
        for p in rs.problems:
            log.warning("rule file problem: %s", p)
        log.info("rules: %d loaded, %d skipped from %s", len(rs.rules), len(rs.skipped),
                 ", ".join(rule_dirs(settings)) or "(no directories)")
        return cls(engine, settings, config.server.hostname, network_tests=network_tests_on(config),
                   bayes_ready=getattr(services, "extra", None))

    def score_set(self) -> int:
        ready = self.bayes_ready.get("bayes.ready")
        return pick_score_set(self.settings, self.network_tests, bool(ready is not None and ready()))

    def evaluate(self, txn) -> list[Result]:
        env = txn.envelope
        view = MessageView(
            txn.message.raw, txn.message.parsed,
            envelope_sender=env.sender if env else "",
            recipients=[r.address for r in env.recipients] if env else [],
            chain=relay_chain(txn, self.trust, self.hostname, self.originating_headers),
        )
        a, txt = dnsbl_answers(txn)
        ctx = EvalContext(view, lists=self.lists, dnsbl=a, dnsbl_txt=txt, sender_dns=sender_dns(txn))
        hits = self.engine.run(view, ctx)
        txn.state["sa_hits"] = hits
        return [Result(h.name, h.score, h.describe or h.name)
                for h in hits_report(self.engine, hits, self.score_set())]

    def check(self, txn):
        return self.evaluate(txn)


CHECKS = (SaRules,)
SECTIONS = {"rules": RulesSettings}
