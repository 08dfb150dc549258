"""The console (monitor/web) as a real listening twisted.web server on a free
loopback port, driven over HTTP: login, sessions, CSRF, roles, the failure
limit, security headers, escaping, the digest links.  The store is the
in-memory one of these tests (tests/monitor/memory_store.py); the spool, the
actions, the Bayes model and the password hashing are the real ones."""

from __future__ import annotations

import asyncio
import http.client
import re
import time
import urllib.parse
from http.cookies import SimpleCookie

import pytest
from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

from gateway.auth import hash_password
from gateway.config import SpamSettings
from gateway.spool import Spool
from monitor.actions import Actions, Learner
from monitor.digest import sign
from monitor.web.server import Backend, Console, message_view
from monitor.web.settings import WebSettings
from tests.monitor.memory_store import MemoryStore
from tests.monitor.test_actions import quarantined, queued

KEY = "k" * 32
SCRIPT = "<script>document.title='pwned'</script>"


@pytest.fixture
def reactor():
    from twisted.internet import reactor as r

    asyncio.set_event_loop(r._asyncioEventloop)
    return r


@pytest.fixture
def run(reactor):
    loop = reactor._asyncioEventloop

    def run(d, timeout: float = 30.0):
        return loop.run_until_complete(asyncio.wait_for(d.asFuture(loop), timeout))

    return run


class Browser:
    """An HTTP client with a cookie jar; blocking, so tests call it through ``run``."""

    def __init__(self, port, run, in_thread):
        self.port, self._run, self._thread, self.cookies = port, run, in_thread, {}

    def _do(self, method, path, form=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        headers = {}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form, doseq=True)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        data = resp.read().decode("utf-8")
        for raw in resp.headers.get_all("Set-Cookie") or []:
            c = SimpleCookie(raw)
            for k, morsel in c.items():
                if morsel.value:
                    self.cookies[k] = morsel.value
                else:
                    self.cookies.pop(k, None)
        conn.close()
        return resp, data

    def get(self, path):
        return self._run(self._thread(self._do, "GET", path))

    def post(self, path, form):
        return self._run(self._thread(self._do, "POST", path, form))

    def csrf(self, path="/login"):
        _, page = self.get(path)
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)

    def login(self, user, password):
        return self.post("/login", {"csrf": self.csrf(), "username": user, "password": password, "next": "/"})


@pytest.fixture
def env(tmp_path, reactor, run):
    from classifiers.model import BayesModel

    users = tmp_path / "users"
    # a low iteration count: these tests check the flow, not PBKDF2's cost
    users.write_text(f"alice:admin:{hash_password('alice-pw-1', 1000)}\nvic:viewer:{hash_password('vic-pw-12', 1000)}\n")
    model = str(tmp_path / "bayes.model")
    BayesModel().save(model)
    spool = Spool(str(tmp_path / "queue"))
    store = MemoryStore()
    events = []

    def emit(e):
        events.append(e)
        store.hear(e)

    pool = ThreadPool(1, 4, name="test-web")
    pool.start()

    def in_thread(f, *a, **kw):
        return threads.deferToThreadPool(reactor, pool, f, *a, **kw)

    settings = WebSettings(users=str(users), max_login_failures=3, digest_key=KEY)
    console = Console(settings, reactor=reactor, run_in_thread=in_thread, password_thread=in_thread)
    actions = Actions(spool, emit, learner=Learner(model))
    console.attach(Backend(actions=actions, spool=spool, store=store, spam=SpamSettings(), bayes_model=model,
                           digest_key=KEY, health=lambda: [{"name": "scanner clamd", "up": False,
                                                            "detail": "self-test FAILED"}]))
    port = reactor.listenTCP(0, console.site(), interface="127.0.0.1")
    ns = type("Env", (), {})()
    ns.spool, ns.store, ns.events, ns.console, ns.model = spool, store, events, console, model
    # the client's own threads (the reactor's pool starts only with reactor.run)
    client_pool = ThreadPool(1, 2, name="test-web-client")
    client_pool.start()
    ns.browser = lambda: Browser(port.getHost().port, run,
                                 lambda f, *a: threads.deferToThreadPool(reactor, client_pool, f, *a))
    yield ns
    run(port.stopListening())
    pool.stop()
    client_pool.stop()


def test_pages_need_a_login_and_the_login_works(env):
    b = env.browser()
    resp, _ = b.get("/quarantine")
    assert resp.status == 303 and resp.headers["Location"] == "/login?next=/quarantine"
    resp, page = b.login("alice", "alice-pw-1")
    assert resp.status == 303 and resp.headers["Location"] == "/"
    resp, page = b.get("/")
    assert resp.status == 200 and 'id="whoami">alice (admin)' in page
    assert [(a["actor"], a["action"]) for a in env.store.audits] == [("web:alice", "login")]
    token = b.cookies["mailgate_session"]
    resp, _ = b.post("/logout", {"csrf": b.csrf("/")})
    assert resp.status == 303 and "mailgate_session" not in b.cookies
    b.cookies["mailgate_session"] = token  # the old cookie is worth nothing now
    resp, _ = b.get("/")
    assert resp.status == 303 and resp.headers["Location"].startswith("/login")
    assert env.store.audits[-1]["action"] == "logout"


def test_session_cookie_is_httponly_and_samesite_strict_and_renewed_at_login(env):
    b = env.browser()
    b.get("/login")
    before = dict(b.cookies)
    resp, _ = b.login("alice", "alice-pw-1")
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # no TLS here; under [web] tls it is Secure
    assert b.cookies["mailgate_session"] != before["mailgate_session"]  # no session fixation


def test_wrong_password_is_refused_audited_and_limited_per_address(env):
    b = env.browser()
    for _ in range(3):
        resp, page = b.login("alice", "wrong")
        assert resp.status == 401 and "wrong user name or password" in page
    resp, page = b.login("alice", "alice-pw-1")  # even the right password waits now
    assert resp.status == 429 and "too many failed logins from 127.0.0.1" in page
    assert [a["action"] for a in env.store.audits] == ["login_failed"] * 3 + ["login_blocked"]
    resp, _ = b.login("nobody", "x")
    assert resp.status == 429


def test_security_headers_on_pages_static_files_and_errors(env):
    b = env.browser()
    for path in ("/login", "/static/console.css", "/static/console.js", "/no-such-page"):
        resp, _ = b.get(path)
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
    _, page = b.get("/login")
    assert "<script>" not in page and 'src="/static/console.js"' in page  # no inline script, no CDN
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_a_post_without_the_csrf_token_is_refused(env):
    qid = quarantined(env.spool)
    b = env.browser()
    b.login("alice", "alice-pw-1")
    for form in ({"action": "delete", "id": qid}, {"action": "delete", "id": qid, "csrf": "forged"}):
        resp, page = b.post("/quarantine", form)
        assert resp.status == 403 and "security token is missing or stale" in page
    assert env.spool.quarantine_meta(qid) is not None
    assert env.store.audits[-1]["action"] == "csrf_refused"
    resp, _ = b.post("/login", {"username": "alice", "password": "alice-pw-1"})  # the login form too
    assert resp.status == 403


def test_a_viewer_sees_but_cannot_release(env):
    qid = quarantined(env.spool)
    b = env.browser()
    b.login("vic", "vic-pw-12")
    resp, page = b.get("/quarantine")
    assert resp.status == 200 and "only admins can release" in page and 'value="release"' not in page
    resp, page = b.post("/quarantine", {"csrf": b.csrf("/quarantine"), "action": "release", "id": qid})
    assert resp.status == 403 and "vic is a viewer" in page
    assert env.spool.quarantine_meta(qid) is not None and list(env.spool.entries()) == []
    assert env.store.audits[-1]["action"] == "forbidden"


def test_admin_bulk_release_and_learn_from_the_quarantine_page(env):
    from classifiers.model import BayesModel

    a = quarantined(env.spool, "0000000000AAAA01")
    z = quarantined(env.spool, "0000000000AAAA02")
    b = env.browser()
    b.login("alice", "alice-pw-1")
    resp, _ = b.post("/quarantine", {"csrf": b.csrf("/quarantine"), "action": "release_ham", "id": [a, z]})
    assert resp.status == 303 and resp.headers["Location"] == "/quarantine"
    _, page = b.get("/quarantine")
    assert page.count("and learned it as ham") == 2
    assert env.spool.quarantine_list() == [] and len(list(env.spool.entries())) == 2
    assert BayesModel.load(env.model).nham == 1  # the same message twice: learned once
    resp, page = b.post("/quarantine", {"csrf": b.csrf("/quarantine"), "action": "delete", "id": a})
    _, page = b.get("/quarantine")
    assert f"no message &#39;{a}&#39; in quarantine" in page


def test_queue_page_and_actions(env):
    q = queued(env.spool)
    b = env.browser()
    b.login("alice", "alice-pw-1")
    _, page = b.get("/queue")
    assert q in page and "not tried yet" in page
    b.post("/queue", {"csrf": b.csrf("/queue"), "action": "hold", "id": q})
    _, page = b.get("/queue")
    assert f"held {q}" in page and "HELD by an admin" in page
    b.post("/queue", {"csrf": b.csrf("/queue"), "action": "flush"})
    _, page = b.get("/queue")
    assert "flush: 0 message(s)" in page
    resp, page = b.post("/queue", {"csrf": b.csrf("/queue"), "action": "explode", "id": q})
    assert resp.status == 400 and "expected one of hold, release, delete" in page


def test_untrusted_text_is_escaped_everywhere(env):
    now = time.time()
    env.store.add(queue_id="0000000000CCCC01", ts=now, sender="x@sender.test", recipients=["a@example.test"],
                  subject=SCRIPT, action="tag", score=6.0, reply="250 ok",
                  symbols=[{"name": "EVIL<b>", "score": 6.0, "description": SCRIPT}])
    raw = (f"Subject: {SCRIPT}\r\nContent-Type: text/html\r\n\r\n<html><body>{SCRIPT}"
           f"<img src=x onerror=alert(1)></body></html>\r\n").encode()
    qid = quarantined(env.spool, "0000000000CCCC01", raw=raw)
    b = env.browser()
    b.login("alice", "alice-pw-1")
    for path in ("/tracking?text=script", f"/message/{qid}", f"/quarantine/{qid}"):
        resp, page = b.get(path)
        assert resp.status == 200, page
        assert "<script>document" not in page and "<img src=x" not in page
    _, page = b.get(f"/message/{qid}")
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in page and "EVIL&lt;b&gt;" in page


def test_message_view_shows_html_parts_as_source_text():
    view = message_view(b"Subject: x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<b>hi</b>\r\n")
    assert view["parts"] == [{"type": "text/html", "text": "<b>hi</b>\r\n"}]  # escaped by the template
    assert message_view(None) == {"available": False}


def test_bad_input_gets_a_precise_400_not_a_traceback(env):
    b = env.browser()
    b.login("alice", "alice-pw-1")
    resp, page = b.get("/tracking?since=yesterday")
    assert resp.status == 400 and "since = &#39;yesterday&#39;: expected a UTC time" in page
    resp, page = b.get("/whatif?threshold=9&reject_threshold=3")
    assert resp.status == 400 and "must not be below threshold" in page
    resp, page = b.get("/login?next=//evil.example")
    assert 'name="next" value="/"' in page


def test_whatif_page_shows_the_numbers_and_the_config_lines(env):
    now = time.time()
    for i, (score, action, label) in enumerate([(1, "accept", "ham"), (5.5, "tag", "ham"), (4, "accept", "spam"),
                                               (30, "reject", None)]):
        env.store.add(queue_id=f"00000000000DD{i:03d}", ts=now - 60, score=score, action=action)
        if label:
            env.store.labels[f"00000000000DD{i:03d}"] = label
    b = env.browser()
    b.login("vic", "vic-pw-12")  # a viewer may look: it changes nothing
    resp, page = b.get("/whatif?threshold=3.5&reject_threshold=20&width=1")
    assert resp.status == 200
    assert re.search(r'id="fp-before">1 of 2<', page) and re.search(r'id="miss-after">0 of 1<', page)
    assert "[spam]\nthreshold = 3.5\nreject_threshold = 20\n" in page
    assert "accept → tag: 1" in page
    # the 30-point message sits in the last bin, past the highest threshold (20): 0..23, not 0..31
    assert "<td>22 and above</td><td>0</td><td>0</td><td>1</td>" in page and page.count("<td>1 to 2</td>") == 1
    resp, page = b.get("/whatif?width=0.01")
    assert resp.status == 400 and "more than 200 bins" in page
    _, page = b.get("/whatif?threshold=5&reject_threshold=900")  # no width: about 60 bins up to the top score
    assert "<td>1 to 1.5</td>" in page and "<td>30 to 30.5</td>" in page and "<td>30.5 to" not in page


def test_dashboard_shows_traffic_health_and_model(env):
    now = time.time()
    env.store.add(queue_id="0000000000EE0001", ts=now - 100, action="reject", client="192.0.2.9",
                  sender="x@spam.test", symbols=[{"name": "GTUBE", "score": 1000, "description": "d"}])
    b = env.browser()
    b.login("alice", "alice-pw-1")
    _, page = b.get("/")
    assert "<td>GTUBE</td><td>1</td>" in page and "192.0.2.9" in page and "spam.test" in page
    assert "scanner clamd" in page and "DOWN" in page
    assert "0 spam, 0 ham" in page and "<rect" in page


def test_digest_links_release_only_that_recipients_copy_without_login(env):
    qid = quarantined(env.spool, rcpts=("a@example.test", "b@example.test"))
    expires = time.time() + 3600
    token = sign(KEY, "release", qid, "b@example.test", expires)
    b = env.browser()  # not logged in
    resp, page = b.get(f"/digest/release/{token}")
    assert resp.status == 200 and 'id="confirm"' in page  # a GET changes nothing (mail scanners prefetch links)
    assert env.spool.quarantine_meta(qid) is not None
    resp, page = b.post(f"/digest/release/{token}", {})
    assert resp.status == 200 and "It is on its way to b@example.test" in page
    (entry,) = env.spool.entries()
    assert [r.address for r in entry.recipients] == ["b@example.test"]
    assert env.spool.quarantine_meta(qid)["released_to"] == ["b@example.test"]  # a's copy stays held
    resp, page = b.post(f"/digest/release/{token}", {})  # a second click does nothing more
    assert resp.status == 410
    assert ("digest:b@example.test", "release") in [(a["actor"], a["action"]) for a in env.store.audits]


@pytest.mark.parametrize("make,reason", [
    (lambda q: sign(KEY, "release", q, "a@example.test", time.time() - 1), "expired"),
    (lambda q: sign(KEY, "release", q, "a@example.test", time.time() + 99)[:-2] + "AA", "tampered"),
    (lambda q: sign("x" * 32, "release", q, "a@example.test", time.time() + 99), "tampered"),
])
def test_digest_links_expired_or_tampered_are_refused(env, make, reason):
    qid = quarantined(env.spool)
    b = env.browser()
    for method in (b.get, lambda p: b.post(p, {})):
        resp, page = method(f"/digest/release/{make(qid)}")
        assert resp.status == 403 and f"link refused ({reason})" in page
    assert env.spool.quarantine_meta(qid) is not None


def test_a_release_link_does_not_work_as_a_notspam_link(env):
    qid = quarantined(env.spool)
    token = sign(KEY, "release", qid, "a@example.test", time.time() + 99)
    resp, page = env.browser().post(f"/digest/notspam/{token}", {})
    assert resp.status == 403 and "link refused (wrong action)" in page
    assert env.spool.quarantine_meta(qid) is not None


def test_under_tls_the_cookie_is_secure_and_hsts_is_sent(tmp_path, reactor, run):
    # the flags only: the certificate itself is the gateway's (gateway.service.server_tls)
    pool = ThreadPool(1, 2, name="test-web-tls")
    pool.start()
    try:
        def in_thread(f, *a, **kw):
            return threads.deferToThreadPool(reactor, pool, f, *a, **kw)

        console = Console(WebSettings(users=str(tmp_path / "none")), reactor=reactor, run_in_thread=in_thread,
                          password_thread=in_thread, tls=True)
        console.attach(Backend(actions=Actions(Spool(str(tmp_path / "q")), lambda e: None), spool=None,
                               store=None, spam=SpamSettings()))
        port = reactor.listenTCP(0, console.site(), interface="127.0.0.1")
        b = Browser(port.getHost().port, run, in_thread)
        resp, page = b.get("/login")
        assert "Secure" in resp.headers["Set-Cookie"] and "HttpOnly" in resp.headers["Set-Cookie"]
        assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
        run(port.stopListening())
    finally:
        pool.stop()


def test_mailgate_run_exits_1_when_the_console_address_is_taken(tmp_path):
    import socket
    import subprocess

    from tests.support.gateway import MAILGATE, base_config
    from tests.support.ports import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        web_port = taken.getsockname()[1]
        smtp_port = free_port()
        cfg = tmp_path / "mailgate.toml"
        cfg.write_text(base_config(smtp_port, str(tmp_path / "queue"), None,
                                   web=f'listen = "127.0.0.1:{web_port}"'))
        p = subprocess.run(MAILGATE + ["run", "-c", str(cfg)], cwd=str(tmp_path), capture_output=True, text=True,
                           timeout=120)
    assert p.returncode == 1, p.stderr
    assert f"cannot listen on 127.0.0.1:{web_port} (web console)" in p.stderr
    assert not (tmp_path / "queue" / "mailgate.pid").exists()  # it touched nothing
    with socket.socket() as s:  # and its SMTP port was closed again
        s.bind(("127.0.0.1", smtp_port))
