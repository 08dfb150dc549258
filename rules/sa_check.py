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
import logging
import os
import re
from typing import Optional

from pydantic import Field, field_validator

from gateway.config import Section
from gateway.plugins import Check
from gateway.records import Result, Stage
from rules.sa import ruleset as sa_ruleset
from rules.sa.engine import DEFAULT_SCORE_SET, Engine, hits_report
from rules.sa.evals import EvalContext
from rules.sa.message import MessageView

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
    # SpamAssassin score set: 0 no net/no Bayes, 1 net (default), 2 Bayes, 3 both
    score_set: int = Field(DEFAULT_SCORE_SET, ge=0, le=3)
    # whitelist_from / blacklist_from in SpamAssassin's glob syntax
    welcomelist_from: list[str] = Field(default_factory=list)
    blocklist_from: list[str] = Field(default_factory=list)
    # DNSBL rules (check_rbl) feed meta rules; scoring them too would count
    # the listing twice beside the gateway's own DNSBL check
    score_dnsbl_rules: bool = False
    # compiled Hyperscan databases of the rules' prefilter, reused across
    # starts and reloads ("" = compile every time)
    cache_dir: str = "var/cache/rules"

    @field_validator("welcomelist_from", "blocklist_from")
    @classmethod
    def _lower(cls, v):
        return [p.strip().lower() for p in v if p.strip()]


def rule_dirs(settings: RulesSettings) -> list[str]:
    return list(settings.dirs) if settings.dirs is not None else default_dirs(settings.stock_rules)


def load_engine(settings: RulesSettings) -> Engine:
    rs = sa_ruleset.load(rule_dirs(settings))
    owned = set(OWNED_ELSEWHERE)
    if not settings.score_dnsbl_rules:
        owned |= {n for n, r in rs.rules.items()
                  if r.eval is not None and r.eval[0].startswith("check_rbl")}
    return Engine(rs, settings.score_set, owned_elsewhere=owned, cache_dir=settings.cache_dir or None)


_OUR_RECEIVED = re.compile(
    rb"^Received: from (\S+) \((?:(\S+) )?\[(?:IPv6:)?([^\]]+)\]\)", re.I)


def client_relay(txn) -> dict:
    """The hop we saw: client IP, HELO, forward-confirmed rDNS, trust.

    The rDNS name comes from our own Received header (the first line of the
    message), where the SMTP server records it only when forward-confirmed.
    A loopback client counts as trusted, as SpamAssassin always trusts
    127.0.0.0/8: it is a program on this host.
    """
    s = txn.session
    rdns = ""
    m = _OUR_RECEIVED.match(txn.message.raw[:512]) if txn.message is not None else None
    if m and m.group(2) and m.group(3).decode("ascii", "replace") == str(s.ip):
        rdns = m.group(2).decode("ascii", "replace").lower()
    return {"ip": str(s.ip), "rdns": rdns, "helo": s.helo or "", "trusted": bool(s.trusted or s.is_loopback),
            "auth": s.auth_user or ""}


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


def relays_header(txn, hostname: str, relay: Optional[dict] = None) -> dict[str, bytes]:
    """SpamAssassin's X-Spam-Relays-* pseudo-headers for the one hop we saw."""
    relay = relay or client_relay(txn)
    env = txn.envelope
    entry = (f"[ ip={relay['ip']} rdns={relay['rdns']} helo={relay['helo']} by={hostname} ident= "
             f"envfrom={env.sender if env else ''} intl={1 if relay['trusted'] else 0} id={txn.queue_id} "
             f"auth={relay['auth']} msa=0 ]").encode()
    if relay["trusted"]:
        return {"x-spam-relays-trusted": entry, "x-spam-relays-internal": entry}
    return {"x-spam-relays-untrusted": entry, "x-spam-relays-external": entry,
            "x-spam-last-external-relay": entry}


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


class SaRules(Check):
    name = "sa_rules"
    stage = Stage.DATA
    priority = 50
    blocking = True  # thousands of regexes: the pipeline runs it in the thread pool

    def __init__(self, engine: Engine, settings: RulesSettings, hostname: str = "localhost"):
        self.engine = engine
        self.settings = settings
        self.hostname = hostname
        # the config's welcome/block lists joined to the rule files' lists once:
        # every message gets the same list objects
        lists = {k: v for k, v in (("welcome", list(settings.welcomelist_from)),
                                   ("block", list(settings.blocklist_from))) if v}
        for k, v in engine.rs.lists.items():
            lists[k] = lists.get(k, []) + v
        self.lists = lists

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
        return cls(engine, settings, config.server.hostname)

    def evaluate(self, txn) -> list[Result]:
        env = txn.envelope
        relay = client_relay(txn)
        view = MessageView(
            txn.message.raw, txn.message.parsed,
            envelope_sender=env.sender if env else "",
            recipients=[r.address for r in env.recipients] if env else [],
            relays=relays_header(txn, self.hostname, relay),
            relay=relay,
        )
        a, txt = dnsbl_answers(txn)
        ctx = EvalContext(view, lists=self.lists, dnsbl=a, dnsbl_txt=txt)
        hits = self.engine.run(view, ctx)
        txn.state["sa_hits"] = hits
        return [Result(h.name, h.score, h.describe or h.name) for h in hits_report(self.engine, hits)]

    def check(self, txn):
        return self.evaluate(txn)


CHECKS = (SaRules,)
SECTIONS = {"rules": RulesSettings}
