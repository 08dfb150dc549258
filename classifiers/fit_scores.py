"""Symbol weights learned from the site's own mail (``mailgate fit-scores``).

SpamAssassin's stock scores were fitted once, years ago, on other people's
mail.  Here the weights are fitted on the site's labelled mail instead:

- **Features**: which symbols a message hit, as ``mailgate score --json``
  reports them (the same code path as the gateway: every DATA-stage check
  with the config given), plus the Bayes probability as its BAYES_xx band.
  Bands, not the raw probability, because the scorer applies a weight per
  symbol: a band's learned weight goes into the same ``[scores]`` table as
  any rule's.  The probability is the *held-out* one (each training message
  judged by a Bayes model that did not learn it, ``BayesModel.
  heldout_probability``): a model's view of its own training mail is far
  too sure and would teach the fit to trust Bayes blindly.
- **Model**: scikit-learn's L2-regularised logistic regression.  A score
  is a sum of per-symbol points, and the logistic regression's decision
  value is a sum of per-symbol coefficients: the coefficients, scaled, are
  the points.
- **False positives in the objective**: a ham refused costs far more than a
  spam let through (SpamAssassin's perceptron weighted them the same way).
  Two parts: ``class_weight`` makes every ham count ``ham_cost`` times in
  the loss, so the fit works hardest where ham sits near the line; and the
  decision line is then placed, on held-out decision values from k-fold
  cross-validation, so that at most ``target_fp`` of the held-out ham
  reach it.  The class weight alone would leave the FP rate to chance; the
  threshold alone would leave the coefficients shaped by the spam-heavy
  middle.  The regularisation strength is picked from a small grid by the
  held-out spam recall at that FP bound.
- **Scale**: coefficients are scaled (and, with Bayes, the intercept
  folded into the BAYES bands) so that the points of a message reach the
  shipped threshold 5.0 exactly where the fitted decision value reaches the
  chosen line: the shipped threshold stays the decision point and nothing
  else in the config needs to change (details in ``fit_scores``).
- **What is not learned**: symbols hit by fewer than ``min_hits`` training
  messages (too little data; they keep their configured score), and policy
  symbols whose configured |score| is ``POLICY_SCORE`` or more (GTUBE,
  block/welcome lists: decisions, not evidence).  A rule whose fitted
  weight comes out against its own sign (a spam sign turned into a ham
  sign by correlation with other rules) is held at 0 and the fit is done
  again without it, as SpamAssassin's perceptron keeps a rule's sign:
  otherwise a spammer could buy points back by hitting it.

The result is a readable TOML file, ``[scores]`` style, one symbol per line
with its hit counts, sorted for diffing; ``[rules] learned_scores`` makes
the gateway use it, and ``[scores]`` in mailgate.toml still overrides any
line (rules/scoring.py ``Scorer.from_config``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

from classifiers.bayes_check import BANDS, DEFAULT_SCORES, EXTRA_BAND
from classifiers.model import HAM, SPAM
from gateway.errors import MailGateError

TARGET_FP = 0.001  # held-out ham at or above the threshold the fit allows
HAM_COST = 10.0  # a ham in the loss counts as this many spam
MIN_HITS = 5
POLICY_SCORE = 20.0
C_GRID = (0.1, 0.3, 1.0, 3.0)
FOLDS = 5
THRESHOLD = 5.0
BAND_SYMBOLS = tuple(name for name, _ in BANDS) + (EXTRA_BAND[0],)

# Upstream verdicts: other filters' opinions (and SpamAssassin's on the
# public corpus) are not the sender's evidence, and would leak the label.
_VERDICT = re.compile(rb"^x-spamd?-", re.I)


def strip_verdict_headers(raw: bytes) -> bytes:
    """The message without ``X-Spam-*`` / ``X-Spamd-*`` header fields
    (continuation lines included); the body is untouched."""
    m = re.search(rb"\r?\n\r?\n", raw)
    head, rest = (raw, b"") if m is None else (raw[:m.start()], raw[m.start():])
    out, dropping = [], False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a continuation of the field before
            if not dropping:
                out.append(line)
            continue
        dropping = bool(_VERDICT.match(line))
        if not dropping:
            out.append(line)
    return b"".join(out) + rest


def band_of(p: float) -> list[str]:
    """The BAYES symbols a probability hits (BAYES_999 beside BAYES_99)."""
    symbol = BANDS[0][0]
    for name, low in BANDS:
        if p >= low:
            symbol = name
    return [symbol, EXTRA_BAND[0]] if p >= EXTRA_BAND[1] else [symbol]


# --- symbol hits through `mailgate score --json` ------------------------------


def read_score_json(lines: Iterable[str]) -> dict[str, dict[str, float]]:
    """{path: {symbol: points as scored}} from ``mailgate score --json``,
    BAYES_xx left out (the caller brings held-out Bayes bands)."""
    out = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
            tests = row["tests"]
            out[row["path"]] = {str(k): float(v) for k, v in tests.items() if k not in DEFAULT_SCORES}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MailGateError(f"mailgate score --json, line {n}: not a score record ({e})") from None
    return out


def score_files(paths: Sequence[str], config: Optional[str], python: str = sys.executable,
                cwd: Optional[str] = None, timeout: Optional[float] = None) -> dict[str, dict[str, float]]:
    """Runs ``mailgate score --json`` (a subprocess: exactly what an admin
    runs, with the faithful offline session) and reads its records."""
    cmd = [python, "-m", "gateway.cli", "score", "--json"]
    if config:
        cmd += ["-c", config]
    proc = subprocess.run(cmd + list(paths), capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if proc.returncode not in (0, 1):  # 1: no message found
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise MailGateError(f"mailgate score failed (exit {proc.returncode}): {tail}")
    return read_score_json(proc.stdout.splitlines())


def write_stripped(messages: Iterable[tuple[str, bytes]], into: str) -> list[str]:
    """Writes each (name, raw) without upstream verdict headers under
    ``into``, keeping the file's base name (hashed folds use it); returns
    the new paths in order."""
    os.makedirs(into, exist_ok=True)
    out = []
    for i, (name, raw) in enumerate(messages):
        base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name))[:120] or "msg"
        d = os.path.join(into, f"{i // 1000:04d}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{i:06d}.{base}")
        with open(path, "wb") as f:
            f.write(strip_verdict_headers(raw))
        out.append(path)
    return out


# --- the fit ------------------------------------------------------------------


@dataclass
class Hits:
    """Per message: the symbols it hit and their configured points."""

    rows: list[dict[str, float]]
    labels: np.ndarray  # HAM / SPAM

    def symbol_counts(self) -> dict[str, tuple[int, int]]:
        """symbol -> (spam hits, ham hits)"""
        out: dict[str, list[int]] = {}
        for row, lab in zip(self.rows, self.labels):
            for s in row:
                c = out.setdefault(s, [0, 0])
                c[0 if lab == SPAM else 1] += 1
        return {s: (a, b) for s, (a, b) in out.items()}

    def defaults(self) -> dict[str, float]:
        """The configured points of every symbol seen (the first seen)."""
        out: dict[str, float] = {}
        for row in self.rows:
            for s, v in row.items():
                out.setdefault(s, v)
        return out


@dataclass
class Fit:
    weights: dict[str, float]  # learned points per symbol (scaled)
    held_at_zero: list[str]  # rules whose fitted sign went against their own
    counts: dict[str, tuple[int, int]]  # symbol -> (spam, ham) hits in training
    defaults: dict[str, float]
    C: float
    scale: float  # points per unit of decision value
    cv: dict = field(default_factory=dict)  # held-out figures at the chosen threshold
    nspam: int = 0
    nham: int = 0

    def points(self, row: dict[str, float], bayes_p: Optional[float]) -> float:
        """What the scorer gives a message with these hits and this Bayes
        probability once the learned file is loaded: learned weights where
        there are some, the configured points elsewhere."""
        total = sum(self.weights.get(s, v) for s, v in row.items())
        if bayes_p is not None:
            total += sum(self.weights.get(b, DEFAULT_SCORES[b]) for b in band_of(bayes_p))
        return total


def _columns(hits: Hits, bayes_p: Optional[np.ndarray], min_hits: int):
    counts = hits.symbol_counts()
    defaults = hits.defaults()
    learn = sorted(s for s, (a, b) in counts.items()
                   if a + b >= min_hits and abs(defaults.get(s, 0.0)) < POLICY_SCORE)
    bands = []
    if bayes_p is not None:
        band_counts = {b: [0, 0] for b in BAND_SYMBOLS}
        for p, lab in zip(bayes_p, hits.labels):
            for b in band_of(float(p)):
                band_counts[b][0 if lab == SPAM else 1] += 1
        for b in BAND_SYMBOLS:
            counts[b] = tuple(band_counts[b])
            defaults[b] = DEFAULT_SCORES[b]
        # every message is in exactly one main band, so they all stay in
        # (the intercept is folded into them, see fit_scores); BAYES_999,
        # an extra on top of BAYES_99, only with enough hits
        bands = [b for b in BAND_SYMBOLS if b != EXTRA_BAND[0] or sum(band_counts[b]) >= min_hits]
    return learn + bands, counts, defaults


def _matrix(rows, bayes_p, columns):
    import scipy.sparse

    index = {s: i for i, s in enumerate(columns)}
    ri, ci = [], []
    for r, row in enumerate(rows):
        syms = list(row)
        if bayes_p is not None:
            syms += band_of(float(bayes_p[r]))
        for s in syms:
            j = index.get(s)
            if j is not None:
                ri.append(r)
                ci.append(j)
    return scipy.sparse.csr_matrix((np.ones(len(ri)), (ri, ci)), shape=(len(rows), len(columns)))


def _signs(columns, defaults) -> np.ndarray:
    """+1: must not go below 0; -1: must not go above 0; 0: free (Bayes
    bands, and rules scored 0, which are information, not a vote)."""
    out = np.zeros(len(columns))
    for j, s in enumerate(columns):
        if s in BAND_SYMBOLS:
            continue
        d = defaults.get(s, 0.0)
        out[j] = 1.0 if d > 0 else (-1.0 if d < 0 else 0.0)
    return out


def _fit_lr(X, y, C: float, ham_cost: float, signs: np.ndarray):
    """(coefficients, intercept) of the cost-weighted logistic regression,
    refitted with sign-violating rules held at 0 until none is left."""
    from sklearn.linear_model import LogisticRegression

    free = np.ones(X.shape[1], dtype=bool)
    coef = np.zeros(X.shape[1])
    intercept = 0.0
    for _ in range(50):
        lr = LogisticRegression(C=C, class_weight={HAM: ham_cost, SPAM: 1.0}, max_iter=5000)
        cols = np.flatnonzero(free)
        lr.fit(X[:, cols], y)
        coef = np.zeros(X.shape[1])
        coef[cols] = lr.coef_[0]
        intercept = float(lr.intercept_[0])
        bad = free & (signs * coef < -1e-9)
        if not bad.any():
            break
        # all offenders at once: one at a time would be as many refits as
        # there are offenders, and the figures differ little
        free &= ~bad
    return coef, intercept, ~free


def _line(d_ham: np.ndarray, target_fp: float) -> float:
    """The lowest decision value that at most ``target_fp`` of these ham reach."""
    if not len(d_ham):
        return 0.0
    allowed = int(math.floor(target_fp * len(d_ham)))
    if allowed >= len(d_ham):
        return float("-inf")
    return float(np.sort(d_ham)[::-1][allowed]) + 1e-9


def _folds(n: int, k: int, labels: np.ndarray) -> np.ndarray:
    # stratified and fixed: every k-th ham and every k-th spam
    fold = np.zeros(n, dtype=int)
    for lab in (HAM, SPAM):
        idx = np.flatnonzero(labels == lab)
        fold[idx] = np.arange(len(idx)) % k
    return fold


def fit_scores(hits: Hits, bayes_p: Optional[np.ndarray], target_fp: float = TARGET_FP,
               ham_cost: float = HAM_COST, folds: int = FOLDS, min_hits: int = MIN_HITS,
               c_grid: Sequence[float] = C_GRID) -> Fit:
    """Fits the weights; ``bayes_p``: held-out P(spam) per message, or None
    to fit the rules alone."""
    y = np.asarray(hits.labels)
    nspam, nham = int((y == SPAM).sum()), int((y == HAM).sum())
    if min(nspam, nham) < 2 * folds:
        raise MailGateError(f"fit-scores needs at least {2 * folds} spam and {2 * folds} ham "
                            f"for {folds}-fold cross-validation; found {nspam} spam and {nham} ham")
    columns, counts, defaults = _columns(hits, bayes_p, min_hits)
    if not columns:
        raise MailGateError(f"no symbol was hit by {min_hits} or more messages: nothing to learn")
    X = _matrix(hits.rows, bayes_p, columns)
    signs = _signs(columns, defaults)
    fold = _folds(len(y), folds, y)

    best = None
    for C in c_grid:
        d = np.zeros(len(y))
        for k in range(folds):
            tr, te = fold != k, fold == k
            coef, b, _ = _fit_lr(X[tr], y[tr], C, ham_cost, signs)
            d[te] = X[te] @ coef + b
        t = _line(d[y == HAM], target_fp)
        recall = float((d[y == SPAM] >= t).mean())
        fp = int((d[y == HAM] >= t).sum())
        if best is None or recall > best[1] + 1e-12:
            best = (C, recall, fp, t, d[y == HAM])
    C, recall, fp, t, d_ham = best
    coef, b, held = _fit_lr(X, y, C, ham_cost, signs)
    # points = scale * (w.x + b - t) + 5 reach 5 exactly where the decision
    # value reaches the line t.  The constant scale * (b - t) + 5 has no
    # symbol of its own -- unless Bayes is in: every message is in exactly
    # one main band, so the constant goes into each band's weight.  Then
    # the scale is free, and is set so that the median held-out ham scores
    # 0 points (a readable, SpamAssassin-like scale).  Without Bayes the
    # constant must be 0, which fixes the scale at 5 / (t - b).
    main_bands = [j for j, s in enumerate(columns) if s in BAND_SYMBOLS and s != EXTRA_BAND[0]]
    if main_bands:
        spread = t - float(np.median(d_ham))
        if not spread > 0:
            raise MailGateError("the fitted line is below the median ham: the labelled mail looks mislabelled")
        scale = THRESHOLD / spread
        coef = coef.copy()
        coef[main_bands] += (b - t) + THRESHOLD / scale
    else:
        if not t > b:
            raise MailGateError(f"the fitted line ({t:.3g}) is not above the intercept ({b:.3g}): a message "
                                "hitting no symbol would be spam; the labelled mail looks mislabelled")
        scale = THRESHOLD / (t - b)
    weights = {s: round(float(c * scale), 3) for s, c in zip(columns, coef)}
    return Fit(weights=weights, held_at_zero=[s for s, h in zip(columns, held) if h], counts=counts,
               defaults=defaults, C=C, scale=scale, nspam=nspam, nham=nham,
               cv={"folds": folds, "ham_fp": fp, "ham": nham, "recall": recall, "target_fp": target_fp,
                   "ham_cost": ham_cost})


# --- the file -----------------------------------------------------------------


def render(fit: Fit, sources: Sequence[str] = (), when: Optional[str] = None) -> str:
    """The learned weights as a readable, diffable TOML file."""
    when = when or dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    cv = fit.cv
    lines = [
        "# MailGate symbol weights learned from labelled mail (mailgate fit-scores).",
        f"# written {when} from {fit.nspam} spam and {fit.nham} ham"
        + (f": {', '.join(sources)}" if sources else ""),
        f"# cost-weighted logistic regression (L2, C={fit.C:g}, a ham counts {cv.get('ham_cost', HAM_COST):g} "
        "spam) over symbol hits and held-out Bayes bands;",
        f"# {cv.get('folds')}-fold cross-validated at threshold {THRESHOLD:g}: ham FP "
        f"{cv.get('ham_fp')}/{cv.get('ham')} = {100 * cv.get('ham_fp', 0) / max(1, cv.get('ham', 1)):.2f} % "
        f"(target {100 * cv.get('target_fp', TARGET_FP):.2f} %), spam recall {100 * cv.get('recall', 0):.2f} %.",
        f"# {fit.scale:.3g} points per unit of log-odds; symbols not listed keep their configured score.",
        "# Used when [rules] learned_scores names this file; [scores] in mailgate.toml overrides any line.",
        "",
        "[scores]",
    ]
    held = set(fit.held_at_zero)
    for s in sorted(fit.weights):
        spam, ham = fit.counts.get(s, (0, 0))
        note = f"hits {spam} spam, {ham} ham"
        if s in fit.defaults:
            note += f"; was {fit.defaults[s]:g}"
        if s in held:
            note += "; held at 0: fitted against its rule's sign"
        lines.append(f"{s} = {fit.weights[s]:g}  # {note}")
    return "\n".join(lines) + "\n"


def write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
