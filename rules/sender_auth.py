"""SPF, DKIM and DMARC (pyspf, dkimpy and authheaders) at the end of DATA.

One ``Authentication-Results: <server.hostname>; spf=... dkim=... dmarc=...``
header (RFC 8601) goes on the delivered message (``Result.header``); the
finisher removes incoming Authentication-Results that claim our hostname.
Each outcome is also a scored symbol (``SPF_FAIL``, ``DKIM_INVALID``,
``DMARC_FAIL_REJECT``...; ``[scores]`` overrides the defaults below).  A
DMARC failure under ``p=reject`` is refused (550 5.7.1) when
``refuse_dmarc_reject`` is set.  DNS trouble gives ``temperror`` in the
header and no points.

These libraries resolve names themselves with blocking calls; every lookup
they make goes to the configured ``[dns] nameservers`` through a blocking
dnspython resolver built with ``configure=False`` (never /etc/resolv.conf),
and the whole check runs in the thread pool (``services.run_in_thread``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
from pydantic import Field

from gateway.config import Section
from gateway.mime import getaddresses, parse_mime
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage

log = logging.getLogger("mailgate.sender_auth")

# symbol -> default score (SpamAssassin's scale; [scores] overrides)
SCORES = {
    "SPF_PASS": -0.1, "SPF_FAIL": 1.0, "SPF_SOFTFAIL": 0.7, "SPF_NEUTRAL": 0.2, "SPF_NONE": 0.0,
    "SPF_PERMERROR": 0.2,
    "DKIM_VALID": -0.1, "DKIM_INVALID": 1.5, "DKIM_NONE": 0.0,
    "DMARC_PASS": -0.1, "DMARC_FAIL_REJECT": 3.0, "DMARC_FAIL_QUARANTINE": 2.0, "DMARC_FAIL_NONE": 0.5,
    "DMARC_NONE": 0.0,
}
DESCRIPTIONS = {
    "SPF_PASS": "SPF: the sender domain authorizes the client", "SPF_FAIL": "SPF: the sender domain forbids the client",
    "SPF_SOFTFAIL": "SPF: the sender domain does not authorize the client (softfail)",
    "SPF_NEUTRAL": "SPF: the sender domain says nothing about the client (neutral)",
    "SPF_NONE": "SPF: the sender domain publishes no SPF record",
    "SPF_PERMERROR": "SPF: the sender domain's SPF record is broken",
    "DKIM_VALID": "DKIM: a valid signature", "DKIM_INVALID": "DKIM: a signature that does not verify",
    "DKIM_NONE": "DKIM: no signature",
    "DMARC_PASS": "DMARC: the From: domain is aligned and authenticated",
    "DMARC_FAIL_REJECT": "DMARC: fails, and the From: domain asks to reject (p=reject)",
    "DMARC_FAIL_QUARANTINE": "DMARC: fails, and the From: domain asks to quarantine (p=quarantine)",
    "DMARC_FAIL_NONE": "DMARC: fails; the From: domain asks for nothing (p=none)",
    "DMARC_NONE": "DMARC: the From: domain publishes no policy",
}
_SPF_SYMBOL = {"pass": "SPF_PASS", "fail": "SPF_FAIL", "softfail": "SPF_SOFTFAIL", "neutral": "SPF_NEUTRAL",
               "none": "SPF_NONE", "permerror": "SPF_PERMERROR"}


class SenderAuthSettings(Section):
    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    # refuse with 550 5.7.1 when DMARC fails and the domain asks p=reject
    refuse_dmarc_reject: bool = False
    # upper bound for all lookups of one message
    timeout: float = Field(10.0, gt=0, le=120)
    # sessions that may relay (our own users) are not judged
    skip_relay_clients: bool = True


class DnsTrouble(Exception):
    """A lookup timed out or the server failed: the answer is unknown."""


class BlockingDns:
    """Blocking lookups on explicit nameservers, for the blocking libraries."""

    def __init__(self, nameservers, timeout: float = 3.0, cache: Optional[dns.resolver.LRUCache] = None):
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [
            dns.nameserver.Do53Nameserver(str(getattr(ns, "host", ns)), int(getattr(ns, "port", 53)))
            for ns in nameservers
        ]
        r.timeout = timeout
        r.lifetime = timeout
        # TTL-respecting, bounded, thread-safe and shared between messages;
        # it keeps NXDOMAIN answers too (the common "no SPF/DMARC record" case)
        r.cache = cache if cache is not None else dns.resolver.LRUCache(10000)
        self.resolver = r
        self.queries = 0

    def resolve(self, name: str, rdtype: str):
        """dnspython rrset answers ([] when none); DnsTrouble on failure."""
        if not self.resolver.nameservers:
            raise DnsTrouble("no [dns] nameservers configured")
        self.queries += 1
        try:
            ans = self.resolver.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise DnsTrouble(f"{name}/{rdtype}: {e.__class__.__name__}") from None
        except dns.exception.DNSException as e:
            raise DnsTrouble(f"{name}/{rdtype}: {e}") from None
        return list(ans.rrset) if ans.rrset is not None else []

    def txt(self, name: str) -> list[bytes]:
        return [b"".join(r.strings) for r in self.resolve(name, "TXT")]


# --- authheaders: one public suffix list, not one per message ---------------------

_psl_lock = threading.Lock()
_psl_installed = False


def _install_org_domain_cache():
    """authheaders parses its whole public suffix list on every DMARC
    check (~130 ms of CPU; `authheaders.dmarc_lookup.get_org_domain`).  Build
    it once and answer from a bounded cache: same list, same answers."""
    global _psl_installed
    if _psl_installed:
        return
    with _psl_lock:
        if _psl_installed:
            return
        import functools

        import authheaders
        from authheaders import dmarc_lookup
        from publicsuffix2 import PublicSuffixList

        try:
            from authheaders.findpsl import location
        except ModuleNotFoundError:
            import importlib.resources

            location = str(importlib.resources.files("authheaders") / "public_suffix_list.txt")
        with open(location) as f:
            psl = PublicSuffixList(f)

        @functools.lru_cache(maxsize=65536)
        def get_org_domain(domain):
            return psl.get_public_suffix(domain)

        dmarc_lookup.get_org_domain = get_org_domain
        authheaders.get_org_domain = get_org_domain
        _psl_installed = True


# --- pyspf: its lookups go through a per-thread function ---------------------------

_spf_local = threading.local()
_spf_lock = threading.Lock()
_spf_installed = False


def _install_spf_lookup():
    """pyspf resolves through the module-level ``spf.DNSLookup``; route it to
    the lookup of the calling thread (refusing when there is none), so pyspf
    never falls back to the system resolver."""
    global _spf_installed
    import spf

    with _spf_lock:
        if _spf_installed:
            return
        spf.DNSLookup = _spf_dispatch
        _spf_installed = True


def _spf_dispatch(name, qtype, strict=True, timeout=20):
    import spf

    lookup = getattr(_spf_local, "dns", None)
    if lookup is None:
        raise spf.TempError("DNS lookups outside a MailGate sender-auth check are refused")
    try:
        rrs = lookup.resolve(name, qtype)
    except DnsTrouble as e:
        raise spf.TempError(f"DNS {e}") from None
    out = []
    for r in rrs:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), r.address))
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, r.exchange.to_text(True))))
        elif qtype == "PTR":
            out.append(((name, qtype), r.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), r.strings))
    return out


def check_spf(lookup: BlockingDns, ip: str, sender: str, helo: str, timeout: float):
    """(result, explanation) from pyspf, resolving through ``lookup``."""
    import spf

    _install_spf_lookup()
    _spf_local.dns = lookup
    try:
        q = spf.query(i=ip, s=sender, h=helo or "unknown", timeout=timeout, querytime=timeout)
        result, _code, explanation = q.check()
    finally:
        _spf_local.dns = None
    return result, explanation


# --- DKIM and DMARC ------------------------------------------------------------------


class _AuthDns:
    """The ``dnsfunc`` authheaders and dkimpy call.

    dkimpy passes a bytes name and wants the TXT as bytes; authheaders'
    DMARC code passes a str and wants a str.  Trouble is remembered, not
    raised, so DMARC can say temperror."""

    def __init__(self, lookup: BlockingDns):
        self.lookup = lookup
        self.trouble: list[str] = []

    def __call__(self, name, timeout=5):
        as_bytes = isinstance(name, bytes)
        qname = name.decode("ascii", "replace") if as_bytes else str(name)
        try:
            records = self.lookup.txt(qname.rstrip("."))
        except DnsTrouble as e:
            self.trouble.append(str(e))
            if as_bytes:
                raise dns.exception.Timeout() from None  # dkimpy/authheaders: temperror
            return None
        if not records:
            return None
        if as_bytes:
            return records[0]
        # authheaders wants the first record that could be DMARC
        for r in records:
            text = r.decode("utf-8", "replace")
            if text.startswith("v=DMARC1"):
                return text
        return records[0].decode("utf-8", "replace")


@dataclass
class Outcome:
    spf: Optional[str] = None
    spf_detail: str = ""
    dkim: Optional[str] = None
    dkim_domain: str = ""
    dmarc: Optional[str] = None
    dmarc_policy: str = ""
    from_domain: str = ""
    header: str = ""  # the Authentication-Results value (after the name)
    trouble: list = field(default_factory=list)


def authenticate(raw: bytes, lookup: BlockingDns, authserv_id: str, ip: str, sender: str, helo: str,
                 settings: SenderAuthSettings) -> Outcome:
    """All three checks; blocking (run it in a thread)."""
    _install_org_domain_cache()
    import authheaders
    from authheaders import (
        AuthenticationResultsHeader,
        DKIMAuthenticationResult,
        SPFAuthenticationResult,
    )

    out = Outcome()
    deadline = time.monotonic() + settings.timeout
    results = []
    spf_result = dkim_result = None
    if settings.spf:
        mail_from = sender or f"postmaster@{helo}" if (sender or helo) else ""
        try:
            res, expl = check_spf(lookup, ip, sender, helo, settings.timeout)
        except Exception as e:  # pyspf raises on malformed input it cannot judge
            res, expl = "permerror", str(e)
        out.spf, out.spf_detail = res, expl
        spf_result = SPFAuthenticationResult(result=res, smtp_mailfrom=mail_from or None,
                                             smtp_helo=helo or None)
        results.append(spf_result)
    authdns = _AuthDns(lookup)
    if settings.dkim:
        if _has_dkim_signature(raw):
            dkim_result = authheaders.check_dkim(raw, dnsfunc=authdns)
            if authdns.trouble and dkim_result.result != "pass":
                dkim_result = DKIMAuthenticationResult(result="temperror", header_d=dkim_result.header_d)
        else:
            dkim_result = DKIMAuthenticationResult(result="none")
        out.dkim, out.dkim_domain = dkim_result.result, getattr(dkim_result, "header_d", "") or ""
        results.append(dkim_result)
    if settings.dmarc and time.monotonic() < deadline:
        before = len(authdns.trouble)
        try:
            dmarc_result = authheaders.check_dmarc(raw, spf_result, dkim_result, dnsfunc=authdns)
        except Exception as e:  # malformed From or record: authheaders raises
            from authheaders import DMARCAuthenticationResult

            dmarc_result = DMARCAuthenticationResult(result="permerror", result_comment=str(e)[:80],
                                                     header_from=_from_domain(raw) or "none", policy="none")
        if len(authdns.trouble) > before:
            from authheaders import DMARCAuthenticationResult

            dmarc_result = DMARCAuthenticationResult(result="temperror", header_from=_from_domain(raw) or "none")
        out.dmarc = dmarc_result.result
        out.dmarc_policy = (getattr(dmarc_result, "policy", "") or "").lower()
        out.from_domain = getattr(dmarc_result, "header_from", "") or ""
        results.append(dmarc_result)
    out.trouble = authdns.trouble
    header = str(AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    out.header = header.split(":", 1)[1].strip() if header.lower().startswith("authentication-results:") else header
    return out


def _has_dkim_signature(raw: bytes) -> bool:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    return b"\ndkim-signature:" in b"\n" + head.lower()


def _from_domain(raw: bytes) -> Optional[str]:
    # bounded: without a CRLF CRLF the "header block" is the whole message
    msg = parse_mime(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
    pairs = getaddresses([str(v) for v in msg.get_all("From") or []])
    for _, a in pairs:
        if "@" in a:
            return a.rpartition("@")[2].lower()
    return None


def results_for(out: Outcome, settings: SenderAuthSettings) -> list:
    """Scored symbols for an outcome; temperror adds nothing."""
    res: list = []
    if out.spf in _SPF_SYMBOL:
        sym = _SPF_SYMBOL[out.spf]
        res.append(Result(sym, SCORES[sym], f"spf={out.spf} {out.spf_detail}"[:200]))
    elif out.spf == "temperror":
        res.append(Failed("sender_auth", "SPF: DNS trouble (temperror)"))
    if out.dkim == "pass":
        res.append(Result("DKIM_VALID", SCORES["DKIM_VALID"], f"dkim=pass d={out.dkim_domain}"))
    elif out.dkim in ("fail", "permerror", "neutral", "policy"):
        res.append(Result("DKIM_INVALID", SCORES["DKIM_INVALID"], f"dkim={out.dkim} d={out.dkim_domain}"))
    elif out.dkim == "none":
        res.append(Result("DKIM_NONE", SCORES["DKIM_NONE"], "no DKIM signature"))
    elif out.dkim == "temperror":
        res.append(Failed("sender_auth", "DKIM: DNS trouble (temperror)"))
    if out.dmarc == "pass":
        res.append(Result("DMARC_PASS", SCORES["DMARC_PASS"], f"dmarc=pass {out.from_domain}"))
    elif out.dmarc == "fail":
        policy = out.dmarc_policy or "none"
        sym = {"reject": "DMARC_FAIL_REJECT", "quarantine": "DMARC_FAIL_QUARANTINE"}.get(policy, "DMARC_FAIL_NONE")
        refuse = "dmarc" if policy == "reject" and settings.refuse_dmarc_reject else None
        res.append(Result(sym, SCORES[sym], out.from_domain or "unknown domain", refuse=refuse))
    elif out.dmarc == "none":
        res.append(Result("DMARC_NONE", SCORES["DMARC_NONE"], "no DMARC record"))
    elif out.dmarc == "temperror":
        res.append(Failed("sender_auth", "DMARC: DNS trouble (temperror)"))
    return res


class SenderAuth(Check):
    name = "sender_auth"
    stage = Stage.DATA
    symbols = tuple(Symbol(name, score, name.partition("_")[0].lower(), DESCRIPTIONS[name])
                    for name, score in SCORES.items()) + (
        Symbol("SENDER_AUTH", 0.0, "auth", "Carries the Authentication-Results header (no points)"),)
    priority = 40

    def __init__(self, settings: SenderAuthSettings, lookup_factory: Callable[[], BlockingDns],
                 authserv_id: str, run_in_thread=None):
        self.settings = settings
        self.lookup_factory = lookup_factory
        self.authserv_id = authserv_id
        self.run_in_thread = run_in_thread

    @classmethod
    def from_config(cls, config, services):
        s = config.sender_auth
        if not (s.spf or s.dkim or s.dmarc):
            return None
        nameservers = list(config.dns.nameservers)
        timeout = config.dns.timeout
        cache = dns.resolver.LRUCache(max(1, config.dns.cache_size))
        _install_org_domain_cache()  # once, at start-up: not on the first message
        return cls(s, lambda: BlockingDns(nameservers, timeout, cache), config.server.hostname,
                   getattr(services, "run_in_thread", None))

    def _check(self, txn) -> list:
        session = txn.session
        if self.settings.skip_relay_clients and session.may_relay:
            return []
        env = txn.envelope
        out = authenticate(txn.message.raw, self.lookup_factory(), self.authserv_id, str(session.ip),
                           env.sender if env else "", session.helo or "", self.settings)
        txn.state["sender_auth"] = out
        records = results_for(out, self.settings)
        header = ("Authentication-Results", out.header)
        # the header rides on the first Result so the finisher adds it once
        for i, r in enumerate(records):
            if isinstance(r, Result):
                records[i] = Result(r.symbol, r.score, r.detail, r.refuse, header)
                break
        else:
            records.append(Result("SENDER_AUTH", 0.0, "authentication results", header=header))
        return records

    def check(self, txn):
        if self.run_in_thread is not None:
            return self.run_in_thread(self._check, txn)
        return self._check(txn)


CHECKS = (SenderAuth,)
SECTIONS = {"sender_auth": SenderAuthSettings}
