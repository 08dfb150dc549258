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
    forged = Transaction(Session("Q1", "192.0.2.1", helo="198.51.100.7"), env, Message(PHISH))
    assert {r.symbol for r in check.check(forged)} == {"HELO_IP"}
    # SpamAssassin reads a bracketed literal as "!198.51.100.7!": no address, no test
    literal = Transaction(Session("Q1", "192.0.2.1", helo="[198.51.100.7]"), env, Message(PHISH))
    assert {r.symbol for r in check.check(literal)} == set()
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


# --- the Received chain behind our session ------------------------------------------------

_EARLIER = (b"Received: from mail.sender.test (mail.sender.test [203.0.113.10])\r\n\tby relay.partner.test "
            b"(Postfix) with ESMTP id 4G5x2Y1abcz;\r\n\tTue, 12 Mar 2024 10:01:00 +0000\r\n")


def _live(ip: str, rdns: str = "", auth=None) -> Transaction:
    from gateway.headers import received_header

    ours = received_header("relay.partner.test", rdns or None, ip, "mx.gateway.test", "Q1",
                           "ESMTPA" if auth else "ESMTP", "bob@example.test", now=1710237662)
    return Transaction(Session("Q1", ip, helo="relay.partner.test", esmtp=True, auth_user=auth),
                       Envelope("Q1", "x@sender.test"), Message(ours + _EARLIER + PHISH))


def test_live_our_session_is_the_newest_hop_and_is_not_counted_twice():
    from rules.sa_check import relay_chain

    # a public client: it and every earlier hop are untrusted
    chain = relay_chain(_live("192.0.2.1", "relay.partner.test"), hostname="mx.gateway.test")
    assert [(r.ip, r.index) for r in chain.untrusted] == [("192.0.2.1", 0), ("203.0.113.10", 1)]
    assert chain.trusted == [] and chain.untrusted[0].as_string() == (
        "[ ip=192.0.2.1 rdns=relay.partner.test helo=relay.partner.test by=mx.gateway.test ident= envfrom= intl=0 "
        "id=Q1 auth= msa=0 ]")
    # a private client (an internal relay): walked through to the hop it got the message from
    inner = relay_chain(_live("10.0.0.5"), hostname="mx.gateway.test")
    assert [r.ip for r in inner.trusted] == ["10.0.0.5"] and [r.ip for r in inner.untrusted] == ["203.0.113.10"]
    assert inner.trusted[0].no_reverse_dns
    # an authenticated one too, with SpamAssassin's token for it
    authed = relay_chain(_live("192.0.2.1", auth="carol"), hostname="mx.gateway.test")
    assert [(r.ip, r.auth) for r in authed.trusted] == [("192.0.2.1", "ESMTPA")]
    # configured: the partner relay is trusted, so the sender's hop is the first untrusted
    trust = RulesSettings(trusted_networks=["192.0.2.0/24"]).trust()
    configured = relay_chain(_live("192.0.2.1", "relay.partner.test"), trust, "mx.gateway.test")
    assert [r.ip for r in configured.trusted] == ["192.0.2.1"]
    assert configured.untrusted[0].rdns == "mail.sender.test"


def test_offline_the_file_is_read_as_spamassassin_reads_it():
    from rules.sa.received import parse_message
    from rules.sa_check import relay_chain

    raw = _EARLIER + PHISH
    env = Envelope("offline", "x@sender.test")
    found = relay_chain(Transaction(Session("offline", "203.0.113.10"), env, Message(raw)))
    assert found.pseudo_headers() == parse_message(raw).pseudo_headers()
    # a client the file does not name (score --client-ip) is the newest hop
    given = relay_chain(Transaction(Session("offline", "198.51.100.7", helo="given.test"), env, Message(raw)),
                        hostname="mx.gateway.test")
    assert [r.ip for r in given.untrusted] == ["198.51.100.7", "203.0.113.10"]
    assert given.last_trusted_relay_index == -2  # it wrote no header
    # no Received header and no client known: no relays at all
    assert relay_chain(Transaction(Session("offline", "0.0.0.0"), env, Message(PHISH))).untrusted == []


def test_network_settings_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an IP address or network"):
        RulesSettings(trusted_networks=["mx.example.org"])
    assert RulesSettings().trust().trusted is None
    assert RulesSettings(internal_networks=["10."]).trust().internal.contains("10.1.2.3")


def test_e2e_relay_rules_see_our_session_and_the_hops_before_it(mailgate, sink, tmp_path):
    from tests.rules.test_sender_auth import only_checks

    rules = tmp_path / "cf"
    rules.mkdir()
    (rules / "relay.cf").write_text(
        "header ALL_TRUSTED eval:check_all_trusted()\ntflags ALL_TRUSTED nice\nscore ALL_TRUSTED -1.0\n"
        "header T_RDNS_NONE X-Spam-Relays-External =~ /^[^\\]]+ rdns= /\nscore T_RDNS_NONE 0.7\n"
        "header T_TWO_HOPS X-Spam-Relays-Trusted =~ /^\\[ ip=127\\.0\\.0\\.1 [^\\]]+ by=mx\\.gateway\\.test /\n"
        "score T_TWO_HOPS 0.1\nheader T_TRUSTED_TWICE X-Spam-Relays-Trusted =~ /\\] \\[/\nscore T_TRUSTED_TWICE 5\n")
    gw = mailgate(extra_toml=f'[rules]\ndirs = ["{rules}"]\n' + only_checks("sa_rules"))
    earlier = (b"Received: from mail1.sender.test ([198.51.100.23])\r\n\tby relay.example.test (8.15.2/8.15.2) "
               b"with ESMTP id h2F0c2x31856;\r\n\tTue, 12 Mar 2024 10:01:03 +0000\r\n")
    with gw.smtp() as smtp:
        smtp.sendmail("x@evil.test", ["bob@example.test"], PHISH)  # from loopback: all trusted
        smtp.sendmail("x@evil.test", ["bob@example.test"], earlier + PHISH)  # relayed for a host with no rDNS
    sink.wait_for(2, timeout=20)
    status = []
    for m in sink.messages[:2]:
        head = m.data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
        status.append([line for line in head.split(b"\r\n") if line.startswith(b"X-Spam-Status:")][0])
    local = next(s for s in status if b"T_RDNS_NONE" not in s)
    relayed = next(s for s in status if s is not local)
    assert b"ALL_TRUSTED=-1" in local and b"T_TWO_HOPS=0.1" in local and b"T_TRUSTED_TWICE" not in local
    # our loopback hop is trusted and counted once; the host before it is the untrusted one
    assert b"ALL_TRUSTED" not in relayed and b"T_RDNS_NONE=0.7" in relayed and b"T_TWO_HOPS=0.1" in relayed


# --- score sets: picked as SpamAssassin does ------------------------------------------


def test_score_set_is_net_bit_plus_bayes_bit_unless_configured():
    from rules.sa_check import pick_score_set

    auto = RulesSettings()
    assert auto.score_set is None
    assert [pick_score_set(auto, net, bayes) for net, bayes in
            ((False, False), (True, False), (False, True), (True, True))] == [0, 1, 2, 3]
    assert pick_score_set(RulesSettings(score_set=1), False, True) == 1  # an explicit set wins


def test_network_tests_are_off_only_when_every_network_check_is():
    from types import SimpleNamespace

    from rules.sa_check import NETWORK_CHECKS, network_tests_on

    assert network_tests_on(SimpleNamespace(checks=SimpleNamespace(disabled=[])))
    assert network_tests_on(SimpleNamespace(checks=SimpleNamespace(disabled=["dnsbl", "uribl"])))
    assert not network_tests_on(SimpleNamespace(checks=SimpleNamespace(disabled=list(NETWORK_CHECKS))))


def test_stock_scores_switch_to_the_bayes_sets_while_a_trained_model_is_loaded(tmp_path):
    rules = tmp_path / "r"
    rules.mkdir()
    (rules / "a.cf").write_text("header S1 Subject =~ /locked/i\nscore S1 1.0 2.0 3.0 4.0\n")
    settings = RulesSettings(dirs=[str(rules)])
    extra: dict = {}
    check = SaRules(load_engine(settings), settings, network_tests=False, bayes_ready=extra)
    raw = b"From: a@example.org\r\nSubject: account locked\r\n\r\nx\r\n"
    assert [(r.symbol, r.score) for r in check.evaluate(_txn(raw))] == [("S1", 1.0)]  # set 0
    ready = {"on": False}
    extra["bayes.ready"] = lambda: ready["on"]  # what the Bayes check publishes
    assert [r.score for r in check.evaluate(_txn(raw))] == [1.0]  # a model that cannot scan yet
    ready["on"] = True
    assert [r.score for r in check.evaluate(_txn(raw))] == [3.0]  # set 2
    net = SaRules(load_engine(settings), settings, network_tests=True, bayes_ready=extra)
    assert [r.score for r in net.evaluate(_txn(raw))] == [4.0]  # set 3


def test_bayes_check_publishes_whether_it_can_scan(tmp_path):
    from types import SimpleNamespace

    from classifiers.bayes_check import BayesCheck, BayesSettings

    services = Services(reactor=None, run_in_thread=lambda f, *a: f(*a))
    config = SimpleNamespace(bayes=BayesSettings(model=str(tmp_path / "none.model")))
    BayesCheck.from_config(config, services)
    assert services.extra["bayes.ready"]() is False  # no model file
