"""The rules engine: a table of rule files and messages with the hits expected."""

from __future__ import annotations

import pytest

from rules.sa.engine import Engine, hits_report
from rules.sa.evals import EvalContext
from rules.sa.message import MessageView
from rules.sa.ruleset import load_text


def msg(headers: str, body: str = "Hello.\n", ctype: str = "text/plain") -> bytes:
    head = headers.strip("\n").replace("\n", "\r\n")
    return (f"{head}\r\nContent-Type: {ctype}; charset=utf-8\r\n\r\n" + body.replace("\n", "\r\n")).encode()


PLAIN = msg("From: Alice <alice@example.test>\nTo: bob@example.test\nSubject: Quarterly report",
            "Dear Bob,\n\nplease find the figures below.\nRegards\n")
SPAMMY = msg(
    "From: \"PayPal Support paypal@service.test\" <x@evil.test>\nSubject: Your account is LOCKED\n"
    "X-Mailer: BulkBlaster 3.0\nReply-To: <y@evil.test>",
    "Dear customer,\n\nyour account\nhas been locked. Click here now! Click here!\n\n"
    "Visit http://192.0.2.7/login or http://bit.ly/abc today.\n")
HTML = msg("From: a@b.test\nTo: c@d.test\nSubject: offer",
           "<html><head><title>Offer</title></head><body><p>Buy <b>CHEAP</b> watches</p>"
           "<a href=\"http://shop.evil.test/w\">here</a><blink>x</blink><foo>y</foo></body></html>\n",
           ctype="text/html")

CASES = [
    # header: =~, !~, :name, :addr, :raw, exists:, if-unset
    ("header H1 Subject =~ /locked/i", SPAMMY, {"H1"}),
    ("header H2 Subject !~ /locked/i", SPAMMY, set()),
    ("header H2 Subject !~ /locked/i", PLAIN, {"H2"}),
    ("header H3 From:name =~ /paypal/i", SPAMMY, {"H3"}),
    ("header H4 From:addr =~ /\\@evil\\.test$/", SPAMMY, {"H4"}),
    ("header H4 From:addr =~ /paypal/", SPAMMY, set()),
    ("header H5 exists:X-Mailer", SPAMMY, {"H5"}),
    ("header H5 exists:X-Mailer", PLAIN, set()),
    ("header H6 X-Missing =~ /^UNSET$/ [if-unset: UNSET]", PLAIN, {"H6"}),
    ("header H7 ToCc =~ /bob\\@/", PLAIN, {"H7"}),
    ("header H8 ALL =~ /^X-Mailer: Bulk/m", SPAMMY, {"H8"}),
    ("header H9 Subject =~ /report$/", PLAIN, {"H9"}),  # $ before the value's newline, as in Perl
    # body: rendered, one paragraph at a time, Subject first
    ("body B1 /your account has been locked/i", SPAMMY, {"B1"}),  # lines of a paragraph joined
    ("body B2 /locked\\. Click here now! Click here! Visit/", SPAMMY, set()),  # not across paragraphs
    ("body B3 /^Your account is LOCKED$/", SPAMMY, {"B3"}),  # the Subject is the first paragraph
    ("body B4 /Buy CHEAP watches/", HTML, {"B4"}),  # HTML rendered
    ("body B5 /<b>/", HTML, set()),
    ("rawbody R1 /<b>CHEAP<\\/b>/", HTML, {"R1"}),  # rawbody keeps the tags
    ("full F1 /^X-Mailer: BulkBlaster/m", SPAMMY, {"F1"}),
    ("uri U1 /^http:\\/\\/192\\.0\\.2\\.7\\//", SPAMMY, {"U1"}),
    ("uri U2 m{^http://shop\\.evil\\.test/}", HTML, {"U2"}),
    ("mimeheader M1 Content-Type =~ /text\\/html/", HTML, {"M1"}),
    # tflags multiple / maxhits: the count feeds meta arithmetic
    ("body C1 /click here/i\ntflags C1 multiple\nmeta C2 C1 >= 2", SPAMMY, {"C1", "C2"}),
    ("body C1 /click here/i\ntflags C1 multiple maxhits=1\nmeta C2 C1 >= 2", SPAMMY, {"C1"}),
    # meta: boolean and arithmetic, rules that did not hit are 0, ! binds to its operand
    ("header __A Subject =~ /locked/i\nheader __B exists:X-Mailer\nmeta M3 __A && __B", SPAMMY, {"M3"}),
    ("header __A Subject =~ /locked/i\nheader __N exists:X-Nope\nmeta M4 __A && !__N", SPAMMY, {"M4"}),
    ("header __A Subject =~ /locked/i\nheader __B exists:X-Mailer\nheader __N exists:X-Nope\n"
     "meta M5 (__A + __B + __N) > 1", SPAMMY, {"M5"}),
    # a rule defined nowhere reads as 0, as in SpamAssassin 4 (Check.pm do_meta_tests)
    ("header __A Subject =~ /locked/i\nmeta M9 __A && !__UNDEFINED", SPAMMY, {"M9"}),
    ("header __A Subject =~ /locked/i\nmeta M9 __A && __UNDEFINED", SPAMMY, set()),
    # a skipped rule is defined: it just never hits
    ("header __A Subject =~ /locked/i\nbody __K /a\\Kb/\nmeta M10 __A && !__K", SPAMMY, {"M10"}),
    ("header __A Subject =~ /locked/i\nmeta M6 !__A + 1 > 1", SPAMMY, set()),
    ("header __X exists:X-Nope\nmeta M7 M8 || 0\nmeta M8 __X", PLAIN, set()),
    # evals
    ("header E1 eval:check_for_missing_to_header()", SPAMMY, {"E1"}),
    ("header E1 eval:check_for_missing_to_header()", PLAIN, set()),
    ("blacklist_from *@evil.test\nheader E2 eval:check_from_in_blacklist()", SPAMMY, {"E2"}),
    ("whitelist_from alice@example.test\nheader E3 eval:check_from_in_whitelist()", PLAIN, {"E3"}),
    ("body E4 eval:html_test('html')", HTML, {"E4"}),
    ("body E5 eval:html_range('bad_tag_ratio', '0.1', 'inf')", HTML, {"E5"}),
    ("body E6 eval:html_tag_exists('blink')", HTML, {"E6"}),
    ("body E7 eval:html_text_match('title', 'Offer')", HTML, {"E7"}),
    ("body E8 eval:check_for_mime_html_only()", HTML, {"E8"}),
    # ifplugin / if / else
    ("ifplugin Mail::SpamAssassin::Plugin::Bayes\nheader I1 Subject =~ /./\nendif", SPAMMY, set()),
    ("ifplugin Mail::SpamAssassin::Plugin::HTMLEval\nheader I2 Subject =~ /./\nendif", SPAMMY, {"I2"}),
    ("if (version >= 3.004000)\nheader I3 Subject =~ /./\nelse\nheader I4 Subject =~ /./\nendif",
     SPAMMY, {"I3"}),
    ("if !plugin(Mail::SpamAssassin::Plugin::DKIM)\nheader I5 Subject =~ /./\nendif", SPAMMY, {"I5"}),
    # ReplaceTags
    ("replace_tag CK (?:c|k)\nbody T1 /<CK>lick here/i\nreplace_rules T1", SPAMMY, {"T1"}),
    ("replace_tag L [l1]\nreplace_inter W [\\s.]?\nbody T2 /<inter W><L><L>/\nreplace_rules T2",
     msg("Subject: x", "l.1 x\n"), {"T2"}),
    # a later definition replaces the earlier one
    ("header D1 Subject =~ /nomatch/\nheader D1 Subject =~ /locked/i", SPAMMY, {"D1"}),
    # Perl constructs translated for Python
    ("body P1 /[[:upper:]]{6}\\z/", SPAMMY, {"P1"}),
    ("body P2 /account(?i)\\s+HAS BEEN/", SPAMMY, {"P2"}),
    ("header P3 Subject =~ /\\x{4f}CKED/i", SPAMMY, {"P3"}),
]


@pytest.mark.parametrize("use_prefilter", [True, False], ids=["hyperscan", "python-only"])
@pytest.mark.parametrize("rules,raw,expected", CASES, ids=[c[0].splitlines()[-1][:60] for c in CASES])
def test_rule_table(rules, raw, expected, use_prefilter):
    rs = load_text(rules)
    assert set(rs.skipped) <= {"__K"}, rs.skipped
    engine = Engine(rs, use_prefilter=use_prefilter)
    hits = engine.run(MessageView(raw))
    assert {h for h in hits if not h.startswith("__")} == expected


def test_scores_one_or_four_values_and_the_set_picked():
    rs = load_text("header S1 Subject =~ /locked/i\nscore S1 1.0 2.0 3.0 4.0\n"
                   "header S2 Subject =~ /locked/i\nscore S2 0.5\n"
                   "header S3 Subject =~ /locked/i\n"
                   "header T_S4 Subject =~ /locked/i\n"
                   "header S5 Subject =~ /locked/i\nscore S5 0\n"
                   "describe S1 first rule\n")
    for score_set, s1 in ((0, 1.0), (1, 2.0), (3, 4.0)):
        engine = Engine(rs, score_set=score_set)
        report = {h.name: h for h in hits_report(engine, engine.run(MessageView(SPAMMY)))}
        assert report["S1"].score == s1 and report["S1"].describe == "first rule"
        assert report["S2"].score == 0.5
        assert report["S3"].score == 1.0  # SpamAssassin's default
        assert report["T_S4"].score == 0.01  # testing rules
        assert "S5" not in report  # score 0 switches a rule off


def test_later_score_line_overrides_earlier_file(tmp_path):
    from rules.sa.ruleset import load

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "10_rules.cf").write_text("header S1 Subject =~ /locked/i\nscore S1 3.0\n")
    (tmp_path / "b" / "local.cf").write_text("score S1 0.25\n")
    rs = load([str(tmp_path / "a"), str(tmp_path / "b")])
    assert rs.score_of("S1", 1) == 0.25


def test_include_reads_relative_files_and_stops_loops(tmp_path):
    from rules.sa.ruleset import load

    (tmp_path / "main.cf").write_text("include extra.inc\nheader A Subject =~ /x/\n")
    (tmp_path / "extra.inc").write_text("include main.cf\nheader B Subject =~ /y/\n")
    rs = load([str(tmp_path / "main.cf")])
    assert {"A", "B"} <= set(rs.rules)
    assert any("include loop" in p for p in rs.problems)


def test_unusable_rules_are_skipped_with_file_and_line():
    rs = load_text("body OK /fine/\nbody K1 /foo\\Kbar/\nbody E1 eval:check_no_such_eval()\n"
                   "body BAD /unterminated\nheader BADH Subject =~ /x/ [if-unset: y]\n"
                   "body LB /(?<=a+)b/\n", path="local.cf")
    assert set(rs.rules) == {"OK", "BADH"}
    reasons = {n: (s.source, s.reason, s.regex) for n, s in rs.skipped.items()}
    assert reasons["K1"][0] == "local.cf:2" and "\\K" in reasons["K1"][1] and reasons["K1"][2]
    assert reasons["E1"][0] == "local.cf:3" and "not implemented" in reasons["E1"][1]
    assert not reasons["E1"][2]  # an eval, not a regex rule
    assert reasons["BAD"][0] == "local.cf:4"
    assert "look-behind" in reasons["LB"][1] or "lookbehind" in reasons["LB"][1]


def test_dnsbl_evals_read_the_gateway_dnsbl_answers():
    rs = load_text("header __RCVD_IN_ZEN eval:check_rbl('zen', 'zen.test.')\n"
                   "header RCVD_IN_SBL eval:check_rbl_sub('zen', '127.0.0.2')\n"
                   "header RCVD_IN_XBL eval:check_rbl('zen-lastexternal', 'zen.test.', '^127\\.0\\.0\\.[4-7]$')\n"
                   "header RCVD_IN_BITS eval:check_rbl_sub('zen', '8')\n"
                   "meta RCVD_IN_ZEN_ANY __RCVD_IN_ZEN\n")
    engine = Engine(rs)
    view = MessageView(PLAIN)
    assert engine.run(view, EvalContext(view, dnsbl={})) == {}
    hits = engine.run(view, EvalContext(view, dnsbl={"zen.test": ["127.0.0.2"]}))
    assert set(hits) == {"__RCVD_IN_ZEN", "RCVD_IN_ZEN_ANY", "RCVD_IN_SBL"}
    hits = engine.run(view, EvalContext(view, dnsbl={"zen.test": ["127.0.0.4", "127.0.0.10"]}))
    assert set(hits) == {"__RCVD_IN_ZEN", "RCVD_IN_ZEN_ANY", "RCVD_IN_XBL", "RCVD_IN_BITS"}


def test_gtube_rule_is_evaluated_but_not_reported_when_owned_elsewhere():
    rs = load_text("body GTUBE /XJS\\*C4JDBQADN1\\.NSBN3\\*2IDNEN\\*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL\\*C\\.34X/\n"
                   "score GTUBE 1000\nmeta GTUBE_SEEN GTUBE\nscore GTUBE_SEEN 0.1\n")
    engine = Engine(rs, owned_elsewhere={"GTUBE"})
    raw = msg("Subject: t", "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n")
    hits = engine.run(MessageView(raw))
    assert {"GTUBE", "GTUBE_SEEN"} <= set(hits)
    assert [h.name for h in hits_report(engine, hits)] == ["GTUBE_SEEN"]


def test_metas_with_undefined_dependencies_are_listed_and_read_them_as_zero():
    # SpamAssassin 4 keeps such a meta: the undefined name is 0 (Check.pm do_meta_tests)
    rs = load_text("meta A __NOWHERE\nmeta B C && !__NOWHERE\nheader C Subject =~ /x/\n")
    assert set(rs.disabled) == {"A", "B"} and "__NOWHERE" in rs.disabled["A"]
    assert set(rs.rules) == {"A", "B", "C"}
    hits = Engine(rs).run(MessageView(msg("Subject: x", "body\n")))
    assert hits.get("B") == 1 and not hits.get("A")


def test_nice_rules_default_to_minus_one():
    rs = load_text("header N1 Subject =~ /x/\ntflags N1 nice\n")
    assert rs.score_of("N1", 1) == -1.0


def test_pseudo_headers_are_case_sensitive():
    rs = load_text("header __M exists:MESSAGEID\nheader MALF exists:MessageID\nmeta HAS __M\n")
    raw = msg("Subject: x\nMessage-ID: <1@x.test>")
    assert set(Engine(rs).run(MessageView(raw))) == {"__M", "HAS"}


def test_meta_cycle_is_skipped_not_fatal():
    rs = load_text("meta A B\nmeta B A\nheader C Subject =~ /locked/i\n")
    engine = Engine(rs)
    assert set(engine.run(MessageView(SPAMMY))) == {"C"}
    assert "circular" in (rs.skipped.get("A") or rs.skipped.get("B")).reason


def test_broken_message_never_raises():
    rs = load_text("body B /x/\nrawbody R /x/\nheader H Subject =~ /x/\nuri U /x/\nfull F /x/\n"
                   "body E eval:html_range('length', '0', '10')\n")
    engine = Engine(rs)
    for raw in (b"", b"\x00\xff\xfe", b"Subject: =?bogus?Q?x?=\r\n\r\n<html><a href=", b"no headers at all"):
        engine.run(MessageView(raw))


def test_costly_sub_rules_run_only_when_a_meta_needs_their_answer(monkeypatch):
    rs = load_text("body __COSTLY /\\d+\\s?(?:x|y)z/\nheader __CHEAP exists:X-Mailer\n"
                   "meta BOTH __COSTLY && __CHEAP\nbody __ALSO /\\w\\s?(?:p|q)r/\nmeta EITHER __ALSO || __CHEAP\n")
    engine = Engine(rs)
    assert set(engine.deferred) == {"__COSTLY", "__ALSO"}  # body sub-rules wait to be asked
    ran = []
    real = Engine._count_deferred

    def spy(self, kind, scan, hits):
        ran.append(scan.rule.name)
        return real(self, kind, scan, hits)

    monkeypatch.setattr(Engine, "_count_deferred", spy)
    raw = msg("Subject: order", "please send 12 xz today\nwpr\n")
    assert set(engine.run(MessageView(raw))) == {"__ALSO", "EITHER"}  # no X-Mailer: BOTH is false
    assert ran == ["__ALSO"]  # __COSTLY never ran: the cheap operand decided BOTH
    ran.clear()
    with_mailer = msg("Subject: order\nX-Mailer: m", "please send 12 xz today\n")
    assert set(engine.run(MessageView(with_mailer))) >= {"__COSTLY", "__CHEAP", "BOTH"}
    assert "__COSTLY" in ran


DATED = msg("Received: from a.test by mx.test; Sat, 28 Nov 2026 12:00:00 +0000\n"
            "Date: Sat, 28 Nov 2026 20:00:00 +0000\nSubject: BUY NOW CHEAP WATCHES\nTo: x@y.test",
            ("THIS IS A VERY LOUD MESSAGE WRITTEN IN CAPITALS FROM START TO END, " * 4) + "\n")


@pytest.mark.parametrize("rule,raw,hit", [
    ("header R eval:check_for_shifted_date('6', '12')", DATED, True),  # Date 8 h after Received
    ("header R eval:check_for_shifted_date('-12', '-6')", DATED, False),
    ("header R eval:check_for_shifted_date('undef', '-96')", PLAIN, False),  # no dates: nothing to say
    ("header R eval:subject_is_all_caps()", DATED, True),
    ("header R eval:subject_is_all_caps()", PLAIN, False),
    ("body R eval:check_for_uppercase('75', '100')", DATED, True),
    ("body R eval:check_for_uppercase('75', '100')", SPAMMY, False),
    ("body R eval:html_tag_balance('blink', '== 0')", HTML, True),
    ("body R eval:html_tag_balance('p', '!= 0')", HTML, False),
    ("body R eval:html_eval('length', '< 1000')", HTML, True),
    ("body R eval:html_image_only('0', '400')", HTML, False),
    ("body R eval:check_for_mime_html()", HTML, True),
    ("body R eval:check_for_mime_html()", PLAIN, False),
])
def test_more_native_evals(rule, raw, hit):
    rs = load_text(rule)
    assert not rs.skipped, rs.skipped
    assert ("R" in Engine(rs).run(MessageView(raw))) is hit


def test_prefilter_covers_the_joined_text_kinds_but_not_per_unit_rules():
    rs = load_text("body B1 /locked/\nrawbody R1 /<b>/\nuri U1 /bit\\.ly/\nfull F1 /BulkBlaster/\n"
                   "body S1 /^Your.*LOCKED/s\nheader H1 Subject =~ /locked/i\n")
    engine = Engine(rs)
    assert set(engine.prefilters) == {"body", "rawbody", "uri", "full"}
    assert engine.prefilters["body"].covered == {"B1"}  # /s sees one paragraph at a time: Python only
    view = MessageView(SPAMMY)
    assert set(engine.run(view)) == {"B1", "U1", "F1", "S1", "H1"}


@pytest.mark.parametrize("use_prefilter", [True, False])
def test_nosubject_body_rules_skip_the_subject_line(use_prefilter):
    # 20_meta_tests.cf: __NONEMPTY_BODY /\S/ with tflags nosubject feeds EMPTY_MESSAGE
    rs = load_text("body __NONEMPTY /\\S/\ntflags __NONEMPTY nosubject\nmeta EMPTY !__NONEMPTY\n"
                   "body SUBJ_WORD /watches/\ntflags SUBJ_WORD nosubject\n")
    engine = Engine(rs, use_prefilter=use_prefilter)
    assert set(engine.run(MessageView(msg("Subject: Cheap watches", "")))) == {"EMPTY"}
    hits = engine.run(MessageView(msg("Subject: Cheap watches", "buy watches\n")))
    assert {"__NONEMPTY", "SUBJ_WORD"} <= set(hits) and "EMPTY" not in hits


# rawbody rules see SpamAssassin's chunks (Message::get_decoded_body_text_array):
# a whole part up to 2 KB, longer ones cut at a newline / ">" / space.
EDGE = msg("Subject: s", "x" * 2048 + ">START" + "y" * 3000, ctype="text/html")  # chunks: 2049 + 3005


@pytest.mark.parametrize("use_prefilter", [True, False])
@pytest.mark.parametrize("rule, raw, hit", [
    # 72_active.cf __CONTENT_AFTER_HTML: \s crosses the line ends inside a chunk
    ("rawbody R /<\\/html>\\s*[a-z0-9]/i", msg("Subject: s", "<html><b>x</b></html>\n\nBuy now\n",
                                                ctype="text/html"), True),
    ("rawbody R /<\\/html>\\s*[a-z0-9]/i", msg("Subject: s", "<html><b>x</b></html>\n\n", ctype="text/html"),
     False),
    ("rawbody R /^START/", EDGE, True),  # ^ is a chunk's start (here after the ">" cut)...
    ("rawbody R /^<b>x/", msg("Subject: s", "<html>\n<b>x</b></html>\n", ctype="text/html"), False),  # ...only
    ("rawbody R /^<b>x/m", msg("Subject: s", "<html>\n<b>x</b></html>\n", ctype="text/html"), True),
    ("rawbody R /x>START/", EDGE, False),  # a match cannot span two chunks
    ("rawbody R /y$/", EDGE, True),  # $ is the chunk's end
])
def test_rawbody_rules_match_spamassassin_chunks(rule, raw, hit, use_prefilter):
    rs = load_text(rule)
    engine = Engine(rs, use_prefilter=use_prefilter)
    if use_prefilter:
        assert "R" in engine.prefilters["rawbody"].covered  # the prefilter is exercised, per chunk
    assert ("R" in engine.run(MessageView(raw))) is hit


def test_rawbody_multiple_counts_over_all_chunks():
    rs = load_text("rawbody R /<td>/\ntflags R multiple\n")
    raw = msg("Subject: s", "<td>x</td>" * 1000, ctype="text/html")
    assert Engine(rs).run(MessageView(raw))["R"] == 1000


LONG = msg("Subject: s", "word " * 409 + "START " + "word " * 500 + "\n")  # 2045 bytes, then a cut


@pytest.mark.parametrize("use_prefilter", [True, False])
@pytest.mark.parametrize("rule, hit", [
    ("body R /^START word/", True),  # a body line cut at 2 KB starts a new line...
    ("body R /word START/", False),  # ...which no match spans
    ("body R /^word word/", True),
])
def test_body_rules_see_long_paragraphs_cut_into_lines(rule, hit, use_prefilter):
    assert MessageView(LONG).body_lines[2].startswith(b"START ")
    engine = Engine(load_text(rule), use_prefilter=use_prefilter)
    assert ("R" in engine.run(MessageView(LONG))) is hit
