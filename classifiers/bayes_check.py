"""The Bayes content check: the model's spam probability as score bands.

Bands follow SpamAssassin's BAYES_00 ... BAYES_99 (plus BAYES_999 on top of
BAYES_99).  The default scores are chosen so that BAYES_99 alone reaches the
default threshold of 5.0, since for most messages Bayes is the only content
evidence; the figures behind that choice are in docs/bayes.md.

The model is read in a worker thread, never on the reactor.  The check
notices a replaced model file (it looks at the file's mtime at most every
``reload_interval`` seconds) and swaps it in without a restart.  Without a
model, or with one trained on fewer than ``min_spam``/``min_ham`` messages,
it adds nothing and says so once in the log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from pydantic import Field, field_validator

from classifiers.model import HAM, SPAM, BayesModel, ModelError
from gateway.config import Duration, Section
from gateway.plugins import Check, Symbol
from gateway.records import Result, Stage

log = logging.getLogger("mailgate.bayes")

# (symbol, lower bound of P(spam)); a message gets the highest band it
# reaches, and BAYES_999 in addition to BAYES_99.
BANDS = (
    ("BAYES_00", 0.0), ("BAYES_05", 0.01), ("BAYES_20", 0.05), ("BAYES_40", 0.20),
    ("BAYES_50", 0.40), ("BAYES_60", 0.60), ("BAYES_80", 0.80), ("BAYES_95", 0.95),
    ("BAYES_99", 0.99),
)
EXTRA_BAND = ("BAYES_999", 0.999)

# SpamAssassin's scores (set 3) up to BAYES_95; BAYES_99 alone reaches the
# default threshold 5.0, since for most messages Bayes is the only content
# evidence.  The training calibration puts P = 0.99 where at most 0.2 % of
# the held-out ham are (see docs/bayes.md for the measurement).
DEFAULT_SCORES = {
    "BAYES_00": -1.9, "BAYES_05": -0.5, "BAYES_20": -0.001, "BAYES_40": -0.001,
    "BAYES_50": 0.8, "BAYES_60": 1.5, "BAYES_80": 2.0, "BAYES_95": 3.0,
    "BAYES_99": 5.0, "BAYES_999": 0.5,
}


class BayesSettings(Section):
    """[bayes]"""

    model: str = "var/bayes.model"
    min_spam: int = Field(200, ge=0)
    min_ham: int = Field(200, ge=0)
    # how often, at most, the model file's mtime is looked at
    reload_interval: Duration = 5.0
    scores: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SCORES))
    # learn from confident overall verdicts; the Bayes points themselves are
    # left out of the sum, so Bayes never teaches itself
    autolearn: bool = False
    autolearn_spam: float = 12.0
    autolearn_ham: float = 0.1
    autolearn_save_interval: Duration = 300.0

    @field_validator("scores")
    @classmethod
    def _scores(cls, value: dict[str, float]) -> dict[str, float]:
        known = set(DEFAULT_SCORES)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown band(s) {', '.join(unknown)}; bands are {', '.join(DEFAULT_SCORES)}")
        return {**DEFAULT_SCORES, **value}


def band_results(p: float, scores: dict[str, float]) -> list[Result]:
    """P(spam) -> the band Result(s) it falls in."""
    symbol = BANDS[0][0]
    for name, low in BANDS:
        if p >= low:
            symbol = name
    detail = f"P(spam)={p:.4f}"
    out = [Result(symbol, scores.get(symbol, DEFAULT_SCORES[symbol]), detail)]
    if p >= EXTRA_BAND[1]:
        out.append(Result(EXTRA_BAND[0], scores.get(EXTRA_BAND[0], DEFAULT_SCORES[EXTRA_BAND[0]]), detail))
    return out


def band_score(p: float, scores: dict[str, float]) -> float:
    return sum(r.score for r in band_results(p, scores))


class ModelHolder:
    """The current model, read again when its file changes.  Thread-safe."""

    def __init__(self, path: str, reload_interval: float, clock: Callable[[], float] = time.monotonic,
                 loader: Callable[[str], BayesModel] = BayesModel.load):
        self.path = path
        self.reload_interval = reload_interval
        self.clock = clock
        self.loader = loader
        self.model: Optional[BayesModel] = None
        self._lock = threading.Lock()
        self._stamp: Any = None  # (mtime_ns, size, inode) of the file loaded or refused
        self._next_look = float("-inf")
        self._said: set = set()  # log once per situation
        self.saved_stamp: Any = None

    def say_once(self, key, level, msg, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg, *args)

    def current(self) -> Optional[BayesModel]:
        now = self.clock()
        if now < self._next_look:
            return self.model
        with self._lock:
            if now < self._next_look:
                return self.model
            self._next_look = now + self.reload_interval
            try:
                st = os.stat(self.path)
            except OSError:
                if self.model is None:
                    self.say_once(("missing", self.path), logging.WARNING,
                               "bayes: no model file at %s; Bayes adds nothing until one is trained "
                               "(mailgate train --spam DIR --ham DIR -o %s)", self.path, self.path)
                return self.model
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return self.model
            self._stamp = stamp
            try:
                model = self.loader(self.path)
            except ModelError as e:
                self.say_once(("bad", stamp), logging.ERROR, "bayes: model refused: %s%s", e,
                           "; keeping the model loaded before" if self.model else "")
                return self.model
            first = self.model is None
            self.model = model
            log.info("bayes: %s model %s (%d spam, %d ham, trained %s)",
                     "loaded" if first else "reloaded", self.path, model.nspam, model.nham, model.trained_at)
            self._said = {k for k in self._said if k[0] != "untrained"}
            return self.model

    def mark_saved(self) -> None:
        """Our own save (autolearn) is not a new file to load."""
        try:
            st = os.stat(self.path)
            self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            pass


class BayesCheck(Check):
    name = "bayes"
    stage = Stage.DATA
    symbols = tuple(Symbol(name, DEFAULT_SCORES[name], "bayes",
                           f"Bayes spam probability is {low:.0%} or more" if low else "Bayes spam probability is under 1%")
                    for name, low in BANDS + (EXTRA_BAND,))
    priority = 50

    def __init__(self, settings: BayesSettings, run_in_thread: Callable[..., Any],
                 holder: Optional[ModelHolder] = None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.run_in_thread = run_in_thread
        self.clock = clock
        self.holder = holder or ModelHolder(settings.model, settings.reload_interval, clock)
        self._learn_lock = threading.Lock()
        self._unsaved = 0
        self._last_save = clock()

    @classmethod
    def from_config(cls, config, services):
        check = cls(config.bayes, services.run_in_thread)
        # sa_rules scores the stock rules with SpamAssassin's Bayes score sets
        # (2, 3) only while a model can scan, as SpamAssassin does; rules/
        # does not import classifiers/, so it asks through the shared services
        extra = getattr(services, "extra", None)
        if extra is not None:
            extra["bayes.ready"] = check.ready
        return check

    def ready(self) -> bool:
        """A trained model is loaded (SpamAssassin's ``is_scan_available``)."""
        model = self.holder.current()
        return model is not None and model.is_trained(self.settings.min_spam, self.settings.min_ham)

    def check(self, txn):
        return self.run_in_thread(self.classify, txn.message.raw)

    def classify(self, raw: bytes) -> list[Result]:
        """Runs in a worker thread."""
        model = self.holder.current()
        if model is None:
            return []
        s = self.settings
        if not model.is_trained(s.min_spam, s.min_ham):
            self.holder.say_once(("untrained", id(model)), logging.WARNING,
                              "bayes: model %s has learned %d spam and %d ham; Bayes adds nothing "
                              "until it has at least %d spam and %d ham",
                              self.holder.path, model.nspam, model.nham, s.min_spam, s.min_ham)
            return []
        return band_results(model.spam_probability(raw), s.scores)

    # --- autolearn --------------------------------------------------------

    def autolearn_label(self, verdict) -> Optional[int]:
        """Which way a verdict is confident enough to learn, from the other
        checks' points only (never from Bayes' own)."""
        if not self.settings.autolearn or verdict is None:
            return None
        names = set(DEFAULT_SCORES)
        others = sum(r.score for r in verdict.results if r.symbol not in names)
        if others >= self.settings.autolearn_spam:
            return SPAM
        if others <= self.settings.autolearn_ham:
            return HAM
        return None

    def after_verdict(self, txn, verdict):
        """Hook for the gateway after the verdict: autolearn, in a thread.
        Returns a Deferred, or None when there is nothing to learn."""
        label = self.autolearn_label(verdict)
        if label is None or txn.message is None:
            return None
        return self.run_in_thread(self.learn, txn.message.raw, label)

    def learn(self, raw: bytes, label: int) -> str:
        model = self.holder.current()
        if model is None:
            return "no-model"
        with self._learn_lock:
            # the log-probabilities are derived again at the save, not for
            # every message: that is a pass over all 2^20 columns
            outcome = model.learn(raw, label, refresh=False)
            if outcome != "same":
                self._unsaved += 1
            now = self.clock()
            if self._unsaved and now - self._last_save >= self.settings.autolearn_save_interval:
                self._save(model)
                self._last_save = now
        return outcome

    def _save(self, model: BayesModel) -> None:
        model.commit()
        try:
            model.save(self.holder.path)
            self.holder.mark_saved()
            log.info("bayes: autolearn saved %d new message(s) to %s", self._unsaved, self.holder.path)
            self._unsaved = 0
        except OSError as e:
            log.error("bayes: autolearn could not save %s: %s", self.holder.path, e)

    def close(self) -> None:
        # a reload replaces this check: keep what autolearn learned (the
        # write happens in a worker thread, never on the reactor)
        model = self.holder.model
        if self._unsaved and model is not None:
            self.run_in_thread(self._save_locked, model)

    def _save_locked(self, model: BayesModel) -> None:
        with self._learn_lock:
            self._save(model)


CHECKS = (BayesCheck,)
SECTIONS = {"bayes": BayesSettings}
