"""The ``Received:`` chain as SpamAssassin 4.0.1 reads it.

SpamAssassin's Message/Metadata/Received.pm is the specification: each
Received header becomes a relay (ip, rdns, helo, by, ident, envfrom, id,
auth), recognised from the formats of the MTAs it knows (Sendmail, Postfix,
Exim, qmail, Microsoft SMTPSVC and SMTP Server, Domino, CommuniGate,
MDaemon, ...), then a walk from the newest hop down splits them into
trusted and untrusted, internal and external relays, from
``trusted_networks`` / ``internal_networks`` / ``msa_networks`` or, when
none is configured, from SpamAssassin's inference (a hop from a private or
loopback address, or an authenticated one, is trusted, and trust ends at the
first hop that is neither).  The pseudo-headers ``X-Spam-Relays-Trusted``,
``-Untrusted``, ``-Internal`` and ``-External`` are built in SpamAssassin's
exact text, which the stock rules match.

Hand-written because no Python library parses Received headers the way
SpamAssassin does, and the rules depend on its exact reading: every pattern
below is one of Received.pm's, in its order (the first that matches wins).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

# --- SpamAssassin's address patterns (Constants.pm) ---------------------------------

_V4 = r"(?:1\d\d|2[0-4]\d|25[0-5]|[1-9]\d|\d)"
_H = r"[a-f0-9]{1,4}"
IP_ADDRESS = (
    r"(?i:"
    rf"\b(?<!:){_V4}\.{_V4}\.{_V4}\.{_V4}\b"
    r"|(?:IPv6:|(?<![a-f0-9:]))(?:"
    rf"(?:(?:{_H}:){{6}}|::(?:{_H}:){{0,5}}|(?:{_H}:){{1,5}}:|{_H}::(?:{_H}:){{1,4}}"
    rf"|(?:{_H}:){{2}}:(?:{_H}:){{1,3}}|(?:{_H}:){{3}}:(?:{_H}:){{1,2}}|(?:{_H}:){{4}}:{_H}:)"
    rf"{_V4}\.{_V4}\.{_V4}\.{_V4}"
    rf"|(?:{_H}:){{7}}{_H}|:(?::{_H}){{1,7}}|(?:{_H}:){{1,7}}:|{_H}:(?::{_H}){{1,6}}"
    rf"|(?:{_H}:){{2}}(?::{_H}){{1,5}}|(?:{_H}:){{3}}(?::{_H}){{1,4}}|(?:{_H}:){{4}}(?::{_H}){{1,3}}"
    rf"|(?:{_H}:){{5}}(?::{_H}){{1,2}}|(?:{_H}:){{6}}:{_H}|::"
    r")(?![a-f0-9:]))"
)
_PRIV4 = r"(?:10|127|169\.254|172\.(?:1[6-9]|2[0-9]|3[01])|192\.168|100\.(?:6[4-9]|[7-9][0-9]|1[01][0-9]|12[0-7]))\..*"
_Z = r"0{1,4}"
_MAPPED = (rf"(?:(?:{_Z}:){{5}}ffff:|::(?:{_Z}:){{0,4}}ffff:|(?:{_Z}:){{1,4}}:ffff:|{_Z}::(?:{_Z}:){{1,3}}ffff:"
           rf"|(?:{_Z}:){{2}}:0{{1,2}}:ffff:|(?:{_Z}:){{3}}:0:ffff:|(?:{_Z}:){{4}}:ffff:)")
_ONE = (rf"(?:(?:{_Z}:){{7}}0{{0,3}}1|:(?::{_Z}){{0,6}}:0{{0,3}}1|{_Z}:(?::{_Z}){{0,5}}:0{{0,3}}1"
        rf"|(?:{_Z}:){{2}}(?::{_Z}){{0,4}}:0{{0,3}}1|(?:{_Z}:){{3}}(?::{_Z}){{0,3}}:0{{0,3}}1"
        rf"|(?:{_Z}:){{4}}(?::{_Z}){{0,2}}:0{{0,3}}1|(?:{_Z}:){{5}}(?::{_Z}){{0,1}}:0{{0,3}}1"
        rf"|(?:{_Z}:){{6}}:0{{0,3}}1)")
IP_PRIVATE = re.compile(
    rf"^(?i:{_PRIV4}|(?:IPv6:|(?<![a-f0-9:]))(?:{_MAPPED}{_PRIV4}|fe[89ab][0-9a-f]:.*|{_ONE})(?![a-f0-9:]))")
LOCALHOST = (r"(?i:localhost(?:\.localdomain)?|\b(?<!:)127\.0\.0\.1\b"
             rf"|(?:IPv6:|(?<![a-f0-9:]))(?:{_MAPPED}127\.0\.0\.1|{_ONE})(?![a-f0-9:]))")
_IS_IPV4 = re.compile(rf"^\b{_V4}\.{_V4}\.{_V4}\.{_V4}\b$")

IP = IP_ADDRESS
LH = LOCALHOST


def _rx(pattern: str, flags: int = 0) -> re.Pattern:
    return re.compile(pattern, flags)


# --- one Received header -------------------------------------------------------------

SKIP = 0  # parse_received_line: a header SpamAssassin deliberately ignores
FETCHER = -1  # ...: a POP/IMAP fetcher's hop (fetchmail, getmail): the trusted part restarts


@dataclass(slots=True)
class Relay:
    ip: str = ""
    rdns: str = ""
    helo: str = ""
    by: str = ""
    ident: str = ""
    envfrom: Optional[str] = None
    id: str = ""
    auth: str = ""
    msa: int = 0
    internal: int = 0
    trusted: bool = False
    ip_private: bool = False
    no_reverse_dns: bool = False  # the MTA looks names up and found none
    rdns_not_in_headers: bool = False  # the MTA does not record names at all
    index: int = -1  # which Received header (0 = topmost) it came from; -1: none (our session)

    def as_string(self) -> str:
        """make_relay_as_string, with the trust walk's intl and msa."""
        return (f"[ ip={self.ip} rdns={self.rdns} helo={self.helo} by={self.by} ident={self.ident} "
                f"envfrom={self.envfrom or ''} intl={self.internal} id={self.id} auth={self.auth} msa={self.msa} ]")

    def as_dict(self) -> dict:
        return {"ip": self.ip, "rdns": self.rdns, "helo": self.helo, "by": self.by, "ident": self.ident,
                "envfrom": self.envfrom or "", "id": self.id, "auth": self.auth, "trusted": self.trusted,
                "internal": bool(self.internal), "msa": bool(self.msa), "ip_private": self.ip_private,
                "no_reverse_dns": self.no_reverse_dns}


_WS = re.compile(r"\s+")
_DATE = re.compile(r"[\s;]+(?:(?:Mon|T(?:ue|hu)|Wed|Fri|S(?:at|un)), )?\d+ (?:J(?:an|u[nl])|Feb|Ma[ry]|A(?:pr|ug)|Sep|"
                   r"Oct|Nov|Dec) \d+ \d+:\d+(?::\d+)? \S+$")
_HELO_CH = r"[-A-Za-z0-9\.\^+_&:=?!@%*\$\\/]"
_HELO_EQ = _rx(rf"\bhelo=({_HELO_CH}+)(?:[^-A-Za-z0-9\.\^+_&:=?!@%*\$\\/]|$)")
_HELO_WORD = _rx(rf"\b(?:HELO|EHLO) ({_HELO_CH}+)(?:[^-A-Za-z0-9\.\^+_&:=?!@%*\$\\/]|$)")
_ID = _rx(r" id <?([^\s<>;]{3,})")
_BY = _rx(r" by (\S+)(?:[^-A-Za-z0-9\;\.]|$)")
# Received.pm's $strip_chars (white space, NUL, # [ ] ( ) < > |), each made "!"
_STRIP_TABLE = {ord(c): "!" for c in " \t\n\r\f\v\0#[]()<>|"}
_STRIP_ANY = re.compile(r"[\s\000#\[\]\(\)<>|]")
_ENV_HEAD = re.compile(r"^\s*<*")
_ENV_TAIL = re.compile(r">*\s*$")

# authentication tokens, in Received.pm's order
_AUTH_WITH = _rx(r" with ((?:ES|L|UTF8S|UTF8L)MTPS?A|ASMTP|HTTP[SU]?)(?: |;|$)", re.I)
_AUTH_GMAIL = _rx(r" by mx\.google\.com with ESMTPS id [a-z0-9]{1,4}sm[0-9]{2,9}[a-z]{3}\.[0-9]{1,3}\.[0-9]{4}\."
                  r"(?:[0-6][0-9]\.){4}[0-6][0-9]")
_AUTH_GMAIL_TLS = _rx(r"\(version=([^ ]+) cipher=([^\)]+)\)")
_AUTH_COURIER = _rx(r"^from .*?(?:\]\)|\)\]) \(AUTH: (LOGIN|PLAIN|DIGEST-MD5|CRAM-MD5) \S+(?:, .*?)?\) by ")
_AUTH_SENDMAIL = _rx(r"^from .*?(?:\](?: \([^)]*\))?\)|\)\]) .*?\(.*?authenticated.*?\).*? by")
_AUTH_GMX = _rx(rf"from \S* \((?:HELO|EHLO) (\S*)\) \[({IP})\] by (mail\.gmx\.(?:net|com)) \([^\)]+\) with "
                r"((?:ESMTP|SMTP))")
_AUTH_CP = _rx(r"\) by .+ \(\d{1,2}\.\d\.\d{3}(?:\.\d{1,3})?\) \(authenticated as .+\) id ")
_AUTH_POSTFIX = _rx(r"\) \(Authenticated sender: \S+\) by \S+ \(([^\)]+)\) with ")
_AUTH_CGP = _rx(r"CommuniGate Pro (HTTP|SMTP|XIMSS|IMAP)")
_AUTH_VIA_HTTP = _rx(r" \(via (HTTP.?)\)(?: |;|$)", re.I)
_HTTP_DAV = _rx(r" with Microsoft Exchange Server HTTP-DAV\b")
_WITH_LOCAL_FOR = _rx(r"\bwith local for\b")
_FROM_BY_SEMI = _rx(r"from (\S+) by [^\s;]+ ?;", re.I)
_BRACKET_V4 = _rx(r"\[[\d.]+\]")
_SQUIRREL_GUARD = _rx(r" \((?:SquirrelMail|NaSMail) authenticated user ")
_ECELERITY = _rx(r"\(ecelerity\b")
_WITH_HTTP = _rx(r"\bwith HTTP\b")
_ID_ANGLE = _rx(r" id <(\S+)>")
_FROM_ANGLE = _rx(r" from <(\S+)>")
_IDENT_PREFIX = _rx(r"IDENT:([^\@]*)\@")
_AT_PREFIX = _rx(r"([^\@]*)\@")
_SUBMIT_LOCAL = _rx(r"^\S+\@localhost\) by \S+ ")
_JQUEUE = _rx(r"^[^\s\@]+\@[^)]+\) by \S+\(jqueuemail\) id [^\s;]+")


def _find_auth(s: str, low: str) -> str:
    has_by = " by " in s
    if has_by and " with " in low and ("mtpa" in low or "mtpsa" in low or "asmtp" in low or "http" in low):
        m = _AUTH_WITH.search(s)
        if m:
            return m.group(1)
    m = "mx.google.com with ESMTPS" in s and _AUTH_GMAIL.search(s) and _AUTH_GMAIL_TLS.search(s)
    if m:
        return f"GMail - transport={m.group(1)} cipher={m.group(2)}"
    m = "(AUTH: " in s and _AUTH_COURIER.search(s)
    if m:
        return m.group(1)
    if "authenticated" in s and _AUTH_SENDMAIL.search(s):
        return "Sendmail"
    m = "mail.gmx." in s and _AUTH_GMX.search(s)
    if m:
        return f"GMX ({m.group(4)} / {m.group(3)})"
    if " (authenticated as " in s and _AUTH_CP.search(s):
        return "CriticalPath"
    m = "(Authenticated sender: " in s and _AUTH_POSTFIX.search(s)
    if m:
        return m.group(1) if m.group(1) == "Postfix" else f"Postfix ({m.group(1)})"
    if "CommuniGate Pro " in s and _AUTH_CGP.search(s) and " (account " in s:
        return "Communigate"
    if " with Microsoft Exchange Server HTTP-DAV" in s and _HTTP_DAV.search(s):
        return "HTTP-DAV"
    if has_by and "(via http" in low:
        m = _AUTH_VIA_HTTP.search(s)
        if m:
            return m.group(1)
    return ""


# The "from ..." formats, in Received.pm's order.  Each entry: (guard substring or
# None, pattern, fields) where fields maps a result name to a group number, a
# constant (str) or a callable; "dns" = 1 marks an MTA that looks names up.
_SMTPSVC = _rx(rf"^(\S*) \(\[({IP})\][^\)]{{0,40}}\) by (\S+) with Microsoft SMTPSVC")
_SMTPSVC_PICKUP = _rx(r"^mail pickup service by (\S+) with Microsoft SMTPSVC$")
_MSSMTP_GUARD = _rx(r" with (?:Microsoft SMTP Server|mapi id) (?:\([^\)]+\) )?\d+\.\d+\.\d+\.\d+(?:$| )")
_MSSMTP = _rx(rf"^(\S+) \(\[?({IP})(?:%[A-Z0-9._~-]*)?\]?\) by (\S+) ")
_XMAIL = _rx(rf"^(\S+) \((\[?{IP}\]?)(?::\d+)\) by (\S+)(?: \(\S+\))? with \[XMail")
_ECEL1 = _rx(rf"^\(\[({IP}):\d+\] helo=(\S+)\) by (\S+) ")
_ECEL2 = _rx(rf"^\S+ \(\[({IP}):\d+\]\) by (\S+) ")
_EXIM_LOCAL = _rx(r"\bwith local(?:-\S+)? ")
_EXIM1 = _rx(rf"^\[({IP})\] \((.*?)\) by (\S+) ")
_EXIM2 = _rx(rf"^(\S+) \(\[({IP})\](.*?)\) by (\S+) ")
_EXIM3 = _rx(rf"^(\S+) \[({IP})\](:\d+)? by (\S+) ")
_EXIM_RDNS = _rx(r"^(\S+) ")
_EXIM_HELO = _rx(r" \((\S+)\) ")
_EXIM_IP = _rx(rf" \[({IP})(?:\.\d+)?\] ")
_EXIM_BY = _rx(r"by (\S+) ")
_POSTFIX1 = _rx(rf"^(\S+) \((\S+) \[({IP})\]\) by (\S+) ")
_POSTFIX2 = _rx(rf"^(\S+) \((\S+)\[({IP})\]\) by (\S+) ")
_SCALIX = _rx(rf"^(\S+) \( ?({IP})\) by (\S+)")
_DOMINO = _rx(rf"^(\S+) \(\[({IP})\]\) by (\S+) \(Lotus")
_HTTP_IMP = _rx(rf"^({IP}) \(\[{IP}\]\) by (\S+)")
_QMAIL_LDAP = _rx(r" by \S+ \(qmail-\S+\) with ")
_SENDMAIL = _rx(rf"^(\S+) \((\S+) \[({IP})\].*\) by (\S+) \(")

_EXIM_SUB_HELO = re.compile(r"helo=(\S+)")
_EXIM_SUB_IDENT = re.compile(r"ident=(\S*)")

# (pattern, field order, dns looked up, guard) for the formats tried one after another
_GENERIC: list = []


def _g(pattern: str, fields: tuple, dns: int = 0, guard: Optional[str] = None, flags: int = 0) -> None:
    _GENERIC.append((re.compile(pattern, flags), fields, dns, guard))


# names: helo, rdns, ip, by, ident; "-" skips a group
_g(rf"^(\S+) \((\S+) \[({IP})\]\) by (\S+) with \S+ \(", ("helo", "rdns", "ip", "by"), 1, guard='[')
_g(rf"^(\S+) \(\[({IP})\] helo=(\S+)\) by (\S+) with ", ("rdns", "ip", "helo", "by"), guard='helo=')
_g(rf"^(\S+) \(<unknown\S*>\[({IP})\]\) by (\S+) ", ("helo", "ip", "by"), guard='(<unknown')
_g(rf"^(\S+) \((\S+\.\S+)\[({IP})\]\) by (\S+) ", ("helo", "rdns", "ip", "by"), 1, guard='[')
_g(rf"^(\S+) \((\S*)\@\[({IP})\].*\) by (\S+) \(", ("helo", "ident", "ip", "by"), 1, guard='@[')
_HOTMAIL_BY = _rx(r"by (\S+\.hotmail\.msn\.com) ")
_HOTMAIL_IP = _rx(rf"^({IP}) ")
_GENERIC_A_END = len(_GENERIC)
_g(rf"^(\S+) \((?:HELO|EHLO) (\S*)\) \(({IP})\) by (\S+) \(qpsmtpd/\S+\) with (?:ESMTP|SMTP)",
   ("rdns", "helo", "ip", "by"), guard='(qpsmtpd/')
_g(rf"^(\S+) \(LHLO (\S*)\) \(({IP})\) by (\S+) with LMTP", ("rdns", "helo", "ip", "by"), guard='(LHLO ')
_g(rf"^(\S+) \((?:HELO|EHLO) (\S*)\) \[({IP})\] by (\S+) \([^\)]+\) with (?:ESMTP|SMTP)",
   ("rdns", "helo", "ip", "by"), guard='LO ')
_g(rf"^(\S+) \(\[({IP})\]\) by (\S+) via smtpd \(for \S+\) with SMTP\(", ("helo", "ip", "by"), guard=' via smtpd (for ')
_GENERIC_B_END = len(_GENERIC)
_QMAIL = _rx(rf"^\S+( \((?:HELO|EHLO) \S*\))? \((\S+\@)?\[?{IP}\]?\)( \(envelope-sender <\S+>\))? by \S+( \(.+\))* "
             r"with (.* )?(SMTP|QMQP)(?! id )")
_QMAIL1 = _rx(rf"^(\S+) \((?:HELO|EHLO) ([^ \(\)]*)\) \((\S*)\@\[?({IP})\]?\)( \(envelope-sender <\S+>\))? by (\S+)")
_QMAIL2 = _rx(rf"^(\S+) \((?:HELO|EHLO) ([^ \(\)]*)\) \(\[?({IP})\]?\)( \(envelope-sender <\S+>\))? by (\S+)")
_QMAIL3 = _rx(rf"^(\S+) \((\S*)\@\[?({IP})\]?\)( \(envelope-sender <\S+>\))? by (\S+)")
_QMAIL4 = _rx(rf"^(\S+) \(\[?({IP})\]?\)( \(envelope-sender <\S+>\))? by (\S+)")
_g(rf"^\[({IP})\] by (\S+) via HTTP$", ("ip", "by"), guard=" via HTTP")
_g(rf"^(\S+) \( \[({IP})\]\).*? by (\S+) ", ("-", "ip", "by"), guard='( [')
_g(rf"^\((\S+) \[({IP})\]\) by (\S+) ", ("helo", "ip", "by"), guard='[')
_g(rf"^\[({IP})\] by (\S+) ", ("ip", "by"), guard='[')
_g(rf"^\(\[?({IP})\]?\) by (\S+) ", ("ip", "by"), guard=') by ')
_g(rf"^(\S+) \[({IP})\] by (\S+) \[{IP}\] with ", ("helo", "ip", "by"), 1, guard='[')
_g(rf"^(\S+) \[\(({IP})\)\] by (\S+) \({IP}\) ", ("helo", "ip", "by"), guard='[(')
_g(rf"^(\S+) \(\[({IP})\]\) by (\S+) \(", ("helo", "ip", "by"), 1, guard='([')
_GENERIC_C_END = len(_GENERIC)
_SENDMAIL2 = _rx(rf"^(\S+) \((\S+) \[({IP})\]\).*? by (\S+)\b")
_g(rf"^(\S+) \(\[({IP})(?:[.:]\d+)?\]\).*? by (\S+) ", ("helo", "ip", "by"), 1, guard='([')
_g(rf"^(\S+) \((\S+) \[({IP})\]\)(?: \(authenticated bits=\d+\))? by (\S+) \(", ("helo", "rdns", "ip", "by"), 1, guard='[')
_GENERIC_D_END = len(_GENERIC)
_FETCHER = _rx(r"with (?:POP3|IMAP)")
_QMAILISH1 = _rx(rf"^(\S+) \((?:HELO|EHLO) ([^\)]*)\) \((\S*@)?\[?({IP})\]?\).* by (\S+) ")
_QMAILISH2 = _rx(rf"^(\S+) \((\S*@)?\[?({IP})\]?\).* by (\S+) ")
_g(rf"^\[({IP})\] by (\S+) with http for ", ("ip", "by"), guard=" with http for ")
_g(rf"^(\S+)\(({IP})\) by (\S+) via smap ", ("rdns", "ip", "by"), 1, guard=" via smap ")
_g(rf"^(\S+)\(({IP}), (?:HELO|EHLO) (\S*)\) by (\S+) via smap ", ("rdns", "ip", "helo", "by"), 1, guard=' via smap ')
_g(rf"^\[({IP})\] by (\S+) \(Post", ("ip", "by"), guard=" (Post")
_g(rf"^\[({IP})\] by (\S+) \(ArGoSoft", ("ip", "by"), guard=" (ArGoSoft")
_g(rf"^({IP}) by (\S+) \((?:SMTPL|InterScan)\b", ("ip", "by"))
_GENERIC_E_END = len(_GENERIC)
_BSMTP = _rx(r"^\S+ by \S+ with BSMTP")
_g(rf"^(\S+) \((\S+) \[({IP})\]\) by (\S+) with ", ("helo", "rdns", "ip", "by"), 1, guard='[')
_g(rf"^(\S+) \((?:HELO|EHLO) (\S*)\) \((?:(\S+)\@)?({IP}).*?\) by (\S+) with ", ("rdns", "helo", "ident", "ip", "by"), 1, guard='LO ')
_g(rf"^\[({IP})\] \((?:account \S+ )?(?:HELO|EHLO) (\S*)\) by (\S+) \(", ("ip", "helo", "by"), guard='LO ')
_g(rf"^((\S+)) \(\[({IP})\] verified\) by (\S+) \(", ("rdns", "helo", "ip", "by"), 1, guard=" (CommuniGate Pro")
_g(rf"^\(\[({IP})\]\) by (\S+) with ", ("ip", "by"), guard='([')
_g(rf"^([^\d]\S+) \(({IP})\) by (\S+) ", ("helo", "ip", "by"), guard=') by ')
_GENERIC_F_END = len(_GENERIC)
_CONTENT_TECH = _rx(r"^\S+ \(\S+\) by \S+ \(Content Technologies ")
_g(rf"^(\S+) \(\[({IP})\] \[(\S+)\]\) by (\S+) with ", ("helo", "ip", "-", "by"), guard='] [')
_g(rf"^({IP}) by (\S+) with ", ("ip", "by"), guard=' with ')
_g(rf"^(\S+) \((\S+)\[({IP})\]\) by (\S+) ", ("helo", "rdns", "ip", "by"), 1, guard='[')
_g(rf"^\[({IP})\]\S+ \((?:HELO|EHLO) (\S*)\) by (\S+) ", ("ip", "helo", "by"), guard='LO ')
_g(rf"^({IP}) \((?:HELO|EHLO) (\S*)\) by (\S+) ", ("ip", "helo", "by"), guard='LO ')
_g(rf"^(\S+) \[({IP})\] by (\S+) ", ("helo", "ip", "by"), guard='] by ')
_g(rf"^(\S+)\(({IP})\) by (\S+) ", ("rdns", "ip", "by"), guard=') by ')
_g(rf"^\[({IP})\] by (\S+) \(MailGate ", ("ip", "by"), guard='(MailGate ')
_g(rf"^(\S+) \(unverified \[({IP})\]\) by (\S+) ", ("helo", "ip", "by"), guard='(unverified [')
_g(rf"^({IP}) \([A-Za-z][^\)]+\) by (\S+) with ", ("ip", "by"), guard=' with ')
_GENERIC_G_END = len(_GENERIC)
_BRACKET_SUB = _rx(rf"^\[({IP})\] \(([^\)]+)\) by (\S+) ")
_g(rf"^(\S+) \((?:\S+\@)?({IP})\) by (\S+) with ", ("rdns", "ip", "by"), guard=' with ')
_GENERIC_H_END = len(_GENERIC)
_OBTUSE = _rx(rf"^(\S+)\(({IP})\)(?:, claiming to be \"(\S+)\")? via \S+ by (\S+),")
_YAHOO_AUTH = _rx(rf"^(\S+) \((\S+)@({IP}) with login\) by (\S+\.yahoo\.com) with SMTP")
_XORIG = _rx(rf"^X-Originating-IP: ({IP})$")

# handovers SpamAssassin ignores (the "STUFF TO IGNORE" list), in its order
_IGNORE = [re.compile(p) for p in (
    rf"^\S+ \([^\s\@]+\@{LH}\) by \S+ \(",
    r"^\S+ \S+ by \S+ with local-e?smtp ",
    r"^127\.0\.0\.1 \(AVG SMTP \S+ \[\S+\]\)",
    r"^\S+\@\S+ by \S+ by uid \S+ ",
    r"^\S+\@\S+ by \S+ ",
    r"^Unknown/Local \(",
    rf"^{LH} \((?:\S+\@)?{LH}[\)\[]",
    rf"^\S+ \((?:\S+\@)?{LH}\) ",
    rf"^\S+ \(\S+\@\S+ \[{LH}\]\) ",
    r"^\(AUTH: \S+\) by \S+ with ",
    r"^localhost \(localhost \[\[UNIX: localhost\]\]\) by ",
    r"^\S+\.amazon\.com by \S+\.amazon\.com with ESMTP \(peer crosscheck: ",
    r"^[^\.]+ by \S+ with Novell_GroupWise",
    r"^no\.name\.available by \S+ via smtpd \(for ",
)]
_QMAIL_SCANNER = _rx(r"^\S+ by \S+ \(.{0,100}\) with qmail-scanner")
_IGNORE2 = [re.compile(p) for p in (
    r"^\S+ by \S+ with local",
    r"^\S+ \(\[unix socket\]\) by \S+ \(Cyrus v[0-9]*?\.[0-9]*?\.[0-9]*?\) with LMTPA",
    r"^\S+ by \S+ (?:with|via|for|\()",
    r"^\S+ (?:(?:with|via|for) \S+|\(unverified\)) by\b",
    r"^\S+ \(unknown\) by \S+ \(SG\) with \b",
    r"^\S+ \(\S+ \[local\]\) by \S+ \(OpenSMTPD\) with \b",
    r"\(LSMTP for",
    rf"^\(\[{LH}\]\) with MailEnable ",
    r"^facebook\.com \([^\)]+\) by facebook\.com with Thrift id \S+$",
    r"^\S+ named \S+ by gmailapi\.google\.com with HTTPREST$",
    r"^\S+ id \S+$",
    r"^\[<.*? \(Jetsend",
)]
_GUESS_HELO = _rx(r"^(\S+)[^-A-Za-z0-9\.]")
_SIMTA = _rx(rf"^(\S+) \((\S+) \[({IP})\]\) BY (\S+) (?:\([^\)]+\) WITH SMTP )?ID <?(\S+?)>?(?: FOR <[^>]+>)?$")
_NAVGW = _rx(rf"^(\S*) \[({IP})\]\) by (\S+) \(NAVGW .*?\) with ")
_ANY_IP = _rx(rf"\[({IP})\]")
_ANY_IP_BARE = _rx(IP)
_ENVFROM = _rx(r"(?:return-path:? |envelope-(?:sender|from)[ =])(\S+)\b", re.I)
_SQUIRREL = _rx(rf"({IP})\b(?![.-]).{{10,80}}by (\S+) with HTTP")
_AOL_WEB = _rx(rf"({IP}) by (\S+) \({IP}\) with HTTP \(WebMailUI\)")
_MAPPED_V4 = re.compile(r"^0*:0*:(?:0*:)*ffff:(\d+\.\d+\.\d+\.\d+)$", re.I)
_SCOPE = re.compile(r"%[A-Z0-9._~-]*\Z", re.I)


PARSED = object()  # a format matched: Received.pm's ``goto enough``


def _take(m: re.Match, names: tuple, out: dict) -> None:
    for n, name in enumerate(names, 1):
        if name != "-":
            out[name] = m.group(n) or ""


_MONTHS = frozenset("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())
_DAYS = frozenset(("Mon, ", "Tue, ", "Wed, ", "Thu, ", "Fri, ", "Sat, ", "Sun, "))
_WS_SEMI = frozenset(" \t\n\r\f\v;")
_TIME = re.compile(r"\d+:\d+(?::\d+)?")


def _strip_date(s: str) -> str:
    r"""``s/[\s;]+(?:Day, )?\d+ Mon \d+ \d+:\d+(?::\d+)? \S+$//`` (``_DATE``), read
    token by token from the end: the date pattern was most of the parse's cost.
    The last token is the zone, the four before it are time, year, month and day
    (each exactly, as the pattern's spaces delimit them); the match starts at the
    run of white space or ";" before the day, or before "Day, " when there is one
    (the leftmost start the regex would find)."""
    i = s.rfind(" ")
    if i <= 0 or i == len(s) - 1:
        return s
    j = s.rfind(" ", 0, i)
    if j < 0 or not _TIME.fullmatch(s, j + 1, i):
        return s
    k = s.rfind(" ", 0, j)
    if k < 0 or not s[k + 1:j].isdecimal():
        return s
    m = s.rfind(" ", 0, k)
    if m < 0 or s[m + 1:k] not in _MONTHS:
        return s
    d = m
    while d > 0 and s[d - 1].isdecimal():
        d -= 1
    if d == m:
        return s
    if d >= 6 and s[d - 5:d] in _DAYS and s[d - 6] in _WS_SEMI:
        p = d - 6
    elif d >= 1 and s[d - 1] in _WS_SEMI:
        p = d - 1
    else:
        return s
    while p > 0 and s[p - 1] in _WS_SEMI:
        p -= 1
    return s[:p]


def parse_received_line(line: str, state: Optional[dict] = None) -> Union[Relay, int, None]:
    """One Received header (without the name) -> a Relay, SKIP for a handover
    SpamAssassin ignores, FETCHER for a POP/IMAP fetch, None when unparseable.

    ``state`` carries qmail-scanner's envelope sender to the next (older) header.
    """
    # (the substring tests before the patterns only skip patterns that cannot match:
    # they keep the parse under 0.1 ms per message)
    # str.split is Perl's \s+ for ASCII text (it also splits at \x1c-\x1f, which
    # no MTA writes), six times faster than the regex
    s = " ".join(line.split()) if line.isascii() else _WS.sub(" ", line).strip(" ")
    while s.endswith(";"):  # s/\s?;$// until none is left
        s = s[:-2] if s.endswith(" ;") else s[:-1]
    low = s.lower()
    if not (low.startswith("from ") or low.startswith("(from ")):
        return SKIP
    if "with local for" in s and _WITH_LOCAL_FOR.search(s):
        return SKIP
    if ";" in s and low[s.find(" ") + 1:].split(" ", 2)[1:2] == ["by"]:
        m = _FROM_BY_SEMI.match(s)
        if m and not _BRACKET_V4.fullmatch(m.group(1)):
            return SKIP
    s = _strip_date(s)
    s = s.replace(")by ", ") by ", 1)

    f = {"ip": "", "helo": "", "rdns": "", "by": "", "id": "", "ident": "", "envfrom": None, "dns": 0, "auth": ""}
    if " id" in s:
        m = _ID.search(s)
        if m:
            f["id"] = m.group(1)
    m = ("helo=" in s and _HELO_EQ.search(s)) or (("HELO " in s or "EHLO " in s) and _HELO_WORD.search(s))
    if m:
        f["helo"] = m.group(1)
    m = _BY.search(s)
    if m:
        f["by"] = m.group(1)
    f["auth"] = _find_auth(s, low)
    if s.startswith("from "):
        result = _parse_from(s[5:], low[5:], f, state)
        if result is PARSED:
            return _enough(f)
        if result is not None:
            return result
    elif s.startswith("FROM "):
        m = _SIMTA.search(s[5:])
        if m:
            f.update(helo=m.group(1), rdns=m.group(2), ip=m.group(3), by=m.group(4), id=m.group(5), dns=1)
            if f["rdns"] == "unverified":
                f["rdns"] = ""
            return _enough(f)
        s = s[5:]
    elif s.startswith("(from "):
        rest = s[6:]
        m = _NAVGW.search(rest)
        if m:
            f.update(helo=m.group(1), ip=m.group(2), by=m.group(3))
            return _enough(f)
        if _SUBMIT_LOCAL.search(rest):
            return SKIP
        if _JQUEUE.search(rest):
            return SKIP
        s = rest
    if not f["ip"]:
        m = _ANY_IP.search(s)
        if m:
            f["ip"] = m.group(1)
    if f["ip"] and f["by"]:
        return _enough(f)
    return None


def _parse_from(s: str, low: str, f: dict, state: Optional[dict]):
    """The ``s/^from //`` branch of parse_received_line: raises _Parsed when a
    format matched, returns SKIP/FETCHER for ignored handovers, else None
    (the caller's general fall-through)."""
    if "return-path" in low or "envelope-" in low:
        m = _ENVFROM.search(s)
        if m:
            f["envfrom"] = m.group(1)
    if "authenticated user " in s and _SQUIRREL_GUARD.search(s):
        m = _SQUIRREL.search(s)
        if m:
            f.update(ip=m.group(1), by=m.group(2))
            return PARSED
    if "aol.com" in s and "with HTTP (WebMailUI)" in s:
        m = _AOL_WEB.search(s)
        if m:
            f.update(ip=m.group(1), by=m.group(2))
            return PARSED
    if " SMTPSVC" in s:
        m = _SMTPSVC.search(s)
        if m:
            f.update(helo=m.group(1), ip=m.group(2), by=m.group(3))
            return PARSED
        if _SMTPSVC_PICKUP.search(s):
            return SKIP
    elif (" with Microsoft SMTP Server" in s or " with mapi id" in s) and _MSSMTP_GUARD.search(s):
        m = _MSSMTP.search(s)
        if m:
            f.update(helo=m.group(1), ip=m.group(2), by=m.group(3), id="")
            return PARSED
    elif "[XMail " in s:
        m = _XMAIL.search(s)
        if m:
            f.update(helo=m.group(1), ip=m.group(2), by=m.group(3))
            m2 = _ID_ANGLE.search(s)
            if m2:
                f["id"] = m2.group(1)
            m2 = _FROM_ANGLE.search(s)
            if m2:
                f["envfrom"] = m2.group(1)
            return PARSED
    elif "(ecelerity" in s and _ECELERITY.search(s):
        m = _ECEL1.search(s)
        if m:
            f.update(ip=m.group(1), helo=m.group(2), by=m.group(3))
            return PARSED
        m = _ECEL2.search(s)
        if m:
            f.update(ip=m.group(1), by=m.group(2))
            return PARSED
    elif "Exim" in s:
        if _EXIM_LOCAL.search(s):
            return SKIP
        m = _EXIM1.search(s)
        if m:
            f.update(ip=m.group(1), by=m.group(3))
            _exim_sub(m.group(2), f)
            return PARSED
        m = _EXIM2.search(s)
        if m:
            f.update(rdns=m.group(1), ip=m.group(2), by=m.group(4), helo=m.group(1))  # bug 5112
            _exim_sub(m.group(3), f)
            return PARSED
        m = _EXIM3.search(s)
        if m:
            f.update(rdns=m.group(1), ip=m.group(2), helo=m.group(1), by=m.group(4))
            return PARSED
        m = _EXIM_RDNS.search(s)
        if m:
            f["rdns"] = m.group(1)
        m = _EXIM_HELO.search(s)
        if m:
            f["helo"] = m.group(1)
        m = _EXIM_IP.search(s)
        if m:
            f["ip"] = m.group(1)
        m = _EXIM_BY.search(s)
        if m:
            f["by"] = m.group(1)
            if f["ip"]:
                return PARSED
    elif " (Postfix) with" in s:
        m = _POSTFIX1.search(s) or _POSTFIX2.search(s)
        if m:
            f.update(helo=m.group(1), rdns=m.group(2), ip=m.group(3), by=m.group(4), dns=1)
            if f["rdns"] == "unknown":
                f["rdns"] = ""
            return PARSED
    elif "(Scalix SMTP Relay" in s:
        m = _SCALIX.search(s)
        if m:
            f.update(helo=m.group(1), ip=m.group(2), by=m.group(3))
            return PARSED
    elif " (Lotus Domino " in s:
        m = _DOMINO.search(s)
        if m:
            f.update(helo=m.group(1), ip=m.group(2), by=m.group(3), dns=0)
            return PARSED

    if "with HTTP" in s and _WITH_HTTP.search(s):
        m = _HTTP_IMP.search(s)
        if m:
            f.update(ip=m.group(1), by=m.group(2))
            return PARSED
    if "(qmail-" not in s or not _QMAIL_LDAP.search(s):
        m = _SENDMAIL.search(s)
        if m:
            f.update(helo=m.group(1), rdns=m.group(2), ip=m.group(3), by=m.group(4), dns=1)
            r = f["rdns"]
            if "@" in r:
                m2 = _IDENT_PREFIX.match(r)
                if m2:
                    f["ident"], r = m2.group(1), r[m2.end():]
                m2 = _AT_PREFIX.match(r)
                if m2:
                    f["ident"], r = m2.group(1), r[m2.end():]
            f["rdns"] = r
            return PARSED

    if _try(s, f, 0, _GENERIC_A_END):

        return PARSED
    m = ".hotmail.msn.com " in s and _HOTMAIL_BY.search(s)
    if m:
        f["by"] = m.group(1)
        m2 = _HOTMAIL_IP.search(s)
        if m2:
            f["ip"] = m2.group(1)
        return PARSED
    if _try(s, f, _GENERIC_A_END, _GENERIC_B_END):
        return PARSED
    if _QMAIL.search(s):
        m = _QMAIL1.search(s)
        if m:
            f.update(rdns=m.group(1), helo=m.group(2), ident=m.group(3), ip=m.group(4), by=m.group(6))
        else:
            m = _QMAIL2.search(s)
            if m:
                f.update(rdns=m.group(1), helo=m.group(2), ip=m.group(3), by=m.group(5))
            else:
                m = _QMAIL3.search(s)
                if m:
                    f.update(rdns=m.group(1), helo=m.group(1), ident=m.group(2), ip=m.group(3), by=m.group(5))
                else:
                    m = _QMAIL4.search(s)
                    if m:
                        f.update(rdns=m.group(1), helo=m.group(1), ip=m.group(2), by=m.group(4))
        if f["rdns"] != "unknown":
            f["dns"] = 1
        else:
            f["rdns"] = ""
        return PARSED
    if _try(s, f, _GENERIC_B_END, _GENERIC_C_END):
        return PARSED
    m = _SENDMAIL2.search(s)
    if m:
        if m.group(2) == "softdnserr":
            f["dns"] = 0  # bug 2326: couriertcpd
        else:
            f.update(dns=1, rdns=m.group(2))
        f.update(helo=m.group(1), ip=m.group(3), by=m.group(4))
        return PARSED
    if _try(s, f, _GENERIC_C_END, _GENERIC_D_END):
        return PARSED
    if ("POP3" in s or "IMAP" in s) and _FETCHER.search(s):
        return FETCHER
    m = _QMAILISH1.search(s)
    if m:
        f.update(dns=1, rdns=m.group(1), helo=m.group(2), ident=(m.group(3) or "").removesuffix("@"),
                 ip=m.group(4), by=m.group(5))
        return PARSED
    m = _QMAILISH2.search(s)
    if m:
        f.update(dns=1, rdns=m.group(1), helo=m.group(1), ident=(m.group(2) or "").removesuffix("@"),
                 ip=m.group(3), by=m.group(4))
        return PARSED
    if _try(s, f, _GENERIC_D_END, _GENERIC_E_END):
        return PARSED
    if " with BSMTP" in s and _BSMTP.search(s):
        return SKIP
    if _try(s, f, _GENERIC_E_END, _GENERIC_F_END):
        return PARSED
    if _CONTENT_TECH.search(s):
        return SKIP
    if _try(s, f, _GENERIC_F_END, _GENERIC_G_END):
        return PARSED
    m = _BRACKET_SUB.search(s)
    if m:
        f.update(ip=m.group(1), by=m.group(3))
        _exim_sub(m.group(2), f)
        return PARSED
    if _try(s, f, _GENERIC_G_END, _GENERIC_H_END):
        return PARSED
    m = _OBTUSE.search(s)
    if m:
        f.update(rdns=m.group(1), ip=m.group(2), helo=m.group(3) or "", by=m.group(4))
        if m.group(1) != "UNKNOWN":
            f["dns"] = 1
        return PARSED
    m = _YAHOO_AUTH.search(s)
    if m:
        f.update(helo=m.group(1), ip=m.group(3), by=m.group(4))
        return PARSED
    m = _XORIG.search(s)
    if m:
        f.update(ip=m.group(1), by="")
        return PARSED
    for rx in _IGNORE:
        if rx.search(s):
            return SKIP
    if _QMAIL_SCANNER.search(s):
        env = f["envfrom"]
        if env is not None:
            env = _clean_envfrom(env)
        if state is not None:
            state["qmail_scanner_env_from"] = env
        return SKIP
    for rx in _IGNORE2:
        if rx.search(s):
            return SKIP
    if not f["helo"]:
        m = _GUESS_HELO.search(s)
        if m:
            f["helo"] = m.group(1)
    return None


def _exim_sub(sub: str, f: dict) -> None:
    m = _EXIM_SUB_HELO.search(sub)
    if m:
        f["helo"] = m.group(1)
        sub = sub[:m.start()] + sub[m.end():]
    m = _EXIM_SUB_IDENT.search(sub)
    if m:
        f["ident"] = m.group(1)


def _try(s: str, f: dict, start: int, end: int) -> bool:
    for rx, names, dns, guard in _GENERIC[start:end]:
        if guard is not None and guard not in s:
            continue
        m = rx.search(s)
        if m:
            _take(m, names, f)
            if dns:
                f["dns"] = 1
            return True
    return False


def _clean_envfrom(env: str) -> str:
    return _ENV_TAIL.sub("", _ENV_HEAD.sub("", env)).translate(_STRIP_TABLE)


def _enough(f: dict) -> Relay:
    rdns = f["rdns"].rstrip(".")
    if rdns.lower() == "unknown" or rdns.startswith("["):
        rdns = ""
    ip = f["ip"]
    if ip[:5].lower() == "ipv6:":
        ip = ip[5:]
    ip = ip.removeprefix("[").removesuffix("]")
    if ":" in ip:
        ip = _MAPPED_V4.sub(r"\1", _SCOPE.sub("", ip))
    elif "%" in ip:
        ip = _SCOPE.sub("", ip)
    by = f["by"].removesuffix(";")
    envfrom = f["envfrom"]
    if envfrom is not None:
        envfrom = _clean_envfrom(envfrom)
    helo, ident = f["helo"], f["ident"]
    if _STRIP_ANY.search(ip + rdns + helo + by + ident):  # rarely: one search instead of five translations
        t = _STRIP_TABLE
        ip, rdns, helo, by, ident = ip.translate(t), rdns.translate(t), helo.translate(t), by.translate(t), \
            ident.translate(t)
    relay = Relay(ip=ip, rdns=rdns, helo=helo, by=by, ident=ident, envfrom=envfrom, id=f["id"], auth=f["auth"])
    if relay.rdns == "":
        if f["dns"]:
            relay.no_reverse_dns = True
        else:
            relay.rdns_not_in_headers = True
    relay.ip_private = is_private(relay.ip)
    return relay


# --- networks --------------------------------------------------------------------------

_LOOPBACK = ("127.0.0.0/8", "::1")


class Networks:
    """A NetSet: SpamAssassin's trusted_networks syntax (``10.0.0.0/8``, ``192.168.``,
    ``10.0.1/24``, ``!10.0.1.5``, IPv6), the longest matching entry deciding, as its
    Patricia-trie lookup does.  127.0.0.0/8 and ::1 are always in."""

    def __init__(self, entries: Iterable[str] = (), loopback: bool = True):
        self.entries: list[tuple[ipaddress._BaseNetwork, bool]] = []
        for e in (list(_LOOPBACK) if loopback else []) + list(entries):
            self.entries.append(parse_network(e))
        self._cache: dict[str, bool] = {}

    def contains(self, ip: str) -> bool:
        hit = self._cache.get(ip)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(ip.strip("[]").removeprefix("IPv6:").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        best, verdict = -1, False
        for net, include in self.entries:
            if net.version == addr.version and addr in net and net.prefixlen > best:
                best, verdict = net.prefixlen, include
        if len(self._cache) < 4096:
            self._cache[ip] = verdict
        return verdict


def parse_network(entry: str) -> tuple:
    """'!10.0.1/24' -> (IPv4Network('10.0.1.0/24'), False); ValueError when it is not one."""
    text = entry.strip()
    include = not text.startswith("!")
    text = text.lstrip("!").strip()
    if text.startswith("[") and "]" in text:
        text = text[1:].replace("]", "", 1)
    addr, slash, bits = text.partition("/")
    if ":" not in addr:
        # SpamAssassin's short forms: "192.168." or "10.0.1" (a /8, /16 or /24)
        parts = [p for p in addr.split(".") if p != ""]
        if not 1 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{entry!r} is not an IP address or network")
        if len(parts) < 4 and not slash:
            bits = str(8 * len(parts))
        addr = ".".join(parts + ["0"] * (4 - len(parts)))
    net = ipaddress.ip_network(f"{addr}/{bits}" if bits else addr, strict=False)
    return net, include


# --- the chain ----------------------------------------------------------------------------


@dataclass
class RelayChain:
    """The relays of one message, newest first, split as SpamAssassin splits them."""

    trusted: list[Relay] = field(default_factory=list)
    untrusted: list[Relay] = field(default_factory=list)
    internal: list[Relay] = field(default_factory=list)
    external: list[Relay] = field(default_factory=list)
    unparseable: int = 0
    # counted from the top (the newest hop); -1: none
    last_trusted_relay_index: int = -1
    last_internal_relay_index: int = -1

    @property
    def first_untrusted(self) -> Optional[Relay]:
        return self.untrusted[0] if self.untrusted else None

    @property
    def last_external(self) -> Optional[Relay]:
        """The first external relay: the hop that brought the message into our networks."""
        return self.external[0] if self.external else None

    def pseudo_headers(self) -> dict[str, bytes]:
        """The X-Spam-Relays-* texts (lower-case names); an empty list is absent."""
        out = {}
        for name, relays in (("x-spam-relays-trusted", self.trusted), ("x-spam-relays-untrusted", self.untrusted),
                             ("x-spam-relays-internal", self.internal), ("x-spam-relays-external", self.external)):
            if relays:
                out[name] = " ".join(r.as_string() for r in relays).encode("utf-8", "surrogateescape")
        if self.external:
            # not one of SpamAssassin's: the boundary hop alone, for our own rules
            out["x-spam-last-external-relay"] = self.external[0].as_string().encode("utf-8", "surrogateescape")
        return out


@dataclass
class TrustConfig:
    """trusted_networks / internal_networks / msa_networks; None = not configured."""

    trusted: Optional[Networks] = None
    internal: Optional[Networks] = None
    msa: Networks = field(default_factory=lambda: Networks(loopback=False))

    @classmethod
    def from_lists(cls, trusted: Optional[list[str]] = None, internal: Optional[list[str]] = None,
                   msa: Optional[list[str]] = None) -> "TrustConfig":
        return cls(Networks(trusted) if trusted is not None else None,
                   Networks(internal) if internal is not None else None,
                   Networks(msa or (), loopback=False))


INFERRED = TrustConfig()


def header_end(raw: bytes) -> int:
    """Where the header section ends (len(raw) when there is no body)."""
    first = raw.find(b"\n")
    if first > 0 and raw[first - 1:first] == b"\r":  # CRLF lines: no need to scan the body for "\n\n"
        end = raw.find(b"\r\n\r\n")
        if end >= 0:
            lf = raw.find(b"\n\n", 0, end)
            return lf if lf >= 0 else end
    end = raw.find(b"\n\n")
    crlf = raw.find(b"\n\r\n", 0, end if end >= 0 else len(raw))
    if crlf >= 0:
        return crlf
    return end if end >= 0 else len(raw)


def _text(value: bytes) -> str:
    # SpamAssassin 4 reads header bytes that are not UTF-8 as Latin-1
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


# matched on the lower-cased header section (same offsets), where "received" is a
# literal the regex engine scans for quickly; the values are cut from the original
_RECEIVED_FIELD = re.compile(rb"(?m)^received[ \t]*:(.*(?:\r?\n[ \t].*)*)")
_FIELD_RX: dict[tuple, re.Pattern] = {}
_ANY_NAME: dict[tuple, re.Pattern] = {}


def received_headers(raw: bytes, originating_headers: Iterable[str] = ()) -> list[str]:
    """The values of the Received headers of a message, topmost first, then
    SpamAssassin's synthetic "from X-Originating-IP: a.b.c.d" hops for the first
    of each ``originating_headers`` carrying an address (bug 5680)."""
    head = raw[:header_end(raw)]
    low = head.lower()
    names = tuple(n.lower() for n in originating_headers)
    if names:
        any_name = _ANY_NAME.get(names)
        if any_name is None:
            any_name = _ANY_NAME[names] = re.compile(b"|".join(re.escape(n.encode()) for n in names))
        if any_name.search(low) is None:  # usually none is there at all
            names = ()
    if not names:
        # bytes.find for the name, then the field pattern at each line start: a
        # multi-line "^" pattern would be tried at every position of the header
        out, pos = [], low.find(b"received")
        while pos >= 0:
            if pos == 0 or low[pos - 1] == 10:
                m = _RECEIVED_FIELD.match(low, pos)
                if m:
                    out.append(_text(head[m.start(1):m.end(1)]))
            pos = low.find(b"received", pos + 8)
        return out
    rx = _FIELD_RX.get(names)
    if rx is None:
        alternatives = b"|".join(re.escape(n.encode()) for n in ("received",) + names)
        rx = _FIELD_RX[names] = re.compile(rb"(?m)^(" + alternatives + rb")[ \t]*:(.*(?:\r?\n[ \t].*)*)")
    out, first = [], {}
    for m in rx.finditer(low):
        name, value = m.group(1), _text(head[m.start(2):m.end(2)])
        if name == b"received":
            out.append(value)
        elif name not in first:
            first[name] = value
    for n in names:
        value = first.get(n.encode())
        if value:
            m = _ANY_IP_BARE.search(value)
            if m:
                out.append(f"from X-Originating-IP: {m.group(0)}\n")
    return out


def parse_all(headers: list[str], start: int = 0) -> list:
    """Each header parsed, newest first: a Relay, SKIP, FETCHER or None (unparseable).
    qmail-scanner's envelope sender, read from its own line, goes to the next
    (older) relay, as Received.pm's hack does."""
    out: list = []
    state: dict = {}
    for n, header in enumerate(headers):
        qms_env_from = state.pop("qmail_scanner_env_from", None)
        relay = parse_received_line(header, state)
        if isinstance(relay, Relay):
            relay.index = start + n
            if qms_env_from:
                relay.envfrom = qms_env_from
        out.append(relay)
    return out


def walk(parsed: list, trust: TrustConfig = INFERRED, first: Optional[Relay] = None,
         first_has_header: bool = True, originating: bool = False) -> RelayChain:
    """parse_received_headers over ``parse_all``'s results.  ``first`` is a hop
    known without parsing (our own session), newer than them: the Received header
    it wrote (index 0) is then not in ``parsed``, or it wrote none."""
    chain = RelayChain()
    if first is not None and not first_has_header:
        # the header indexes (ALL-TRUSTED and friends) count real headers only
        chain.last_trusted_relay_index = chain.last_internal_relay_index = -2
    trusted_nets, internal_nets = trust.trusted, trust.internal
    user_trust, user_internal = trusted_nets is not None, internal_nets is not None
    if user_trust and not user_internal:
        internal_nets = trusted_nets
    elif user_internal and not user_trust:
        trusted_nets = internal_nets
    configured = user_trust or user_internal
    in_trusted = in_internal = True
    found_msa = False
    allow_fetch_markers = True

    for relay in ([first] if first is not None else []) + parsed:
        if relay is None:
            chain.unparseable += 1
        elif relay is FETCHER:
            if allow_fetch_markers:  # found_pop_fetcher_sig: the trusted part restarts here
                chain.trusted, chain.internal, chain.external = [], [], []
        if not isinstance(relay, Relay):
            if in_trusted:
                chain.last_trusted_relay_index += 1
            if in_internal:
                chain.last_internal_relay_index += 1
            continue
        relay.msa = 0
        if in_trusted and not found_msa:
            if not configured:
                if not (relay.ip_private or relay.auth):
                    in_trusted = in_internal = False
            elif not relay.auth and not trusted_nets.contains(relay.ip):
                if not originating:
                    in_trusted = False
                else:
                    found_msa = True
                in_internal = False
            else:
                if in_internal and not relay.auth and not internal_nets.contains(relay.ip):
                    in_internal = False
                if trust.msa.contains(relay.ip):
                    found_msa = True
                    relay.msa = 1
        relay.internal = 1 if in_internal else 0
        relay.trusted = in_trusted
        if in_trusted:
            chain.trusted.append(relay)
            allow_fetch_markers = True
            chain.last_trusted_relay_index += 1
        else:
            chain.untrusted.append(relay)
            allow_fetch_markers = False
        if in_internal:
            chain.internal.append(relay)
            chain.last_internal_relay_index += 1
        else:
            chain.external.append(relay)
    return chain


def parse_message(raw: bytes, trust: TrustConfig = INFERRED, originating_headers: Iterable[str] = ()) -> RelayChain:
    """SpamAssassin's reading of a message file's Received chain."""
    return walk(parse_all(received_headers(raw, originating_headers)), trust)


def strip_chars(text: str) -> str:
    return text.translate(_STRIP_TABLE)


_PRIVATE_STARTS = ("10.", "127.", "169.254.", "172.", "192.168.", "100.")


def is_private(ip: str) -> bool:
    """IP_PRIVATE (only its IPv4 prefixes can match a dotted address: checked first)."""
    if ":" not in ip and not ip.startswith(_PRIVATE_STARTS) and not ip[:5].lower() == "ipv6:":
        return False
    return bool(IP_PRIVATE.search(ip))


def is_ipv4(text: str) -> bool:
    return bool(_IS_IPV4.match(text))
