"""The trained Bayes model: hashed features and a multinomial naive Bayes.

Features are the tokenizer's strings hashed into ``n_features`` columns by
scikit-learn's ``HashingVectorizer`` (no vocabulary to grow or store);
counts are per message presence (``binary``), as SpamBayes found best.  The
estimator is ``MultinomialNB`` learning with ``partial_fit``; unlearning a
message subtracts its counts again.

The file format executes no code on load: a zip archive holding
``meta.json`` (when trained, how many spam and ham, the feature settings, a
format version) and plain ``.npy`` arrays read with ``allow_pickle=False``.
A model written with other settings, or a damaged file, is refused with a
``ModelError`` naming the file and the reason.

The model keeps the digests of the messages it learned and which way, so
learning a message again the same way does nothing and learning it the
other way moves its counts over.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from classifiers.tokenizer import TokenizerSettings, tokenize
from gateway.atomic import replaced_file
from gateway.errors import MailGateError

FORMAT = "mailgate-bayes"
# 2: the calibration has a third number, the evidence a full offset needs
FORMAT_VERSION = 2
HAM, SPAM = 0, 1
LABELS = {"ham": HAM, "spam": SPAM}
# Arrays a model file must hold, and their dtypes.
_ARRAYS = {"feature_count": np.float64, "class_count": np.float64,
           "digests": np.uint8, "digest_labels": np.int8}
DIGEST_BYTES = 16
MAX_MODEL_FILE = 512 * 1024 * 1024
# share of held-out ham allowed at or above P(spam) = 0.99 (see fit_calibration)
TARGET_HAM_FP = 0.002
# A token is informative when its Robinson spamicity f(w) is at least this far
# from 0.5: SpamAssassin's ROBINSON_MIN_PROB_STRENGTH (Bayes.pm), i.e. f(w)
# outside [0.154, 0.846].  Robinson's smoothing uses s = 1, x = 0.5.
MIN_PROB_STRENGTH = 0.346
ROBINSON_S, ROBINSON_X = 1.0, 0.5
# Informative tokens from which a message gets the calibration's whole
# offset (see ``BayesModel._calibrated``).  Chosen by measurement
# (docs/bayes.md, tools/bench_bayes.py): the public corpus's held-out
# messages carry a median of ~40 (2 % fewer than 12), the short modern
# notes and calendar invites of tests/fixtures/short_modern 0-11.  At 20
# those go from P 0.98-0.99 to 0.48-0.91 (median 0.60); the public corpus's
# 5-fold figures at P >= 0.99 move from ham FP 8/4149, recall 97.78 % to
# 6/4149, 97.10 % (AUC 0.9989 both).  10 keeps recall (-0.06 point) but
# leaves the invites at 0.96-0.98; 30 costs 1.7 points of recall.
FULL_EVIDENCE = 20.0


class ModelError(MailGateError):
    """A model file that cannot be used: names the file and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class ModelSettings:
    """Everything that shapes the features and the estimate; a model file
    made with other settings cannot be used with these."""

    n_features: int = 2 ** 20
    binary: bool = True
    alpha: float = 1e-4
    fit_prior: bool = False
    tokenizer: TokenizerSettings = field(default_factory=TokenizerSettings)

    def as_dict(self) -> dict:
        return {"n_features": self.n_features, "binary": self.binary, "alpha": self.alpha,
                "fit_prior": self.fit_prior, "tokenizer": self.tokenizer.as_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSettings":
        data = dict(data)
        data["tokenizer"] = TokenizerSettings(**data.get("tokenizer", {}))
        return cls(**data)


DEFAULT_MODEL_SETTINGS = ModelSettings()


def _identity(tokens):
    return tokens


def message_digest(raw: bytes) -> bytes:
    """Identifies a message across the copies an admin may learn from.

    The body and the Message-ID, not the whole file: a copy from a user's
    mailbox has our X-Spam headers and Received line added, and must still
    be recognised as the message learned before.
    """
    sep = raw.find(b"\r\n\r\n")
    sep_len = 4
    if sep < 0:
        sep, sep_len = raw.find(b"\n\n"), 2
    head, body = (raw, b"") if sep < 0 else (raw[:sep], raw[sep + sep_len:])
    m = re.search(rb"(?im)^message-id:[ \t]*(<[^>\r\n]{1,500}>)", head)
    h = hashlib.sha256()
    h.update(m.group(1).strip() if m else b"")
    h.update(b"\0")
    h.update(body.replace(b"\r\n", b"\n"))
    return h.digest()[:DIGEST_BYTES]


class BayesModel:
    """Counts, the estimator built from them, and the learned-message record."""

    def __init__(self, settings: ModelSettings = DEFAULT_MODEL_SETTINGS):
        # scikit-learn costs a second to import: only commands and checks
        # that use a model pay for it, not every `mailgate` invocation
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.naive_bayes import MultinomialNB

        self.settings = settings
        self.vectorizer = HashingVectorizer(
            analyzer=_identity, n_features=settings.n_features, alternate_sign=False,
            norm=None, binary=settings.binary, dtype=np.float64,
        )
        self.nb = MultinomialNB(alpha=settings.alpha, fit_prior=settings.fit_prior)
        self.nb.classes_ = np.array([HAM, SPAM])
        self.nb.feature_count_ = np.zeros((2, settings.n_features), dtype=np.float64)
        self.nb.class_count_ = np.zeros(2, dtype=np.float64)
        self.nb.n_features_in_ = settings.n_features
        self._learned: dict[bytes, int] = {}
        self.trained_at: Optional[str] = None
        # P(spam) = sigmoid(a * log_odds + b * min(1, informative / n_full)),
        # (a, b, n_full) fitted by `fit_calibration`
        self.calibration: tuple[float, float, float] = (1.0, 0.0, FULL_EVIDENCE)
        # held-out (log-odds, informative tokens) of the training messages,
        # from the calibration's folds: never saved, for `heldout_probability`
        self.heldout: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._refresh()

    # --- counts ----------------------------------------------------------

    @property
    def nspam(self) -> int:
        return int(self.nb.class_count_[SPAM])

    @property
    def nham(self) -> int:
        return int(self.nb.class_count_[HAM])

    @property
    def learned_count(self) -> int:
        return len(self._learned)

    def tokens(self, raw: bytes) -> list[str]:
        return tokenize(raw, self.settings.tokenizer)

    def vectors(self, token_lists: Iterable[list[str]]):
        return self.vectorizer.transform(token_lists)

    def _refresh(self) -> None:
        # MultinomialNB derives its log-probabilities from the counts; after
        # loading or subtracting counts they are derived again the same way.
        self.nb._update_feature_log_prob(self.settings.alpha)
        if self.settings.fit_prior and self.nb.class_count_.min() <= 0:
            self.nb.class_log_prior_ = np.full(2, -np.log(2.0))  # no data yet
        else:
            self.nb._update_class_log_prior()
        # P(spam) is a logistic of w.x + b: one sparse dot product per message
        flp = self.nb.feature_log_prob_
        self._weights = flp[SPAM] - flp[HAM]
        self._bias = float(self.nb.class_log_prior_[SPAM] - self.nb.class_log_prior_[HAM])
        self._informative = informative_features(self.nb.feature_count_, self.nb.class_count_)

    def train_vectors(self, X, labels: np.ndarray) -> None:
        """Add a batch of hashed messages (no digest record: bulk training)."""
        if X.shape[0]:
            self.nb.partial_fit(X, np.asarray(labels), classes=self.nb.classes_)
            self._refresh()
        self.trained_at = _now()

    def fit(self, X, labels, calibrate: bool = True, folds: int = 5,
            full_evidence: Optional[float] = None) -> None:
        """Bulk training from a hashed matrix, then the calibration
        (``full_evidence``: see ``fit_calibration``; 0 = no shrinking)."""
        labels = np.asarray(labels)
        self.train_vectors(X, labels)
        if calibrate:
            self.heldout = heldout_evidence(self.settings, X, labels, folds)
            self.calibration = fit_calibration(self.settings, X, labels, folds, heldout=self.heldout,
                                               full_evidence=full_evidence)

    def heldout_probability(self) -> Optional[np.ndarray]:
        """P(spam) of each training message (rows of ``fit``'s X) from the
        calibration fold model that did not learn it, under the final
        calibration: what learned rule weights are fitted on, since the
        model's own view of its training mail is far too sure."""
        if self.heldout is None:
            return None
        return self._calibrated(*self.heldout)

    def record(self, digest: bytes, label: int) -> None:
        """Note a message learned in bulk (``fit``) so ``learn`` knows it."""
        self._learned[digest] = label

    def learned_as(self, raw: bytes) -> Optional[int]:
        return self._learned.get(message_digest(raw))

    def learn(self, raw: bytes, label: int, refresh: bool = True) -> str:
        """Learn one message; returns "new", "same" (already learned this
        way: nothing done) or "moved" (it was learned the other way)."""
        if label not in (HAM, SPAM):
            raise ValueError("label must be HAM or SPAM")
        digest = message_digest(raw)
        before = self._learned.get(digest)
        if before == label:
            return "same"
        x = self.vectors([self.tokens(raw)])
        if before is not None:
            self._subtract(x, before)
        self.nb.feature_count_[label][x.indices] += x.data
        self.nb.class_count_[label] += 1
        self._learned[digest] = label
        self.trained_at = _now()
        if refresh:
            self._refresh()
        return "new" if before is None else "moved"

    def forget(self, raw: bytes) -> bool:
        """Unlearn a message learned before; False if it never was."""
        digest = message_digest(raw)
        before = self._learned.pop(digest, None)
        if before is None:
            return False
        self._subtract(self.vectors([self.tokens(raw)]), before)
        self._refresh()
        return True

    def _subtract(self, x, label: int) -> None:
        row = self.nb.feature_count_[label]
        # a copy with headers we add later may hash a few features it was
        # not trained with: counts never go below zero
        row[x.indices] = np.maximum(row[x.indices] - x.data, 0.0)
        self.nb.class_count_[label] = max(0.0, self.nb.class_count_[label] - 1)

    def commit(self) -> None:
        """Derive the estimate again after ``learn(..., refresh=False)``."""
        self._refresh()

    # --- scoring ---------------------------------------------------------

    def log_odds_tokens(self, token_lists: list[list[str]]) -> np.ndarray:
        """The naive Bayes log-odds of spam: a ranking, not a probability."""
        return self.log_odds_tokens_matrix(self.vectors(token_lists))

    def log_odds_tokens_matrix(self, X) -> np.ndarray:
        return np.asarray(X @ self._weights + self._bias, dtype=np.float64)

    def evidence_matrix(self, X) -> np.ndarray:
        """How many of each row's distinct tokens are informative."""
        if not self.settings.binary:
            X = X.sign()
        return np.asarray(X @ self._informative, dtype=np.float64)

    def spam_probability_matrix(self, X) -> np.ndarray:
        return self._calibrated(self.log_odds_tokens_matrix(X), self.evidence_matrix(X))

    def spam_probability_tokens(self, token_lists: list[list[str]]) -> np.ndarray:
        return self.spam_probability_matrix(self.vectors(token_lists))

    def _calibrated(self, log_odds: np.ndarray, evidence: np.ndarray) -> np.ndarray:
        """Naive Bayes log-odds -> P(spam), shrunk toward 0.5 by the evidence.

        Naive Bayes log-odds are far too confident (every message is 0 or
        1): the calibration fitted at training time scales them (``a``) and
        shifts them (``b``).  The shift is what naive Bayes gets wrong per
        token -- ham in a typical corpus carries many more ham tokens than
        a short message can, so z = 0 sits deep on the spam side (b is about
        +4.5 on the public corpus: an empty message would be P = 0.99).  A
        correction made per token belongs to messages in proportion to the
        tokens that carry evidence, so a message gets the share
        min(1, n / n_full) of it, n being its informative tokens
        (``informative_features``).  With no informative token at all the
        model has no opinion and says 0.5, as SpamAssassin's Bayes abstains
        without significant tokens; the slope term ``a * z`` is evidence
        already, summed over the same tokens, so it needs no shrinking.
        Measured before/after (SpamBayes style) in docs/bayes.md and by
        tools/bench_bayes.py: public-corpus accuracy unchanged, short modern
        mail from BAYES_95/99 to the middle bands.
        """
        a, b, n_full = self.calibration
        evidence = np.asarray(evidence, dtype=np.float64)
        # n_full = 0: no shrinking (the calibration before this one, kept
        # for the before/after measurement)
        share = np.minimum(1.0, evidence / n_full) if n_full > 0 else np.ones_like(evidence)
        return _sigmoid(a * np.asarray(log_odds) + b * share)

    def spam_probability(self, raw: bytes) -> float:
        return float(self.spam_probability_tokens([self.tokens(raw)])[0])

    def is_trained(self, min_spam: int, min_ham: int) -> bool:
        return self.nspam >= min_spam and self.nham >= min_ham

    # --- files -----------------------------------------------------------

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "trained_at": self.trained_at,
            "spam": self.nspam,
            "ham": self.nham,
            "learned_messages": self.learned_count,
            "calibration": list(self.calibration),
            "settings": self.settings.as_dict(),
            "estimator": "sklearn.naive_bayes.MultinomialNB",
            "features": "sklearn.feature_extraction.text.HashingVectorizer(alternate_sign=False)",
        }

    def save(self, path: str) -> None:
        """Write atomically: a reader sees the old file or the new one."""
        digests = np.frombuffer(b"".join(self._learned.keys()), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        arrays = {
            "feature_count": self.nb.feature_count_,
            "class_count": self.nb.class_count_,
            "digests": digests,
            "digest_labels": np.fromiter(self._learned.values(), dtype=np.int8, count=len(self._learned)),
        }
        with replaced_file(path, "wb", prefix=".bayes-", suffix=".tmp") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
                z.writestr("meta.json", json.dumps(self.metadata(), indent=2, sort_keys=True))
                for name, arr in arrays.items():
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(arr, dtype=_ARRAYS[name]), allow_pickle=False)
                    z.writestr(name + ".npy", buf.getvalue())

    @classmethod
    def load(cls, path: str, expected: Optional[ModelSettings] = DEFAULT_MODEL_SETTINGS) -> "BayesModel":
        """Read a model file; ``expected=None`` takes the file's own settings."""
        meta, arrays = read_model_file(path)
        try:
            settings = ModelSettings.from_dict(meta["settings"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(path, f"metadata has no usable feature settings ({e})") from None
        if expected is not None and settings != expected:
            diff = _differences(expected.as_dict(), settings.as_dict())
            raise ModelError(path, "trained with other feature settings than this version uses "
                             f"({'; '.join(diff)}); train it again with `mailgate train`")
        model = cls(settings)
        fc, cc = arrays["feature_count"], arrays["class_count"]
        if fc.shape != (2, settings.n_features) or cc.shape != (2,):
            raise ModelError(path, f"array shapes {fc.shape}/{cc.shape} do not match "
                             f"n_features={settings.n_features}")
        if not (np.isfinite(fc).all() and np.isfinite(cc).all()) or (fc < 0).any() or (cc < 0).any():
            raise ModelError(path, "counts are negative or not finite (damaged file)")
        digests, dlabels = arrays["digests"], arrays["digest_labels"]
        if digests.ndim != 2 or digests.shape[1] != DIGEST_BYTES or dlabels.shape != (digests.shape[0],):
            raise ModelError(path, "learned-message record has the wrong shape (damaged file)")
        model.nb.feature_count_ = fc  # fresh arrays from np.load: no copy needed
        model.nb.class_count_ = cc
        flat = digests.tobytes()
        model._learned = {flat[i:i + DIGEST_BYTES]: int(lab)
                          for i, lab in zip(range(0, len(flat), DIGEST_BYTES), dlabels)}
        model.trained_at = meta.get("trained_at")
        try:
            a, b, n_full = (float(v) for v in meta.get("calibration", (1.0, 0.0, FULL_EVIDENCE)))
        except (TypeError, ValueError):
            raise ModelError(path, "metadata calibration is not three numbers (damaged file)") from None
        if not (np.isfinite(a) and np.isfinite(b) and np.isfinite(n_full) and a > 0 and n_full >= 0):
            raise ModelError(path, "metadata calibration is out of range (damaged file)")
        model.calibration = (a, b, n_full)
        model._refresh()
        return model


def read_model_file(path: str) -> tuple[dict, dict]:
    """Metadata and arrays of a model file, or a ModelError saying why not."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ModelError(path, "no such model file; create it with `mailgate train`") from None
    except OSError as e:
        raise ModelError(path, f"cannot read: {e.strerror}") from None
    if size > MAX_MODEL_FILE:
        raise ModelError(path, f"{size} bytes is larger than any model this version writes")
    try:
        with zipfile.ZipFile(path) as z:
            try:
                meta = json.loads(z.read("meta.json"))
            except KeyError:
                raise ModelError(path, "not a MailGate Bayes model (no meta.json)") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ModelError(path, "not a MailGate Bayes model (wrong format name)")
            if meta.get("version") != FORMAT_VERSION:
                raise ModelError(path, f"model format version {meta.get('version')!r}, this "
                                 f"MailGate reads version {FORMAT_VERSION}; train it again")
            arrays = {}
            for name, dtype in _ARRAYS.items():
                try:
                    data = z.read(name + ".npy")
                except KeyError:
                    raise ModelError(path, f"damaged model: {name}.npy is missing") from None
                arr = np.load(io.BytesIO(data), allow_pickle=False)
                if arr.dtype != dtype:
                    raise ModelError(path, f"damaged model: {name} has dtype {arr.dtype}")
                arrays[name] = arr
    except ModelError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile):
        raise ModelError(path, "not a MailGate Bayes model (not a zip archive, or damaged)") from None
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError, EOFError, zlib_error()) as e:
        raise ModelError(path, f"damaged model file ({e})") from None
    except OSError as e:
        raise ModelError(path, f"cannot read: {e.strerror or e}") from None
    return meta, arrays


def zlib_error():
    import zlib

    return zlib.error


def informative_features(feature_count: np.ndarray, class_count: np.ndarray) -> np.ndarray:
    """1.0 for the hashed features whose spamicity is far from 0.5, else 0.

    Robinson's f(w) = (s x + N p(w)) / (s + N): Graham's p(w) from the share
    of spam and of ham messages holding the token, pulled toward x = 0.5 by
    how few messages (N) it was seen in.  Counts are per message (the
    vectors are binary), which is what p(w) needs.
    """
    nspam, nham = float(class_count[SPAM]), float(class_count[HAM])
    if nspam <= 0 or nham <= 0:
        return np.zeros(feature_count.shape[1])
    ps, ph = feature_count[SPAM] / nspam, feature_count[HAM] / nham
    seen = feature_count[SPAM] + feature_count[HAM]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(ps + ph > 0, ps / (ps + ph), ROBINSON_X)
    f = (ROBINSON_S * ROBINSON_X + seen * p) / (ROBINSON_S + seen)
    return (np.abs(f - 0.5) >= MIN_PROB_STRENGTH).astype(np.float64)


def heldout_evidence(settings: ModelSettings, X, labels: np.ndarray,
                     folds: int = 5) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Held-out (log-odds, informative tokens) of every row of X, each from a
    model trained without its fold (rows dealt round-robin); None when there
    is too little data for the folds."""
    labels = np.asarray(labels)
    if min(int((labels == SPAM).sum()), int((labels == HAM).sum())) < 2 * folds:
        return None
    fold = np.arange(len(labels)) % folds
    z, n = np.zeros(len(labels)), np.zeros(len(labels))
    for k in range(folds):
        part = BayesModel(settings)
        part.train_vectors(X[fold != k], labels[fold != k])
        z[fold == k] = part.log_odds_tokens_matrix(X[fold == k])
        n[fold == k] = part.evidence_matrix(X[fold == k])
    return z, n


def fit_calibration(settings: ModelSettings, X, labels: np.ndarray, folds: int = 5,
                    target_ham_fp: float = TARGET_HAM_FP, heldout=None,
                    full_evidence: Optional[float] = None) -> tuple[float, float, float]:
    """Maps naive Bayes log-odds to the P(spam) scale the BAYES_xx bands use.

    Naive Bayes log-odds rank messages well but are no probabilities: they
    grow with a message's length and are mostly beyond +-50, so every
    message would land in BAYES_00 or BAYES_99.  From held-out log-odds
    (``folds`` models, each trained without its fold):

    - the slope is Platt scaling's (a one-feature logistic regression), so
      the bands in between spread like the evidence does;
    - the offset puts P = 0.99, where BAYES_99 starts, at the log-odds that
      only ``target_ham_fp`` of the held-out ham reach.  BAYES_99 therefore
      means "as spammy as at most 0.2 % of this site's ham", measured.
      When held-out spam and ham do not overlap at all, P = 0.5 goes
      half-way across the gap instead.
    - the offset is given to a message in proportion to its informative
      tokens, up to ``full_evidence`` (see ``BayesModel._calibrated``), and
      is placed with that share applied to the held-out messages.

    ``heldout``: (log-odds, informative tokens) from ``heldout_evidence``
    when the caller has them already.  Too little data for folds: no
    calibration (1, 0, full_evidence).
    """
    from sklearn.linear_model import LogisticRegression

    if full_evidence is None:
        full_evidence = FULL_EVIDENCE
    labels = np.asarray(labels)
    if heldout is None:
        heldout = heldout_evidence(settings, X, labels, folds)
    if heldout is None:
        return (1.0, 0.0, full_evidence)
    z, n = heldout
    lr = LogisticRegression(C=1.0, max_iter=1000)
    lr.fit(z.reshape(-1, 1), labels)
    a = float(lr.coef_[0, 0])
    if not np.isfinite(a) or a <= 0:
        return (1.0, 0.0, full_evidence)
    share = np.minimum(1.0, n / full_evidence) if full_evidence > 0 else np.ones_like(n)
    ham, spam = labels == HAM, labels == SPAM
    ham_z = np.sort(z[ham])[::-1]
    spam_z = np.sort(z[spam])
    # just above the (allowed+1)-th most spam-like held-out ham
    z99 = float(ham_z[min(int(target_ham_fp * len(ham_z)), len(ham_z) - 1)]) + 1e-6
    z_spam_low = float(spam_z[min(int(target_ham_fp * len(spam_z)), len(spam_z) - 1)])
    if z_spam_low > z99:
        # the held-out classes do not overlap (a small or easy corpus):
        # P = 0.5 half-way across the gap rather than 0.99 next to the ham
        return (a, -a * (z99 + z_spam_low) / 2, full_evidence)
    # b such that only target_ham_fp of the held-out ham reach P = 0.99 with
    # their share of b: the count above the line falls as b falls, so halve
    # the interval; the line is the logit a*z + b*share of each ham
    allowed = int(target_ham_fp * int(ham.sum()))
    target = float(np.log(0.99 / 0.01))
    ham_az, ham_share = a * z[ham], share[ham]
    lo, hi = -50.0, 50.0  # beyond that a logit offset means nothing
    for _ in range(100):
        b = (lo + hi) / 2
        if int((ham_az + b * ham_share >= target).sum()) > allowed:
            hi = b
        else:
            lo = b
    return (a, lo, full_evidence)


def _differences(want: dict, have: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(want) | set(have)):
        a, b = want.get(key), have.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={b!r} in the file, {a!r} expected")
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
