"""The one decider."""

import pytest

from gateway.config import load
from gateway.errors import ConfigError, Reject, TempFail
from gateway.records import Action, Failed, Result
from rules.scoring import Scorer


def test_thresholds_pick_the_action():
    s = Scorer(threshold=5, reject_threshold=15, quarantine_threshold=10)
    assert s.decide([Result("A", 4.9)]).action == Action.ACCEPT
    assert s.decide([Result("A", 5.0)]).action == Action.TAG
    assert s.decide([Result("A", 3), Result("B", 7)]).action == Action.QUARANTINE
    v = s.decide([Result("A", 15)])
    assert v.action == Action.REJECT and v.reply == Reject(554, "5.7.1", "Message refused as spam")


def test_config_weights_override_check_scores():
    s = Scorer(weights={"A": 9.0})
    v = s.decide([Result("A", 1.0)])
    assert v.score == 9.0 and v.action == Action.TAG and v.results[0].score == 9.0


def test_virus_refusal_wins_and_names_the_virus():
    s = Scorer()
    v = s.decide([Result("ALLOWLISTED", -100), Result("RBL", 3, refuse="rbl", detail="zen"),
                  Result("VIRUS", 0, refuse="virus", detail="Eicar-Test-Signature")])
    assert v.action == Action.REJECT
    assert v.reply == Reject(554, "5.7.0", "Message contains a virus: Eicar-Test-Signature")


def test_could_not_check_adds_nothing_unless_it_must_tempfail():
    s = Scorer()
    assert s.decide([Failed("dnsbl", "timeout")]).action == Action.ACCEPT
    v = s.decide([Failed("clamd", "connection refused", severity="tempfail")])
    assert v.action == Action.TEMPFAIL and v.reply.code == 451 and v.reply.enhanced == "4.3.0"
    assert "connection refused" in v.reply.text


def test_a_crashed_check_is_an_internal_error_not_an_accept():
    v = Scorer().decide([Result("A", -50), Failed("x", "boom", severity="error")])
    assert v.action == Action.TEMPFAIL and v.reply.text.startswith("Internal error")


def test_quarantine_request():
    v = Scorer().decide([Result("VIRUS", 0, refuse="quarantine", detail="x")])
    assert v.action == Action.QUARANTINE


def test_stage_decisions():
    s = Scorer()
    assert s.decide_stage([Result("RBL", 2)]) is None
    assert s.decide_stage([Result("GREY", 0, refuse="greylist")]) == TempFail(451, "4.7.1",
                                                                              "Greylisted, please try again later")
    assert s.decide_stage([Result("U", 0, refuse="unknown_user")]).code == 550
    assert s.decide_stage([Result("X", 0, refuse="no-such-reason", detail="d")]).text.endswith(": d")


def test_detail_is_kept_short_and_on_one_line():
    reply = Scorer().decide_stage([Result("B", 0, refuse="helo", detail="a\r\nb" + "x" * 500)])
    assert "\n" not in reply.text and len(reply.text) < 260


def test_every_hit_carries_its_declared_description_and_weight():
    from gateway.plugins import Symbol, SymbolTable

    table = SymbolTable([Symbol("A", 1.0, "g", "Means A"), Symbol("FAM_*", 0.0, "g", "Some FAM")])
    s = Scorer(weights={"A": 2.5}, symbols=table)
    v = s.decide([Result("A", 1.0, "seen"), Result("FAM_X", 0.0), Result("UNDECLARED", 0.5)])
    assert [(r.symbol, r.score, r.detail, r.description) for r in v.results] == [
        ("A", 2.5, "seen", "Means A"), ("FAM_X", 0.0, "", "Some FAM"), ("UNDECLARED", 0.5, "", "")]
    # the description is no part of the evidence: results compare as before
    assert v.results[1] == Result("FAM_X", 0.0)
    assert Scorer().decide([Result("A", 1.0)]).results[0].description == ""


# --- [rules] learned_scores (the file `mailgate fit-scores` writes) ---------------


def _config(tmp_path, learned: str, scores: str = ""):
    cfg = tmp_path / "mailgate.toml"
    cfg.write_text(f'[rules]\nlearned_scores = "{learned}"\n' + (f"[scores]\n{scores}\n" if scores else ""))
    return load(str(cfg))


def test_the_scorer_uses_the_learned_file_under_the_configs_own_scores(tmp_path):
    learned = tmp_path / "learned.toml"
    learned.write_text("[scores]\nMG_A = 2.5\nMG_B = -1\n")
    scorer = Scorer.from_config(_config(tmp_path, str(learned), "MG_B = 0.25"))
    assert scorer.weights["MG_A"] == 2.5 and scorer.weights["MG_B"] == 0.25
    # not named: not loaded
    assert "MG_A" not in Scorer.from_config(_config(tmp_path, "")).weights


@pytest.mark.parametrize("content, reason", [
    (None, "no such file; write it with `mailgate fit-scores`"),
    ("[scores\n", "not valid TOML"),
    ("MG_A = 1\n", "has no [scores] table"),
    ('[scores]\nMG_A = "high"\n', "scores.MG_A = 'high': not a finite number"),
    ("[scores]\nMG_A = nan\n", "scores.MG_A = nan: not a finite number"),
    ("[scores]\nMG_A = true\n", "not a finite number"),
])
def test_a_bad_learned_file_is_refused_naming_the_key(tmp_path, content, reason):
    path = tmp_path / "learned.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        Scorer.from_config(_config(tmp_path, str(path)))
    assert f"rules.learned_scores = '{path}'" in str(e.value) and reason in str(e.value)
