"""Honest evaluation: fixed splits, rates at thresholds, AUC, per-source errors.

Splits are by a hash of the message's file name, so they are the same on
every run and every machine: fold = sha1(basename) mod k.  Fold 0 of 5 is
"the 80/20 split" quoted in docs/bayes.md.  A message is called spam at the
pipeline threshold when its Bayes band points reach it, which is what the
gateway does for a message with no other evidence.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from classifiers.bayes_check import DEFAULT_SCORES, band_score
from classifiers.model import SPAM, BayesModel, ModelSettings

PROBABILITY_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)


@dataclass
class Sample:
    label: int  # HAM or SPAM
    name: str  # file path or path:N
    source: str  # the PATH argument it came from (for per-source figures)
    tokens: list[str]


def fold_of(name: str, k: int) -> int:
    """The fold of a message: a hash of its file name, stable everywhere."""
    base = os.path.basename(name)
    return int.from_bytes(hashlib.sha1(base.encode("utf-8", "surrogateescape")).digest()[:8], "big") % k


@dataclass
class Report:
    spam_prob: np.ndarray
    labels: np.ndarray
    sources: list[str]
    names: list[str]
    threshold: float
    scores: dict
    extra: dict = field(default_factory=dict)

    @property
    def points(self) -> np.ndarray:
        return np.array([band_score(p, self.scores) for p in self.spam_prob])

    def confusion(self) -> dict:
        called = self.points >= self.threshold
        spam = self.labels == SPAM
        return {"tp": int((called & spam).sum()), "fn": int((~called & spam).sum()),
                "fp": int((called & ~spam).sum()), "tn": int((~called & ~spam).sum())}

    def rates(self) -> tuple[float, float]:
        c = self.confusion()
        fp_rate = c["fp"] / max(1, c["fp"] + c["tn"])
        recall = c["tp"] / max(1, c["tp"] + c["fn"])
        return fp_rate, recall

    def auc(self) -> float:
        from sklearn.metrics import roc_auc_score

        if len(set(self.labels.tolist())) < 2:
            return float("nan")
        return float(roc_auc_score(self.labels, self.spam_prob))

    def threshold_table(self) -> list[tuple[float, float, float]]:
        spam = self.labels == SPAM
        rows = []
        for t in PROBABILITY_THRESHOLDS:
            called = self.spam_prob >= t
            fp = (called & ~spam).sum() / max(1, (~spam).sum())
            rec = (called & spam).sum() / max(1, spam.sum())
            rows.append((t, float(fp), float(rec)))
        return rows

    def per_source(self) -> list[tuple[str, str, int, int]]:
        """(source, kind, errors, total): ham FPs or spam misses per PATH."""
        called = self.points >= self.threshold
        out = {}
        for src, lab, c in zip(self.sources, self.labels, called):
            kind = "spam" if lab == SPAM else "ham"
            err = (not c) if lab == SPAM else bool(c)
            e, n = out.get((src, kind), (0, 0))
            out[(src, kind)] = (e + int(err), n + 1)
        return [(s, k, e, n) for (s, k), (e, n) in sorted(out.items())]

    def errors(self, limit: int = 20) -> list[tuple[str, str, float]]:
        called = self.points >= self.threshold
        out = []
        for name, lab, c, p in zip(self.names, self.labels, called, self.spam_prob):
            if (lab == SPAM) != bool(c):
                out.append(("missed spam" if lab == SPAM else "false positive", name, float(p)))
        return out[:limit]

    def format(self) -> str:
        c = self.confusion()
        fp, rec = self.rates()
        nham, nspam = c["fp"] + c["tn"], c["tp"] + c["fn"]
        lines = [
            f"tested: {nspam} spam, {nham} ham{self.extra.get('how', '')}",
            f"at the pipeline threshold {self.threshold:g} (Bayes band points alone):",
            f"  ham false positives: {c['fp']}/{nham} = {100 * fp:.2f} %",
            f"  spam recall:         {c['tp']}/{nspam} = {100 * rec:.2f} %",
            f"  confusion: TP={c['tp']} FN={c['fn']} FP={c['fp']} TN={c['tn']}",
            f"AUC: {self.auc():.5f}",
            "",
            "P(spam) >=   ham FP %   spam recall %",
        ]
        for t, f, r in self.threshold_table():
            lines.append(f"  {t:<9g}  {100 * f:8.2f}   {100 * r:12.2f}")
        lines += ["", "per source (at the pipeline threshold):"]
        for src, kind, e, n in self.per_source():
            what = "false positives" if kind == "ham" else "missed"
            lines.append(f"  {kind:4} {src}: {what} {e}/{n} = {100 * e / max(1, n):.2f} %")
        errs = self.errors()
        if errs:
            lines += ["", "errors (first 20):"]
            lines += [f"  {kind}: {name} P(spam)={p:.4f}" for kind, name, p in errs]
        return "\n".join(lines)


def train_on(samples: Sequence[Sample], settings: ModelSettings, calibrate: bool = True,
             full_evidence: Optional[float] = None) -> BayesModel:
    model = BayesModel(settings)
    model.fit(model.vectors([s.tokens for s in samples]), np.array([s.label for s in samples]), calibrate,
              full_evidence=full_evidence)
    return model


def score_samples(model: BayesModel, samples: Sequence[Sample]) -> np.ndarray:
    if not samples:
        return np.zeros(0)
    return model.spam_probability_tokens([s.tokens for s in samples])


def cross_validate(samples: Sequence[Sample], settings: ModelSettings, folds: int, threshold: float,
                   scores: Optional[dict] = None, only_fold: Optional[int] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   full_evidence: Optional[float] = None) -> Report:
    """k-fold by file-name hash; ``only_fold`` runs one fold (0 = the 80/20 split)."""
    fold = np.array([fold_of(s.name, folds) for s in samples])
    probs = np.full(len(samples), np.nan)
    which = range(folds) if only_fold is None else [only_fold]
    for n, k in enumerate(which):
        train = [s for s, f in zip(samples, fold) if f != k]
        test_idx = np.flatnonzero(fold == k)
        model = train_on(train, settings, full_evidence=full_evidence)
        probs[test_idx] = score_samples(model, [samples[i] for i in test_idx])
        if progress:
            progress(n + 1, len(which))
    keep = ~np.isnan(probs)
    idx = np.flatnonzero(keep)
    how = (f" ({folds}-fold cross-validation by file-name hash)" if only_fold is None
           else f" (fold {only_fold} of {folds} by file-name hash: a {100 // folds}% test split)")
    return Report(probs[keep], np.array([samples[i].label for i in idx]),
                  [samples[i].source for i in idx], [samples[i].name for i in idx],
                  threshold, scores or dict(DEFAULT_SCORES), {"how": how})


def test_report(model: BayesModel, samples: Sequence[Sample], threshold: float,
                scores: Optional[dict] = None, how: str = "") -> Report:
    probs = score_samples(model, samples)
    return Report(probs, np.array([s.label for s in samples]), [s.source for s in samples],
                  [s.name for s in samples], threshold, scores or dict(DEFAULT_SCORES), {"how": how})


def load_samples(paths: Iterable[str], label: int, tokenizer: Callable[[bytes], list[str]],
                 iter_messages: Callable, progress: Optional[Callable[[], None]] = None) -> list[Sample]:
    out = []
    for path in paths:
        for name, raw in iter_messages([path]):
            out.append(Sample(label, name, path, tokenizer(raw)))
            if progress:
                progress()
    return out


# --- the whole pipeline: rules + Bayes, configured or learned weights ---------


@dataclass
class PipelineRow:
    """One configuration on one split: every test message's points."""

    variant: str
    split: str
    labels: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    points: list = field(default_factory=list)

    def add(self, labels, sources, points) -> None:
        self.labels += list(labels)
        self.sources += list(sources)
        self.points += [float(p) for p in points]

    def figures(self, threshold: float, hard_source: str = "hard_ham") -> dict:
        y = np.array(self.labels)
        pts = np.array(self.points)
        called = pts >= threshold
        ham, spam = y != SPAM, y == SPAM
        hard = ham & np.array([os.path.basename(str(s).rstrip("/")) == hard_source for s in self.sources], bool)
        return {"ham": int(ham.sum()), "fp": int((called & ham).sum()),
                "spam": int(spam.sum()), "tp": int((called & spam).sum()),
                "hard": int(hard.sum()), "hard_fp": int((called & hard).sum()),
                "easy_ham": int((ham & ~hard).sum()), "easy_fp": int((called & ham & ~hard).sum())}


def pipeline_parts(samples: Sequence[Sample], split: str, folds: int = 5,
                   era_train: Sequence[str] = (), era_test: Sequence[str] = ()) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, test indices) of a split: "80/20" (fold 0 of 5 by
    file-name hash), "cv" (every fold) or "era" (by source set name)."""
    if split in ("80/20", "cv"):
        fold = np.array([fold_of(s.name, folds) for s in samples])
        which = [0] if split == "80/20" else range(folds)
        return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in which]
    if split == "era":
        base = [os.path.basename(str(s.source).rstrip("/")) for s in samples]
        train = np.array([b in era_train for b in base])
        test = np.array([b in era_test for b in base])
        return [(np.flatnonzero(train), np.flatnonzero(test))]
    raise ValueError(f"unknown split {split!r}")


def evaluate_pipeline(samples: Sequence[Sample], hits: dict[str, list[dict]], parts: dict[str, list],
                      settings: ModelSettings, learn: Sequence[str] = (), fit_options: Optional[dict] = None,
                      band_scores: Optional[dict] = None, full_evidence: Optional[float] = None,
                      progress: Optional[Callable[[str], None]] = None) -> list[PipelineRow]:
    """Scores each split's test messages as the gateway would.

    ``hits``: per rules configuration, each message's symbols and points as
    ``mailgate score --json`` gave them (Bayes left out).  Per part, a
    Bayes model is trained on the training messages only; its band is added
    to each test message's points.  For the configurations in ``learn``,
    weights are also fitted on the training messages (with their held-out
    Bayes probabilities, classifiers.fit_scores) and the test messages
    scored with them: the "after" of the before/after table.
    """
    from classifiers.fit_scores import Hits, fit_scores

    band_scores = band_scores or dict(DEFAULT_SCORES)
    labels = np.array([s.label for s in samples])
    rows: dict[tuple[str, str], PipelineRow] = {}

    def row(variant, split):
        return rows.setdefault((variant, split), PipelineRow(variant, split))

    cache: dict[bytes, tuple] = {}
    for split, split_parts in parts.items():
        for train, test in split_parts:
            key = hashlib.sha1(np.asarray(train, dtype=np.int64).tobytes()).digest()
            if key not in cache:
                model = train_on([samples[i] for i in train], settings, full_evidence=full_evidence)
                p_train = model.heldout_probability()
                fits = {}
                for name in learn:
                    fits[name] = fit_scores(Hits([hits[name][i] for i in train], labels[train]), p_train,
                                            **(fit_options or {}))
                cache[key] = (model, fits)
                if progress:
                    progress(f"{split}: trained on {len(train)}")
            model, fits = cache[key]
            p_test = score_samples(model, [samples[i] for i in test])
            srcs = [samples[i].source for i in test]
            row("Bayes alone", split).add(labels[test], srcs, [band_score(p, band_scores) for p in p_test])
            for name, rows_hits in hits.items():
                pts = [sum(rows_hits[i].values()) + band_score(p, band_scores) for i, p in zip(test, p_test)]
                row(f"{name} + Bayes", split).add(labels[test], srcs, pts)
                if name in fits:
                    fit = fits[name]
                    row(f"{name} + learned weights + Bayes", split).add(
                        labels[test], srcs, [fit.points(rows_hits[i], p) for i, p in zip(test, p_test)])
    return list(rows.values())


def format_pipeline(rows: Sequence[PipelineRow], threshold: float, split_names: Optional[dict] = None) -> str:
    """The accuracy table: one line per configuration and split."""
    split_names = split_names or {}
    head = (f"{'configuration':<38} {'split':<14} {'ham FP':>16} {'hard_ham FP':>13} {'other ham FP':>16} "
            f"{'spam recall':>18}")
    lines = [f"at threshold {threshold:g}", head, "-" * len(head)]
    for r in rows:
        f = r.figures(threshold)
        fp = f"{f['fp']}/{f['ham']} {100 * f['fp'] / max(1, f['ham']):5.2f}%"
        hard = f"{f['hard_fp']}/{f['hard']}" if f["hard"] else "-"
        easy = f"{f['easy_fp']}/{f['easy_ham']} {100 * f['easy_fp'] / max(1, f['easy_ham']):5.2f}%"
        rec = f"{f['tp']}/{f['spam']} {100 * f['tp'] / max(1, f['spam']):6.2f}%"
        lines.append(f"{r.variant:<38} {split_names.get(r.split, r.split):<14} {fp:>16} {hard:>13} {easy:>16} "
                     f"{rec:>18}")
    return "\n".join(lines)
