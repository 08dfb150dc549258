"""The what-if arithmetic (monitor/whatif.py): pure functions over verdict rows."""

import pytest

from monitor.whatif import Row, Thresholds, WhatIfError, histogram, rows, simulate

CURRENT = Thresholds(5.0, 15.0)


def r(qid, score, action, label=None):
    return Row(qid, score, action, label)


def test_thresholds_decide_in_the_scorers_order():
    t = Thresholds(5.0, 15.0, quarantine_threshold=10.0)
    assert [t.action(s) for s in (4.99, 5.0, 9.9, 10.0, 14.99, 15.0, 40)] == \
        ["accept", "tag", "tag", "quarantine", "quarantine", "reject", "reject"]
    assert Thresholds(5.0, 15.0).action(12) == "tag"


def test_thresholds_that_make_no_config_are_refused_with_the_reason():
    with pytest.raises(WhatIfError, match=r"reject_threshold = 4: must not be below threshold \(5\)"):
        Thresholds(5.0, 4.0)
    with pytest.raises(WhatIfError, match="finite"):
        Thresholds(float("nan"), 15.0)


def test_config_lines_are_the_spam_section_to_paste():
    assert Thresholds(4.5, 12.0).config_lines() == "[spam]\nthreshold = 4.5\nreject_threshold = 12\n"
    assert "quarantine_threshold = 8\n" in Thresholds(4.5, 12.0, 8.0).config_lines()


def test_rows_take_store_tuples_and_drop_unknown_labels():
    assert rows([("A", "3.5", "accept", "ham"), ("B", 7, "tag", "weird")]) == \
        [r("A", 3.5, "accept", "ham"), r("B", 7.0, "tag", None)]


def test_histogram_counts_every_message_once_by_label():
    data = [r("a", -1.2, "accept", "ham"), r("b", 0.0, "accept"), r("c", 0.99, "accept", "ham"),
            r("d", 5.0, "tag", "spam"), r("e", 5.5, "tag"), r("f", 20.0, "reject", "spam")]
    bins = histogram(data, width=5.0)
    assert [(b.lo, b.hi) for b in bins] == [(-5.0, 0.0), (0.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.0),
                                           (20.0, 25.0)]
    assert [(b.ham, b.spam, b.unlabelled) for b in bins] == [(1, 0, 0), (1, 0, 1), (0, 1, 1), (0, 0, 0),
                                                            (0, 0, 0), (0, 1, 0)]
    assert sum(b.total for b in bins) == len(data)


def test_histogram_clamps_into_a_fixed_range_and_refuses_a_bad_width():
    bins = histogram([r("a", -30, "accept"), r("b", 99, "reject")], width=10, lo=0, hi=20)
    assert [b.total for b in bins] == [1, 1]
    assert histogram([], 1.0) == []
    with pytest.raises(WhatIfError, match="bin width"):
        histogram([r("a", 1, "accept")], width=0)


def test_simulate_counts_changes_and_errors_by_label():
    data = [
        r("ham-low", 1.0, "accept", "ham"),
        r("ham-tagged", 5.5, "tag", "ham"),  # a false positive now; not at threshold 6
        r("spam-missed", 4.0, "accept", "spam"),  # a miss now; caught at threshold 3.5
        r("spam-tagged", 8.0, "tag", "spam"),
        r("unlab", 4.2, "accept"),  # unlabelled: changes action but counts in neither error
        r("big", 14.0, "tag", "spam"),  # rejected under reject 12
    ]
    out = simulate(data, CURRENT, Thresholds(3.5, 12.0))
    assert out.total == 6 and out.decided_by_score == 6
    assert {(c.queue_id, c.before, c.after) for c in out.changes} == {
        ("spam-missed", "accept", "tag"), ("unlab", "accept", "tag"), ("big", "tag", "reject")}
    assert out.by_transition == {("accept", "tag"): 2, ("tag", "reject"): 1}
    assert (out.before.false_positives, out.before.misses, out.before.ham, out.before.spam) == (1, 1, 2, 3)
    assert (out.after.false_positives, out.after.misses) == (1, 0)
    higher = simulate(data, CURRENT, Thresholds(6.0, 15.0))
    assert [(c.queue_id, c.after) for c in higher.changes] == [("ham-tagged", "accept")]
    assert (higher.after.false_positives, higher.after.misses) == (0, 1)


def test_simulate_keeps_actions_the_score_did_not_decide():
    data = [r("virus", 2.0, "reject", "spam"),  # refused for a virus at 2 points
            r("policy", 1.0, "quarantine"),  # a banned attachment quarantined
            r("tempfail", 9.0, "tempfail"),
            r("scored", 6.0, "tag", "spam")]
    out = simulate(data, CURRENT, Thresholds(7.0, 8.0))
    assert out.decided_by_score == 1
    assert [(c.queue_id, c.before, c.after) for c in out.changes] == [("scored", "tag", "accept")]
    assert out.after.misses == 1  # the scored spam is now accepted; the virus stays refused


def test_changes_are_listed_highest_score_first():
    data = [r(f"m{i}", float(s), "accept") for i, s in enumerate((3, 4.5, 4))]
    assert [c.queue_id for c in simulate(data, CURRENT, Thresholds(2.0, 15.0)).changes] == ["m1", "m2", "m0"]
