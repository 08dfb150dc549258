"""The web console: plain ``twisted.web`` resources and Jinja2 templates.

Why plain twisted.web and not Klein: the console has a dozen routes, and
Twisted (already the gateway's one dependency for networking) serves them
with nothing more; Klein would add Werkzeug and its own release cadence for
a routing table this file holds in twenty lines.

Threading: the reactor thread only parses the request, looks up the session,
checks the CSRF token, the role and the login failure limit (dict lookups).
Everything that blocks or costs CPU runs in the thread pool: store queries
(SQL), spool reads, the actions (fsync), the what-if and rendering the
template.  Password checks run in the gateway's low-priority password pool.
Events the actions emit from a thread reach the sink on the reactor thread.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import json
import logging
import math
import os
import re
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.web import resource, server, static

from monitor.web.security import COOKIE, FailureLimit, Session, Sessions, csrf_ok, security_headers

log = logging.getLogger("mailgate.web")

HERE = os.path.dirname(os.path.abspath(__file__))
BODY_LIMIT = 256 * 1024  # bytes of a message shown in a page
PAGE = 50


@dataclass
class Response:
    body: bytes = b""
    status: int = 200
    content_type: bytes = b"text/html; charset=utf-8"
    headers: list = field(default_factory=list)

    @classmethod
    def redirect(cls, location: str, status: int = 303) -> "Response":
        return cls(b"", status, headers=[(b"location", location.encode())])


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Ctx:
    """One request as the pages see it: decoded, with its session."""

    method: str
    path: str
    args: dict  # name -> [str]
    session: Optional[Session]
    client: str
    match: Any = None

    def get(self, name: str, default: str = "") -> str:
        values = self.args.get(name)
        return values[0].strip() if values else default

    def getall(self, name: str) -> list[str]:
        return [v.strip() for v in self.args.get(name, []) if v.strip()]

    @property
    def actor(self) -> str:
        return f"web:{self.session.user}" if self.session and self.session.user else "web:-"


def templates():
    """The Jinja2 environment: autoescaping on for every template, always."""
    import jinja2

    # a key one store row lacks renders empty (the SQLite and PostgreSQL rows
    # need not carry every optional field); autoescaping is on for every template
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(HERE, "templates")), autoescape=True)
    env.filters["when"] = fmt_time
    env.filters["ago"] = fmt_ago
    env.filters["score"] = lambda v: "-" if v is None else f"{float(v):.1f}"
    return env


def fmt_time(ts) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(float(ts), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def fmt_ago(ts) -> str:
    if not ts:
        return "-"
    s = time.time() - float(ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(s) >= n:
            return f"{s / n:.0f}{unit} ago" if s > 0 else f"in {-s / n:.0f}{unit}"
    return "now"


def parse_time(text: str, name: str) -> Optional[float]:
    """``2026-12-04T10:00`` / ``2026-12-04 10:00[:ss]`` / ``2026-12-04`` (UTC) -> epoch seconds."""
    if not text:
        return None
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.timezone.utc).timestamp()
        except ValueError:
            continue
    raise HttpError(400, f"{name} = {text!r}: expected a UTC time as 2026-12-04T10:00")


def parse_float(text: str, name: str, default: Optional[float]) -> Optional[float]:
    if text == "":
        return default
    try:
        return float(text)
    except ValueError:
        raise HttpError(400, f"{name} = {text!r}: expected a number") from None


def message_view(raw: Optional[bytes]) -> dict:
    """Headers and text of a message for display, as text only: the template
    escapes it, and HTML parts are shown as their source, never rendered."""
    if raw is None:
        return {"available": False}
    truncated = len(raw) > BODY_LIMIT
    raw = raw[:BODY_LIMIT]
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    parts = []
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype.startswith("text/"):
            try:
                text = part.get_content()
            except (LookupError, ValueError, AssertionError):
                text = part.get_payload(decode=True).decode("utf-8", "replace")
            parts.append({"type": ctype, "text": text})
        else:
            parts.append({"type": ctype, "text": f"({ctype} attachment"
                          f"{', ' + part.get_filename() if part.get_filename() else ''}: not shown)"})
    return {"available": True, "headers": head.decode("utf-8", "replace"), "parts": parts,
            "truncated": truncated}


def bayes_info(path: str) -> dict:
    """Size and age of the Bayes model file, from its metadata only (not its arrays)."""
    try:
        st = os.stat(path)
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("meta.json"))
    except FileNotFoundError:
        return {"path": path, "present": False}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
        return {"path": path, "present": True, "error": str(e)}
    return {"path": path, "present": True, "bytes": st.st_size, "mtime": st.st_mtime,
            "spam": meta.get("spam"), "ham": meta.get("ham"), "trained_at": meta.get("trained_at")}


@dataclass
class Backend:
    """What the console reads and acts through; given by the gateway (or a test)."""

    actions: Any  # monitor.actions.Actions
    spool: Any  # gateway.spool.Spool
    store: Any  # monitor.tracking.TrackingStore, or None when tracking is off
    spam: Any  # [spam] settings (or a callable giving them): the what-if's current thresholds
    bayes_model: str = ""
    health: Callable[[], list] = lambda: []  # [{"name", "up", "detail"}]
    digest_key: str = ""


ROUTES = []  # (method, regex, handler name, who may: "any" | "user" | "admin")


def route(method: str, pattern: str, who: str = "user"):
    def mark(fn):
        ROUTES.append((method, re.compile(f"^{pattern}$"), fn.__name__, who))
        return fn

    return mark


class Pages(resource.Resource):
    """Every dynamic page; ``/static`` and ``/metrics`` are sibling resources."""

    isLeaf = True

    def __init__(self, console: "Console"):
        super().__init__()
        self.c = console

    def render(self, request):
        d = defer.maybeDeferred(self.c.dispatch, request)
        d.addErrback(self.c.failed, request)
        d.addCallback(self.c.respond, request)
        d.addErrback(lambda f: log.error("web response failed: %s", f.getTraceback()))
        return server.NOT_DONE_YET


class Root(resource.Resource):
    def __init__(self, pages: Pages):
        super().__init__()
        self.pages = pages

    def getChild(self, path, request):
        request.postpath.insert(0, path)
        request.prepath.pop()
        return self.pages


class Console:
    def __init__(self, settings, *, reactor, run_in_thread: Callable, password_thread: Callable,
                 tls: bool = False, clock: Optional[Callable[[], float]] = None,
                 metrics: Optional[resource.Resource] = None):
        self.settings = settings
        self.reactor = reactor
        self.run_in_thread = run_in_thread
        self.password_thread = password_thread
        self.tls = tls
        self.clock = clock or reactor.seconds
        self.sessions = Sessions(self.clock, settings.session_lifetime)
        self.failures = FailureLimit(self.clock, settings.max_login_failures, settings.login_failure_window)
        self.env = templates()
        self.backend: Optional[Backend] = None
        self.metrics = metrics

    def attach(self, backend: Backend) -> None:
        """The spool, store and actions exist only once the ports are bound."""
        self.backend = backend

    def site(self) -> server.Site:
        pages = Pages(self)
        root = Root(pages)
        root.putChild(b"static", static.File(os.path.join(HERE, "static")))
        if self.metrics is not None:
            root.putChild(b"metrics", self.metrics)
        site = server.Site(root, logFormatter=access_line)
        site.displayTracebacks = False
        headers = security_headers(self.tls)

        class ConsoleRequest(server.Request):
            def process(self):
                for k, v in headers:
                    self.setHeader(k, v)
                super().process()

        site.requestFactory = ConsoleRequest
        return site

    # --- request plumbing (reactor thread) ---------------------------------

    def _ctx(self, request) -> Ctx:
        try:
            args = {k.decode("utf-8"): [v.decode("utf-8") for v in vs] for k, vs in request.args.items()}
            path = urllib.parse.unquote(request.path.decode("ascii"), errors="strict")
        except (UnicodeDecodeError, UnicodeError):
            raise HttpError(400, "the request is not UTF-8") from None
        token = request.getCookie(COOKIE)
        session = self.sessions.get(token.decode("ascii", "replace") if token else None)
        return Ctx(request.method.decode("ascii"), path, args, session, request.getClientAddress().host)

    def dispatch(self, request):
        ctx = self._ctx(request)
        for method, pattern, name, who in ROUTES:
            m = pattern.match(ctx.path)
            if m is None:
                continue
            if method != ctx.method:
                continue
            ctx.match = m
            if ctx.method == "POST" and who != "digest" and not csrf_ok(ctx.session, ctx.get("csrf")):
                self._audit(ctx, "csrf_refused", ctx.path)
                raise HttpError(403, "the form's security token is missing or stale: reload the page and try again")
            if who in ("user", "admin"):
                if ctx.session is None or ctx.session.user is None:
                    if ctx.method == "GET":
                        return Response.redirect("/login?next=" + urllib.parse.quote(ctx.path))
                    raise HttpError(403, "log in first")
                if who == "admin" and not ctx.session.admin:
                    self._audit(ctx, "forbidden", ctx.path)
                    raise HttpError(403, f"{ctx.session.user} is a viewer: only admins may do this")
            if self.backend is None:
                raise HttpError(503, "the gateway is still starting")
            return getattr(self, name)(ctx)
        if any(p.match(ctx.path) for _, p, _, _ in ROUTES):
            raise HttpError(405, f"{ctx.method} is not allowed here")
        raise HttpError(404, f"no page {ctx.path}")

    def failed(self, failure, request):
        if failure.check(HttpError):
            e = failure.value
            return self._error_page(e.status, e.message)
        from gateway.errors import MailGateError

        if failure.check(MailGateError):
            return self._error_page(400, str(failure.value))
        log.error("web page %s failed: %s", request.path.decode("ascii", "replace"), failure.getTraceback())
        return self._error_page(500, "internal error (logged)")

    def _error_page(self, status: int, message: str) -> Response:
        body = self.env.get_template("error.html").render(status=status, message=message, session=None, flash=[], path="")
        return Response(body.encode("utf-8"), status)

    def respond(self, resp: Response, request):
        if request.finished or request._disconnected:
            return
        request.setResponseCode(resp.status)
        request.setHeader(b"content-type", resp.content_type)
        request.setHeader(b"cache-control", b"no-store")
        for k, v in resp.headers:
            if k == b"set-cookie-session":
                self._set_cookie(request, v)
            else:
                request.setHeader(k, v)
        request.write(resp.body)
        request.finish()

    def _set_cookie(self, request, token: bytes) -> None:
        request.addCookie(COOKIE, token, path=b"/", httpOnly=True, sameSite="strict",
                          secure=True if self.tls else None,
                          max_age=str(int(self.settings.session_lifetime)).encode() if token else b"0")

    def _audit(self, ctx: Ctx, action: str, target: str = "", detail: str = "") -> None:
        if self.backend is not None:
            self.backend.actions.audit(ctx.actor, action, target, detail, ctx.client)

    def page(self, ctx: Ctx, template: str, fn: Callable[[], dict], status: int = 200) -> defer.Deferred:
        """Run ``fn`` (store queries) and render ``template`` in a thread."""
        session = ctx.session
        flash = list(session.flash) if session else []
        if session:
            session.flash.clear()

        def work():
            data = fn()
            return self.env.get_template(template).render(session=session, flash=flash, path=ctx.path, **data)

        return self.run_in_thread(work).addCallback(lambda body: Response(body.encode("utf-8"), status))

    def _store(self):
        store = self.backend.store
        if store is None:
            raise HttpError(503, "the tracking store is off ([tracking] in the config): nothing to show here")
        return store

    # --- login ---------------------------------------------------------------

    @route("GET", "/login", "any")
    def login_form(self, ctx: Ctx):
        session = ctx.session if ctx.session is not None else self.sessions.new()
        body = self.env.get_template("login.html").render(session=session, flash=[], path=ctx.path,
                                                           next=_safe_next(ctx.get("next")), error="")
        return Response(body.encode("utf-8"), headers=[(b"set-cookie-session", session.token.encode())])

    @route("POST", "/login", "any")
    def login(self, ctx: Ctx):
        from twisted.cred.credentials import UsernamePassword
        from twisted.cred.error import UnauthorizedLogin

        from gateway.auth import UsersFileChecker
        from monitor.web.users import read_users

        name, password, nxt = ctx.get("username"), ctx.args.get("password", [""])[0], _safe_next(ctx.get("next"))
        wait = self.failures.blocked(ctx.client)
        if wait:
            self._audit(ctx, "login_blocked", name, f"too many failures; {wait:.0f}s to wait")
            raise HttpError(429, f"too many failed logins from {ctx.client}: try again in {wait / 60:.0f} minute(s)")
        d = self.run_in_thread(read_users, self.settings.users)

        def check(users):
            checker = UsersFileChecker(self.password_thread, {n: u.secret for n, u in users.items()})
            d2 = checker.requestAvatarId(UsernamePassword(name.encode(), password.encode()))
            return d2.addCallback(lambda who: users[who])

        def ok(user):
            self.failures.succeeded(ctx.client)
            if ctx.session is not None:
                self.sessions.end(ctx.session)  # a new token at login: no session fixation
            session = self.sessions.new(user.name, user.role)
            self.backend.actions.audit(f"web:{user.name}", "login", user.name, user.role, ctx.client)
            return Response(b"", 303, headers=[(b"location", nxt.encode()),
                                               (b"set-cookie-session", session.token.encode())])

        def refused(f):
            f.trap(UnauthorizedLogin)
            self.failures.failed(ctx.client)
            self._audit(ctx, "login_failed", name)
            session = ctx.session or self.sessions.new()
            body = self.env.get_template("login.html").render(
                session=session, flash=[], path="/login", next=nxt, error="wrong user name or password")
            return Response(body.encode("utf-8"), 401, headers=[(b"set-cookie-session", session.token.encode())])

        return d.addCallback(check).addCallbacks(ok, refused)

    @route("POST", "/logout", "user")
    def logout(self, ctx: Ctx):
        self.sessions.end(ctx.session)
        self._audit(ctx, "logout", ctx.session.user)
        return Response(b"", 303, headers=[(b"location", b"/login"), (b"set-cookie-session", b"")])

    # --- pages ---------------------------------------------------------------

    @route("GET", "/", "user")
    def dashboard(self, ctx: Ctx):
        b = self.backend
        hours = int(parse_float(ctx.get("hours"), "hours", 24) or 24)
        now = time.time()

        def data():
            dash = b.store.dashboard(now - hours * 3600, now) if b.store is not None else None
            if dash is not None:
                dash = dict(dash, totals=dict(dash.get("totals") or {}))
            entries = list(b.spool.entries())
            return {"dash": dash, "hours": hours, "queue_depth": len(entries),
                    "held": sum(1 for e in entries if e.held),
                    "quarantined": len(os.listdir(b.spool.quarantine)) // 2,
                    "health": b.health(), "bayes": bayes_info(b.bayes_model) if b.bayes_model else None,
                    "chart": hour_chart(dash["per_hour"]) if dash else None}

        return self.page(ctx, "dashboard.html", data)

    @route("GET", "/tracking", "user")
    def tracking(self, ctx: Ctx):
        store = self._store()
        fields = ("queue_id", "message_id", "sender", "recipient", "client", "action", "text")
        query = {k: ctx.get(k) for k in fields if ctx.get(k)}
        since, until = parse_time(ctx.get("since"), "since"), parse_time(ctx.get("until"), "until")
        page = max(0, int(parse_float(ctx.get("page"), "page", 0)))

        def data():
            rows = store.search(since=since, until=until, limit=PAGE + 1, offset=page * PAGE, **query)
            form = {k: ctx.get(k) for k in fields + ("since", "until")}
            return {"rows": rows[:PAGE], "more": len(rows) > PAGE, "page": page, "form": form,
                    "pager": lambda p: urllib.parse.urlencode({**{k: v for k, v in form.items() if v}, "page": p})}

        return self.page(ctx, "tracking.html", data)

    @route("GET", "/message/(?P<qid>[A-Za-z0-9]{1,63})", "user")
    def message(self, ctx: Ctx):
        store, spool = self._store(), self.backend.spool
        qid = ctx.match.group("qid")

        def data():
            m = store.message(qid)
            if m is None:
                raise HttpError(404, f"no message {qid} in the tracking store")
            raw, where = None, ""
            if spool.quarantine_meta(qid) is not None:
                raw, where = spool.quarantine_read(qid), "quarantine"
            elif spool.entry(qid) is not None:
                raw, where = spool.read(qid), "queue"
            return {"m": m, "view": message_view(raw), "where": where}

        return self.page(ctx, "message.html", data)

    @route("GET", "/quarantine", "user")
    def quarantine(self, ctx: Ctx):
        b = self.backend
        page = max(0, int(parse_float(ctx.get("page"), "page", 0)))
        rcpt = ctx.get("recipient") or None

        def data():
            if b.store is not None:
                items = b.store.quarantine_items(recipient=rcpt, limit=PAGE + 1, offset=page * PAGE)
                # the store hears of a release a moment after the spool has it: show what is really held
                items = [it for it in items if b.spool.quarantine_meta(it["queue_id"]) is not None]
                for it in items:  # the store keeps each symbol's points and text; the list shows names
                    it["symbol_names"] = [s.get("name", "") if isinstance(s, dict) else str(s)
                                          for s in it.get("symbols") or []]
                source = "store"
            else:
                items = [dict(m, ts=m.get("arrival"), subject=None, reason="; ".join(m.get("reasons") or []),
                              symbol_names=m.get("symbols") or []) for m in b.spool.quarantine_list()]
                source = "spool"
            return {"items": items[:PAGE], "more": len(items) > PAGE, "page": page, "source": source,
                    "recipient": rcpt or ""}

        return self.page(ctx, "quarantine.html", data)

    @route("GET", "/quarantine/(?P<qid>[A-Za-z0-9]{1,63})", "user")
    def quarantine_item(self, ctx: Ctx):
        b = self.backend
        qid = ctx.match.group("qid")

        def data():
            meta = b.spool.quarantine_meta(qid)
            if meta is None:
                raise HttpError(404, f"no message {qid} in quarantine")
            return {"meta": meta, "qid": qid, "view": message_view(b.spool.quarantine_read(qid))}

        return self.page(ctx, "quarantine_item.html", data)

    @route("POST", "/quarantine", "admin")
    def quarantine_act(self, ctx: Ctx):
        actions = self.backend.actions
        what, ids = ctx.get("action"), ctx.getall("id")
        calls = {"release": lambda q: actions.release(q, ctx.actor, source_ip=ctx.client),
                 "release_ham": lambda q: actions.release(q, ctx.actor, learn_ham=True, source_ip=ctx.client),
                 "delete": lambda q: actions.delete(q, ctx.actor, source_ip=ctx.client),
                 "learn_spam": lambda q: actions.learn(q, ctx.actor, "spam", source_ip=ctx.client),
                 "learn_ham": lambda q: actions.learn(q, ctx.actor, "ham", source_ip=ctx.client)}
        return self._bulk(ctx, calls, what, ids, "/quarantine")

    @route("GET", "/queue", "user")
    def queue(self, ctx: Ctx):
        spool = self.backend.spool
        return self.page(ctx, "queue.html", lambda: {"entries": list(spool.entries())})

    @route("POST", "/queue", "admin")
    def queue_act(self, ctx: Ctx):
        actions = self.backend.actions
        what = ctx.get("action")
        if what == "flush":
            return self._bulk(ctx, {"flush": lambda _: actions.queue_flush(ctx.actor, ctx.client)},
                              what, ["all"], "/queue")
        calls = {"hold": lambda q: actions.queue_hold(q, ctx.actor, ctx.client),
                 "release": lambda q: actions.queue_release(q, ctx.actor, ctx.client),
                 "delete": lambda q: actions.queue_delete(q, ctx.actor, ctx.client)}
        return self._bulk(ctx, calls, what, ctx.getall("id"), "/queue")

    def _bulk(self, ctx: Ctx, calls: dict, what: str, ids: list, back: str):
        from monitor.actions import ActionError

        call = calls.get(what)
        if call is None:
            raise HttpError(400, f"action {what!r}: expected one of {', '.join(calls)}")
        if not ids:
            raise HttpError(400, "no message chosen: tick at least one")

        def work():
            said = []
            for q in ids:
                try:
                    said.append(("ok", call(q).text))
                except ActionError as e:
                    said.append(("error", str(e)))
                except Exception as e:  # a model that cannot load, a full disk: said, and logged
                    log.exception("web action %s on %s failed", what, q)
                    said.append(("error", f"{what} {q}: {e}"))
            return said

        def done(said):
            ctx.session.flash.extend(said)
            return Response.redirect(back)

        return self.run_in_thread(work).addCallback(done)

    @route("GET", "/whatif", "user")
    def whatif(self, ctx: Ctx):
        from monitor import whatif as w

        store, spam = self._store(), self.backend.spam
        spam = spam() if callable(spam) else spam  # the gateway's: the thresholds running now, after a reload too
        now = time.time()
        since = parse_time(ctx.get("since"), "since") or now - 7 * 86400
        until = parse_time(ctx.get("until"), "until") or now
        current = w.Thresholds(spam.threshold, spam.reject_threshold, spam.quarantine_threshold)
        try:
            proposed = w.Thresholds(
                parse_float(ctx.get("threshold"), "threshold", spam.threshold),
                parse_float(ctx.get("reject_threshold"), "reject_threshold", spam.reject_threshold),
                parse_float(ctx.get("quarantine_threshold"), "quarantine_threshold",
                            spam.quarantine_threshold if "quarantine_threshold" not in ctx.args else None))
            width = parse_float(ctx.get("width"), "width", None)  # None: one that makes at most 60 bins
        except w.WhatIfError as e:
            raise HttpError(400, str(e)) from None

        def data():
            rows = w.rows(store.verdicts(since, until))
            # GTUBE scores 1000: the bins stop a little past the highest threshold,
            # and the last one holds everything above (a 1000-row table helps nobody)
            top = max([r.score for r in rows] or [0.0])
            bottom = min([0.0] + [r.score for r in rows])
            edge = max(current.reject_threshold, proposed.reject_threshold)
            step = width or nice_width(min(top, edge + 2) - bottom, 60)
            if step <= 0 or not math.isfinite(step):
                raise HttpError(400, f"width = {step:g}: must be a positive number")
            hi = (math.floor(min(top, edge + 2 * step) / step) + 1) * step
            lo = math.floor(bottom / step) * step
            if (hi - lo) / step > 200:
                raise HttpError(400, f"width = {step:g}: makes more than 200 bins; choose a wider one")
            try:
                bins = w.histogram(rows, step, lo=lo, hi=hi)
            except w.WhatIfError as e:
                raise HttpError(400, str(e)) from None
            outcome = w.simulate(rows, current, proposed)
            return {"bins": bins, "chart": histogram_chart(bins, proposed), "outcome": outcome, "open_top": top >= hi,
                    "current": current, "proposed": proposed, "since": since, "until": until,
                    "form": {"since": fmt_time(since)[:16].replace(" ", "T"),
                             "until": fmt_time(until)[:16].replace(" ", "T"), "width": f"{width:g}" if width else ""}}

        return self.page(ctx, "whatif.html", data)

    @route("GET", "/audit", "user")
    def audit(self, ctx: Ctx):
        store = self._store()
        return self.page(ctx, "audit.html", lambda: {"rows": store.audit(limit=200)})

    # --- digest links: no login, one action on one recipient's item -----------

    @route("GET", "/digest/(?P<action>release|notspam)/(?P<token>[A-Za-z0-9_.=-]{1,400})", "digest")
    def digest_form(self, ctx: Ctx):
        link = self._link(ctx)
        spool = self.backend.spool

        def data():
            meta = spool.quarantine_meta(link.queue_id)
            if meta is None or link.recipient in (meta.get("released_to") or []):
                raise HttpError(410, "this message is no longer held for you (released, deleted or expired)")
            return {"meta": meta, "link": link, "token": ctx.match.group("token"), "done": None}

        return self.page(ctx, "digest.html", data)

    @route("POST", "/digest/(?P<action>release|notspam)/(?P<token>[A-Za-z0-9_.=-]{1,400})", "digest")
    def digest_act(self, ctx: Ctx):
        from monitor.actions import ActionError

        link = self._link(ctx)
        actions = self.backend.actions
        actor = f"digest:{link.recipient}"

        def work():
            try:
                done = actions.release(link.queue_id, actor, learn_ham=link.action == "notspam",
                                       recipients=[link.recipient], source_ip=ctx.client)
            except ActionError as e:
                raise HttpError(410, f"{e} (already released, deleted or expired)") from None
            return {"meta": None, "link": link, "token": "", "done": done.text}

        return self.page(ctx, "digest.html", lambda: work())

    def _link(self, ctx: Ctx):
        from monitor.digest import LinkError, verify

        key = self.backend.digest_key
        if not key:
            raise HttpError(404, "quarantine digests are off ([web] digest_key)")
        try:
            return verify(key, ctx.match.group("token"), ctx.match.group("action"), time.time())
        except LinkError as e:
            self.backend.actions.audit("digest", "digest_link_refused", ctx.match.group("action"), e.reason,
                                       ctx.client)
            raise HttpError(403, f"link refused ({e.reason}): {e}") from None


_TOKEN = re.compile(rb"^(/digest/[a-z]+/)[^?]*")


def access_line(timestamp: str, request) -> str:
    """Twisted's access line, but a digest link's token (a capability) never reaches the log."""
    uri = _TOKEN.sub(rb"\1(token)", request.uri)
    return '"%s" - - %s "%s %s %s" %d %s' % (
        request.getClientAddress().host, timestamp, request.method.decode("ascii", "replace"),
        uri.decode("ascii", "replace"), request.clientproto.decode("ascii", "replace"), request.code,
        request.sentLength or "-")


def _safe_next(value: str) -> str:
    """Only a path on this site: ``next=//evil.example`` must not redirect away."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def nice_width(span: float, bins: int) -> float:
    """The smallest of 0.5, 1, 2, 5, 10, 20, 50... that cuts ``span`` into at most ``bins`` bins."""
    width = 0.5
    while span / width > bins:
        width *= 2.5 if str(width).startswith("2") else 2
    return width


def hour_chart(per_hour: list) -> dict:
    """SVG geometry (attributes, not inline styles: the CSP has no 'unsafe-inline')."""
    hours = sorted({r["hour_ts"] for r in per_hour})
    actions = sorted({r["action"] for r in per_hour})
    counts = {(r["hour_ts"], r["action"]): r["count"] for r in per_hour}
    totals = [sum(counts.get((h, a), 0) for a in actions) for h in hours]
    top = max(totals or [1]) or 1
    bar_w = 600 / max(1, len(hours))
    bars = []
    for i, h in enumerate(hours):
        y = 150.0
        for a in actions:
            n = counts.get((h, a), 0)
            if not n:
                continue
            height = 140.0 * n / top
            y -= height
            bars.append({"x": i * bar_w + 1, "y": y, "w": max(1.0, bar_w - 2), "h": height, "action": a,
                         "title": f"{fmt_time(h)[:13]}h {a}: {n}"})
    return {"bars": bars, "actions": actions, "max": top, "hours": hours}


def histogram_chart(bins: list, proposed) -> dict:
    top = max([b.total for b in bins] or [1]) or 1
    if not bins:
        return {"bars": [], "marks": [], "max": 0}
    lo, hi = bins[0].lo, bins[-1].hi
    scale = 600 / max(1e-9, hi - lo)
    bars = []
    for b in bins:
        x, w = (b.lo - lo) * scale, max(1.0, (b.hi - b.lo) * scale - 1)
        y = 150.0
        for label, n in (("ham", b.ham), ("spam", b.spam), ("unlabelled", b.unlabelled)):
            if n:
                h = 140.0 * n / top
                y -= h
                bars.append({"x": x, "y": y, "w": w, "h": h, "label": label,
                             "title": f"{b.lo:g}..{b.hi:g}: {n} {label}"})
    marks = [{"x": (v - lo) * scale, "name": name} for name, v in
             (("threshold", proposed.threshold), ("reject", proposed.reject_threshold),
              ("quarantine", proposed.quarantine_threshold)) if v is not None and lo <= v <= hi]
    return {"bars": bars, "marks": marks, "max": top, "lo": lo, "hi": hi}
