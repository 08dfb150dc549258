"""The sa_rules check: config, shipped rules, results, DNSBL mapping, stock rules."""

from __future__ import annotations

import os

import pytest

from gateway import config as cfg
from gateway.plugins import Services
from gateway.records import Envelope, Message, Recipient, Result, Session, Transaction
from rules.sa_check import SHIPPED_RULES, RulesSettings, SaRules, default_dirs, load_engine, rule_dirs, stock_dirs

PHISH = (b"From: \"Support support@bank.test\" <x@evil.test>\r\nTo: bob@example.test\r\n"
         b"Subject: Account notice\r\nContent-Type: text/plain\r\n\r\n"
         b"Please verify your account today: http://192.0.2.7/login\r\n")


def _config(tmp_path, text: str):
    path = tmp_path / "mailgate.toml"
    path.write_text("[server]\nhostname = \"mx.gateway.test\"\n" + text)
    return cfg.load(str(path))


def _txn(raw: bytes, results=()) -> Transaction:
    env = Envelope("Q1", "x@evil.test", recipients=[Recipient("bob@example.test", "example.test")])
    env.results.extend(results)
    return Transaction(Session("Q1", "192.0.2.1", helo="evil.test"), env, Message(raw))


def test_shipped_rules_are_found_next_to_the_package():
    assert os.path.isfile(os.path.join(SHIPPED_RULES, "50_mailgate.cf"))
    assert default_dirs()[0] == SHIPPED_RULES
    assert rule_dirs(RulesSettings()) == [SHIPPED_RULES]  # the stock set is opt-in: ~7 ms a message
    rs = load_engine(RulesSettings(dirs=[SHIPPED_RULES])).rs
    assert not rs.skipped and not rs.problems
    assert len(rs.rules) > 20


def test_check_reports_hits_with_scores(tmp_path):
    config = _config(tmp_path, f"[rules]\ndirs = [{SHIPPED_RULES!r}]\n")
    check = SaRules.from_config(config, Services(reactor=None))
    results = check.check(_txn(PHISH))
    by_symbol = {r.symbol: r for r in results}
    assert {"MG_FROM_NAME_HAS_ADDR", "MG_VERIFY_ACCOUNT", "MG_URI_IP_HOST", "MG_PHISH_LINK"} <= set(by_symbol)
    assert by_symbol["MG_PHISH_LINK"].score == 2.5
    assert all(isinstance(r, Result) and r.score != 0 for r in results)


def test_local_directory_overrides_shipped_scores(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "local.cf").write_text("score MG_PHISH_LINK 6.0\nbody LOCAL_RULE /verify your account/i\n"
                                    "score LOCAL_RULE 0.7\n")
    config = _config(tmp_path, f"[rules]\ndirs = [{SHIPPED_RULES!r}, {str(local)!r}]\n")
    by_symbol = {r.symbol: r for r in SaRules.from_config(config, Services(reactor=None)).check(_txn(PHISH))}
    assert by_symbol["MG_PHISH_LINK"].score == 6.0 and by_symbol["LOCAL_RULE"].score == 0.7


def test_config_lists_feed_welcomelist_and_blocklist_rules(tmp_path):
    config = _config(tmp_path, f"[rules]\ndirs = [{SHIPPED_RULES!r}]\nblocklist_from = [\"*@EVIL.test\"]\n")
    symbols = {r.symbol for r in SaRules.from_config(config, Services(reactor=None)).check(_txn(PHISH))}
    assert "MG_FROM_BLOCKLISTED" in symbols


def test_bad_rules_config_is_refused(tmp_path):
    with pytest.raises(cfg.ConfigError):
        _config(tmp_path, "[rules]\nscore_set = 7\n")
    with pytest.raises(cfg.ConfigError):
        _config(tmp_path, "[rules]\nnope = 1\n")


def test_dnsbl_listings_of_the_mail_stage_feed_check_rbl(tmp_path):
    rules = tmp_path / "r"
    rules.mkdir()
    (rules / "dnsbl.cf").write_text("header __RCVD_IN_ZEN eval:check_rbl('zen', 'zen.test.')\n"
                                    "header RCVD_IN_SBL eval:check_rbl_sub('zen', '127.0.0.2')\n"
                                    "score RCVD_IN_SBL 2.0\n"
                                    "meta ZEN_AND_PHISH __RCVD_IN_ZEN && MG_VERIFY_ACCOUNT\n"
                                    "score ZEN_AND_PHISH 1.0\n")
    dirs = f"[{SHIPPED_RULES!r}, {str(rules)!r}]"
    listing = Result("RBL_ZEN_TEST", 3.0, "zen.test=127.0.0.2")
    config = _config(tmp_path, f"[rules]\ndirs = {dirs}\n")
    check = SaRules.from_config(config, Services(reactor=None))
    symbols = {r.symbol for r in check.check(_txn(PHISH, [listing]))}
    assert "ZEN_AND_PHISH" in symbols
    assert "RCVD_IN_SBL" not in symbols  # the dnsbl check already scored the listing
    assert "ZEN_AND_PHISH" not in {r.symbol for r in check.check(_txn(PHISH))}
    config = _config(tmp_path, f"[rules]\ndirs = {dirs}\nscore_dnsbl_rules = true\n")
    symbols = {r.symbol for r in SaRules.from_config(config, Services(reactor=None)).check(_txn(PHISH, [listing]))}
    assert "RCVD_IN_SBL" in symbols


def test_the_pipeline_runs_the_rules_in_the_thread_pool():
    from gateway.pipeline import Pipeline
    from gateway.records import Stage
    from tests.gateway.test_auth import HeldThreads

    threads = HeldThreads()
    check = SaRules(load_engine(RulesSettings(dirs=[SHIPPED_RULES])), RulesSettings(dirs=[SHIPPED_RULES]))
    out = []
    Pipeline([check], run_in_thread=threads).run(Stage.DATA, _txn(PHISH)).addCallback(out.extend)
    assert out == [] and len(threads.pending) == 1  # nothing evaluated on the calling thread
    threads.run_all()
    assert out and all(r.symbol for r in out)


@pytest.fixture
def stock_rules():
    """SpamAssassin's rules, from the Debian package (in CI: required, never skipped)."""
    from tests.support.programs import require_program

    require_program("spamassassin")
    dirs = stock_dirs()
    assert dirs, "the spamassassin package is installed but no stock rules were found"
    return dirs


def test_stock_rules_load_and_most_regex_rules_run(capsys, stock_rules, tmp_path):
    engine = load_engine(RulesSettings(stock_rules=True, cache_dir=str(tmp_path)))
    rs = engine.rs
    regex_loaded = sum(1 for r in rs.rules.values() if r.parsed is not None)
    regex_skipped = sum(1 for s in rs.skipped.values() if s.regex)
    share = regex_skipped / (regex_loaded + regex_skipped)
    with capsys.disabled():
        print(f"\nstock rules: {len(rs.rules)} loaded, {len(rs.skipped)} skipped; "
              f"regex rules skipped: {regex_skipped}/{regex_loaded + regex_skipped} ({100 * share:.1f}%)")
    assert regex_loaded > 1000
    assert share < 0.10
    results = engine.run(__import__("rules.sa.message", fromlist=["MessageView"]).MessageView(PHISH))
    assert isinstance(results, dict)


# --- end to end through `mailgate run` ---------------------------------------------


def test_e2e_shipped_rules_show_in_x_spam_status(mailgate, sink):
    from tests.rules.test_sender_auth import only_checks

    gw = mailgate(extra_toml=f"[rules]\ndirs = [{SHIPPED_RULES!r}]\n" + only_checks("sa_rules"))
    with gw.smtp() as smtp:
        smtp.sendmail("x@evil.test", ["bob@example.test"], PHISH)
    sink.wait_for(1, timeout=20)
    head = sink.messages[0].data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    status = [line for line in head.split(b"\r\n") if line.startswith(b"X-Spam-Status:")][0]
    assert b"MG_PHISH_LINK=2.5" in status and b"MG_VERIFY_ACCOUNT=1" in status


def test_e2e_stock_rules_opt_in_and_gtube_counted_once(mailgate, sink, stock_rules):
    from rules.gtube import GTUBE
    from tests.rules.test_sender_auth import only_checks

    gw = mailgate(extra_toml="[spam]\nreject_threshold = 100000\n[rules]\nstock_rules = true\n"
                  + only_checks("sa_rules", "gtube"))
    no_to = b"From: x@evil.test\r\nSubject: hello\r\nDate: Sat, 28 Nov 2026 19:00:00 +0000\r\n\r\nhi\r\n"
    gtube = b"From: x@evil.test\r\nTo: bob@example.test\r\nSubject: test\r\n\r\n" + GTUBE + b"\r\n"
    with gw.smtp() as smtp:
        smtp.sendmail("x@evil.test", ["bob@example.test"], no_to)
        smtp.sendmail("x@evil.test", ["bob@example.test"], gtube)
    sink.wait_for(2, timeout=20)
    heads = [m.data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
             for m in sink.messages[:2]]
    plain = next(h for h in heads if b"Subject: hello" in h)
    spam = next(h for h in heads if b"Subject: hello" not in h)
    assert b"MISSING_HEADERS=" in plain  # SpamAssassin's rule, from /usr/share/spamassassin
    assert spam.count(b"GTUBE=1000") == 1  # rules/gtube.py scores it; the SA rule of that name does not
    score = float(spam.split(b"X-Spam-Score: ")[1].split(b"\r\n")[0])
    assert 990 <= score < 1100  # GTUBE once, give or take the other rules (ALL_TRUSTED for loopback)


def test_relay_pseudo_headers_take_rdns_from_our_received_header():
    from rules.sa_check import client_relay, relays_header

    raw = (b"Received: from mail.sender.test (mail.sender.test [192.0.2.1])\r\n\tby mx.gateway.test (MailGate)"
           b" with ESMTP id Q1;\r\n\tSat, 28 Nov 2026 19:00:00 +0000\r\n" + PHISH)
    txn = Transaction(Session("Q1", "192.0.2.1", helo="mail.sender.test"), Envelope("Q1", "x@evil.test"),
                      Message(raw))
    relay = client_relay(txn)
    assert relay["rdns"] == "mail.sender.test" and not relay["trusted"]
    entry = relays_header(txn, "mx.gateway.test")["x-spam-relays-untrusted"]
    assert entry.startswith(b"[ ip=192.0.2.1 rdns=mail.sender.test helo=mail.sender.test by=mx.gateway.test")
    unconfirmed = raw.replace(b"(mail.sender.test [192.0.2.1])", b"([192.0.2.1])")
    assert client_relay(Transaction(txn.session, txn.envelope, Message(unconfirmed)))["rdns"] == ""


def test_relay_evals_see_the_session(tmp_path):
    rules = tmp_path / "r"
    rules.mkdir()
    (rules / "relay.cf").write_text(
        "ifplugin Mail::SpamAssassin::Plugin::RelayEval\nheader ALL_TRUSTED eval:check_all_trusted()\n"
        "tflags ALL_TRUSTED nice\nheader HELO_IP eval:helo_ip_mismatch()\n"
        "header DOTCOM eval:check_for_no_rdns_dotcom_helo()\nendif\n")
    check = SaRules(load_engine(RulesSettings(dirs=[str(rules)])), RulesSettings(dirs=[str(rules)]))
    env = Envelope("Q1", "x@evil.test")
    trusted = Transaction(Session("Q1", "10.0.0.5", helo="pc1.example.test", trusted=True), env, Message(PHISH))
    assert [(r.symbol, r.score) for r in check.check(trusted)] == [("ALL_TRUSTED", -1.0)]
    forged = Transaction(Session("Q1", "192.0.2.1", helo="[198.51.100.7]"), env, Message(PHISH))
    assert {r.symbol for r in check.check(forged)} == {"HELO_IP"}
    dotcom = Transaction(Session("Q1", "192.0.2.1", helo="mx.hotmail.com"), env, Message(PHISH))
    assert {r.symbol for r in check.check(dotcom)} == {"DOTCOM"}


def test_engine_is_reused_across_reloads_until_a_rule_file_changes(tmp_path):
    import os as _os

    from rules.sa_check import cached_engine

    rules = tmp_path / "r"
    rules.mkdir()
    (rules / "a.cf").write_text("header A Subject =~ /x/\n")
    settings = RulesSettings(dirs=[str(rules)])
    store: dict = {}
    first = cached_engine(settings, store)
    assert cached_engine(settings, store) is first
    assert cached_engine(RulesSettings(dirs=[str(rules)], score_set=0), store) is not first
    (rules / "a.cf").write_text("header A Subject =~ /x/\nheader B Subject =~ /y/\n")
    _os.utime(rules / "a.cf", ns=(1, 1))
    assert set(cached_engine(settings, store).rs.rules) == {"A", "B"}


def test_stock_rules_hit_the_same_with_and_without_the_prefilter(stock_rules, tmp_path):
    from rules.sa.engine import Engine
    from rules.sa.message import MessageView
    from rules.sa.ruleset import load
    from tests.rules.test_sa_engine import HTML, PLAIN, SPAMMY, msg

    spam = [
        msg("From: Pharmacy <rx@evil.test>\nTo: you@example.test\nSubject: V-i-a-g-r-a 80% off",
            "Cheap V 1 A G R A, C-i-a-l-i-s and x a n a x, no prescription!\n\n"
            "Order now at http://pills.evil.test/buy and save.\n"),
        msg("From: Barrister James <claims@evil.test>\nTo: you@example.test\nSubject: URGENT REPLY",
            "I am Barrister James. You have won the sum of US$ 5,500,000.00 (FIVE MILLION FIVE HUNDRED "
            "THOUSAND DOLLARS) in our lottery.\n\nTo claim, send:\n1. Your full name:\n2. Your address:\n"
            "3. Your phone number:\n4. Your date of birth:\n5. Your occupation:\n6. Your bank account:\n"),
        msg("From: Security <it@evil.test>\nTo: you@example.test\nSubject: Your mailbox will be deactivated",
            "Your email account will be deactivated today. Verify your password here to avoid losing "
            "important messages: <a href=\"http://login.evil.test/\">http://example.test/</a>\n",
            ctype="text/html"),
    ]
    dirs = [SHIPPED_RULES] + stock_rules
    fast = Engine(load(dirs), cache_dir=str(tmp_path))
    slow = Engine(load(dirs), use_prefilter=False)
    covered = set().union(*(p.covered for p in fast.prefilters.values()))
    assert len(covered) > 500
    hit_behind_prefilter = set()
    for raw in [PLAIN, SPAMMY, HTML] + spam:
        hits = fast.run(MessageView(raw))
        assert hits == slow.run(MessageView(raw))
        hit_behind_prefilter |= set(hits) & covered
    assert len(hit_behind_prefilter) >= 5, hit_behind_prefilter  # the comparison saw real hits
