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

import email.errors
import email.header
import functools
import html
import re
from functools import cached_property
from html.parser import HTMLParser
from typing import Optional

from gateway.mime import getaddresses, parse_mime
from rules.sa import uris as uri_mod

MAX_PART = 512 * 1024  # text parts larger than this are cut (rules scan a prefix)
# Constants.pm MAX_BODY_LINE_LENGTH: the chunk size of rawbody (and long body lines)
MAX_BODY_LINE_LENGTH = 2048
# Conf.pm's default rawbody_part_scan_size: each part's decoded text is cut there
RAWBODY_PART_SCAN_SIZE = 500000
MAX_PARTS = 200

# Node.pm unfolds a header as s/\n[ \t]+/ /: the fold and the white space after it are one space
_FOLD = re.compile(r"\r?\n[ \t]+")
_WS = re.compile(r"[ \t\n\r\x0b\xa0]+")
_PARA = re.compile(r"\n[ \t\r\x0b\xa0]*\n+")
_HTML_WS = re.compile(r"[ \t\r\n\f]+")
_HAS_WORD = re.compile(r"\w")
_QP_EXCESS = re.compile(r"=(?:09|3[0-9ABCEF]|[2456][0-9A-F]|7[0-9A-E])")
_QP_TRAILING = re.compile(r"((?:=09|=20)+)[^\S\n]*$", re.M)
# NUL, a CR outside CRLF, or any byte past 0x7f: in a str payload 8-bit
# bytes show as surrogate escapes or U+FFFD, so "not ASCII" is any char past 0x7f
_NOT_ASCII_TEXT = re.compile("[^\x01-\x0c\x0e-\x7f]")
_QP_LONG_LINE = re.compile(r"^(?:[^\n]{80}|[^\n]{79}\n)", re.M)

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

# --- SpamAssassin's HTML.pm text-style stack (font_low_contrast, font_invalid_color) ---

# elements SpamAssassin renders (HTML 4.01 strict + loose, its non-standard ones, its "tricks")
_SA_ELEMENTS = frozenset("""a abbr acronym address area b base bdo big blockquote body br button caption cite code
col colgroup dd del dfn div dl dt em fieldset form h1 h2 h3 h4 h5 h6 head hr html i img input ins kbd label legend
li link map meta noscript object ol optgroup option p param pre q samp script select small span strong style sub
sup table tbody td textarea tfoot th thead title tr tt ul var applet basefont center dir font frame frameset iframe
isindex menu noframes s strike u nobr x-sigsep x-tab bgsound embed listing plaintext xmp""".split())
_SA_TEXT_STYLE = frozenset("body font table tr th td big small basefont span p div a".split())
_SA_WHITESPACE = frozenset("br div li th td dt dd p hr blockquote pre embed listing plaintext xmp title "
                           "h1 h2 h3 h4 h5 h6".split())
_SA_OK_ATTRS = {
    "basefont": {"color", "face", "size"}, "body": {"text", "bgcolor", "link", "alink", "vlink", "background"},
    "font": {"color", "face", "size"}, "table": {"bgcolor", "style"}, "td": {"bgcolor", "style"},
    "tr": {"bgcolor", "style"}, "span": {"style"}, "p": {"style"}, "div": {"style"}, "a": {"style"},
}
# ASCII punctuation: HTML.pm's obfuscation test wants a character that is
# neither this nor white space on both sides of a tag
_ASCII_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_FONT_FACE_OK = re.compile(r"^\s*[\"'.]?[a-z ][a-z -]*[a-z]\d?[\"']?(?:,\s*[\"']?[a-z][a-z -]*[a-z]\d?[\"']?)*;?$",
                           re.I)
_META_CHARSET = re.compile(r"""\bcharset\s*=\s*["']?([^"']+)""", re.I)
_DEFAULT_STYLE = ("default", "#000000", "#ffffff")
_LEADING_INT = re.compile(r"\s*\d")
_CSS_COLOR = re.compile(r"^\s*(background-)?color:\s*(.+?)\s*$", re.I | re.S)
_CSS_IMPORTANT = re.compile(r"\s*!\s*important$")
_CSS_BACKGROUND = re.compile(r"^\s*background:\s*(.+?)\s*$", re.S)
_HEX_RGB = re.compile(r"^#?([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$")

_HTML_COLORS = {
    "aliceblue": "#f0f8ff", "antiquewhite": "#faebd7", "aqua": "#00ffff", "aquamarine": "#7fffd4",
    "azure": "#f0ffff", "beige": "#f5f5dc", "bisque": "#ffe4c4", "black": "#000000", "blanchedalmond": "#ffebcd",
    "blue": "#0000ff", "blueviolet": "#8a2be2", "brown": "#a52a2a", "burlywood": "#deb887", "cadetblue": "#5f9ea0",
    "chartreuse": "#7fff00", "chocolate": "#d2691e", "coral": "#ff7f50", "cornflowerblue": "#6495ed",
    "cornsilk": "#fff8dc", "crimson": "#dc143c", "cyan": "#00ffff", "darkblue": "#00008b", "darkcyan": "#008b8b",
    "darkgoldenrod": "#b8860b", "darkgray": "#a9a9a9", "darkgreen": "#006400", "darkgrey": "#a9a9a9",
    "darkkhaki": "#bdb76b", "darkmagenta": "#8b008b", "darkolivegreen": "#556b2f", "darkorange": "#ff8c00",
    "darkorchid": "#9932cc", "darkred": "#8b0000", "darksalmon": "#e9967a", "darkseagreen": "#8fbc8f",
    "darkslateblue": "#483d8b", "darkslategray": "#2f4f4f", "darkslategrey": "#2f4f4f", "darkturquoise": "#00ced1",
    "darkviolet": "#9400d3", "deeppink": "#ff1493", "deepskyblue": "#00bfff", "dimgray": "#696969",
    "dimgrey": "#696969", "dodgerblue": "#1e90ff", "firebrick": "#b22222", "floralwhite": "#fffaf0",
    "forestgreen": "#228b22", "fuchsia": "#ff00ff", "gainsboro": "#dcdcdc", "ghostwhite": "#f8f8ff",
    "gold": "#ffd700", "goldenrod": "#daa520", "gray": "#808080", "green": "#008000", "greenyellow": "#adff2f",
    "grey": "#808080", "honeydew": "#f0fff0", "hotpink": "#ff69b4", "indianred": "#cd5c5c", "indigo": "#4b0082",
    "ivory": "#fffff0", "khaki": "#f0e68c", "lavender": "#e6e6fa", "lavenderblush": "#fff0f5",
    "lawngreen": "#7cfc00", "lemonchiffon": "#fffacd", "lightblue": "#add8e6", "lightcoral": "#f08080",
    "lightcyan": "#e0ffff", "lightgoldenrodyellow": "#fafad2", "lightgray": "#d3d3d3", "lightgreen": "#90ee90",
    "lightgrey": "#d3d3d3", "lightpink": "#ffb6c1", "lightsalmon": "#ffa07a", "lightseagreen": "#20b2aa",
    "lightskyblue": "#87cefa", "lightslategray": "#778899", "lightslategrey": "#778899",
    "lightsteelblue": "#b0c4de", "lightyellow": "#ffffe0", "lime": "#00ff00", "limegreen": "#32cd32",
    "linen": "#faf0e6", "magenta": "#ff00ff", "maroon": "#800000", "mediumaquamarine": "#66cdaa",
    "mediumblue": "#0000cd", "mediumorchid": "#ba55d3", "mediumpurple": "#9370db", "mediumseagreen": "#3cb371",
    "mediumslateblue": "#7b68ee", "mediumspringgreen": "#00fa9a", "mediumturquoise": "#48d1cc",
    "mediumvioletred": "#c71585", "midnightblue": "#191970", "mintcream": "#f5fffa", "mistyrose": "#ffe4e1",
    "moccasin": "#ffe4b5", "navajowhite": "#ffdead", "navy": "#000080", "oldlace": "#fdf5e6", "olive": "#808000",
    "olivedrab": "#6b8e23", "orange": "#ffa500", "orangered": "#ff4500", "orchid": "#da70d6",
    "palegoldenrod": "#eee8aa", "palegreen": "#98fb98", "paleturquoise": "#afeeee", "palevioletred": "#db7093",
    "papayawhip": "#ffefd5", "peachpuff": "#ffdab9", "peru": "#cd853f", "pink": "#ffc0cb", "plum": "#dda0dd",
    "powderblue": "#b0e0e6", "purple": "#800080", "red": "#ff0000", "rosybrown": "#bc8f8f", "royalblue": "#4169e1",
    "saddlebrown": "#8b4513", "salmon": "#fa8072", "sandybrown": "#f4a460", "seagreen": "#2e8b57",
    "seashell": "#fff5ee", "sienna": "#a0522d", "silver": "#c0c0c0", "skyblue": "#87ceeb", "slateblue": "#6a5acd",
    "slategray": "#708090", "slategrey": "#708090", "snow": "#fffafa", "springgreen": "#00ff7f",
    "steelblue": "#4682b4", "tan": "#d2b48c", "teal": "#008080", "thistle": "#d8bfd8", "tomato": "#ff6347",
    "turquoise": "#40e0d0", "violet": "#ee82ee", "wheat": "#f5deb3", "white": "#ffffff", "whitesmoke": "#f5f5f5",
    "yellow": "#ffff00", "yellowgreen": "#9acd32",
}


def _contrast_verdict(fg: str, bg: str) -> str:
    """HTML.pm html_font_invisible, the two results the rules read: '' when the text is readable."""
    if fg[-6:] == bg[-6:]:
        return "font_low_contrast"
    m1 = _HEX_RGB.match(fg)
    m2 = _HEX_RGB.match(bg) if m1 else None
    if m1 and m2:
        r, g, b = (int(x, 16) - int(y, 16) for x, y in zip(m1.groups(), m2.groups()))
        # distance weighted by brightness; under 12 is near-invisible
        if ((0.2126 * r) ** 2 + (0.7152 * g) ** 2 + (0.0722 * b) ** 2) ** 0.5 < 12:
            return "font_low_contrast"
    if fg == "invalid" or bg == "invalid":
        return "font_invalid_color"
    return ""


_CONTRAST_CACHE: dict[tuple[str, str], str] = {}


def _dec2hex(n: int) -> str:
    return ("0" if n < 16 else "") + format(n, "x")


@functools.lru_cache(maxsize=1024)
def name_to_rgb(value: str) -> str:
    """HTML.pm name_to_rgb: '#rrggbb' or 'invalid'."""
    color = value.lower().strip()
    named = _HTML_COLORS.get(color)
    if named:
        return named
    if not re.search(r"^[#a-f0-9]*$|rgb\([\d%, ]*\)", color, re.I):
        return "invalid"
    m = re.search(r"rgb\((\d+)%,\s*(\d+)%,\s*(\d+)%\s*\)", color, re.I)
    if m:
        color = "#" + "".join(_dec2hex(int(int(g) / 100 * 255)) for g in m.groups())
    m = re.search(r"rgb\((\d+),\s*(\d+),\s*(\d+)\s*\)", color, re.I)
    if m:
        color = "#" + "".join(_dec2hex(int(g)) for g in m.groups())
    if not color.startswith("#"):
        return "invalid"
    color = re.sub(r"[^a-f0-9]", "", color, flags=re.I)
    if len(color) > 6:
        color = color[:6]
    if 3 < len(color) < 6:
        color = color[:3]
    if len(color) % 3:
        color += "0" * (3 - len(color) % 3)
    if len(color) == 3:
        color = "".join(c + c for c in color)
    return "#" + color


def parse_css_background(value: str) -> list[list[str]]:
    """HTML.pm parse_css_background: the layers of a CSS ``background`` value, each a list of tokens."""
    layers: list[list[str]] = []
    tokens: list[str] = []
    stack: list[int] = []
    state, token = 0, ""
    for ch in value:
        if state == 0:
            if ch == " ":
                if token:
                    tokens.append(token)
                token = ""
            elif ch in "(\"'":
                token += ch
                stack.append(state)
                state = {"(": 1, '"': 2, "'": 3}[ch]
            elif ch == ",":
                if token:
                    tokens.append(token)
                token = ""
                layers.append(tokens)
                tokens = []
            else:
                token += ch
        elif state == 1:
            token += ch
            if ch == ")":
                tokens.append(token)
                token = ""
                state = stack.pop()
            elif ch in "\"'":
                stack.append(state)
                state = 2 if ch == '"' else 3
        else:
            token += ch
            if ch == ('"' if state == 2 else "'"):
                state = stack.pop()
    if token:
        tokens.append(token)
    if tokens:
        layers.append(tokens)
    return layers



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
        # open minus close tags per tag, never below 0 (HTML.pm {inside}), per HTML
        # part: end_part moves it into the part's statistics (html_tag_balance)
        self.balance: dict[str, int] = {}
        # what SpamAssassin's HTML.pm counts, per HTML part (html_all): start and
        # end tags, words split by a tag (obfuscation), titles, iframes, invisible text
        self.part_stats: list[dict] = []
        self._stats = self._new_stats()
        self._last_chunk: Optional[str] = None  # HTML.pm's $self->{text}->[-1]
        self._style: list[tuple] = [_DEFAULT_STYLE]
        self._style_tags: dict[str, int] = {}
        self._in_sa_title = 0

    @staticmethod
    def _new_stats() -> dict:
        return {"tags": 0, "obfuscation": 0, "titles": [], "iframe_src": False, "font_low_contrast": False,
                "font_invalid_color": False, "font_face_bad": False, "charsets": []}

    def end_part(self, text_start: int, img_before: int) -> None:
        """Close the statistics of one HTML part (HTML.pm results are per part)."""
        st = self._stats
        st["text_span"] = (text_start, len(self.text))
        st["img"] = self.tags.get("img", 0) - img_before
        st["balance"] = self.balance
        self.balance = {}
        self.part_stats.append(st)
        self._stats = self._new_stats()
        self._last_chunk = None
        self._style = [_DEFAULT_STYLE]
        self._style_tags = {}
        self._in_sa_title = 0

    # HTML.pm text_style, close_table_tag, close_tag, keeping of each style
    # only what the rules read: (tag, text colour, background colour)
    def _push_style(self, entry: tuple) -> None:
        self._style.append(entry)
        self._style_tags[entry[0]] = self._style_tags.get(entry[0], 0) + 1

    def _pop_style(self) -> tuple:
        entry = self._style.pop()
        self._style_tags[entry[0]] -= 1
        return entry

    def _text_style(self, tag: str, attrs: dict, opening: bool) -> None:
        style = self._style
        if tag == "th":
            tag = "td"
        if not opening:
            if tag != "body" and self._style_tags.get(tag):
                while style and self._pop_style()[0] != tag:
                    pass
            return
        if tag == "basefont":
            if _LEADING_INT.match(attrs.get("size", "")):
                return  # a base font size: no colour change
        if (tag == "td" or tag == "tr") and self._style_tags.get(tag):
            closes = ("font", "td") if tag == "td" else ("font", "td", "tr")
            while style and style[-1][0] in closes:
                self._pop_style()
        _, fg, bg = style[-1] if style else _DEFAULT_STYLE
        if tag != "big" and tag != "small":
            allowed = _SA_OK_ATTRS.get(tag, ())
            for name, value in attrs.items():
                if name not in allowed:
                    continue
                if name == "text" or name == "color":
                    fg = name_to_rgb(value)
                elif name == "style":
                    fg, bg = self._css_style(fg, bg, bg, value)
                # HTML.pm converts a bgcolor attribute but never applies it
        self._push_style((tag, fg, bg))

    @staticmethod
    def _css_style(fg: str, bg: str, parent_bg: str, value: str) -> tuple[str, str]:
        for part in value.split(";"):
            m = _CSS_COLOR.match(part)
            if m:
                v = _CSS_IMPORTANT.sub("", m.group(2).lower())
                if "rgb" in v:
                    rgb = [int(x) if x else 0 for x in re.sub(r"[^0-9,]", "", v).split(",")][:3]
                    rgb += [0] * (3 - len(rgb))
                    v = "#" + "".join(f"{min(x, 255):02x}" for x in rgb)
                elif v == "inherit":
                    continue
                elif v != "transparent":
                    v = name_to_rgb(v)
                if m.group(1):
                    bg = v
                else:
                    fg = v
                continue
            m = _CSS_BACKGROUND.match(part)
            if m:
                layers = parse_css_background(m.group(1).lower())
                for v in layers[-1] if layers else ():
                    color = name_to_rgb(v)
                    if color != "invalid":
                        bg = color
                        break
        if bg == "transparent":
            bg = parent_bg
        if fg == "transparent":
            fg = bg
        return fg, bg

    def _font_invisible(self) -> None:
        _, fg, bg = self._style[-1] if self._style else _DEFAULT_STYLE
        key = (fg, bg)
        verdict = _CONTRAST_CACHE.get(key)
        if verdict is None:
            verdict = _CONTRAST_CACHE[key] = _contrast_verdict(*key)
        if verdict:
            self._stats[verdict] = True

    def _sa_tag(self, tag: str, attrs: Optional[dict], opening: bool) -> None:
        # HTML.pm html_tag for what the rules read: tag count, text style,
        # whitespace chunks, iframe sources, font faces, titles
        self._stats["tags"] += 1
        if tag not in _SA_ELEMENTS:
            return
        if tag in _SA_TEXT_STYLE:
            self._text_style(tag, attrs or {}, opening)
        if tag in _SA_WHITESPACE:
            self._last_chunk = " "
        if tag == "title":
            self._in_sa_title = max(0, self._in_sa_title + (1 if opening else -1))
        if not opening:
            return
        if tag == "iframe" and re.sub(r"^[\s\xa0]+|[\s\xa0]+$", "", attrs.get("src") or ""):
            self._stats["iframe_src"] = True
        elif tag == "font" and "face" in attrs and not _FONT_FACE_OK.match(attrs["face"]):
            self._stats["font_face_bad"] = True
        elif tag == "title":
            self._stats["titles"].append("")
        elif tag == "meta" and "content" in attrs and re.search("Content-Type", attrs.get("http-equiv", ""), re.I):
            m = _META_CHARSET.search(attrs["content"])
            if m:
                self._stats["charsets"].append(m.group(1))

    def _sa_text(self, data: str) -> None:
        # HTML.pm html_text: titles, invisible text, words split by tags
        if self._in_sa_title and self._stats["titles"]:
            self._stats["titles"][-1] += data
        if data.strip(" \t\n\r\f\x0b\xa0"):
            self._font_invisible()
        last = self._last_chunk
        if last and data:
            a, b = last[-1], data[0]
            if not (a in _ASCII_PUNCT or b in _ASCII_PUNCT or a.isspace() or b.isspace()):
                self._stats["obfuscation"] += 1
        self._last_chunk = data

    def handle_starttag(self, tag, attrs):
        self.balance[tag] = self.balance.get(tag, 0) + 1
        self.total_tags += 1
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag not in KNOWN_TAGS:
            self.bad_tags += 1
        if tag not in _VOID:
            self._open[tag] = self._open.get(tag, 0) + 1
        a = {k: (v or "") for k, v in attrs}
        self._sa_tag(tag, a, True)
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
        self.balance[tag] = max(0, self.balance.get(tag, 0) - 1)  # an extra close is closed_extra
        self._sa_tag(tag, None, False)
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
        self._sa_text(data)
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
    value = _FOLD.sub(" ", value)
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


# one mailbox of an address list: quoted strings, <...>, comments kept whole
_MAILBOX = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|<[^>]*>?|\([^)]*\)?|[^,"<(])+')
_ANGLE = re.compile(r"<([^>]*)>?")
_COMMENT = re.compile(r'\([^)]*\)?|"(?:[^"\\]|\\.)*"?')
_GROUP_NAME = re.compile(r'^[^"<>@,:]*:')


def split_addresses(value: str) -> list[str]:
    """The addresses of an address-list header value, in order (RFC 5322 mailboxes and
    groups; the address inside <...>, else the bare text without comments).  A
    regex pass instead of ``email.utils.getaddresses``, which costs ~10 us per address."""
    out = []
    for mailbox in _MAILBOX.findall(value.replace("\r", "").replace("\n", " ")):
        mailbox = _GROUP_NAME.sub("", mailbox.strip(), count=1).strip().rstrip(";").strip()
        m = _ANGLE.search(mailbox)
        if m:
            addr = m.group(1).strip()
        else:
            addr = _COMMENT.sub("", mailbox).strip()
            if " " in addr:
                continue  # a phrase without an address
        if addr:
            out.append(addr)
    return out


_CT_CHARSET = re.compile(r"""\bcharset\s*=\s*["']?(.*?)["']?(?:;|$)""", re.I)
_CT_TYPE = re.compile(r"^([^/]+(?:/[^/\s]*)?).*$", re.S)


def sa_content_type(value) -> tuple[str, str]:
    """Util::parse_content_type: (type, lower-case charset) as SpamAssassin reads them;
    a missing type is text/plain in us-ascii, and any text/* it does not know is text/plain."""
    ct = str(value) if value else ""
    if not ct:
        return "text/plain", "us-ascii"
    m = _CT_CHARSET.search(ct)
    charset = m.group(1).lower() if m else ""
    ct = ct.lstrip().split(";", 1)[0]
    m = _CT_TYPE.match(ct)
    ct = (m.group(1) if m else ct).lower()
    if not ct or (ct.startswith("text") and re.match(r"text\b", ct)
                  and ct not in ("text/x-vcard", "text/calendar", "text/html")):
        ct = "text/plain"
    return ct, charset


_ASCII_CHARSET = re.compile(r"us-ascii|ansi_x3\.4-1968|iso-ir-6|ansi_x3\.4-1986|iso_646\.irv:1991|ascii|"
                            r"iso646-us|us|ibm367|cp367|csascii")
_ISO_CHARSET = re.compile(r"iso-\S+-\S+\b", re.I)
_GOOD_ISO_CHARSET = re.compile(r"iso-(?:8859-\d{1,2}|2022-(?:jp|kr))\b")
_HAS_LETTER = re.compile(r"[a-z]", re.I)
_MIME_FIELDS = frozenset(("content-type", "content-transfer-encoding", "content-disposition"))


def _mime_fields(part) -> dict[str, list]:
    out: dict[str, list] = {}
    for k, v in part.raw_items():
        k = k.lower()
        if k in _MIME_FIELDS:
            out.setdefault(k, []).append(v)
    return out


def _u8(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _to_str(header_value) -> str:
    if isinstance(header_value, str):
        return header_value
    return str(header_value)


class MessageView:
    """The message as the rules see it; every view is computed on first use."""

    def __init__(self, raw: bytes, parsed=None, envelope_sender: str = "", recipients=(),
                 relays: Optional[dict[str, bytes]] = None, relay: Optional[dict] = None, chain=None):
        self.raw = raw
        self._parsed = parsed
        self.envelope_sender = envelope_sender
        self.recipients = list(recipients)
        # the Received chain (rules.sa.received.RelayChain); without one it is read
        # from the message as SpamAssassin reads a file (or, given ``relay``, a
        # chain of that one hop: ip, rdns, helo, trusted, auth)
        if chain is None and relay is not None:
            chain = _one_hop(relay)
        self._chain = chain
        self._relays = relays
        self._mime_cache: dict = {}
        self._header_cache: dict[tuple[str, str], Optional[bytes]] = {}
        self._addr_cache: dict[str, list[bytes]] = {}

    # --- the Received chain (Received.pm) ------------------------------------------

    @cached_property
    def chain(self):
        if self._chain is None:
            from rules.sa.received import parse_message

            self._chain = parse_message(self.raw)
        return self._chain

    @cached_property
    def relays(self) -> dict[str, bytes]:
        """The X-Spam-Relays-* pseudo-headers (lower-case names)."""
        return self._relays if self._relays is not None else self.chain.pseudo_headers()

    @cached_property
    def relay(self) -> Optional[dict]:
        """The first untrusted relay (the hop that brought the message in), else
        the oldest trusted one; None without relays."""
        c = self.chain
        r = c.untrusted[0] if c.untrusted else (c.trusted[-1] if c.trusted else None)
        return r.as_dict() if r is not None else None

    def headers_in_rcvd_range(self, start: Optional[int], end: Optional[int], raw: bool) -> str:
        """PerMsgStatus::get_all_hdrs_in_rcvd_index_range (both ends included)."""
        if end is not None and end < 0:
            return ""
        out, index = [], -1
        for k, v in self._headers:
            if k.lower() == "received":
                index += 1
            if (start is None or start <= index) and (end is None or index < end):
                out.append(f"{k}: {v if raw else decode_header(v)}\n")
            elif end is not None and index == end:
                out.append(f"{k}: {v if raw else decode_header(v)}\n")
                break
        return "".join(out)

    @cached_property
    def parsed(self):
        if self._parsed is not None:
            return self._parsed
        return parse_mime(self.raw)

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
        if name == "ALL":
            text = "".join(f"{k}: {v if raw else decode_header(v)}\n" for k, v in self._headers)
            return [text] if text else []
        if name in ("ALL-TRUSTED", "ALL-UNTRUSTED", "ALL-INTERNAL", "ALL-EXTERNAL"):
            # the headers added by the trusted (internal) relays, or the rest; the
            # Received header of the boundary hop counts on both sides, as in SpamAssassin
            c = self.chain
            trust_side = name in ("ALL-TRUSTED", "ALL-UNTRUSTED")
            last = c.last_trusted_relay_index if trust_side else c.last_internal_relay_index
            if name in ("ALL-TRUSTED", "ALL-INTERNAL"):
                text = self.headers_in_rcvd_range(None, last + 1, raw)
            else:
                text = self.headers_in_rcvd_range(last + 1, None, raw)
            return [text] if text else []
        if name == "ToCc":
            return self.header_values("To", raw) + self.header_values("Cc", raw)
        if name == "EnvelopeFrom":
            env = self.envelope_from
            return [env] if env else []
        if name == "MESSAGEID":
            return (self.header_values("Message-Id", raw) + self.header_values("Resent-Message-Id", raw)
                    + self.header_values("X-Message-Id", raw))
        if key.startswith("x-spam-relays-") or key == "x-spam-last-external-relay":
            value = self.relays.get(key)
            return [value.decode("utf-8", "replace")] if value else []
        vals = self._by_name.get(key, [])
        return vals if raw else [decode_header(v) for v in vals]

    @cached_property
    def envelope_from(self) -> str:
        """SpamAssassin's EnvelopeFrom (PerMsgStatus::get_envelope_from): the
        envelope sender we were given (the SMTP MAIL FROM), else the one the
        last untrusted relay recorded, else the headers a delivery agent
        writes, each only where no relay could have forged it."""
        if self.envelope_sender:
            return self.envelope_sender
        relay = self.relay or {}
        envf = relay.get("envfrom") or ""
        if "@" in envf[1:]:
            return envf
        x_sender = self._first_addr("X-Sender")
        if "@" in x_sender and any("(fetchmail" in v for v in self.header_values("Received", raw=True)):
            return ""  # fetchmail rewrote the envelope: nothing to trust
        names = [k.lower() for k, _ in self._headers]
        for header in ("x-envelope-from", "envelope-sender", "return-path"):
            if header not in names:
                continue
            last = len(names) - 1 - names[::-1].index(header)
            # one below a Received line was there before the last hop: forgeable
            if "received" in names[:last]:
                if header == "x-envelope-from":
                    return ""
                continue
            return self._first_addr(header)
        return ""

    def _first_addr(self, name: str) -> str:
        value = self.header(name, "first,addr")
        return value.decode("utf-8", "surrogateescape").split("\n")[0] if value else ""

    def header(self, name: str, modifier: str = "") -> Optional[bytes]:
        """The bytes a header rule matches, or None when the header is absent."""
        key = (name, modifier)
        if key in self._header_cache:  # header rules and evals ask for the same few headers
            return self._header_cache[key]
        value = self._header_cache[key] = self._header(name, modifier)
        return value

    def _header(self, name: str, modifier: str) -> Optional[bytes]:
        mods = modifier.split(",") if modifier else []
        vals = self.header_values(name, raw="raw" in mods)
        if not vals:
            return None
        if "first" in mods:
            vals = vals[:1]
        elif "last" in mods:
            vals = vals[-1:]
        if "addr" in mods or "name" in mods or "host" in mods or "domain" in mods:
            pairs = getaddresses([v.strip() for v in vals])
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
        """Every address of the header, in order (SpamAssassin's ``get('Name:addr')`` in
        list context, which parses the raw header)."""
        cached = self._addr_cache.get(name)
        if cached is None:
            cached = self._addr_cache[name] = [_u8(a) for v in self.header_values(name, raw=True)
                                               for a in split_addresses(v)]
        return cached

    def header_count(self, name: str) -> int:
        return len(self._by_name.get(name.lower(), []))

    def addresses(self, *names: str) -> list[str]:
        """The addresses of these headers, lower-case (for the welcome/block lists)."""
        return [a.decode("utf-8", "surrogateescape").lower() for n in names for a in self.header_addresses(n)]

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
        htmls = [(t, p) for c, t, p in self._parts if c == "text/html"]
        if not htmls:
            return None
        r = HtmlRender()
        for t, part in htmls:
            start, imgs = len(r.text), r.tags.get("img", 0)
            try:
                # HTML.pm: &nbsp; is a space, "<br/>" is "<br>"
                r.feed(re.sub(r"<(\w+)\s*/>", r"<\1>", t.replace("&nbsp;", " ")))
                r.close()
            except Exception:
                pass
            r.end_part(start, imgs)
            r.part_stats[-1]["part"] = part
            r.part_stats[-1]["length"] = len(t)  # HTML.pm {length}: the part's HTML source
        r.raw_length = sum(len(t) for t, _ in htmls)
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
    def body_lines(self) -> list[bytes]:
        """What body rules scan, one item at a time: the paragraphs (one line
        each in Message::get_body_text_array_common), a line longer than
        MAX_BODY_LINE_LENGTH (its newline counted) cut as
        split_into_array_of_short_lines cuts it."""
        out: list[bytes] = []
        for para in self.paragraphs:
            lines = split_short_lines(para + b"\n")
            lines[-1] = lines[-1][:-1]
            out += lines
        return out

    @cached_property
    def body_text(self) -> bytes:
        """Body lines joined with newlines: what body rules scan in one pass."""
        return b"\n".join(self.body_lines) + b"\n"

    @cached_property
    def rawbody_chunks(self) -> list[bytes]:
        """What rawbody rules scan, one item at a time, as SpamAssassin's
        Message::get_decoded_body_text_array: each text part decoded (HTML
        left as is), cut to rawbody_part_scan_size, then split into chunks of
        2-4 KB (``split_short_paragraphs``).  Parts are not joined: a rule
        never sees two parts at once, and a chunk holds many lines, so
        ``\\s`` crosses line ends and ``^`` is the chunk's start only."""
        out: list[bytes] = []
        for ctype, text, _ in self._parts:
            # Bug 4843 in Message.pm: text/calendar parts are attachments, not read
            if ctype == "text/calendar":
                continue
            out += split_short_paragraphs(truncate_scan(_u8(text.replace("\r\n", "\n")),
                                                        RAWBODY_PART_SCAN_SIZE))
        return out

    @cached_property
    def rawbody_text(self) -> bytes:
        """The rawbody chunks joined: for substring tests (needles) only, a
        match in a chunk is always in here; regexes run per chunk."""
        return b"".join(self.rawbody_chunks)

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
    def mime_scan(self) -> dict:
        """MIMEEval's _check_attachments and _check_mime_header over the MIME tree,
        plus MIMEEval::_check_base64_length and check_ma_non_text."""
        st = {"body_html_count": 0, "body_text_count": 0, "base64_count": 0, "qp_count": 0, "attachment": 0,
              "base64_encoded_text": False, "bad_iso_charset": False, "multipart_alternative": False,
              "multipart_ratio": 1.0, "qp_long_line": False, "html_charsets": [], "base64_length": 0,
              "ma_non_text": False, "mimepart_limit_exceeded": False, "ascii_text_illegal": 0}
        part_bytes: list[Optional[int]] = []
        part_type: list[str] = []
        qp_bytes = qp_excess = 0
        for part in self.parsed.walk():
            # one pass over the part's headers (Message.get scans them all each time)
            fields = self._by_name if part is self.parsed else _mime_fields(part)
            ctype, charset = sa_content_type((fields.get("content-type") or ("",))[0])
            cte = str((fields.get("content-transfer-encoding") or ("",))[0]).strip().lower()
            cd = str((fields.get("content-disposition") or ("",))[0]).strip().lower()
            if ctype == "multipart/alternative":
                st["multipart_alternative"] = True
            if ctype == "text/html":
                st["body_html_count"] += 1
            elif ctype.startswith("text"):
                st["body_text_count"] += 1
            if "base64" in cte:
                st["base64_count"] += 1
            elif "quoted-printable" in cte:
                st["qp_count"] += 1
            if cd and "attachment" in cd:
                st["attachment"] += 1
            if (ctype.startswith("text") and "base64" in cte and not cd.startswith(("attachment", "inline"))
                    and (not charset or _ASCII_CHARSET.search(charset))):
                st["base64_encoded_text"] = True
            if charset:
                if _ISO_CHARSET.search(charset) and not _GOOD_ISO_CHARSET.search(charset):
                    st["bad_iso_charset"] = True
                if _HAS_LETTER.search(charset):
                    st["html_charsets"].append(charset)
            if part.is_multipart():
                children = part.get_payload()
                if len(children) >= 1000:  # Message.pm stops at 1000 parts of one multipart
                    st["mimepart_limit_exceeded"] = True
                if ctype == "multipart/alternative" and not st["ma_non_text"]:
                    for child in children:
                        ct = child.get_content_type()
                        if (not child.is_multipart() and ct not in ("multipart/related", "application/rtf")
                                and not ct.startswith("text/")):
                            st["ma_non_text"] = True
                continue
            payload = part.get_payload()
            if not isinstance(payload, str):
                continue
            body = payload.replace("\r\n", "\n")
            part_type.append(ctype)
            part_bytes.append(None if "attachment" in cd else 0)
            if st["multipart_alternative"] and "attachment" not in cd and ctype in ("text/plain", "text/html"):
                part_bytes[-1] = len(body.encode("utf-8", "surrogateescape"))
            if cte == "quoted-printable":
                if "SPAM: " in body:  # lines SpamAssassin's own reports add are not counted
                    body = "".join(ln for ln in body.splitlines(keepends=True) if not ln.startswith("SPAM: "))
                # a line longer than RFC 5322's 78 plus its newline (bug 5491)
                if _QP_LONG_LINE.search(body):
                    st["qp_long_line"] = True
                qp_bytes += len(body)
                if "=" in body:
                    # encoded characters that need no encoding, less white space encoded at line ends
                    qp_excess += len(_QP_EXCESS.findall(body))
                    qp_excess -= sum(len(t) // 3 for t in _QP_TRAILING.findall(body))
            # text/plain claiming US-ASCII (or no charset) may hold only 7-bit
            # characters, no NUL and no CR outside CRLF (check_for_ascii_text_illegal)
            if ctype == "text/plain" and charset in ("", "us-ascii") and _NOT_ASCII_TEXT.search(body):
                st["ascii_text_illegal"] += 1
            if cte == "base64" and ctype != "application/ics" and body:
                st["base64_length"] = max(st["base64_length"], max(map(len, body.splitlines(keepends=True))))
        if qp_bytes:
            st["qp_count"] = qp_excess  # SpamAssassin reuses the name for the excess count
            st["qp_ratio"] = qp_excess / qp_bytes
        if st["multipart_alternative"]:
            text = html_bytes = None
            for ptype, nbytes in zip(reversed(part_type), reversed(part_bytes)):  # bug 4207: the last parts
                if nbytes is None:
                    continue
                if html_bytes is None and ptype == "text/html":
                    html_bytes = nbytes
                elif text is None and ptype == "text/plain":
                    text = nbytes
                if html_bytes is not None and text is not None:
                    break
            if text is not None and html_bytes:
                st["multipart_ratio"] = text / html_bytes
        return st

    @cached_property
    def parse_flags(self) -> frozenset:
        """Message.pm's parse flags (check_msg_parse_flags), read from the email
        package's parse: its defects and epilogues mark the same faults."""
        flags = set()
        if not self.has_header_body_separator:
            flags.add("missing_head_body_separator")
        # MAX_HEADER_KEY_LENGTH, MAX_HEADER_VALUE_LENGTH, MAX_HEADER_LENGTH; a header
        # section shorter than 8 KB can only break the first
        if len(self.raw) - self.body_length < 8192:
            if any(len(k) > 256 for k, _ in self._headers):
                flags.add("truncated_header")
        else:
            total = 0
            for k, v in self._headers:
                value_len = len(v.replace("\r\n", "\n")) + 2  # the space after the colon and the newline
                total += len(k) + value_len
                if len(k) > 256 or value_len > 8192 or total > 65536:
                    flags.add("truncated_header")
        for n, part in enumerate(self.parsed.walk()):
            if part.is_multipart():
                if part.epilogue and re.search(r"[^\s.]", part.epilogue):
                    flags.add("mime_epilogue_exists")
                children = part.get_payload()
                if part.get_content_maintype() == "multipart" and any(
                        isinstance(c, type(part)) and not c.keys() for c in children):
                    flags.add("missing_mime_headers")
                if len(children) >= 1000:
                    flags.add("mimepart_limit_exceeded")
            if n and any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect) for d in part.defects):
                flags.add("missing_mime_head_body_separator")
        return frozenset(flags)

    @cached_property
    def alternative_difference(self) -> tuple[float, int, int]:
        """BodyEval::_multipart_alternative_difference: (largest share in percent of
        HTML words missing from the text part, HTML words, text words)."""
        madiff, html_words, text_words = 0.0, 0, 0
        alternatives = [p for p in self.parsed.walk() if p.get_content_type() == "multipart/alternative"]
        if not alternatives:
            return madiff, html_words, text_words
        top = self.parsed
        if (top.get_content_type() == "multipart/alternative" and top.is_multipart()
                and [c.get_content_type() for c in top.get_payload()] == ["text/html", "text/calendar"]
                and not any(c.is_multipart() for c in top.get_payload())):
            return madiff, html_words, text_words  # an Exchange meeting request
        texts = {id(p): t for c, t, p in self._parts}
        html_stats = {id(st["part"]): st for st in self.html.part_stats} if self.html is not None else {}
        for alt in alternatives:
            html: dict[str, int] = {}
            text: dict[str, int] = {}
            for part in alt.walk():
                if part.is_multipart() or part.get_content_maintype() != "text":
                    continue
                st = html_stats.get(id(part))
                if part.get_content_type() == "text/html":
                    if st is None:
                        continue
                    a, b = st["text_span"]
                    rendered = " ".join(st["titles"]) + " " + "".join(self.html.text[a:b])
                    for w in rendered.split():
                        if _HAS_WORD.search(w):
                            html[w] = html.get(w, 0) + 1
                    if not html and st["img"]:
                        html["\n"] = 1  # no words but an image
                elif id(part) in texts:
                    for w in texts[id(part)].split():
                        if _HAS_WORD.search(w):
                            text[w] = text.get(w, 0) + 1
            orig = len(html)
            if not orig:
                continue
            html_words, text_words = orig, len(text)
            left = sum(1 for w, n in html.items() if not (w in text and n - text[w] < 1))
            madiff = max(madiff, left / orig * 100)
        return madiff, html_words, text_words

    @cached_property
    def has_header_body_separator(self) -> bool:
        return b"\n\n" in self.raw or b"\r\n\r\n" in self.raw


def truncate_scan(text: bytes, scansize: int) -> bytes:
    """Message::get_decoded_body_text_array's cut of a part to ``scansize``:
    at the first newline, else ``>``, else space at or after ``scansize`` if
    it is within 1 KB, else at ``scansize`` itself."""
    if not scansize or len(text) <= scansize:
        return text
    for sep in (b"\n", b">", b" "):
        i = text.find(sep, scansize)
        if i >= 0 and i - scansize <= 1024:
            return text[:i + 1]
    return text[:scansize]


def split_short_lines(line: bytes) -> list[bytes]:
    """Message::split_into_array_of_short_lines for one line: pieces of at
    most MAX_BODY_LINE_LENGTH bytes, each cut after its last space (a space
    right at MAX_BODY_LINE_LENGTH included, as Perl's rindex finds it), at
    MAX_BODY_LINE_LENGTH without one."""
    out = []
    while len(line) > MAX_BODY_LINE_LENGTH:
        cut = line.rfind(b" ", 0, MAX_BODY_LINE_LENGTH + 1) + 1 or MAX_BODY_LINE_LENGTH
        out.append(line[:cut])
        line = line[cut:]
    out.append(line)
    return out


def split_short_paragraphs(text):
    """Message::split_into_array_of_short_paragraphs, boundary for boundary
    (rule hits depend on them): text up to MAX_BODY_LINE_LENGTH is one
    chunk; longer text is cut after the first newline, else ``>``, else
    space at or after MAX_BODY_LINE_LENGTH bytes into the chunk, provided
    the chunk stays within twice that, else at MAX_BODY_LINE_LENGTH; the
    rest (up to twice the length) is the last chunk.  ``text`` is bytes
    (rawbody) or str (check_stock_info's rendered text): the chunks are of
    its type."""
    n = len(text)
    if n <= MAX_BODY_LINE_LENGTH:
        return [text]
    out = []
    ofs = 0
    limit = 2 * MAX_BODY_LINE_LENGTH
    while n - ofs > limit:
        for sep in (b"\n", b">", b" ") if isinstance(text, bytes) else ("\n", ">", " "):
            j = text.find(sep, ofs + MAX_BODY_LINE_LENGTH)
            if j >= 0 and j - ofs + 1 <= limit:
                break
        else:
            j = ofs + MAX_BODY_LINE_LENGTH
        out.append(text[ofs:j + 1])
        ofs = j + 1
    if ofs < n:
        out.append(text[ofs:])
    return out


def _one_hop(relay: dict):
    """A chain of the one hop a caller knows (tests, tools): ip, rdns, helo, trusted, auth."""
    from rules.sa.received import Relay, RelayChain, is_private

    r = Relay(ip=relay.get("ip", ""), rdns=relay.get("rdns", ""), helo=relay.get("helo", ""),
              by=relay.get("by", ""), auth=relay.get("auth", ""), trusted=bool(relay.get("trusted")), index=0)
    r.ip_private = is_private(r.ip)
    r.no_reverse_dns = not r.rdns
    r.internal = 1 if r.trusted else 0
    if r.trusted:
        return RelayChain(trusted=[r], internal=[r], last_trusted_relay_index=0, last_internal_relay_index=0)
    return RelayChain(untrusted=[r], external=[r])


def html_text(r: HtmlRender) -> str:
    return html.unescape("".join(r.text))
