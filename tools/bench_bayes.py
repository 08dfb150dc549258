"""Bayes classifier figures: classify cost per 5 KB message (median, p99),
training time on the whole corpus, model size on disk and in memory, and the
accuracy on the SpamAssassin public corpus (80/20 split by file-name hash,
and 5-fold cross-validation).

    python -m tools.bench_bayes [--corpus DIR]

DIR holds the corpus tarballs (default $MAILGATE_CORPUS, else
../shared/corpus/spamassassin next to the repository).  They are unpacked
into a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
import tracemalloc

HAM_SETS = ("easy_ham", "easy_ham_2", "hard_ham")
SPAM_SETS = ("spam", "spam_2")


def default_corpus() -> str:
    env = os.environ.get("MAILGATE_CORPUS")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(here), "shared", "corpus", "spamassassin")


def unpack(corpus: str, into: str) -> dict[str, str]:
    """{set name: directory} for the tarballs found in ``corpus``."""
    found = {}
    for name in sorted(os.listdir(corpus)):
        if not name.endswith((".tar.bz2", ".tar.gz", ".tar")):
            continue
        with tarfile.open(os.path.join(corpus, name)) as tar:
            tar.extractall(into, filter="data")
    for d in os.listdir(into):
        if d in HAM_SETS + SPAM_SETS:
            found[d] = os.path.join(into, d)
    return found


def five_kb_messages(dirs: list[str], want: int = 400) -> list[bytes]:
    """Corpus messages cut or padded to 5 KB (headers intact, body resized)."""
    from gateway.sources import iter_messages

    out = []
    for _, raw in iter_messages(dirs):
        if len(raw) < 2500:
            continue
        if len(raw) >= 5120:
            raw = raw[:5120]
        else:
            raw = raw + b"\n" + raw[-(5120 - len(raw) - 1):]  # pad with its own text
        out.append(raw)
        if len(out) >= want:
            break
    return out


def short_modern(settings) -> list:
    """The test suite's short modern hams and spams (tests/fixtures/short_modern)."""
    from classifiers import evaluation as ev
    from classifiers.model import HAM, SPAM
    from classifiers.tokenizer import tokenize
    from gateway.sources import iter_messages

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "short_modern")
    out = []
    for kind, label in (("ham", HAM), ("spam", SPAM)):
        if os.path.isdir(os.path.join(root, kind)):
            for s in ev.load_samples([os.path.join(root, kind)], label, lambda r: tokenize(r, settings.tokenizer),
                                     iter_messages):
                s.source = kind
                out.append(s)
    return out


def main(argv=None) -> int:
    from classifiers import evaluation as ev
    from classifiers.bayes_check import DEFAULT_SCORES, band_results
    from classifiers.model import DEFAULT_MODEL_SETTINGS, HAM, SPAM, BayesModel
    from classifiers.tokenizer import tokenize
    from gateway.sources import iter_messages

    ap = argparse.ArgumentParser(prog="python -m tools.bench_bayes")
    ap.add_argument("--corpus", default=default_corpus())
    args = ap.parse_args(argv)
    if not os.path.isdir(args.corpus):
        print(f"bench_bayes: no corpus at {args.corpus} (set MAILGATE_CORPUS); nothing measured")
        return 0
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-bayes-") as tmp:
        sets = unpack(args.corpus, tmp)
        spam_dirs = [sets[s] for s in SPAM_SETS if s in sets]
        ham_dirs = [sets[s] for s in HAM_SETS if s in sets]
        settings = DEFAULT_MODEL_SETTINGS

        # training on the whole corpus: reading, tokenizing, fitting, calibrating
        t0 = time.perf_counter()
        samples = (ev.load_samples(spam_dirs, SPAM, lambda r: tokenize(r, settings.tokenizer), iter_messages)
                   + ev.load_samples(ham_dirs, HAM, lambda r: tokenize(r, settings.tokenizer), iter_messages))
        t_read = time.perf_counter() - t0
        model = ev.train_on(samples, settings)
        t_train = time.perf_counter() - t0
        rows.append(("training, whole corpus", f"{t_train:.1f} s ({len(samples)} messages; "
                                               f"{t_read:.1f} s reading+tokenizing)"))

        path = os.path.join(tmp, "bayes.model")
        model.save(path)
        rows.append(("model file", f"{os.path.getsize(path) / 1e6:.2f} MB"))
        tracemalloc.start()
        loaded = BayesModel.load(path)
        _, peak = tracemalloc.get_traced_memory()
        current = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        rows.append(("loaded model in memory", f"{current / 1e6:.1f} MB (peak while loading {peak / 1e6:.1f} MB)"))

        msgs = five_kb_messages(spam_dirs + ham_dirs)
        for raw in msgs[:20]:
            loaded.spam_probability(raw)  # warm caches (PSL, numpy)
        times = []
        for _ in range(3):
            for raw in msgs:
                t = time.perf_counter()
                loaded.spam_probability(raw)
                times.append(time.perf_counter() - t)
        times.sort()
        rows.append(("classify 5 KB message", f"median {1e3 * statistics.median(times):.2f} ms, "
                                              f"p99 {1e3 * times[int(0.99 * len(times))]:.2f} ms "
                                              f"({len(times)} runs, one core)"))
        tok = []
        for raw in msgs:
            t = time.perf_counter()
            tokenize(raw, settings.tokenizer)
            tok.append(time.perf_counter() - t)
        rows.append(("  of which tokenizing", f"median {1e3 * statistics.median(tok):.2f} ms"))

        # before/after the evidence shrinking (classifiers/model.py
        # BayesModel._calibrated): full_evidence 0 is the calibration before it
        short = short_modern(settings)
        for what, full in (("before (no shrinking)", 0.0), ("after (shrinking)", None)):
            for label, only in (("80/20 split (fold 0 of 5)", 0), ("5-fold cross-validation", None)):
                r = ev.cross_validate(samples, settings, 5, 5.0, dict(DEFAULT_SCORES), only_fold=only,
                                      full_evidence=full)
                c = r.confusion()
                fp, rec = r.rates()
                hard = [(e, n) for src, kind, e, n in r.per_source() if src.endswith("hard_ham")]
                hard_txt = f", hard_ham FP {hard[0][0]}/{hard[0][1]}" if hard else ""
                rows.append((f"{what}: {label} @5.0", f"ham FP {c['fp']}/{c['fp'] + c['tn']} = {100 * fp:.2f} %, "
                                                      f"spam recall {100 * rec:.2f} %, AUC {r.auc():.4f}{hard_txt}"))
            if short:
                whole = ev.train_on(samples, settings, full_evidence=full)
                for kind in ("ham", "spam"):
                    probs = ev.score_samples(whole, [s for s in short if s.source == kind])
                    bands = [band_results(p, DEFAULT_SCORES)[0].symbol[6:] for p in probs]
                    rows.append((f"{what}: short modern {kind}", f"P {' '.join(f'{p:.2f}' for p in probs)}; "
                                                                 f"bands {' '.join(bands)}"))

    width = max(len(k) for k, _ in rows)
    print("Bayes classifier (targets: classify <= 2 ms median, train < 60 s, model < 100 MB, "
          "ham FP <= 0.2 %, recall >= 97 %)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
