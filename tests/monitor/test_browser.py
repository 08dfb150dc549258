"""The Mail Monitor in a real browser: headless Chromium (Debian's chromium and
chromium-driver, through Selenium) against a real `mailgate run` subprocess
with its real tracking store, a real downstream SMTP sink and real users made
with `mailgate web adduser`.

Screenshots of each page go to $MAILGATE_SCREENSHOTS when set (`make
screenshots` sets docs/screenshots, which the README shows), else to the
test's temp dir.  The tests run in file order over one gateway.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from rules.gtube import GTUBE
from tests.support.browser import chromium, quit_driver
from tests.support.gateway import MAILGATE, mailgate_factory
from tests.support.ports import free_port
from tests.support.sink import Sink

HAM = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: lunch on friday\r\n"
       b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <lunch-1@sender.test>\r\n"
       b"\r\nShall we meet at noon?\r\n")
SPAM = (b"From: Promo <promo@sender.test>\r\nTo: bob@example.test\r\nSubject: cheap watches\r\n"
        b"Date: Fri, 04 Dec 2026 10:01:00 +0000\r\nMessage-ID: <promo-1@sender.test>\r\n"
        b"\r\nBuy now!\r\n" + GTUBE + b"\r\n")
EVIL = (b"From: Evil <evil@sender.test>\r\nTo: bob@example.test\r\nSubject: <script>document.title='pwned'</script>\r\n"
        b"Date: Fri, 04 Dec 2026 10:02:00 +0000\r\nMessage-ID: <evil-1@sender.test>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b"<html><body><p id=\"injected\">hello</p><script>document.title='pwned'</script>"
        b"<img src=\"x\" onerror=\"document.title='pwned by img'\">" + GTUBE + b"</body></html>\r\n")

pytestmark = pytest.mark.timeout(600)


class Console:
    pass


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    from classifiers.model import BayesModel

    tmp = tmp_path_factory.mktemp("browser")
    shots = Path(os.environ.get("MAILGATE_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    sink = Sink().start()
    make = mailgate_factory(tmp, sink)
    web_port = free_port()
    model = tmp / "bayes.model"
    BayesModel().save(str(model))  # an empty model: learning works, it scores nothing yet
    users = tmp / "web-users"
    gw = make(f'[spam]\nquarantine_threshold = 500\nreject_threshold = 5000\n[bayes]\nmodel = "{model}"\n',
              web=f'listen = "127.0.0.1:{web_port}"\nusers = "{users}"', start=False)
    for name, role, pw in (("alice", "admin", "alice-password"), ("vic", "viewer", "vic-password")):
        p = subprocess.run(MAILGATE + ["web", "adduser", name, "--role", role, "-c", str(gw.config_path)],
                           input=pw + "\n", capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert f"added {role} {name}" in p.stdout
    gw.start()
    c = Console()
    c.gw, c.sink, c.model, c.shots = gw, sink, model, shots
    c.url = f"http://127.0.0.1:{web_port}"
    for body, sender in ((HAM, "alice@sender.test"), (SPAM, "promo@sender.test"), (EVIL, "evil@sender.test")):
        with gw.smtp() as s:
            s.sendmail(sender, ["bob@example.test"], body)
    assert sink.wait_for(1, timeout=30)  # the ham; the two spams are held
    c.driver = chromium(1360, 1000)
    try:
        yield c
    finally:
        quit_driver(c.driver)
        gw.stop()
        for server in make.servers:
            server.stop(final=True)
        sink.stop()


def shot(c, name):
    c.driver.save_screenshot(str(c.shots / f"{name}.png"))


def login(c, user, password):
    from selenium.webdriver.common.by import By

    d = c.driver
    d.delete_all_cookies()
    d.get(c.url + "/login")
    d.find_element(By.ID, "username").send_keys(user)
    d.find_element(By.ID, "password").send_keys(password)
    click(c, d.find_element(By.ID, "login"))
    wait(lambda: d.find_elements(By.ID, "whoami"), what=f"{user} logged in")


def click(c, element=None, script=None, *args):
    """Click what submits a form (or run a script that does), then wait until
    the next page has replaced this one and finished loading."""
    from selenium.common.exceptions import WebDriverException

    d = c.driver
    d.execute_script("window.__before_click = true")
    if element is not None:
        element.click()
    else:
        d.execute_script(script, *args)

    def loaded():
        try:  # mid-navigation Chromium may answer with an inspector error: not yet
            return d.execute_script("return window.__before_click === undefined && document.readyState === 'complete'")
        except WebDriverException:
            return False

    wait(loaded, what="the next page")


def wait(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def reload_until(c, path, predicate, what, timeout=30.0):
    """The store writes in batches (every 0.5 s): a page shows a fact a moment after it happened."""
    def ok():
        c.driver.get(c.url + path)
        return predicate(c.driver.page_source)

    try:
        return wait(ok, timeout, what)
    except AssertionError:
        main = c.driver.page_source.split("<main>", 1)[-1][:3000]
        log = "\n".join(line for line in c.gw.log().splitlines() if '"GET ' not in line)  # not the access lines
        raise AssertionError(f"timed out waiting for {what} on {path}:\n{main}\n--- gateway log:\n"
                             f"{log[-4000:]}") from None


def quarantine_id(c, subject_part):
    from selenium.webdriver.common.by import By

    def find():
        c.driver.get(c.url + "/quarantine")
        for a in c.driver.find_elements(By.CSS_SELECTOR, "#quarantine a.qid"):
            if subject_part in a.text:  # the text as shown: escaped in the source
                return a.get_attribute("href").rsplit("/", 1)[1]
        return None

    return wait(find, what=f"{subject_part!r} in the quarantine list")


def test_login_page_and_dashboard(console):
    from selenium.webdriver.common.by import By

    c, d = console, console.driver
    d.delete_all_cookies()
    d.get(c.url + "/")
    assert d.current_url == c.url + "/login?next=/"
    shot(c, "login")
    login(c, "alice", "alice-password")
    d.get(c.url + "/")
    reload_until(c, "/", lambda src: "GTUBE" in src, "GTUBE among the top symbols")
    assert d.find_element(By.ID, "quarantined").text == "2"
    assert "0 spam, 0 ham" in d.find_element(By.ID, "bayes").text
    shot(c, "dashboard")


def test_tracking_finds_both_messages_with_their_symbols(console):
    from selenium.webdriver.common.by import By

    c, d = console, console.driver
    reload_until(c, "/tracking", lambda src: "lunch on friday" in src and "cheap watches" in src,
                 "ham and spam in tracking")
    shot(c, "tracking")
    d.get(c.url + "/tracking?sender=promo%40sender.test")
    rows = d.find_elements(By.CSS_SELECTOR, "#results a.qid")
    assert len(rows) == 1
    click(c, rows[0])
    assert d.find_element(By.ID, "action").text == "quarantine"
    symbols = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")
               for tr in d.find_elements(By.CSS_SELECTOR, "#symbols tr")[1:]}
    assert "GTUBE" in symbols
    assert float(symbols["GTUBE"][1].text) == 1000.0
    assert symbols["GTUBE"][2].text  # the declared description beside the hit
    assert "Buy now!" in d.find_element(By.CSS_SELECTOR, "pre.body").text
    shot(c, "message")
    d.get(c.url + "/tracking?sender=alice%40sender.test")
    click(c, d.find_element(By.CSS_SELECTOR, "#results a.qid"))
    assert d.find_element(By.ID, "action").text == "accept"
    path = d.current_url[len(c.url):]
    reload_until(c, path, lambda src: "sent" in d.find_element(By.ID, "deliveries").text,
                 "the ham's delivery attempt (written by the delivery process)")


def test_a_body_with_script_is_shown_escaped_and_runs_nothing(console):
    from selenium.webdriver.common.by import By

    c, d = console, console.driver
    qid = quarantine_id(c, "<script>")
    for path in (f"/quarantine/{qid}", f"/message/{qid}"):
        d.get(c.url + path)
        assert "pwned" not in d.title
        assert not d.find_elements(By.ID, "injected") and not d.find_elements(By.CSS_SELECTOR, "main img")
        scripts = [s.get_attribute("src") for s in d.find_elements(By.TAG_NAME, "script")]
        assert scripts == [c.url + "/static/console.js"]
        body = d.find_element(By.CSS_SELECTOR, "pre.body").text
        assert "<script>document.title='pwned'</script>" in body and '<img src="x" onerror=' in body
    d.get(c.url + f"/quarantine/{qid}")
    d.execute_script("document.querySelector('pre.body').scrollIntoView()")
    shot(c, "quarantine-preview")
    # the browser's console: no script error and no CSP violation on our own pages
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert errors == []


def test_release_and_learn_ham_arrives_downstream_without_the_tag(console):
    from selenium.webdriver.common.by import By

    from classifiers.model import BayesModel

    c, d = console, console.driver
    qid = quarantine_id(c, "cheap watches")
    shot(c, "quarantine")
    d.get(c.url + f"/quarantine/{qid}")
    before = len(c.sink.messages)
    click(c, d.find_element(By.ID, "release-ham"))
    assert "and learned it as ham" in d.find_element(By.CSS_SELECTOR, "p.flash").text
    assert c.sink.wait_for(before + 1, timeout=30)
    data = c.sink.messages[-1].data
    msg = email.message_from_bytes(data)
    assert msg["Subject"] == "cheap watches"
    assert msg["X-Spam-Flag"] is None and msg["X-Spam-Status"] is None and b"SPAM***" not in data
    assert msg["X-MailGate-Released"].startswith("by alice ")
    m = BayesModel.load(str(c.model))
    assert (m.nham, m.nspam) == (1, 0)
    reload_until(c, f"/message/{qid}", lambda src: "released" in src.lower(), "the release in the message's story")


def test_a_post_without_the_csrf_token_is_refused(console):
    from selenium.webdriver.common.by import By

    c, d = console, console.driver
    qid = quarantine_id(c, "<script>")
    d.get(c.url + f"/quarantine/{qid}")
    d.execute_script("document.querySelector('#act input[name=csrf]').remove()")
    click(c, d.find_element(By.ID, "learn-spam"))
    assert "security token is missing or stale" in d.find_element(By.ID, "error").text
    shot(c, "csrf-refused")
    # with the token, the same click works: learned as spam, still held
    d.get(c.url + f"/quarantine/{qid}")
    click(c, d.find_element(By.ID, "learn-spam"))
    assert f"learned {qid} as spam" in d.find_element(By.CSS_SELECTOR, "p.flash").text
    from classifiers.model import BayesModel

    assert BayesModel.load(str(c.model)).nspam == 1


def test_whatif_shows_the_labels_and_the_config_lines(console):
    from selenium.webdriver.common.by import By

    c, d = console, console.driver
    # released-as-ham and learned-as-spam now label the two held messages (both scored 1000)
    reload_until(c, "/whatif?threshold=5&reject_threshold=900&quarantine_threshold=500",
                 lambda src: re.search(r'id="fp-before">1 of 1<', src) and re.search(r'id="miss-after">0 of 1<', src),
                 "the released message labelled ham and the learned one spam")
    assert d.find_element(By.ID, "changed").text.startswith("2 of ")
    assert "quarantine → reject: 2" in d.find_element(By.ID, "changed").text
    assert d.find_element(By.ID, "miss-after").text == "0 of 1"
    assert d.find_element(By.ID, "config-lines").text == \
        "[spam]\nthreshold = 5\nreject_threshold = 900\nquarantine_threshold = 500"
    shot(c, "whatif")


def test_a_viewer_cannot_release(console):
    from selenium.webdriver.common.by import By

    c, d = console, console.driver
    qid = quarantine_id(c, "<script>")
    login(c, "vic", "vic-password")
    d.get(c.url + f"/quarantine/{qid}")
    assert not d.find_elements(By.ID, "release")  # no button for a viewer
    # and a forged form (with the viewer's own valid token) is refused by the server
    click(c, None, """
        const f = document.createElement('form'); f.method = 'post'; f.action = '/quarantine';
        for (const [k, v] of [['csrf', document.querySelector('input[name=csrf]').value],
                              ['action', 'release'], ['id', arguments[0]]]) {
            const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i);
        }
        document.body.appendChild(f); f.submit();""", qid)
    assert "vic is a viewer" in d.find_element(By.ID, "error").text
    login(c, "alice", "alice-password")
    assert quarantine_id(c, "<script>") == qid  # still held


def test_queue_and_audit_pages(console):
    from selenium.webdriver.common.by import By

    c, d = console, console.driver
    d.get(c.url + "/queue")
    assert d.find_element(By.ID, "queue")
    shot(c, "queue")
    reload_until(c, "/audit", lambda src: "release_learn_ham" in src and "csrf_refused" in src
                 and "forbidden" in src and "login" in src, "the audit trail")
    text = d.find_element(By.ID, "audit").text
    assert "web:alice" in text and "web:vic" in text
    shot(c, "audit")


def test_metrics_are_served_on_the_console_listener(console):
    import urllib.request

    with urllib.request.urlopen(console.url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert re.search(r'^mailgate_messages_total\{action="quarantine"\} 2\.0$', text, re.M), text[:2000]
