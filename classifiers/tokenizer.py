"""Raw message bytes -> a list of feature strings, in the SpamBayes style.

Every choice here was measured on the SpamAssassin public corpus; the
before/after tables are in docs/bayes.md.  The rules that matter most:

- Words are split on whitespace and lower-cased; only words of 3..12
  characters are kept as they are.  Longer words become shape tokens
  (``skip:c 20``) and non-ASCII share tokens (``8bit%:40``), which is what
  SpamBayes found to work better than keeping or dropping them.
- Headers give tokens with the header's name as a prefix (``subject:free``),
  so the same word in a Subject and a body count separately.
- Headers added by filters (``X-Spam-*``, ``X-Virus-*``, our own
  ``Authentication-Results``) are never tokens: they are not the sender's
  evidence and can be forged.  A subject tag like ``SPAM***`` or ``[SPAM]``
  is removed before the Subject is tokenized.
- Work is capped: only the first ``max_bytes`` of a message are parsed,
  text parts are decoded up to ``max_text_chars``, a message gives at most
  ``max_tokens`` tokens, and attachments give tokens for their type and name
  only, never for their content.

``tokenize`` never raises: hostile input that trips the parser still gives
the tokens found so far plus a ``tokenizer:error`` token.
"""

from __future__ import annotations

import binascii
import email.header
import html
import ipaddress
import math
import quopri
import re
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from typing import Iterator, Optional

from gateway.mime import getaddresses, parse_mime

# Header name prefixes other filters (and MailGate itself) add.  Their
# values say what some filter thought, not what the sender sent.
FILTER_HEADER_PREFIXES = (
    "x-spam", "x-virus", "x-mailgate", "x-bogosity", "x-dspam", "x-mailscanner",
    "x-amavis", "x-quarantine", "x-crm114", "x-bayes", "authentication-results",
)

# Subject tags added by spam filters, ours (default "SPAM*** %s") included.
SUBJECT_TAG = re.compile(
    r"^\s*(?:(?:\*+\s*spam\s*\*+|spam\*+|\[\s*spam\s*\??\s*\]|\{\s*spam\??\s*\}|\(\s*spam\s*\))\s*:?\s*)+",
    re.IGNORECASE,
)

URL_SHORTENERS = frozenset({
    "bit.ly", "tinyurl.com", "goo.gl", "t.co", "ow.ly", "is.gd", "buff.ly", "rebrand.ly",
    "cutt.ly", "shorturl.at", "tiny.cc", "rb.gy", "t.ly", "bl.ink", "s.id", "v.gd", "x.co",
    "lnkd.in", "trib.al", "qr.ae", "adf.ly", "shorte.st", "snipurl.com", "clck.ru",
})

_URL = re.compile(r"""(?i)\b(?:(https?|ftp)://|(www\d{0,3}\.))([^\s<>"'`{}|\\^\]\[]{1,2048})""")
_WORDS = re.compile(r"\S+")
_PUNCT = ".,;:!?\"'()[]<>{}*-"
_SUBJECT_WORDS = re.compile(r"[\w$€£'-]+|[^\w\s]+")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[a-z0-9.-]{1,253}\.[a-z]{2,}$")
_HOSTNAME = re.compile(r"\b(?=[a-z0-9-]*[a-z])[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63})+\b")
_IPV4 = re.compile(r"\b(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\b")
_DIGITS = re.compile(r"\d+")
_PATH_WORDS = re.compile(r"[a-z0-9]{2,20}")
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*[01](?:px|pt)?\b", re.I)
_WHITE = re.compile(r"^(?:#?f{3}(?:f{3})?|white)$", re.I)


@dataclass(frozen=True)
class TokenizerSettings:
    """What the tokenizer does; saved with a model and compared at load."""

    headers: bool = True
    html: bool = True
    urls: bool = True
    received_ips: bool = True
    strip_punctuation: bool = True
    bigrams: bool = False
    min_word: int = 3
    max_word: int = 12
    max_bytes: int = 512 * 1024
    max_text_chars: int = 200_000
    max_parts: int = 64
    max_tokens: int = 20_000

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_SETTINGS = TokenizerSettings()
MAX_HEADER_CHARS = 4000


def tokenize(raw: bytes, settings: TokenizerSettings = DEFAULT_SETTINGS) -> list[str]:
    """The features of one message.  Never raises."""
    out: list[str] = []
    try:
        _tokenize(raw, settings, out)
    except Exception:  # noqa: BLE001 - hostile input must never stop the gateway
        out.append("tokenizer:error")
    if len(out) > settings.max_tokens:
        del out[settings.max_tokens:]
        out.append("tokenizer:capped")
    return out


def _tokenize(raw: bytes, s: TokenizerSettings, out: list[str]) -> None:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError("raw message must be bytes")
    raw = bytes(raw)
    if len(raw) > s.max_bytes:
        raw = raw[: s.max_bytes]
        out.append("message:truncated")
    # A NUL is never in honest mail; the parser copes but the count is evidence.
    if b"\0" in raw:
        out.append("message:nul")
        raw = raw.replace(b"\0", b" ")
    if raw.startswith(b"From "):
        # the mbox envelope line is the mailbox's, not the sender's
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    msg = parse_mime(raw)  # nesting bounded: a hostile depth must not recurse
    if msg.defects:
        out.append("message:defects")
    if s.headers:
        _header_tokens(msg, out, s.received_ips)
    _body_tokens(msg, s, out)


# --- headers ---------------------------------------------------------------


def decode_header(value) -> str:
    """A header value as text whatever its encoded-words and charsets."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        value = str(value)
    # no honest header needs more; a 400 KB Subject of encoded words would
    # otherwise cost the decoder half a second
    text = str(value)[:MAX_HEADER_CHARS]
    if "=?" not in text:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    try:
        parts = email.header.decode_header(text)
    except Exception:  # noqa: BLE001 - malformed encoded words
        return text
    pieces = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            pieces.append(_decode_bytes(chunk, charset))
        else:
            pieces.append(chunk)
    return "".join(pieces)


def _decode_bytes(data: bytes, charset: Optional[str]) -> str:
    charset = (charset or "").strip().strip('"').lower() or "us-ascii"
    if charset in ("us-ascii", "ascii", "unknown-8bit", "x-unknown", "default"):
        charset = "utf-8"
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError, TypeError):
        return data.decode("latin-1")


def _is_filter_header(name: str) -> bool:
    return name.lower().startswith(FILTER_HEADER_PREFIXES)


def _bucket(n: int) -> int:
    """A coarse size class: 0, 1, 2, 3-4, 5-8, ... so counts generalise."""
    return 0 if n <= 0 else int(2 ** math.ceil(math.log2(n)))


def _header_tokens(msg, out: list[str], ips: bool = True) -> None:
    counts: dict[str, int] = {}
    for name in msg.keys():
        lname = name.lower()
        if _is_filter_header(lname):
            continue
        counts[lname] = counts.get(lname, 0) + 1
    # SpamBayes' "header:Name:count": which headers a mailer writes, and how
    # many times, is a strong signature of the software that sent the mail.
    for lname, n in counts.items():
        out.append(f"header:{lname}:{min(n, 9)}")

    subject = SUBJECT_TAG.sub("", decode_header(msg.get("Subject", "")))
    for w in _SUBJECT_WORDS.findall(subject.lower())[:60]:
        out.append("subject:" + w[:20])
    if subject and subject.upper() == subject and any(c.isalpha() for c in subject):
        out.append("subject:all-caps")

    for field in ("from", "reply-to", "sender", "return-path"):
        values = msg.get_all(field) or []
        if field in counts and not values:
            continue
        for name, addr in getaddresses([decode_header(v) for v in values[:3]]):
            _address_tokens(field, name, addr, out)

    from_domain = _domain_of(msg.get("From", ""))
    reply_domain = _domain_of(msg.get("Reply-To", ""))
    if reply_domain and from_domain and reply_domain != from_domain:
        out.append("reply-to:other-domain")

    for field in ("to", "cc"):
        values = msg.get_all(field) or []
        if not values:
            continue
        addrs = getaddresses([decode_header(v) for v in values[:20]])[:1000]
        out.append(f"{field}:count:{_bucket(len(addrs))}")
        if addrs and not any(n for n, _ in addrs):
            out.append(f"{field}:no-real-name")
        for _, addr in addrs[:5]:
            if "@" in addr:
                out.append(f"{field}:domain:{addr.rpartition('@')[2].lower()[:60]}")

    for received in (msg.get_all("received") or [])[:8]:
        _received_tokens(decode_header(received).lower(), out, ips)

    mid = decode_header(msg.get("Message-ID", "")).strip()
    if not mid:
        out.append("message-id:missing")
    else:
        m = re.match(r"^<([^@<>]*)@([^@<>]+)>$", mid)
        if not m:
            out.append("message-id:invalid")
        else:
            local, domain = m.groups()
            out.append("message-id:@" + domain.lower()[:60])
            # the shape of the local part identifies the mailer
            shape = re.sub(r"[a-z]+", "a", re.sub(r"[A-Z]+", "A", _DIGITS.sub("9", local)))
            out.append("message-id:shape:" + shape[:30])

    for field in ("x-mailer", "user-agent"):
        value = decode_header(msg.get(field, "")).strip().lower()
        if value:
            out.append(f"{field}:" + _DIGITS.sub("9", " ".join(value.split()))[:60])

    for field in ("content-type", "content-transfer-encoding", "mime-version"):
        if field not in counts:
            continue
        value = decode_header(msg.get(field, "")).lower()
        out.append(f"{field}:" + value.split(";", 1)[0].strip()[:40])


def _domain_of(value) -> str:
    addrs = getaddresses([decode_header(value)]) if value else []
    for _, addr in addrs:
        if "@" in addr:
            return addr.rpartition("@")[2].lower().strip(">. ")
    return ""


def _address_tokens(field: str, name: str, addr: str, out: list[str]) -> None:
    name = name.strip().lower()
    addr = addr.strip().lower()
    if not name:
        out.append(f"{field}:no-real-name")
    else:
        for w in _SUBJECT_WORDS.findall(name)[:8]:
            out.append(f"{field}:name:{w[:20]}")
    if "@" not in addr:
        out.append(f"{field}:addr:none")
        return
    local, _, domain = addr.rpartition("@")
    out.append(f"{field}:addr:{addr[:80]}")
    out.append(f"{field}:domain:{domain[:60]}")
    if _DIGITS.search(local):
        out.append(f"{field}:local-digits")
    if name and "@" in name and name.strip("'\"") != addr:
        out.append(f"{field}:name-is-other-address")


def _received_tokens(text: str, out: list[str], ips: bool = True) -> None:
    # hosts and their parent domains, IPs and their /8../24 prefixes: where
    # the message really came from (SpamBayes' "received:" tokens)
    for host in set(_HOSTNAME.findall(text[:1000])):
        labels = host.split(".")
        if not labels[-1].isalpha():
            continue
        for i in range(max(0, len(labels) - 4), len(labels) - 1):
            out.append("received:" + ".".join(labels[i:]))
    for ip in set(m.group(0) for m in _IPV4.finditer(text[:1000])) if ips else ():
        a, b, c, _ = ip.split(".")
        out.append(f"received:{a}")
        out.append(f"received:{a}.{b}")
        out.append(f"received:{a}.{b}.{c}")


# --- body ------------------------------------------------------------------


def _walk(msg, limit: int) -> Iterator[tuple[int, object]]:
    """Parts depth first, iteratively (a hostile nesting must not recurse)."""
    stack = [(0, msg)]
    seen = 0
    while stack and seen < limit:
        depth, part = stack.pop()
        seen += 1
        yield depth, part
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            for child in reversed(payload[:limit]):
                stack.append((depth + 1, child))


def _body_tokens(msg, s: TokenizerSettings, out: list[str]) -> None:
    budget = s.max_text_chars
    nparts = 0
    for depth, part in _walk(msg, s.max_parts):
        nparts += 1
        ctype = part.get_content_type()
        if s.headers and part is not msg:
            out.append(f"mime:{ctype}")
            charset = part.get_param("charset")
            if isinstance(charset, str):
                out.append("charset:" + charset.lower()[:30])
            cte = str(part.get("content-transfer-encoding", "")).strip().lower()
            if cte:
                out.append("cte:" + cte[:20])
        elif s.headers:
            charset = part.get_param("charset")
            if isinstance(charset, str):
                out.append("charset:" + charset.lower()[:30])
        if part.is_multipart():
            continue
        filename = _filename(part)
        if filename:
            _filename_tokens(filename, out)
            if not ctype.startswith("text/"):
                continue
        if ctype not in ("text/plain", "text/html") and not (ctype == "text/enriched"):
            if not ctype.startswith("text/"):
                out.append("attachment:" + ctype[:40])
            continue
        if budget <= 0:
            out.append("text:over-budget")
            continue
        text = _part_text(part, budget)
        budget -= len(text)
        if ctype == "text/html":
            if not s.html:
                text = _strip_tags(text)
            else:
                text = _html_text(text, out, s)
        _text_tokens(text, s, out)
    if s.headers and nparts >= s.max_parts:
        out.append("mime:many-parts")


def _filename(part) -> str:
    try:
        name = part.get_filename()
    except Exception:  # noqa: BLE001 - broken RFC 2231 parameters
        return "?"
    return decode_header(name) if name else ""


def _filename_tokens(name: str, out: list[str]) -> None:
    name = name.strip().lower()
    out.append("filename:" + name[:60])
    stem, dot, ext = name.rpartition(".")
    if dot:
        out.append("filename:ext:" + ext[:10])
        if "." in stem:
            out.append("filename:double-ext")


def _part_text(part, budget: int) -> str:
    """The decoded text of a text part, at most ``budget`` characters' work."""
    payload = part.get_payload(decode=False)
    if not isinstance(payload, str):
        return ""
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    # decode only what we will read; base64 is cut at a 4-character boundary
    limit = budget * 2
    if not payload[:limit].isascii():
        if cte in ("base64", "quoted-printable"):
            payload = payload.encode("ascii", "ignore").decode("ascii")  # 8-bit junk in an encoding
        else:
            # compat32 has already decoded 8-bit text with the declared charset
            return payload[:budget]
    if cte == "base64":
        compact = re.sub(r"[^A-Za-z0-9+/]", "", payload[: limit * 2])[: limit // 3 * 4]
        compact = compact[: len(compact) // 4 * 4]
        try:
            data = binascii.a2b_base64(compact)
        except (binascii.Error, ValueError):
            data = b""
    elif cte == "quoted-printable":
        data = quopri.decodestring(payload[:limit].encode("ascii"))
    else:
        data = payload[:limit].encode("ascii")
    charset = part.get_param("charset")
    return _decode_bytes(data, charset if isinstance(charset, str) else None)[:budget]


def _strip_tags(text: str) -> str:
    return html.unescape(re.sub(r"<[^>]{0,2000}>", " ", text))


class _HtmlText(HTMLParser):
    """HTML -> visible text, plus tokens for what spammers use HTML for."""

    HIDING_TAGS = frozenset({"script", "style", "title"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tokens: list[str] = []
        self.urls: list[str] = []
        self.skip = 0
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("img", "form", "input", "script", "iframe", "object", "embed", "area", "map", "base"):
            self.tokens.append("html:tag:" + tag)
        if tag in self.HIDING_TAGS:
            self.skip += 1
        attrs = dict((k.lower(), v or "") for k, v in attrs[:30])
        style = attrs.get("style", "")
        if style and _HIDDEN_STYLE.search(style):
            self.tokens.append("html:hidden-style")
        if tag == "font":
            if _WHITE.match(attrs.get("color", "").strip()):
                self.tokens.append("html:white-font")
            if attrs.get("size", "").strip() in ("0", "1", "-2", "-3"):
                self.tokens.append("html:tiny-font")
        for key in ("href", "src", "action"):
            value = attrs.get(key, "")
            if value:
                self.urls.append(value)
        if tag == "img" and not attrs.get("alt"):
            self.tokens.append("html:img-no-alt")

    def handle_endtag(self, tag):
        if tag in self.HIDING_TAGS and self.skip:
            self.skip -= 1
        if tag in ("p", "div", "br", "td", "tr", "li"):
            self.text.append(" ")

    def handle_data(self, data):
        if not self.skip:
            self.text.append(data)

    def handle_comment(self, data):
        self.tokens.append("html:comment")


def _html_text(text: str, out: list[str], s: TokenizerSettings) -> str:
    parser = _HtmlText()
    try:
        parser.feed(text)
        parser.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient; belt and braces
        out.append("html:unparseable")
        return _strip_tags(text)
    seen = set()
    for t in parser.tokens:
        if t not in seen:  # presence, not count: one hidden span is enough
            seen.add(t)
            out.append(t)
    if s.urls:
        for url in parser.urls[:50]:
            if re.match(r"(?i)(?:https?|ftp)://", url):
                _url_tokens(url, out)
            elif url.lower().startswith("mailto:"):
                out.append("url:mailto")
    return " ".join(parser.text)


def _text_tokens(text: str, s: TokenizerSettings, out: list[str]) -> None:
    text = text.lower()
    if s.urls:
        def crack(m: re.Match) -> str:
            scheme = m.group(1) or "http"
            _url_tokens(f"{scheme}://{m.group(3) if m.group(1) else m.group(2) + m.group(3)}", out)
            return " "
        text = _URL.sub(crack, text)
    lo, hi = s.min_word, s.max_word
    prev = None
    for word in _WORDS.findall(text):
        if s.strip_punctuation:
            word = word.strip(_PUNCT) or word
        n = len(word)
        if lo <= n <= hi:
            out.append(word)
            if s.bigrams:
                if prev is not None:
                    out.append(f"bi:{prev} {word}")
                prev = word
        else:
            prev = None
        if n > hi:
            if "@" in word and _EMAIL.match(word.strip("<>()[].,;:")):
                local, _, domain = word.strip("<>()[].,;:").rpartition("@")
                out.append("email name:" + local[:30])
                out.append("email addr:" + domain[:60])
                continue
            # SpamBayes' shape token: a long word says little by itself but
            # its first letter and length class (base64 junk, URLs) do
            out.append(f"skip:{word[0]} {n // 10 * 10}")
        if n >= lo and not word.isascii():
            nonascii = sum(1 for c in word if ord(c) > 127)
            out.append(f"8bit%:{round(100 * nonascii / n, -1):.0f}")


def _url_tokens(url: str, out: list[str]) -> None:
    m = re.match(r"(?i)^([a-z]+)://([^/?#]*)([^#]*)", url.strip()[:2048])
    if not m:
        return
    scheme, netloc, rest = m.group(1).lower(), m.group(2).lower(), m.group(3).lower()
    out.append("proto:" + scheme)
    if "@" in netloc:
        out.append("url:userinfo")
        netloc = netloc.rpartition("@")[2]
    host, _, port = netloc.partition(":")
    host = host.strip(".")
    if port and port not in ("80", "443"):
        out.append("url:port")
    if "%" in host or "%" in rest:
        out.append("url:escaped")
    try:
        ipaddress.ip_address(host.strip("[]"))
        out.append("url:ip")
    except ValueError:
        if host:
            out.append("url:" + host[:80])
            domain = registered_domain(host)
            if domain != host:
                out.append("url-domain:" + domain)
            if domain in URL_SHORTENERS or host in URL_SHORTENERS:
                out.append("url:shortener")
    for w in _PATH_WORDS.findall(rest)[:20]:
        out.append("url-path:" + w)


_psl_cache: dict[str, str] = {}


def registered_domain(host: str) -> str:
    """example.co.uk for www.mail.example.co.uk, by the Public Suffix List."""
    hit = _psl_cache.get(host)
    if hit is None:
        try:
            from publicsuffix2 import get_sld  # loaded on first use, not at import

            hit = get_sld(host, strict=False) or host
        except Exception:  # noqa: BLE001 - a hostile host name must not raise
            hit = ".".join(host.split(".")[-2:])
        if len(_psl_cache) > 50_000:
            _psl_cache.clear()
        _psl_cache[host] = hit
    return hit
