import dataclasses
import io
import json
import random
import zipfile

import numpy as np
import pytest

from classifiers.model import (
    DEFAULT_MODEL_SETTINGS,
    HAM,
    SPAM,
    BayesModel,
    ModelError,
    ModelSettings,
    message_digest,
)
from tests.classifiers import generated

SMALL = ModelSettings(n_features=2 ** 16)


def trained(settings=SMALL, seed=1, n=60) -> BayesModel:
    model = BayesModel(settings)
    data = generated.corpus(seed, n, n)
    X = model.vectors([model.tokens(raw) for _, raw in data])
    model.fit(X, np.array([label for label, _ in data]))
    for label, raw in data:
        model.record(message_digest(raw), label)
    return model


def test_training_then_scoring_separates_unseen_messages():
    model = trained()
    unseen = generated.corpus(seed=99, nspam=40, nham=40)
    probs = [(label, model.spam_probability(raw)) for label, raw in unseen]
    spam = [p for label, p in probs if label == SPAM]
    ham = [p for label, p in probs if label == HAM]
    assert min(spam) > 0.5 > max(ham)
    assert model.nspam == 60 and model.nham == 60


def test_an_empty_model_says_nothing_either_way():
    model = BayesModel(SMALL)
    assert model.spam_probability(generated.corpus(3, 1, 0)[0][1]) == pytest.approx(0.5)
    assert not model.is_trained(1, 1)


def test_learn_moves_a_score_the_right_way():
    model = trained()
    rng = random.Random(5)
    # ham-looking words plus words the model never saw: learned as spam it must rise
    raw = generated.message(rng, spam=False, n=777, words=("zorblax", "quintessa", "flibber") * 5)
    before = model.spam_probability(raw)
    assert model.learn(raw, SPAM) == "new"
    after_spam = model.spam_probability(raw)
    assert after_spam > before
    assert model.learn(raw, HAM) == "moved"
    assert model.spam_probability(raw) < after_spam


def test_learning_twice_does_not_count_twice():
    model = trained()
    raw = generated.message(random.Random(6), spam=True, n=888)
    model.learn(raw, SPAM)
    counts = model.nb.feature_count_.copy()
    nspam, nham = model.nspam, model.nham
    assert model.learn(raw, SPAM) == "same"
    assert (model.nspam, model.nham) == (nspam, nham)
    assert np.array_equal(model.nb.feature_count_, counts)


def test_learning_the_other_way_moves_the_counts_over():
    model = trained()
    raw = generated.message(random.Random(7), spam=True, n=999)
    spam_before, ham_before = model.nb.feature_count_[SPAM].copy(), model.nb.feature_count_[HAM].copy()
    model.learn(raw, SPAM)
    model.learn(raw, HAM)
    assert np.array_equal(model.nb.feature_count_[SPAM], spam_before)
    assert model.nb.feature_count_[HAM].sum() > ham_before.sum()
    assert (model.nspam, model.nham) == (60, 61)
    assert model.forget(raw) and not model.forget(raw)
    assert np.array_equal(model.nb.feature_count_[HAM], ham_before)


def test_bulk_trained_messages_are_known_to_learn():
    model = trained()
    label, raw = generated.corpus(1, 60, 60)[0]  # the same corpus trained() used
    assert model.learned_as(raw) == label
    assert model.learn(raw, label) == "same"


def test_digest_ignores_headers_we_add():
    raw = generated.message(random.Random(8), spam=True, n=1)
    delivered = (b"X-Spam-Flag: YES\nX-Spam-Status: Yes, score=9.9\n"
                 b"Received: from client by gateway; Mon, 1 Jan 2024\n") + raw
    assert message_digest(delivered) == message_digest(raw)
    assert message_digest(raw.replace(b"\n", b"\r\n")) == message_digest(raw)
    assert message_digest(raw + b"more") != message_digest(raw)


def test_save_and_load_round_trip(tmp_path):
    model = trained()
    path = str(tmp_path / "sub" / "bayes.model")
    model.save(path)
    loaded = BayesModel.load(path, expected=SMALL)
    raws = [raw for _, raw in generated.corpus(42, 5, 5)]
    assert [model.spam_probability(r) for r in raws] == [loaded.spam_probability(r) for r in raws]
    assert (loaded.nspam, loaded.nham, loaded.learned_count) == (60, 60, 120)
    assert loaded.calibration == model.calibration
    assert loaded.learn(generated.corpus(1, 60, 60)[5][1], SPAM) == "same"
    meta = json.loads(zipfile.ZipFile(path).read("meta.json"))
    assert meta["spam"] == 60 and meta["ham"] == 60 and meta["trained_at"]
    assert meta["settings"]["n_features"] == 2 ** 16 and meta["version"] == 1
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["bayes.model"]  # no temp file left


def test_model_with_other_settings_is_refused(tmp_path):
    path = str(tmp_path / "bayes.model")
    trained().save(path)
    with pytest.raises(ModelError) as e:
        BayesModel.load(path, expected=DEFAULT_MODEL_SETTINGS)
    assert path in str(e.value) and "n_features=65536 in the file" in str(e.value)
    other_tokenizer = dataclasses.replace(SMALL, tokenizer=dataclasses.replace(SMALL.tokenizer, headers=False))
    with pytest.raises(ModelError, match="tokenizer.headers=True in the file"):
        BayesModel.load(path, expected=other_tokenizer)


def _rewrite(path, replace: dict):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members.update(replace)
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            if data is not None:
                z.writestr(n, data)


def _npy(arr, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("damage, reason", [
    (lambda p: open(p, "wb").write(b"\x00garbage" * 100), "not a zip archive"),
    (lambda p: open(p, "r+b").truncate(200), "not a zip archive"),
    (lambda p: _rewrite(p, {"meta.json": None}), "no meta.json"),
    (lambda p: _rewrite(p, {"meta.json": b"{not json"}), "damaged model file"),
    (lambda p: _rewrite(p, {"meta.json": json.dumps({"format": "other"}).encode()}), "wrong format name"),
    (lambda p: _rewrite(p, {"feature_count.npy": None}), "feature_count.npy is missing"),
    (lambda p: _rewrite(p, {"feature_count.npy": b"\x93NUMPY junk"}), "damaged model file"),
    (lambda p: _rewrite(p, {"feature_count.npy": _npy(np.array([{"x": 1}], dtype=object), True)}),
     "damaged model file"),
    (lambda p: _rewrite(p, {"feature_count.npy": _npy(np.zeros((2, 10)))}), "do not match"),
    (lambda p: _rewrite(p, {"class_count.npy": _npy(np.array([-1.0, 5.0]))}), "negative"),
])
def test_damaged_model_files_are_refused_clearly(tmp_path, damage, reason):
    path = str(tmp_path / "bayes.model")
    trained().save(path)
    damage(path)
    with pytest.raises(ModelError) as e:
        BayesModel.load(path, expected=SMALL)
    assert str(e.value).startswith(path + ": ")
    assert reason in str(e.value)


def test_wrong_format_version_is_refused(tmp_path):
    path = str(tmp_path / "bayes.model")
    model = trained()
    model.save(path)
    meta = model.metadata()
    meta["version"] = 99
    _rewrite(path, {"meta.json": json.dumps(meta).encode()})
    with pytest.raises(ModelError, match="format version 99"):
        BayesModel.load(path, expected=SMALL)


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such model file; create it with `mailgate train`"):
        BayesModel.load(str(tmp_path / "none.model"))
