"""tools/sa_parity.py: its helpers, and parity itself on a fixed sample.

The sample test runs the real SpamAssassin (spamd --local, answering spamc)
and the real ``mailgate score`` on the same messages and requires the same
stock rules on both sides, so a change to the engine that loses parity
fails here, not only in ``make bench``.
"""

from __future__ import annotations

import os

import pytest

from tests.support.programs import require_program
from tools import sa_parity

# Chosen from the public corpus to cover many stock rules (178 distinct ones
# between them: HTML, MIME, FreeMail, dates, headers, body phrases...).
SAMPLE = (
    "easy_ham/00679.7c3eae8e28aadb8ea378fb5c04bc5d29", "easy_ham/00696.767a9ee8575785978ea5174d3ad3ee26",
    "easy_ham/00886.6d792e0aa2cd6975ef5e050f7b0173b5", "easy_ham_2/00388.06d9471d9bb3270cc5caa33d267a1e9e",
    "easy_ham_2/00401.4bcb1d17a18fc77217a1092fa6c27bfa", "easy_ham_2/00869.0fbb783356f6875063681dc49cfcb1eb",
    "hard_ham/00167.728c686d0128f4d677a5658d865e6159", "hard_ham/00169.251360b0bc97db8a080cc122ce0428fe",
    "hard_ham/00170.1a9e4779117adf05e9690401ab6bc6cb", "spam/00021.effe1449462a9d7ad7af0f1c94b1a237",
    "spam/00036.256602e2cb5a5b373bdd1fb631d9f452", "spam/00061.bec763248306fb3228141491856ed216",
    "spam/00095.17594a58d6736a8f6a1990b0b92090cd", "spam/00243.c6e70273fe1cf9e56e26bb6bbeef415d",
    "spam/00363.e6935b8f87c5984a5c6f6656afa1afb4", "spam/00341.99b463b92346291f5848137f4a253966",
    "spam/00344.17882edad13c2c761e6d8d99eef5a346", "spam_2/00009.1e1a8cb4b57532ab38aa23287523659d",
    "spam_2/00074.f7cfc6a5142e788004e0cff70e3a36c0", "spam_2/00253.bd8e0dd85f0f848be89aadbf6d6364dc",
    "spam_2/00258.eb914ca569df16b9e969cc1ff646033f", "spam_2/00270.1ee4eb635731c5a022fb060bc8cd26e0",
    "spam_2/00370.abd27ca9728627f8f0f83934ea7520d0", "spam_2/00463.0bc4e08af0529dd773d9f10f922547db",
    "spam_2/00474.c1835a35419f2bbdccbabfd8547faf4a", "spam_2/00600.d113e8e0ac2d8d42f500f4faef61061b",
    "spam_2/00645.dd7d8ec1eb687c5966c516b720fcc3d5", "spam_2/00777.284d3dc66b4f1bdedb5a5eba41d18d14",
)

# Without the corpus: messages written for the test, each aimed at rules of
# a different kind (FreeMail, HTML, MIME, header evals, body phrases, dates).
WRITTEN = {
    "written/freemail": (
        "Return-Path: <winner2000@yahoo.com>\nFrom: \"Mr. John Smith\" <winner2000@yahoo.com>\n"
        "Reply-To: claims.office@hotmail.com\nTo: undisclosed-recipients:;\nSubject: URGENT BUSINESS PROPOSAL\n"
        "Date: Mon, 02 Sep 2002 10:00:00 +0000\nMessage-ID: <a1@yahoo.com>\n\n"
        "Dear Friend,\n\nI am Mr. John Smith, the son of the late minister. We have the sum of US$25,000,000\n"
        "(Twenty Five Million United States Dollars) in a suspense account. Your share is 30%.\n"
        "Please reply to claims.office@hotmail.com with your bank details.\n"),
    "written/html-image": (
        "From: Deals <deals@shop.example.com>\nTo: you@example.org\nSubject: Cheap watches!!!\n"
        "Date: Mon, 02 Sep 2002 10:00:00 +0000\nMessage-ID: <a2@shop.example.com>\nMIME-Version: 1.0\n"
        "Content-Type: text/html; charset=\"iso-8859-1\"\nContent-Transfer-Encoding: base64\n\n"
        "PGh0bWw+PGJvZHk+PGEgaHJlZj0iaHR0cDovLzE5Mi4wLjIuNy9idXkiPjxpbWcgc3JjPSJodHRw\n"
        "Oi8vMTkyLjAuMi43L2EuZ2lmIiB3aWR0aD01MDAgaGVpZ2h0PTQwMD48L2E+PC9ib2R5PjwvaHRt\nbD4=\n"),
    "written/stock": (
        "From: Analyst <tips@investor.example.net>\nTo: you@example.org\nSubject: Hot stock alert\n"
        "Date: Mon, 02 Sep 2002 10:00:00 +0000\nMessage-ID: <a3@investor.example.net>\n\n"
        "Company: Acme Gold Corp\nSymbol: ACGC\nCurrent Price: $0.12\nTarget: $1.50\n"
        "Rating: Strong Buy\n\nThis stock is about to explode. Act now!\n"),
    "written/8bit-subject": (
        "From: a@mail.example.kr\nTo: you@example.org\nSubject: [\xb1\xa4\xb0\xed] \xbf\xe4\xc1\xf2 best 5\n"
        "Date: Mon, 02 Sep 2002 10:00:00 +0000\nMessage-ID: <a4@mail.example.kr>\nContent-Type: text/plain\n\n"
        "caf\xe9 \xb1\xa4\xb0\xed \xbf\xe4\xc1\xf2\n"),
    "written/ham": (
        "From: Alice <alice@example.org>\nTo: Bob <bob@example.org>\nSubject: Re: minutes of the meeting\n"
        "Date: Mon, 02 Sep 2002 10:00:00 +0000\nMessage-ID: <a5@example.org>\nIn-Reply-To: <a0@example.org>\n"
        "References: <a0@example.org>\nUser-Agent: Mutt/1.4i\n\n"
        "Hi Bob,\n\nthe minutes are attached to the wiki page now. See you on Thursday.\n\n> Did you\n> write them?\n\n"
        "-- \nAlice\n"),
}


def corpus_or_written() -> tuple[str, dict[str, bytes]]:
    from tools.bench_bayes import default_corpus

    corpus = default_corpus()
    if os.path.isdir(corpus):
        messages = sa_parity.corpus_messages(corpus, None, 0, names=SAMPLE)
        if len(messages) == len(SAMPLE):
            return "corpus", messages
    return "written", {k: sa_parity.normalise(v.encode("latin-1")) for k, v in WRITTEN.items()}


def test_stock_rules_agree_with_spamassassin_on_a_fixed_sample():
    for program in ("spamassassin", "spamd", "spamc"):
        require_program(program)
    source, messages = corpus_or_written()
    comparison, excluded = sa_parity.run(messages, cache=None, log=lambda *a: None)
    assert comparison.messages == len(messages)
    report = "\n".join(comparison.lines)
    # Relay rules (RDNS_*, HELO_DYNAMIC_*, ALL_TRUSTED, *_DIRECT_MX, KHOP_*,
    # forged Received and the metas reading them) are left out until the
    # Received-chain parsing of issue 12 item 1 lands; then compare
    # comparison.same_rules / same_score instead.
    assert comparison.same_rules_norelay == comparison.messages, f"{source} sample differs:\n{report}"
    assert comparison.same_score_norelay == comparison.messages, f"{source} sample scores differ:\n{report}"
    assert excluded.net and excluded.relay


def test_parse_report_reads_wrapped_lists_and_none():
    text = "7.3/5.0\nTESTS=DIET_1=0.714,KHOP_HELO_FCRDNS=1,SUB\n JECT_DIET=1.927\n\n"
    assert sa_parity.parse_report(text) == (7.3, {"DIET_1": 0.714, "KHOP_HELO_FCRDNS": 1.0, "SUBJECT_DIET": 1.927})
    assert sa_parity.parse_report("0.0/5.0\nTESTS=none\n") == (0.0, {})
    with pytest.raises(RuntimeError, match="unexpected spamc"):
        sa_parity.parse_report("0/0\n")


def test_normalise_drops_the_mbox_line_and_upstream_spam_headers():
    raw = (b"From someone@example.org Mon Sep  2 10:00:00 2002\r\nX-Spam-Status: Yes, score=9\r\n"
           b"\ttests=A,B\r\nSubject: hi\r\nX-Spam-Level: ***\r\nX-Spamd-Result: kept\r\n\r\nX-Spam-Flag: body\r\n")
    assert sa_parity.normalise(raw) == b"Subject: hi\nX-Spamd-Result: kept\n\nX-Spam-Flag: body\n"


def test_excluded_rules_are_net_rules_and_relay_rules_with_their_metas(tmp_path):
    (tmp_path / "a.cf").write_text(
        "header RCVD_IN_X eval:check_rbl('x', 'x.example.')\ntflags RCVD_IN_X net\n"
        "header __RDNS_NONE X-Spam-Relays-Untrusted =~ /^[^\\]]+ rdns= /\n"
        "meta RDNS_NONE __RDNS_NONE\nheader SUBJ_X Subject =~ /x/\n"
        "meta SPOOFED_X SUBJ_X && __RDNS_NONE\nmeta PLAIN_X SUBJ_X\n")
    ex = sa_parity.excluded_rules([str(tmp_path)])
    assert ex.net == {"RCVD_IN_X"}
    assert {"__RDNS_NONE", "RDNS_NONE", "SPOOFED_X"} <= ex.relay and not {"SUBJ_X", "PLAIN_X"} & ex.relay
    tests = {"RCVD_IN_X": 1.0, "MG_OWN": 2.0, "BAYES_99": 3.0, "SPF_PASS": -0.1, "RDNS_NONE": 0.8, "SUBJ_X": 1.0}
    assert sa_parity.compared(tests, ex, relay=True) == {"RDNS_NONE": 0.8, "SUBJ_X": 1.0}
    assert sa_parity.compared(tests, ex, relay=False) == {"SUBJ_X": 1.0}
    # our own checks' symbols that are no stock rule (header_sanity's FROM_MALFORMED) are not compared
    assert sa_parity.compared({"FROM_MALFORMED": 1.5, "SUBJ_X": 1.0}, ex, relay=True, ours=True) == {"SUBJ_X": 1.0}
    assert sa_parity.compared({"FROM_MALFORMED": 1.5}, ex, relay=True) == {"FROM_MALFORMED": 1.5}


def test_compare_counts_rule_sets_and_scores():
    ex = sa_parity.Excluded(net=set(), relay={"RDNS_NONE"})
    sa = {"m1": (2.0, {"A": 1.0, "B": 1.0}), "m2": (1.8, {"A": 1.0, "RDNS_NONE": 0.8}), "m3": (1.0, {"A": 1.0})}
    mg = {"m1": (2.0, {"A": 1.0, "B": 1.0}), "m2": (1.0, {"A": 1.0}), "m3": (1.05, {"A": 1.05})}
    c = sa_parity.compare(sa, mg, ex)
    assert (c.messages, c.same_rules, c.same_score) == (3, 2, 2)
    assert (c.same_rules_norelay, c.same_score_norelay) == (3, 3)
    assert c.only_sa == {"RDNS_NONE": 1} and not c.only_mg
    assert len(c.lines) == 1 and c.lines[0].startswith("m2\t")
