"""``mailgate train``, ``mailgate learn``, ``mailgate fit-scores`` and ``mailgate eval``.

PATH arguments are files, Maildirs, mbox files or directory trees of them
(``gateway.sources.iter_messages``).  The model path is ``[bayes] model``
from the config unless ``-o``/``-m`` names another.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable

import numpy as np

from gateway.errors import MailGateError


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, what: str, total: int = 0, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.what, self.total, self.done = what, total, 0
        self.started = self._last = time.monotonic()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        rate = self.done / max(1e-9, time.monotonic() - self.started)
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            line = f"\r{self.what} [{bar}] {self.done}/{self.total} ({rate:.0f}/s)"
        else:
            line = f"\r{self.what} {self.done} ({rate:.0f}/s)"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def _count_files(paths: Iterable[str]) -> int:
    """A quick estimate of how many messages there are, for the bar."""
    n = 0
    for p in paths:
        if os.path.isdir(p):
            for _, dirs, files in os.walk(p):
                n += sum(1 for f in files if not f.startswith(".") and f != "cmds")
        elif os.path.exists(p):
            n += 1
    return n


def _check_paths(paths: Iterable[str]) -> None:
    for p in paths:
        if not os.path.exists(p):
            raise MailGateError(f"{p}: no such file or directory")


def _read(paths, label, tokenizer, progress: Progress):
    """(source, name, raw digest, tokens) for every message under paths."""
    from classifiers.evaluation import Sample
    from classifiers.model import message_digest
    from gateway.sources import iter_messages

    out = []
    for path in paths:
        for name, raw in iter_messages([path]):
            out.append((Sample(label, name, path, tokenizer(raw)), message_digest(raw)))
            progress.step()
    return out


def _settings(args):
    """(config, bayes settings, model path)"""
    from gateway.cli import load_config

    config = load_config(args)
    bayes = config.bayes
    model_path = getattr(args, "output", None) or getattr(args, "model", None) or bayes.model
    return config, bayes, model_path


def _band_scores(config) -> dict:
    from classifiers.bayes_check import DEFAULT_SCORES

    scores = dict(config.bayes.scores)
    # [scores] overrides every symbol's weight, Bayes bands included
    scores.update({k: v for k, v in config.scores.items() if k in DEFAULT_SCORES})
    return scores


def _size(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


# --- train -------------------------------------------------------------------


def cmd_train(args) -> int:
    import scipy.sparse

    from classifiers.model import HAM, SPAM, BayesModel, message_digest
    from gateway.sources import iter_messages

    _check_paths(args.spam + args.ham)
    _, bayes, model_path = _settings(args)
    started = time.monotonic()
    model = BayesModel()
    progress = Progress("reading", _count_files(args.spam + args.ham))
    # hashed rows in batches: a large mail store never sits in memory as text
    seen: dict[bytes, int] = {}
    blocks, labels, batch, batch_labels = [], [], [], []
    duplicates = conflicts = 0

    def flush():
        if batch:
            blocks.append(model.vectors(batch))
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    for label, paths in ((SPAM, args.spam), (HAM, args.ham)):
        for _, raw in iter_messages(paths):
            progress.step()
            digest = message_digest(raw)
            before = seen.get(digest)
            if before is not None:
                # the same message twice counts once; given as spam and as
                # ham, the first label wins
                duplicates += before == label
                conflicts += before != label
                continue
            seen[digest] = label
            batch.append(model.tokens(raw))
            batch_labels.append(label)
            if len(batch) >= 1000:
                flush()
    flush()
    progress.close()
    y = np.array(labels, dtype=int)
    nspam, nham = int((y == SPAM).sum()), int((y == HAM).sum())
    if not nspam or not nham:
        raise MailGateError(f"found {nspam} spam and {nham} ham messages; training needs both "
                            f"(spam from {' '.join(args.spam)}, ham from {' '.join(args.ham)})")
    if args.verbose:
        print(f"fitting on {nspam} spam, {nham} ham ...", file=sys.stderr)
    model.fit(scipy.sparse.vstack(blocks).tocsr(), y)
    for digest, label in seen.items():
        model.record(digest, label)
    model.save(model_path)
    took = time.monotonic() - started
    print(f"trained on {nspam} spam and {nham} ham in {took:.1f} s"
          + (f"; skipped {duplicates} duplicate(s)" if duplicates else "")
          + (f"; {conflicts} message(s) given both as spam and ham kept their first label" if conflicts else ""))
    print(f"model: {model_path} ({_size(model_path)}), calibration a={model.calibration[0]:.4g} "
          f"b={model.calibration[1]:.4g} full evidence={model.calibration[2]:g} informative tokens")
    if nspam < bayes.min_spam or nham < bayes.min_ham:
        print(f"note: the gateway uses the model only from {bayes.min_spam} spam and {bayes.min_ham} ham "
              f"([bayes] min_spam/min_ham); learn more with `mailgate learn`")
    if getattr(args, "fit_scores", None):
        # the weights need each message's held-out Bayes band and its rule
        # hits through `mailgate score`: fit-scores reads the mail again
        # rather than keeping every message of a large store in memory here
        args.output_scores = args.fit_scores
        return cmd_fit_scores(args)
    return 0


# --- fit-scores --------------------------------------------------------------


def _labelled_mail(args, tmp: str):
    """Stripped copies of --spam/--ham under tmp, and their Bayes samples."""
    from classifiers.evaluation import Sample
    from classifiers.fit_scores import write_stripped
    from classifiers.model import DEFAULT_MODEL_SETTINGS, HAM, SPAM
    from classifiers.tokenizer import tokenize
    from gateway.sources import iter_messages

    samples, paths = [], []
    progress = Progress("reading", _count_files(args.spam + args.ham))
    for label, what in ((SPAM, args.spam), (HAM, args.ham)):
        for src in what:
            msgs = []
            for name, raw in iter_messages([src]):
                msgs.append((name, raw))
                progress.step()
            sub = os.path.join(tmp, "spam" if label == SPAM else "ham", f"{len(paths):06d}")
            for path in write_stripped(msgs, sub):
                with open(path, "rb") as f:
                    tokens = tokenize(f.read(), DEFAULT_MODEL_SETTINGS.tokenizer)
                samples.append(Sample(label, os.path.basename(path).split(".", 1)[1], src, tokens))
                paths.append(path)
    progress.close()
    return samples, paths


def _rule_hits(config, args, tmp: str, paths: list[str]) -> list[dict]:
    """Each message's symbols through `mailgate score --json` with the same config."""
    from classifiers.fit_scores import score_files
    from gateway.config import find_config_path

    config_path = find_config_path(getattr(args, "config", None))
    learned = getattr(getattr(config, "rules", None), "learned_scores", "")
    if learned and not os.path.exists(learned):
        # the config names the file this run is about to write; an empty
        # table is what "no learned weights" means, and lets score start
        from classifiers.fit_scores import write

        write(learned, "[scores]\n")
    by_path = score_files([tmp], os.path.abspath(config_path) if config_path else None)
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise MailGateError(f"mailgate score gave no verdict for {len(missing)} message(s), e.g. {missing[0]}")
    return [by_path[p] for p in paths]


def cmd_fit_scores(args) -> int:
    import tempfile

    import numpy as np

    from classifiers import fit_scores as fs
    from classifiers.evaluation import train_on
    from classifiers.model import DEFAULT_MODEL_SETTINGS
    from gateway.cli import load_config

    _check_paths(args.spam + args.ham)
    config = load_config(args)
    out = (getattr(args, "output_scores", None)
           or getattr(getattr(config, "rules", None), "learned_scores", "") or "var/learned-scores.toml")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mailgate-fit-scores-") as tmp:
        samples, paths = _labelled_mail(args, tmp)
        labels = np.array([s.label for s in samples])
        bayes_p = None
        if not args.no_bayes:
            # held-out probabilities: each message judged by a calibration
            # fold model that never learned it
            model = train_on(samples, DEFAULT_MODEL_SETTINGS)
            bayes_p = model.heldout_probability()
            if bayes_p is None:
                raise MailGateError("too few messages for a cross-validated Bayes band; give more, or --no-bayes")
        rows = _rule_hits(config, args, tmp, paths)
    fit = fs.fit_scores(fs.Hits(rows, labels), bayes_p, target_fp=args.target_fp, ham_cost=args.ham_cost,
                        folds=args.folds, min_hits=args.min_hits)
    fs.write(out, fs.render(fit, sources=list(args.spam) + list(args.ham)))
    cv = fit.cv
    print(f"learned {len(fit.weights)} symbol weights from {fit.nspam} spam and {fit.nham} ham "
          f"in {time.monotonic() - started:.1f} s: {out}")
    print(f"{cv['folds']}-fold held-out at threshold {fs.THRESHOLD:g}: ham FP {cv['ham_fp']}/{cv['ham']} "
          f"= {100 * cv['ham_fp'] / max(1, cv['ham']):.2f} %, spam recall {100 * cv['recall']:.2f} % "
          f"(C={fit.C:g}, {len(fit.held_at_zero)} rule(s) held at 0 for their sign)")
    learned = getattr(getattr(config, "rules", None), "learned_scores", "")
    if os.path.abspath(learned or "") != os.path.abspath(out):
        print(f"the gateway uses it once [rules] learned_scores = {out!r}")
    return 0


# --- learn -------------------------------------------------------------------


def cmd_learn(args) -> int:
    from classifiers.model import HAM, SPAM, BayesModel
    from gateway.sources import iter_messages

    paths = args.spam or args.ham
    label = SPAM if args.spam else HAM
    _check_paths(paths)
    _, _, model_path = _settings(args)
    model = BayesModel.load(model_path)  # ModelError names the file and why
    counts = {"new": 0, "same": 0, "moved": 0}
    progress = Progress("learning", _count_files(paths))
    for _, raw in iter_messages(paths):
        counts[model.learn(raw, label, refresh=False)] += 1
        progress.step()
    progress.close()
    model.commit()
    if counts["new"] or counts["moved"]:
        model.save(model_path)
    what = "spam" if label == SPAM else "ham"
    print(f"learned {counts['new']} new message(s) as {what}; {counts['moved']} moved from "
          f"{'ham' if label == SPAM else 'spam'}; {counts['same']} already learned as {what}")
    print(f"model: {model_path} now {model.nspam} spam, {model.nham} ham")
    return 0


# --- eval --------------------------------------------------------------------


def cmd_eval(args) -> int:
    from classifiers import evaluation as ev
    from classifiers.model import DEFAULT_MODEL_SETTINGS, HAM, SPAM, BayesModel
    from classifiers.tokenizer import tokenize

    config, _, model_path = _settings(args)
    threshold = args.threshold if args.threshold is not None else config.spam.threshold
    scores = _band_scores(config)
    settings = DEFAULT_MODEL_SETTINGS
    tokens = lambda raw: tokenize(raw, settings.tokenizer)  # noqa: E731

    testing = bool(args.test_spam or args.test_ham)
    training = bool(args.spam or args.ham)
    if training and not (args.spam and args.ham):
        raise MailGateError("give both --spam and --ham to train on")
    if not training and not testing:
        raise MailGateError("give --spam and --ham (cross-validation), or --test-spam/--test-ham")
    _check_paths(args.spam + args.ham + args.test_spam + args.test_ham)
    if args.folds < 2:
        raise MailGateError(f"--folds {args.folds}: needs at least 2")
    if args.only_fold is not None and not 0 <= args.only_fold < args.folds:
        raise MailGateError(f"--only-fold {args.only_fold}: must be 0..{args.folds - 1}")

    if args.rules:
        return _eval_with_rules(args, config, threshold, scores, training, testing)
    started = time.monotonic()
    progress = Progress("reading", _count_files(args.spam + args.ham + args.test_spam + args.test_ham))
    train_samples = [s for s, _ in _read(args.spam, SPAM, tokens, progress) + _read(args.ham, HAM, tokens, progress)]
    test_samples = [s for s, _ in _read(args.test_spam, SPAM, tokens, progress)
                    + _read(args.test_ham, HAM, tokens, progress)]
    progress.close()

    if testing:
        if training:
            model = ev.train_on(train_samples, settings)
            how = f" (trained on {len(train_samples)} messages from --spam/--ham)"
        else:
            model = BayesModel.load(model_path)
            how = f" (model {model_path}: {model.nspam} spam, {model.nham} ham)"
        report = ev.test_report(model, test_samples, threshold, scores, how)
    else:
        labels = {s.label for s in train_samples}
        if labels != {SPAM, HAM}:
            raise MailGateError("found no spam or no ham messages to cross-validate")
        report = ev.cross_validate(train_samples, settings, args.folds, threshold, scores, args.only_fold)
    print(report.format())
    print(f"\n(took {time.monotonic() - started:.1f} s)")
    return 0


def _eval_with_rules(args, config, threshold, scores, training, testing) -> int:
    """The before/after table: the configured weights and weights learned on
    each training part, both with a Bayes model trained on that part, every
    message scored through `mailgate score` with upstream verdicts stripped."""
    import tempfile
    import types

    import numpy as np

    from classifiers import evaluation as ev
    from classifiers.model import DEFAULT_MODEL_SETTINGS

    if not training:
        raise MailGateError("--rules needs --spam and --ham to train on (the weights are learned, then tested)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mailgate-eval-") as tmp:
        train_args = types.SimpleNamespace(spam=args.spam, ham=args.ham)
        samples, paths = _labelled_mail(train_args, os.path.join(tmp, "train"))
        ntrain = len(samples)
        if testing:
            test_args = types.SimpleNamespace(spam=args.test_spam, ham=args.test_ham)
            more, more_paths = _labelled_mail(test_args, os.path.join(tmp, "test"))
            samples, paths = samples + more, paths + more_paths
        rows = _rule_hits(config, args, tmp, paths)
    if testing:
        parts = {"test": [(np.arange(ntrain), np.arange(ntrain, len(samples)))]}
        names = {"test": "--test-*"}
    elif args.only_fold is not None:
        fold = np.array([ev.fold_of(s.name, args.folds) for s in samples])
        parts = {"fold": [(np.flatnonzero(fold != args.only_fold), np.flatnonzero(fold == args.only_fold))]}
        names = {"fold": f"fold {args.only_fold}/{args.folds}"}
    else:
        parts = {"cv": ev.pipeline_parts(samples, "cv", args.folds)}
        names = {"cv": f"{args.folds}-fold CV"}
    result = ev.evaluate_pipeline(samples, {"configured weights": rows}, parts, DEFAULT_MODEL_SETTINGS,
                                  learn=["configured weights"], band_scores=scores)
    order = {"Bayes alone": 0, "configured weights + Bayes": 1, "configured weights + learned weights + Bayes": 2}
    result.sort(key=lambda r: order.get(r.variant, 9))
    for r in result:
        if r.variant.endswith("learned weights + Bayes"):
            r.variant = "learned weights + Bayes"
    print("rules and Bayes through `mailgate score` with this config (upstream X-Spam-*/X-Spamd-* stripped);\n"
          "Bayes, and the learned weights, trained on each training part only")
    print(ev.format_pipeline(result, threshold, names))
    print(f"\n(took {time.monotonic() - started:.1f} s)")
    return 0


def _fit_options(p) -> None:
    from classifiers import fit_scores as fs

    p.add_argument("--target-fp", type=_fraction, default=fs.TARGET_FP, metavar="RATE",
                   help=f"held-out ham allowed at the threshold (default {fs.TARGET_FP:g})")
    p.add_argument("--ham-cost", type=_positive, default=fs.HAM_COST, metavar="N",
                   help=f"a ham counts as N spam in the fit (default {fs.HAM_COST:g})")
    p.add_argument("--folds", type=int, default=fs.FOLDS, choices=range(2, 21), metavar="K",
                   help=f"cross-validation folds (default {fs.FOLDS})")
    p.add_argument("--min-hits", type=int, default=fs.MIN_HITS, metavar="N",
                   help=f"learn only symbols hit by N or more messages (default {fs.MIN_HITS})")
    p.add_argument("--no-bayes", action="store_true", help="fit the rules alone, without the Bayes bands")


def _fraction(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 0 and below 1 (0.001 = 0.1 %)")
    return v


def _positive(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be above 0")
    return v


def register_commands(subparsers, parent) -> None:
    p = subparsers.add_parser("train", parents=[parent], help="train the Bayes model from spam and ham folders",
                              description="Train a new Bayes model. PATH is a message file, a Maildir, an mbox "
                                          "or a directory tree of them.")
    p.add_argument("--spam", nargs="+", required=True, metavar="PATH", help="spam messages")
    p.add_argument("--ham", nargs="+", required=True, metavar="PATH", help="ham (good) messages")
    p.add_argument("-o", "--output", metavar="MODEL", help="model file to write (default: [bayes] model)")
    p.add_argument("--fit-scores", metavar="FILE", help="then learn symbol weights from the same mail into FILE "
                                                        "(as `mailgate fit-scores -o FILE`)")
    _fit_options(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("fit-scores", parents=[parent], help="learn symbol weights from spam and ham folders",
                              description="Score the messages with `mailgate score` (this config), train a "
                                          "cross-validated Bayes model on them, and fit per-symbol weights "
                                          "that keep held-out ham false positives under --target-fp at "
                                          "threshold 5. Writes a [scores] TOML file; [rules] learned_scores "
                                          "makes the gateway use it.")
    p.add_argument("--spam", nargs="+", required=True, metavar="PATH", help="spam messages")
    p.add_argument("--ham", nargs="+", required=True, metavar="PATH", help="ham (good) messages")
    p.add_argument("-o", "--output", dest="output_scores", metavar="FILE",
                   help="weights file to write (default: [rules] learned_scores, else var/learned-scores.toml)")
    _fit_options(p)
    p.set_defaults(func=cmd_fit_scores)

    p = subparsers.add_parser("learn", parents=[parent], help="correct the Bayes model with more spam or ham",
                              description="Learn messages into the existing model. A message learned before the "
                                          "same way is not counted twice; learned the other way, it is moved.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--spam", nargs="+", metavar="PATH", help="messages that are spam")
    g.add_argument("--ham", nargs="+", metavar="PATH", help="messages that are ham")
    p.add_argument("-m", "--model", metavar="MODEL", help="model file (default: [bayes] model)")
    p.set_defaults(func=cmd_learn)

    p = subparsers.add_parser("eval", parents=[parent], help="measure the Bayes classifier",
                              description="Cross-validate on --spam/--ham (folds by a hash of the file name), "
                                          "or test on --test-spam/--test-ham (with the model file, or trained "
                                          "on --spam/--ham).")
    p.add_argument("--spam", nargs="+", default=[], metavar="PATH")
    p.add_argument("--ham", nargs="+", default=[], metavar="PATH")
    p.add_argument("--test-spam", nargs="+", default=[], metavar="PATH")
    p.add_argument("--test-ham", nargs="+", default=[], metavar="PATH")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--only-fold", type=int, default=None, metavar="N",
                   help="test on fold N only (with --folds 5 and N=0: the documented 80/20 split)")
    p.add_argument("--threshold", type=float, default=None, help="pipeline threshold (default: [spam] threshold)")
    p.add_argument("-m", "--model", metavar="MODEL", help="model file for --test-* (default: [bayes] model)")
    p.add_argument("--rules", action="store_true",
                   help="the whole pipeline through `mailgate score` with this config: configured weights "
                        "before, weights learned on the training part after (with --spam/--ham)")
    p.set_defaults(func=cmd_eval)
