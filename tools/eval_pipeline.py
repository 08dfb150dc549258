"""Accuracy of the whole content pipeline, not of Bayes alone.

On the SpamAssassin public corpus, with the upstream verdict headers
(``X-Spam-*``, ``X-Spamd-*``: the collectors' own SpamAssassin runs) stripped
from every message first:

1. every message is scored once per rules configuration with
   ``mailgate score --json`` (all DATA-stage checks, the faithful offline
   session): the shipped rules, and SpamAssassin's stock rules on top.
   Bayes runs too (a model is loaded, so the stock rules get SpamAssassin's
   Bayes-aware score set), but its band is replaced in step 2;
2. per split, a Bayes model is trained on the training part only and its
   band added to each test message's points; and weights are learned on
   the training part (classifiers/fit_scores.py, with the held-out Bayes
   probabilities of the training messages) and applied to the test part.

Splits: the hashed 80/20 (fold 0 of 5 by file-name hash), 5-fold
cross-validation, and the era split (train on the 2002 sets, test on
``easy_ham_2`` and the later ``spam_2``).  hard_ham false positives are
reported apart.  Offline: sender authentication needs the 2002 senders' DNS,
so it is off, and the DNS server is a closed loopback port.

    python -m tools.eval_pipeline [--corpus DIR] [--quick] [--cache DIR]

``--quick`` scores a quarter of the corpus (a fixed hash sample); ``--cache``
keeps the score records between runs (they depend on the code, so use it
only while the rules are not changing).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.ports import free_port  # noqa: E402
from tools.bench_bayes import default_corpus, unpack  # noqa: E402

HAM_SETS = ("easy_ham", "easy_ham_2", "hard_ham")
SPAM_SETS = ("spam", "spam_2")
ERA_TRAIN = ("easy_ham", "hard_ham", "spam")  # 20030228_*
ERA_TEST = ("easy_ham_2", "spam_2")  # 20030228_easy_ham_2, 20050311_spam_2
SPLIT_NAMES = {"80/20": "80/20 hashed", "cv": "5-fold CV", "era": "era 2002->05"}
TARGETS = ("targets, stock + learned + Bayes: 5-fold ham FP <= 0.1 % and recall >= 99 %; "
           "era ham FP <= 0.2 % and recall >= 95 %")


def config_text(tmp: Path, stock: bool, model: Path) -> str:
    return f"""
[dns]
nameservers = ["127.0.0.1:{free_port()}"]
timeout = 0.2
[bayes]
model = "{model}"
[rules]
stock_rules = {'true' if stock else 'false'}
cache_dir = "{tmp / 'rules-cache'}"
[checks]
disabled = ["sender_auth", "uribl"]
"""


def spamassassin_alone(corpus: str, samples) -> tuple[list, str]:
    """SpamAssassin 4.0.1's own score per sample (rules only, no Bayes, no
    network), from tools/sa_parity.py's cache; ([], why) when it cannot
    give every message: spamd is that tool's to run, not this one's."""
    try:
        from tools import sa_parity
    except ImportError as e:  # pragma: no cover - the tool ships with the project
        return [], f"tools.sa_parity not importable ({e})"
    try:
        version = sa_parity.sa_version()
    except (OSError, RuntimeError, AttributeError) as e:
        return [], f"no SpamAssassin here ({e})"
    try:
        messages = sa_parity.corpus_messages(corpus, sets=None, limit=0)
    except (TypeError, OSError, ValueError) as e:  # that tool is changing under us: say so, show the rest
        return [], f"tools.sa_parity could not read the corpus ({e})"
    points, missing = [], 0
    for s in samples:
        msg = messages.get(f"{s.source}/{s.name}")
        path = sa_parity.CACHE / sa_parity.sa_key(msg, version) if msg is not None else None
        if path is None or not path.exists():
            missing += 1
            points.append(None)
            continue
        import json

        points.append(float(json.loads(path.read_text())["score"]))
    if missing:
        return [], (f"{missing} of {len(samples)} messages are not in {sa_parity.CACHE} "
                    "(run `python -m tools.sa_parity` once to fill it)")
    return points, ""


def in_quick_sample(name: str) -> bool:
    # a salted hash, independent of the fold hash, so every fold keeps its share
    return hashlib.sha1(b"quick:" + os.path.basename(name).encode()).digest()[0] % 4 == 0


def main(argv=None) -> int:
    from classifiers import evaluation as ev
    from classifiers.fit_scores import score_files, write_stripped
    from classifiers.model import DEFAULT_MODEL_SETTINGS, HAM, SPAM
    from classifiers.tokenizer import tokenize
    from gateway.sources import iter_messages

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=default_corpus())
    ap.add_argument("--quick", action="store_true", help="a quarter of the corpus (fixed hash sample)")
    ap.add_argument("--no-stock", action="store_true", help="shipped rules only (skips the slow stock-rules run)")
    ap.add_argument("--cache", metavar="DIR", help="keep/reuse the `mailgate score` records here")
    ap.add_argument("--splits", default="80/20,cv,era", help="comma-separated: 80/20, cv, era")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.corpus):
        print(f"eval_pipeline: no corpus at {args.corpus}; nothing measured")
        return 0
    settings = DEFAULT_MODEL_SETTINGS
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-eval-"))
    try:
        sets = unpack(args.corpus, str(tmp / "corpus"))
        samples, paths = [], []
        for name in HAM_SETS + SPAM_SETS:
            if name not in sets:
                continue
            msgs = [(n, raw) for n, raw in iter_messages([sets[name]]) if not args.quick or in_quick_sample(n)]
            stripped = write_stripped(msgs, str(tmp / "stripped" / name))
            label = SPAM if name in SPAM_SETS else HAM
            for path in stripped:
                with open(path, "rb") as f:
                    raw = f.read()
                # named by the original base name (the fold hash), sourced by set
                original = os.path.basename(path).split(".", 1)[1]  # write_stripped's "NNNNNN.<name>"
                samples.append(ev.Sample(label, original, name, tokenize(raw, settings.tokenizer)))
                paths.append(path)
        print(f"corpus: {len(samples)} messages ({sum(s.label == SPAM for s in samples)} spam), upstream "
              f"X-Spam-*/X-Spamd-* headers stripped{'; --quick: a quarter' if args.quick else ''}")

        # a model so that Bayes is "ready" and the stock rules get the Bayes-aware
        # score set; its own band is dropped (the splits bring held-out bands)
        model_path = tmp / "bayes.model"
        ev.train_on(samples, settings, calibrate=False).save(str(model_path))

        hits: dict[str, list[dict]] = {}
        configs = [("shipped rules", False)] + ([] if args.no_stock else [("stock rules", True)])
        for label, stock in configs:
            cached = None
            if args.cache:
                os.makedirs(args.cache, exist_ok=True)
                cached = Path(args.cache) / (f"{'stock' if stock else 'shipped'}{'-quick' if args.quick else ''}.jsonl")
            cfg = tmp / f"{'stock' if stock else 'shipped'}.toml"
            cfg.write_text(config_text(tmp, stock, model_path))
            t0 = time.monotonic()
            if cached is not None and cached.exists():
                from classifiers.fit_scores import read_score_json

                by_name = read_score_json(cached.read_text().splitlines())
                by_base = {os.path.basename(k): v for k, v in by_name.items()}
                took = None
            else:
                by_name = score_files([str(tmp / "stripped")], str(cfg), cwd=str(tmp))
                took = time.monotonic() - t0
                by_base = {os.path.basename(k): v for k, v in by_name.items()}
                if cached is not None:
                    import json

                    with open(cached, "w") as f:
                        for k, v in by_name.items():
                            f.write(json.dumps({"path": k, "tests": v}) + "\n")
            missing = [p for p in paths if os.path.basename(p) not in by_base]
            if missing:
                print(f"eval_pipeline: mailgate score gave no record for {len(missing)} message(s), e.g. {missing[0]}")
                return 1
            hits[label] = [by_base[os.path.basename(p)] for p in paths]
            if took is not None:
                print(f"mailgate score, {label}: {len(paths)} messages in {took:.0f} s "
                      f"({1e3 * took / max(1, len(paths)):.1f} ms a message, one process, startup included)")

        wanted = [s.strip() for s in args.splits.split(",") if s.strip()]
        parts = {}
        for split in wanted:
            if split not in SPLIT_NAMES:
                ap.error(f"--splits: unknown split {split!r} (80/20, cv, era)")
            parts[split] = ev.pipeline_parts(samples, split, 5, ERA_TRAIN, ERA_TEST)
        learn = [] if args.no_stock else ["stock rules"]
        t0 = time.monotonic()
        rows = ev.evaluate_pipeline(samples, hits, parts, settings, learn=learn)
        sa_points, why = spamassassin_alone(args.corpus, samples)
        if sa_points:
            for split, split_parts in parts.items():
                row = ev.PipelineRow("SpamAssassin 4.0.1 alone (no Bayes)", split)
                for _, test in split_parts:
                    row.add([samples[i].label for i in test], [samples[i].source for i in test],
                            [sa_points[i] for i in test])
                rows.append(row)
        order = {"SpamAssassin 4.0.1 alone (no Bayes)": -1, "Bayes alone": 0, "shipped rules + Bayes": 1,
                 "stock rules + Bayes": 2, "stock rules + learned weights + Bayes": 3}
        rows.sort(key=lambda r: (wanted.index(r.split), order.get(r.variant, 9)))
        print(f"\nwhole DATA pipeline (mailgate score), Bayes trained per split on its training part "
              f"({time.monotonic() - t0:.0f} s of training and fitting)")
        print(ev.format_pipeline(rows, 5.0, SPLIT_NAMES))
        print(TARGETS)
        if why:
            print(f"SpamAssassin alone: not shown: {why}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
