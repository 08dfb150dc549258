"""Threshold what-if: what other ``[spam]`` thresholds would have done to the
site's own recent traffic.  Pure arithmetic over ``store.verdicts(since,
until)`` rows ``(queue_id, score, action, label)``; it writes nothing.

Labels are what people said later: a message released from quarantine or
learned as ham is ham, one learned as spam is spam, the rest are unlabelled.

Only verdicts the score decided are moved: a message whose recorded action is
what the current thresholds give its score.  A virus refused at 2 points, a
policy quarantine or a tempfail keeps its action whatever the thresholds are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

ACCEPT, TAG, QUARANTINE, REJECT = "accept", "tag", "quarantine", "reject"
SCORE_ACTIONS = (ACCEPT, TAG, QUARANTINE, REJECT)


class WhatIfError(ValueError):
    """Thresholds that make no config (said to the admin as is)."""


@dataclass(frozen=True)
class Thresholds:
    threshold: float
    reject_threshold: float
    quarantine_threshold: Optional[float] = None

    def __post_init__(self):
        for name in ("threshold", "reject_threshold", "quarantine_threshold"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise WhatIfError(f"{name} = {v}: must be a finite number")
        if self.reject_threshold < self.threshold:
            raise WhatIfError(f"reject_threshold = {self.reject_threshold:g}: must not be below "
                              f"threshold ({self.threshold:g})")

    def action(self, score: float) -> str:
        """Exactly rules/scoring.py's order: reject, then quarantine, then tag."""
        if score >= self.reject_threshold:
            return REJECT
        if self.quarantine_threshold is not None and score >= self.quarantine_threshold:
            return QUARANTINE
        if score >= self.threshold:
            return TAG
        return ACCEPT

    def config_lines(self) -> str:
        lines = ["[spam]", f"threshold = {self.threshold:g}", f"reject_threshold = {self.reject_threshold:g}"]
        if self.quarantine_threshold is not None:
            lines.append(f"quarantine_threshold = {self.quarantine_threshold:g}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Row:
    queue_id: str
    score: float
    action: str
    label: Optional[str]  # "ham", "spam" or None


@dataclass
class Bin:
    lo: float
    hi: float
    ham: int = 0
    spam: int = 0
    unlabelled: int = 0

    @property
    def total(self) -> int:
        return self.ham + self.spam + self.unlabelled


@dataclass(frozen=True)
class Change:
    queue_id: str
    score: float
    label: Optional[str]
    before: str
    after: str


@dataclass
class Errors:
    """Labelled messages a set of thresholds gets wrong."""

    false_positives: int = 0  # ham that is tagged, quarantined or refused as spam
    misses: int = 0  # spam that is accepted untouched
    ham: int = 0
    spam: int = 0


@dataclass
class Outcome:
    current: Thresholds
    proposed: Thresholds
    total: int
    decided_by_score: int
    changes: list[Change] = field(default_factory=list)
    before: Errors = field(default_factory=Errors)
    after: Errors = field(default_factory=Errors)
    by_transition: dict = field(default_factory=dict)  # (before, after) -> count


def rows(verdicts: Iterable) -> list[Row]:
    """Store tuples (or Rows) -> Rows, with the score as a float."""
    out = []
    for v in verdicts:
        queue_id, score, action, label = v
        out.append(Row(str(queue_id), float(score), str(action), label if label in ("ham", "spam") else None))
    return out


def histogram(data: Iterable[Row], width: float = 1.0, lo: Optional[float] = None,
              hi: Optional[float] = None) -> list[Bin]:
    """Counts per score bin [lo+k*width, lo+(k+1)*width), by label.  Scores
    below ``lo`` or above ``hi`` fall into the first or last bin, so every
    message is counted once."""
    data = list(data)
    if width <= 0 or not math.isfinite(width):
        raise WhatIfError(f"bin width = {width}: must be a positive number")
    if not data:
        return []
    scores = [r.score for r in data]
    lo = math.floor(min(scores) / width) * width if lo is None else lo
    hi = (math.floor(max(scores) / width) + 1) * width if hi is None else hi
    n = max(1, int(math.ceil((hi - lo) / width - 1e-9)))
    bins = [Bin(lo + k * width, lo + (k + 1) * width) for k in range(n)]
    for r in data:
        k = min(n - 1, max(0, int(math.floor((r.score - lo) / width + 1e-9))))
        b = bins[k]
        if r.label == "ham":
            b.ham += 1
        elif r.label == "spam":
            b.spam += 1
        else:
            b.unlabelled += 1
    return bins


def _errors(data: list[Row], action_of) -> Errors:
    e = Errors()
    for r in data:
        act = action_of(r)
        if r.label == "ham":
            e.ham += 1
            e.false_positives += act in (TAG, QUARANTINE, REJECT)
        elif r.label == "spam":
            e.spam += 1
            e.misses += act == ACCEPT
    return e


def simulate(data: Iterable[Row], current: Thresholds, proposed: Thresholds) -> Outcome:
    """How many messages change action under ``proposed``, which ones, and
    the false positives and misses (by the labels) before and after."""
    data = list(data)
    by_score = [r for r in data if r.action in SCORE_ACTIONS and current.action(r.score) == r.action]
    moved = {r.queue_id for r in by_score}

    def after(r: Row) -> str:
        return proposed.action(r.score) if r.queue_id in moved else r.action

    out = Outcome(current, proposed, total=len(data), decided_by_score=len(by_score))
    for r in data:
        new = after(r)
        if new != r.action:
            out.changes.append(Change(r.queue_id, r.score, r.label, r.action, new))
            out.by_transition[(r.action, new)] = out.by_transition.get((r.action, new), 0) + 1
    out.changes.sort(key=lambda c: (-abs(c.score), c.queue_id))
    out.before = _errors(data, lambda r: r.action)
    out.after = _errors(data, after)
    return out
