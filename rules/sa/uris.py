"""Finding URIs in message text and HTML, and reducing hosts to the domain
a blocklist lists (the registered domain, public-suffix aware).

Spammers hide links from filters: ``hxxp://``, ``example[.]com``,
``example(dot)com``, ``http:\\\\example.com``, HTML entities, percent-encoded
host names, credentials in front of the host (``http://bank.com@evil.test``),
bare ``www.`` names and IP addresses written as one decimal number.  These
are undone before the host is taken.
"""

from __future__ import annotations

import html
import ipaddress
import re
import threading
from typing import Iterable, Optional
from urllib.parse import unquote

MAX_URIS = 2000

# (cheap substring gates on the lower-cased text, regex, replacement): most
# mail has none of these tricks, and a substring test is ~100x cheaper than a
# regex pass over a 5 KB body
_DEOBFUSCATE = [
    (("xxp", "**p"), re.compile(r"\b(?:h[xX]{2}p|h\*\*p)(s?)(?=://)", re.I), lambda m: "http" + m.group(1)),
    (("[.]", "(.)", "{.}", "dot]", "dot)", "dot}"),
     re.compile(r"[ \t]?(?:\[\.\]|\(\.\)|\{\.\}|\[dot\]|\(dot\)|\{dot\})[ \t]?", re.I), lambda m: "."),
    ((" dot ",), re.compile(r"(?<=[a-z0-9]) dot (?=[a-z0-9-]+\.?[a-z]{2,}\b)", re.I), lambda m: "."),
    ((":\\\\",), re.compile(r"(?<=https:)\\\\|(?<=http:)\\\\", re.I), lambda m: "//"),
]
_SCHEME_URI = re.compile(
    r"""(?:https?|ftp)://[^\s<>"'`{}|\\^\[\]]+""", re.I)
_WWW = re.compile(r"""(?<![\w.@/-])(?:www\d{0,3}|ftp)\.[a-z0-9-]+(?:\.[a-z0-9-]+)+(?:[/?#][^\s<>"'`]*)?""", re.I)
_MAILTO = re.compile(r"""mailto:[^\s<>"'`]+""", re.I)
_EMAIL = re.compile(r"""(?<![\w.+=/-])[\w.+=-]{1,64}@[a-z0-9-]+(?:\.[a-z0-9-]+)+(?![\w-])""", re.I)
_TLDS = r"(?:com|net|org|info|biz|ru|cn|top|xyz|io|co|us|uk|de|fr|nl|it|es|br|in|jp|pl|su|online|site|club|shop|link|click|ly|me|tk|ml|ga|cf|gq|test)"
_BARE_DOMAIN = re.compile(
    r"""(?<![\w.@/-])[a-z0-9][a-z0-9-]{0,62}(?:\.[a-z0-9-]{1,63})*\.""" + _TLDS +
    r"""(?:/[^\s<>"'`]*)?(?![\w-])""",
    re.I)
# the bare-domain scan tries every position of the text; this literal-led
# pattern finds in one fast pass whether it can match at all
_HAS_TLD = re.compile(r"\." + _TLDS + r"(?![\w-])", re.I)


def deobfuscate(text: str) -> str:
    if "&" in text:
        text = html.unescape(text)
    low = text.lower()
    for gates, rx, repl in _DEOBFUSCATE:
        if any(g in low for g in gates):
            text = rx.sub(repl, text)
    return text


def extract(texts: Iterable[str], links: Iterable[str] = ()) -> list[str]:
    """URIs in order of appearance, each once, bounded by MAX_URIS."""
    seen: dict[str, None] = {}

    def add(u: str) -> None:
        u = u.strip().rstrip(".,;:!?)>'\"]")
        if u and u not in seen and len(seen) < MAX_URIS:
            seen[u] = None

    for link in links:
        link = deobfuscate(link.strip())
        low = link.lower()
        if low.startswith(("http:", "https:", "ftp:", "mailto:")):
            add(link)
        elif low.startswith("www.") or (low and "://" not in low and "." in low.split("/")[0]
                                          and not low.startswith(("#", "/", "javascript:", "cid:", "data:"))):
            add("http://" + link)
    for text in texts:
        text = deobfuscate(text)
        low = text.lower()
        if "://" in low:
            for m in _SCHEME_URI.finditer(text):
                add(m.group(0))
        if "mailto:" in low:
            for m in _MAILTO.finditer(text):
                add(m.group(0))
        if "@" in text:
            for m in _EMAIL.finditer(text):
                add("mailto:" + m.group(0))  # SpamAssassin lists bare addresses as mailto: URIs
        if "www" in low or "ftp." in low:
            for m in _WWW.finditer(text):
                add("http://" + m.group(0))
        if _HAS_TLD.search(text):
            for m in _BARE_DOMAIN.finditer(text):
                add("http://" + m.group(0))
    return list(seen)


def host_of(uri: str) -> Optional[str]:
    """The host a URI points at: lower-case, credentials, port and dots removed."""
    u = uri.strip()
    low = u.lower()
    if low.startswith("mailto:"):
        addr = u[7:].split("?", 1)[0]
        host = addr.rpartition("@")[2]
    else:
        m = re.match(r"^[a-z][a-z0-9+.-]*:/*(.*)$", u, re.I)
        rest = m.group(1) if m else u
        authority = re.split(r"[/?#\\]", rest, 1)[0]
        authority = unquote(authority)
        host = authority.rpartition("@")[2]
        if host.startswith("["):
            host = host[1:].split("]", 1)[0]
        else:
            host = host.split(":", 1)[0]
    host = unquote(host).strip().strip(".").lower()
    host = host.replace("\u3002", ".").replace("\uff0e", ".")
    if not host:
        return None
    ip = ip_of(host)
    if ip:
        return ip
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        if not host.isascii():
            return None
    if not re.fullmatch(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)+", host):
        return None
    return host


def ip_of(host: str) -> Optional[str]:
    """Dotted, decimal-integer, hex and octal IPv4 forms -> dotted quad."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if re.fullmatch(r"\d{8,10}", host):
        n = int(host)
        if n < 2 ** 32:
            return str(ipaddress.IPv4Address(n))
    if re.fullmatch(r"0x[0-9a-f]{1,8}", host):
        return str(ipaddress.IPv4Address(int(host, 16)))
    parts = host.split(".")
    if len(parts) == 4 and all(re.fullmatch(r"0x[0-9a-f]+|0[0-7]*|[1-9]\d*", p) for p in parts):
        try:
            nums = [int(p, 16) if p.startswith("0x") else int(p, 8) if p.startswith("0") and len(p) > 1
                    else int(p) for p in parts]
            if all(0 <= x < 256 for x in nums):
                return ".".join(map(str, nums))
        except ValueError:
            return None
    return None


_psl = None
_psl_lock = threading.Lock()


def _suffix_list():
    # loaded on first use from publicsuffix2's bundled file (no network)
    global _psl
    if _psl is None:
        with _psl_lock:
            if _psl is None:
                from publicsuffix2 import PublicSuffixList

                _psl = PublicSuffixList()
    return _psl


def registered_domain(host: str) -> Optional[str]:
    """www.shop.example.co.uk -> example.co.uk; IPs come back unchanged.

    A top-level domain the public-suffix list does not know (``.test``) is
    treated as a public suffix, the list's own default rule.
    """
    if not host:
        return None
    if ip_of(host):
        return ip_of(host)
    host = host.lower().strip(".")
    sld = _suffix_list().get_sld(host, strict=True)
    if sld:
        return sld if "." in sld else None
    labels = host.split(".")
    return ".".join(labels[-2:]) if len(labels) >= 2 else None
