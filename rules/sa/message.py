"""What SpamAssassin rules look at, computed once per message.

``MessageView`` turns the raw bytes (and the parsed ``email`` message) into
the texts each rule kind reads, all as UTF-8 bytes like SpamAssassin's own:

- header values, decoded (RFC 2047) and unfolded, several occurrences joined
  with newlines; ``:raw`` keeps them undecoded;
- the rendered body: text parts decoded, HTML rendered to text, the Subject
  first, split into paragraphs with whitespace runs collapsed to one space;
- the raw body: text parts decoded from base64/QP, HTML left as is;
- the full message as received;
- every URI found in text and HTML (``rules.sa.uris``);
- statistics of the HTML parts for the HTML eval tests.
"""

from __future__ import annotations

import email.header
import email.utils
import html
import re
from functools import cached_property
from html.parser import HTMLParser
from typing import Optional

from rules.sa import uris as uri_mod

MAX_PART = 512 * 1024  # text parts larger than this are cut (rules scan a prefix)
MAX_PARTS = 200

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_WS = re.compile(r"[ \t\n\r\x0b\xa0]+")
_PARA = re.compile(r"\n[ \t\r\x0b\xa0]*\n+")
_HTML_WS = re.compile(r"[ \t\r\n\f]+")

# HTML elements a browser knows; anything else counts as a "bad" tag
KNOWN_TAGS = frozenset("""a abbr acronym address applet area article aside audio b base basefont bdi bdo
bgsound big blink blockquote body br button canvas caption center cite code col colgroup data datalist
dd del details dfn dialog dir div dl dt em embed fieldset figcaption figure font footer form frame
frameset h1 h2 h3 h4 h5 h6 head header hr html i iframe img input ins isindex kbd keygen label legend
li link main map mark marquee menu meta meter nav nobr noframes noscript object ol optgroup option
output p param picture pre progress q rp rt ruby s samp script section select small source span
strike strong style sub summary sup table tbody td template textarea tfoot th thead time title tr
track tt u ul var video wbr xml o:p""".split())
_VOID = frozenset("area base basefont bgsound br col embed frame hr img input isindex keygen link meta "
                  "param source track wbr".split())
_BLOCK = frozenset("p div br tr li h1 h2 h3 h4 h5 h6 table blockquote pre hr title dd dt ul ol "
                   "section article header footer".split())
_URI_ATTRS = {"a": "href", "area": "href", "link": "href", "img": "src", "frame": "src",
              "iframe": "src", "embed": "src", "script": "src", "form": "action", "base": "href",
              "input": "src", "body": "background", "td": "background", "table": "background"}


class HtmlRender(HTMLParser):
    """HTML to text plus what the HTML eval tests measure."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.links: list[str] = []
        self.tags: dict[str, int] = {}
        self.total_tags = 0
        self.bad_tags = 0
        self.closed_extra = 0
        self.comments: list[str] = []
        self.title: list[str] = []
        self.anchor_text: list[str] = []
        self.image_area = 0
        self.max_font_size = 3
        self._open: dict[str, int] = {}
        self._skip = 0  # inside <script>/<style>
        self._in_title = False
        self._in_anchor = 0
        self._pre = 0
        self.embeds = False
        self.form_action_mailto = False
        self.balance: dict[str, int] = {}  # open minus close tags, per tag (html_tag_balance)

    def handle_starttag(self, tag, attrs):
        self.balance[tag] = self.balance.get(tag, 0) + 1
        self.total_tags += 1
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag not in KNOWN_TAGS:
            self.bad_tags += 1
        if tag not in _VOID:
            self._open[tag] = self._open.get(tag, 0) + 1
        a = {k: (v or "") for k, v in attrs}
        attr = _URI_ATTRS.get(tag)
        if attr and a.get(attr):
            self.links.append(a[attr].strip())
        if tag == "pre":
            self._pre += 1
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag == "a":
            self._in_anchor += 1
        elif tag == "img":
            w, h = _int(a.get("width")), _int(a.get("height"))
            if w and h:
                self.image_area += w * h
            if self._in_anchor:
                self.anchor_text.append("<img>")
        elif tag in ("embed", "object", "applet"):
            self.embeds = True
        elif tag == "form" and a.get("action", "").lower().startswith("mailto:"):
            self.form_action_mailto = True
        elif tag == "font":
            size = a.get("size", "").strip()
            m = re.match(r"([+-]?)(\d+)", size)
            if m:
                n = int(m.group(2))
                n = 3 + n if m.group(1) == "+" else 3 - n if m.group(1) == "-" else n
                self.max_font_size = max(self.max_font_size, n)
        if tag in _BLOCK:
            self.text.append("\n")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        self.balance[tag] -= 1
        if tag not in _VOID and self._open.get(tag):
            self._open[tag] -= 1

    def handle_endtag(self, tag):
        self.balance[tag] = self.balance.get(tag, 0) - 1
        if self._open.get(tag, 0) > 0:
            self._open[tag] -= 1
        else:
            self.closed_extra += 1
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        elif tag == "title":
            self._in_title = False
        elif tag == "a" and self._in_anchor:
            self._in_anchor -= 1
        if tag in _BLOCK:
            self.text.append("\n")

    def handle_data(self, data):
        if self._skip:
            return
        if not self._pre:
            # line breaks in HTML source are spaces; only tags break lines
            data = _HTML_WS.sub(" ", data)
        if self._in_title:
            self.title.append(data)
            return
        if self._in_anchor:
            self.anchor_text.append(data)
        self.text.append(data)

    def handle_comment(self, data):
        self.comments.append(f"<!--{data}-->")

    def unknown_decl(self, data):
        self.comments.append(f"<!{data}>")


def _int(v) -> int:
    m = re.match(r"\s*(\d+)", v or "")
    return int(m.group(1)) if m else 0


def decode_header(value: str) -> str:
    """RFC 2047 words decoded; undecodable bytes kept as they were."""
    value = _FOLD.sub("", value)
    if "=?" not in value:
        return value
    try:
        parts = email.header.decode_header(value)
    except Exception:
        return value
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            try:
                out.append(chunk.decode(charset or "latin-1", "replace"))
            except LookupError:
                out.append(chunk.decode("latin-1"))
        else:
            out.append(chunk)
    return "".join(out)


def _u8(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _to_str(header_value) -> str:
    if isinstance(header_value, str):
        return header_value
    return str(header_value)


class MessageView:
    """The message as the rules see it; every view is computed on first use."""

    def __init__(self, raw: bytes, parsed=None, envelope_sender: str = "", recipients=(),
                 relays: Optional[dict[str, bytes]] = None, relay: Optional[dict] = None):
        self.raw = raw
        self._parsed = parsed
        self.envelope_sender = envelope_sender
        self.recipients = list(recipients)
        self.relays = relays or {}
        # the hop we saw (ip, rdns, helo, trusted, auth); None when judging a file
        self.relay = relay
        self._mime_cache: dict = {}

    @cached_property
    def parsed(self):
        if self._parsed is not None:
            return self._parsed
        import email as _email
        import email.policy

        return _email.message_from_bytes(self.raw, policy=email.policy.compat32)

    # --- headers ----------------------------------------------------------------

    @cached_property
    def _headers(self) -> list[tuple[str, str]]:
        return [(k, _to_str(v)) for k, v in self.parsed.items()]

    @cached_property
    def _by_name(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for k, v in self._headers:
            out.setdefault(k.lower(), []).append(v)
        return out

    def header_values(self, name: str, raw: bool = False) -> list[str]:
        key = name.lower()
        # pseudo-headers are matched case-sensitively, as SpamAssassin does:
        # "exists:MessageID" asks for a (malformed) real header of that name
        if name in ("ALL", "ALL-TRUSTED", "ALL-UNTRUSTED", "ALL-INTERNAL", "ALL-EXTERNAL"):
            text = "".join(f"{k}: {v if raw else decode_header(v)}\n" for k, v in self._headers)
            return [text] if text else []
        if name == "ToCc":
            return self.header_values("To", raw) + self.header_values("Cc", raw)
        if name == "EnvelopeFrom":
            return [self.envelope_sender] if self.envelope_sender else []
        if name == "MESSAGEID":
            return (self.header_values("Message-Id", raw) + self.header_values("Resent-Message-Id", raw)
                    + self.header_values("X-Message-Id", raw))
        if key.startswith("x-spam-relays-") or key == "x-spam-last-external-relay":
            value = self.relays.get(key)
            return [value.decode("utf-8", "replace")] if value else []
        vals = self._by_name.get(key, [])
        return vals if raw else [decode_header(v) for v in vals]

    def header(self, name: str, modifier: str = "") -> Optional[bytes]:
        """The bytes a header rule matches, or None when the header is absent."""
        mods = modifier.split(",") if modifier else []
        vals = self.header_values(name, raw="raw" in mods)
        if not vals:
            return None
        if "first" in mods:
            vals = vals[:1]
        elif "last" in mods:
            vals = vals[-1:]
        if "addr" in mods or "name" in mods or "host" in mods or "domain" in mods:
            pairs = email.utils.getaddresses([v.strip() for v in vals])
            if "name" in mods:
                return _u8("\n".join(n for n, _ in pairs[:1]))
            addrs = [a for _, a in pairs if a][:1]
            if "host" in mods or "domain" in mods:
                hosts = [a.rpartition("@")[2].lower() for a in addrs]
                if "domain" in mods:
                    hosts = [uri_mod.registered_domain(h) or h for h in hosts]
                return _u8("\n".join(hosts))
            return _u8("\n".join(addrs))
        return _u8("".join(v.strip("\r\n") + "\n" for v in vals))

    def header_addresses(self, name: str) -> list[bytes]:
        """Every address of the header, in order (SpamAssassin's ``get('Name:addr')`` in list context)."""
        vals = self.header_values(name)
        return [_u8(a) for _, a in email.utils.getaddresses([v.strip() for v in vals]) if a]

    def header_count(self, name: str) -> int:
        return len(self._by_name.get(name.lower(), []))

    def addresses(self, *names: str) -> list[str]:
        out = []
        for n in names:
            for _, a in email.utils.getaddresses(self.header_values(n)):
                if a:
                    out.append(a.lower())
        return out

    @cached_property
    def mime_headers(self) -> list[list[tuple[str, str]]]:
        """The headers of each MIME part (for mimeheader rules)."""
        out = []
        for n, part in enumerate(self.parsed.walk()):
            if n >= MAX_PARTS:
                break
            out.append([(k, _to_str(v)) for k, v in part.items()])
        return out

    def mime_header(self, name: str, raw: bool = False) -> list[bytes]:
        cached = self._mime_cache.get((name.lower(), raw))
        if cached is not None:
            return cached
        key = name.lower()
        out = []
        for headers in self.mime_headers:
            for k, v in headers:
                if k.lower() == key:
                    out.append(_u8((v if raw else decode_header(v)).strip("\r\n") + "\n"))
        self._mime_cache[(key, raw)] = out
        return out

    # --- bodies -----------------------------------------------------------------

    @cached_property
    def _parts(self) -> list[tuple[str, str, object]]:
        """(content type, decoded text, part) for each text part."""
        out = []
        for n, part in enumerate(self.parsed.walk()):
            if n >= MAX_PARTS:
                break
            if part.is_multipart():
                continue
            ctype = part.get_content_type()
            if part.get_content_maintype() != "text" and n > 0:
                continue
            if part.get_filename() and ctype not in ("text/plain", "text/html"):
                continue
            try:
                payload = part.get_payload(decode=True) or b""
            except Exception:
                payload = _u8(str(part.get_payload()))
            payload = payload[:MAX_PART]
            charset = part.get_content_charset() or "utf-8"
            try:
                text = payload.decode(charset, "replace")
            except LookupError:
                text = payload.decode("latin-1")
            out.append((ctype, text, part))
        return out

    @cached_property
    def html(self) -> Optional[HtmlRender]:
        htmls = [t for c, t, _ in self._parts if c == "text/html"]
        if not htmls:
            return None
        r = HtmlRender()
        for t in htmls:
            try:
                r.feed(t)
                r.close()
            except Exception:
                pass
        r.raw_length = sum(len(t) for t in htmls)
        return r

    @cached_property
    def rendered_text(self) -> str:
        chunks = []
        rendered_html = False
        for ctype, text, _ in self._parts:
            if ctype == "text/html":
                if rendered_html:
                    continue
                rendered_html = True
                chunks.append("".join(self.html.text) if self.html else "")
            else:
                chunks.append(text)
        return "\n\n".join(chunks)

    @cached_property
    def subject(self) -> str:
        vals = self.header_values("Subject")
        return vals[0].strip() if vals else ""

    @cached_property
    def paragraphs(self) -> list[bytes]:
        """The rendered body, one paragraph per item, Subject first."""
        text = self.rendered_text.replace("\r\n", "\n").replace("\f", "\n\n")
        out = [_u8(_WS.sub(" ", self.subject).strip())] if self.subject else []
        for para in _PARA.split(text):
            p = _WS.sub(" ", para).strip()
            if p:
                out.append(_u8(p))
        return out

    @cached_property
    def body_text(self) -> bytes:
        """Paragraphs joined with newlines: what body rules scan in one pass."""
        return b"\n".join(self.paragraphs) + b"\n"

    @cached_property
    def rawbody_text(self) -> bytes:
        return _u8("\n".join(t.replace("\r\n", "\n") for _, t, _ in self._parts)) + b"\n"

    @cached_property
    def rawbody_lines(self) -> list[bytes]:
        return self.rawbody_text.splitlines(keepends=True)

    @cached_property
    def full_text(self) -> bytes:
        return self.raw.replace(b"\r\n", b"\n")

    @cached_property
    def body_length(self) -> int:
        end = self.raw.find(b"\r\n\r\n")
        sep = 4
        if end < 0:
            end, sep = self.raw.find(b"\n\n"), 2
        return 0 if end < 0 else len(self.raw) - end - sep

    # --- URIs --------------------------------------------------------------------

    @cached_property
    def uris(self) -> list[str]:
        texts = [t for c, t, _ in self._parts if c != "text/html"]
        links: list[str] = []
        if self.html is not None:
            texts.append("".join(self.html.text))
            links = self.html.links
        return uri_mod.extract(texts, links)

    @cached_property
    def uri_text(self) -> bytes:
        return b"\n".join(_u8(u) for u in self.uris) + b"\n" if self.uris else b""

    # --- MIME facts for the MIME evals ----------------------------------------------

    @cached_property
    def mime_stats(self) -> dict:
        st = {"base64_count": 0, "qp_count": 0, "attachment": False, "html_only": False,
              "base64_text": False, "multipart_alternative": False}
        types = []
        for n, part in enumerate(self.parsed.walk()):
            if n >= MAX_PARTS:
                break
            ctype = part.get_content_type()
            if part.is_multipart():
                if ctype == "multipart/alternative":
                    st["multipart_alternative"] = True
                continue
            types.append(ctype)
            cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
            if cte == "base64":
                st["base64_count"] += 1
                if part.get_content_maintype() == "text" and not part.get_filename():
                    st["base64_text"] = True
            elif cte == "quoted-printable":
                st["qp_count"] += 1
            disp = str(part.get("Content-Disposition", "")).lower()
            if "attachment" in disp or (part.get_filename() and part.get_content_maintype() != "text"):
                st["attachment"] = True
        st["html_only"] = bool(types) and all(t == "text/html" for t in types)
        return st

    @cached_property
    def has_header_body_separator(self) -> bool:
        return b"\n\n" in self.raw or b"\r\n\r\n" in self.raw


def html_text(r: HtmlRender) -> str:
    return html.unescape("".join(r.text))
