import dataclasses
import io
import json
import os
import random
import zipfile

import numpy as np
import pytest

from classifiers.model import (
    DEFAULT_MODEL_SETTINGS,
    FORMAT_VERSION,
    FULL_EVIDENCE,
    HAM,
    SPAM,
    BayesModel,
    ModelError,
    ModelSettings,
    informative_features,
    message_digest,
)
from classifiers.tokenizer import tokenize
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
    assert meta["settings"]["n_features"] == 2 ** 16 and meta["version"] == FORMAT_VERSION == 2
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


# --- Bayes knows what it does not know ----------------------------------------

SHORT_MODERN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "short_modern")


def short_modern(kind: str) -> list[bytes]:
    d = os.path.join(SHORT_MODERN, kind)
    return [open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))]


def test_the_short_modern_fixtures_are_there():
    # calendar invites, one-line notes, modern phishing, crypto scams
    assert len(short_modern("ham")) >= 8 and len(short_modern("spam")) >= 8


def test_informative_tokens_follow_robinsons_spamicity():
    fc = np.array([[0.0, 50, 1, 30, 0], [0.0, 0, 0, 30, 60]])  # ham row, spam row
    cc = np.array([100.0, 100.0])
    # unseen: 0.5; ham-only in 50: far; seen once: pulled to 0.25; even: 0.5; spam-only: far
    assert informative_features(fc, cc).tolist() == [0, 1, 0, 0, 1]
    assert informative_features(fc, np.array([100.0, 0.0])).tolist() == [0, 0, 0, 0, 0]


def test_no_informative_token_means_no_opinion():
    model = trained()
    a, b, n_full = model.calibration
    assert n_full == FULL_EVIDENCE and b != 0
    nothing = b"Subject: zzqx\n\nqqvv wwpp\n"  # tokens the model never saw
    X = model.vectors([model.tokens(nothing)])
    assert model.evidence_matrix(X)[0] == 0
    assert model.spam_probability(nothing) == pytest.approx(0.5, abs=0.02)
    # the calibration before the shrinking gave such a message the whole offset
    model.calibration = (a, b, 0.0)
    assert model.spam_probability(nothing) != pytest.approx(0.5, abs=0.02)


def test_evidence_grows_the_share_of_the_offset_up_to_full():
    model = trained()
    model.calibration = (1.0, 4.0, 10.0)
    p = model._calibrated(np.zeros(4), np.array([0, 5, 10, 40]))
    logit = np.log(p / (1 - p))
    assert logit == pytest.approx([0.0, 2.0, 4.0, 4.0])


def test_heldout_probabilities_are_less_sure_than_the_models_own():
    model = trained()
    data = generated.corpus(1, 60, 60)
    held = model.heldout_probability()
    own = model.spam_probability_tokens([model.tokens(raw) for _, raw in data])
    assert held.shape == own.shape == (120,)
    assert np.abs(held - 0.5).mean() < np.abs(own - 0.5).mean()
    labels = np.array([label for label, _ in data])
    assert held[labels == SPAM].mean() > 0.5 > held[labels == HAM].mean()


def test_a_calibration_of_the_old_format_is_refused(tmp_path):
    path = str(tmp_path / "bayes.model")
    model = trained()
    model.save(path)
    meta = model.metadata()
    meta["calibration"] = [1.0, 2.0]
    _rewrite(path, {"meta.json": json.dumps(meta).encode()})
    with pytest.raises(ModelError, match="calibration is not three numbers"):
        BayesModel.load(path, expected=SMALL)


@pytest.fixture(scope="module")
def public_corpus_samples(tmp_path_factory):
    from tools.bench_bayes import default_corpus, unpack
    from classifiers import evaluation as ev
    from gateway.sources import iter_messages

    corpus = default_corpus()
    if not os.path.isdir(corpus):
        pytest.skip(f"no public corpus at {corpus}: the generated corpus tests above still run")
    sets = unpack(corpus, str(tmp_path_factory.mktemp("corpus")))
    tok = lambda raw: tokenize(raw, DEFAULT_MODEL_SETTINGS.tokenizer)  # noqa: E731
    return (ev.load_samples([sets[s] for s in ("spam", "spam_2")], SPAM, tok, iter_messages)
            + ev.load_samples([sets[s] for s in ("easy_ham", "easy_ham_2", "hard_ham")], HAM, tok, iter_messages))


def test_short_modern_hams_are_no_longer_sure_spam_to_the_public_corpus_model(public_corpus_samples):
    from classifiers import evaluation as ev

    model = ev.train_on(public_corpus_samples, DEFAULT_MODEL_SETTINGS)
    ham = np.array([model.spam_probability(raw) for raw in short_modern("ham")])
    spam = np.array([model.spam_probability(raw) for raw in short_modern("spam")])
    # measured: 0.48-0.91, median 0.60 (BAYES_50/60); no BAYES_95 or BAYES_99
    assert ham.max() < 0.95 and 0.4 <= np.median(ham) < 0.7
    assert np.median(spam) < 0.95  # the scams are new to a 2002-2005 model too
    # the same counts with the calibration before the shrinking: all BAYES_95 or above
    a, b, _ = model.calibration
    model.calibration = (a, b, 0.0)
    assert min(model.spam_probability(raw) for raw in short_modern("ham")) >= 0.95
