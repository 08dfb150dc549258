import logging
import os
import shutil
import types

import numpy as np
import pytest
from twisted.internet import defer

from classifiers.bayes_check import (
    DEFAULT_SCORES,
    BayesCheck,
    BayesSettings,
    ModelHolder,
    band_results,
    band_score,
)
from classifiers.model import HAM, SPAM, BayesModel, ModelSettings, message_digest
from gateway.config import validate
from gateway.errors import ConfigError
from gateway.plugins import discover
from gateway.records import Action, Message, Result, Session, Transaction, Verdict
from tests.classifiers import generated

SMALL = ModelSettings(n_features=2 ** 16)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run_in_thread(fn, *args):
    """Synchronous stand-in for deferToThread."""
    try:
        return defer.succeed(fn(*args))
    except Exception:
        return defer.fail()


def services():
    return types.SimpleNamespace(run_in_thread=run_in_thread, reactor=None, log=None)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the check's Deferred did not fire"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def txn(raw: bytes) -> Transaction:
    return Transaction(session=Session("Q1", "192.0.2.1"), message=Message(raw))


def save_model(path, nspam=30, nham=30, seed=1):
    model = BayesModel(SMALL)
    data = generated.corpus(seed, nspam, nham)
    model.fit(model.vectors([model.tokens(raw) for _, raw in data]), np.array([lab for lab, _ in data]))
    for lab, raw in data:
        model.record(message_digest(raw), lab)
    model.save(str(path))
    return model


def make_check(path, clock=None, **overrides):
    settings = BayesSettings(model=str(path), min_spam=overrides.pop("min_spam", 20),
                             min_ham=overrides.pop("min_ham", 20), **overrides)
    clock = clock or FakeClock()
    holder = ModelHolder(settings.model, settings.reload_interval, clock,
                         loader=lambda p: BayesModel.load(p, expected=SMALL))
    return BayesCheck(settings, services().run_in_thread, holder=holder, clock=clock), clock


def symbols(results):
    return [r.symbol for r in results]


def test_discovered_as_a_data_check_with_its_section():
    cat = discover()
    assert cat.checks["bayes"] is BayesCheck
    assert cat.sections["bayes"] is BayesSettings


def test_from_config_reads_the_bayes_section(tmp_path):
    config = types.SimpleNamespace(bayes=BayesSettings(model=str(tmp_path / "x.model")))
    check = BayesCheck.from_config(config, services())
    assert check.holder.path == str(tmp_path / "x.model")
    assert check.run_in_thread is run_in_thread
    assert result_of(check.check(txn(b"Subject: hi\r\n\r\nhello"))) == []


def test_config_defaults_and_band_overrides():
    config = validate({"bayes": {"model": "m.model", "scores": {"BAYES_99": 4.0}}}, {"bayes": BayesSettings})
    assert config.bayes.model == "m.model"
    assert config.bayes.min_spam == 200 and config.bayes.min_ham == 200
    assert config.bayes.scores["BAYES_99"] == 4.0
    assert config.bayes.scores["BAYES_00"] == DEFAULT_SCORES["BAYES_00"]
    with pytest.raises(ConfigError, match="bayes.scores.*unknown band.*BAYES_98"):
        validate({"bayes": {"scores": {"BAYES_98": 1.0}}}, {"bayes": BayesSettings})
    with pytest.raises(ConfigError, match="bayes.min_spam"):
        validate({"bayes": {"min_spam": -1}}, {"bayes": BayesSettings})


def test_default_bands_reach_the_threshold_only_at_bayes_99():
    s = DEFAULT_SCORES
    assert band_score(0.995, s) >= 5.0 and band_score(0.9995, s) >= 5.0
    assert band_score(0.98, s) < 5.0
    assert symbols(band_results(0.0, s)) == ["BAYES_00"]
    assert symbols(band_results(0.01, s)) == ["BAYES_05"]
    assert symbols(band_results(0.5, s)) == ["BAYES_50"]
    assert symbols(band_results(0.995, s)) == ["BAYES_99"]
    assert symbols(band_results(0.9995, s)) == ["BAYES_99", "BAYES_999"]
    assert band_results(0.5, s)[0].detail == "P(spam)=0.5000"


def test_trained_model_scores_spam_high_and_ham_low(tmp_path):
    save_model(tmp_path / "b.model")
    check, _ = make_check(tmp_path / "b.model")
    rng_corpus = generated.corpus(seed=77, nspam=5, nham=5)
    for label, raw in rng_corpus:
        results = result_of(check.check(txn(raw)))
        assert all(isinstance(r, Result) for r in results)
        total = sum(r.score for r in results)
        if label == SPAM:
            assert total > 0, results
        else:
            assert total < 0, results


def test_missing_model_adds_nothing_and_logs_once(tmp_path, caplog):
    check, clock = make_check(tmp_path / "none.model")
    raw = generated.corpus(1, 1, 0)[0][1]
    with caplog.at_level(logging.WARNING, logger="mailgate.bayes"):
        for _ in range(3):
            assert result_of(check.check(txn(raw))) == []
            clock.now += 10
    said = [r for r in caplog.records if "no model file" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "none.model") in said[0].getMessage()


def test_undertrained_model_adds_nothing_and_says_so_once(tmp_path, caplog):
    save_model(tmp_path / "b.model", nspam=30, nham=30)
    check, clock = make_check(tmp_path / "b.model", min_spam=200, min_ham=200)
    raw = generated.corpus(1, 1, 0)[0][1]
    with caplog.at_level(logging.WARNING, logger="mailgate.bayes"):
        for _ in range(3):
            assert result_of(check.check(txn(raw))) == []
    said = [r for r in caplog.records if "needs" in r.getMessage() or "until it has" in r.getMessage()]
    assert len(said) == 1 and "30 spam and 30 ham" in said[0].getMessage()


def test_a_replaced_model_file_is_picked_up_without_restart(tmp_path):
    path = tmp_path / "b.model"
    check, clock = make_check(path)
    raw = generated.corpus(5, 1, 0)[0][1]
    assert result_of(check.check(txn(raw))) == []  # no model yet
    save_model(path)
    # not looked at again before reload_interval has passed
    clock.now += 1
    assert result_of(check.check(txn(raw))) == []
    clock.now += 10
    first = result_of(check.check(txn(raw)))
    assert first and first[0].symbol.startswith("BAYES_")
    old = check.holder.model
    # a retrained model (train writes a new file and renames it over the old)
    tmp = tmp_path / "new.model"
    save_model(tmp, seed=2)
    os.replace(tmp, path)
    clock.now += 10
    result_of(check.check(txn(raw)))
    assert check.holder.model is not old


def test_a_damaged_replacement_keeps_the_old_model(tmp_path, caplog):
    path = tmp_path / "b.model"
    save_model(path)
    check, clock = make_check(path)
    raw = generated.corpus(5, 1, 0)[0][1]
    before = result_of(check.check(txn(raw)))
    good = check.holder.model
    with open(tmp_path / "junk", "wb") as f:
        f.write(b"not a model at all")
    shutil.move(str(tmp_path / "junk"), str(path))
    clock.now += 10
    with caplog.at_level(logging.ERROR, logger="mailgate.bayes"):
        assert result_of(check.check(txn(raw))) == before
        clock.now += 10
        result_of(check.check(txn(raw)))
    assert check.holder.model is good
    refused = [r for r in caplog.records if "model refused" in r.getMessage()]
    assert len(refused) == 1 and "not a MailGate Bayes model" in refused[0].getMessage()


def verdict(*results):
    return Verdict(Action.ACCEPT, sum(r.score for r in results), 5.0, list(results))


def test_autolearn_uses_the_other_checks_points_only(tmp_path):
    save_model(tmp_path / "b.model")
    check, _ = make_check(tmp_path / "b.model", autolearn=True)
    assert check.autolearn_label(verdict(Result("RBL_X", 13.0), Result("BAYES_00", -1.9))) == SPAM
    # Bayes alone never teaches itself
    assert check.autolearn_label(verdict(Result("BAYES_99", 5.0), Result("BAYES_999", 20.0))) == HAM
    assert check.autolearn_label(verdict(Result("RBL_X", 3.0))) is None
    off, _ = make_check(tmp_path / "b.model")
    assert off.autolearn_label(verdict(Result("RBL_X", 30.0))) is None


def test_autolearn_learns_and_saves_after_the_interval(tmp_path):
    path = tmp_path / "b.model"
    save_model(path)
    check, clock = make_check(path, autolearn=True, autolearn_save_interval=60)
    raw = generated.message(__import__("random").Random(3), spam=True, n=4242)
    result_of(check.check(txn(raw)))  # loads the model
    nspam = check.holder.model.nspam
    assert result_of(check.after_verdict(txn(raw), verdict(Result("RBL_X", 15.0)))) == "new"
    assert check.holder.model.nspam == nspam + 1
    assert BayesModel.load(str(path), expected=SMALL).nspam == nspam  # not saved yet
    clock.now += 61
    assert result_of(check.after_verdict(txn(raw), verdict(Result("RBL_X", 15.0)))) == "same"
    assert BayesModel.load(str(path), expected=SMALL).nspam == nspam + 1
    # our own save is not taken for a new model to load
    model = check.holder.model
    clock.now += 10
    result_of(check.check(txn(raw)))
    assert check.holder.model is model


# --- end to end through `mailgate run` ---------------------------------------------


def _only_bayes() -> str:
    others = sorted(set(discover().checks) - {"bayes"})
    return "[checks]\ndisabled = [" + ", ".join(f'"{n}"' for n in others) + "]\n"


def _status(data: bytes) -> bytes:
    head = data.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    return next(line for line in head.split(b"\r\n") if line.startswith(b"X-Spam-Status:"))


def test_e2e_gateway_starts_without_a_model_and_picks_one_up(mailgate, sink, tmp_path):
    import time

    from classifiers.model import DEFAULT_MODEL_SETTINGS

    model_path = tmp_path / "var" / "bayes.model"
    gw = mailgate(extra_toml=f'[bayes]\nmodel = "{model_path}"\nmin_spam = 10\nmin_ham = 10\n'
                             'reload_interval = "0.2s"\n' + _only_bayes())
    spam_raw, ham_raw = (raw.replace(b"\n", b"\r\n") for _, raw in generated.corpus(31, 1, 1))
    with gw.smtp() as smtp:
        smtp.sendmail("x@sender.test", ["bob@example.test"], spam_raw)
    sink.wait_for(1, timeout=20)
    assert b"BAYES_" not in _status(sink.messages[0].data)
    deadline = time.monotonic() + 10
    while "no model file" not in gw.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.log().count("no model file") == 1

    # `mailgate train` writes the model; the running gateway takes it up
    model = BayesModel(DEFAULT_MODEL_SETTINGS)
    data = generated.corpus(32, 30, 30)
    model.fit(model.vectors([model.tokens(raw) for _, raw in data]), np.array([lab for lab, _ in data]))
    model.save(str(model_path))
    time.sleep(0.3)
    with gw.smtp() as smtp:
        smtp.sendmail("x@sender.test", ["bob@example.test"], spam_raw)
        smtp.sendmail("alice@sender.test", ["bob@example.test"], ham_raw)
    sink.wait_for(3, timeout=20)
    statuses = [_status(m.data) for m in sink.messages[1:3]]
    spam_status = next(s for s in statuses if b"BAYES_9" in s)
    ham_status = next(s for s in statuses if s is not spam_status)
    assert b"BAYES_99=5" in spam_status and spam_status.startswith(b"X-Spam-Status: Yes")
    assert b"BAYES_00=-1.9" in ham_status and ham_status.startswith(b"X-Spam-Status: No")
    assert "bayes: loaded model" in gw.log()
