"""Accuracy of the whole content pipeline, not of Bayes alone.

Trains a model with `mailgate train` on the 80 % of the SpamAssassin public
corpus whose file-name hash is not in fold 0 (classifiers.evaluation.fold_of),
then runs `mailgate score --json` (every DATA-stage check: GTUBE, header
sanity, the shipped rules, Bayes, banned attachments) on the held-out 20 %
and counts verdicts at the default threshold.  Offline: sender
authentication needs the 2002 senders' DNS, so it is off, and the DNS
server is a closed loopback port (no lookup leaves the machine).

    python -m tools.eval_pipeline [--corpus DIR] [--stock-rules] [--folds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from classifiers.evaluation import fold_of  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tools.bench_bayes import default_corpus, unpack  # noqa: E402

HAM_SETS = ("easy_ham", "easy_ham_2", "hard_ham")
SPAM_SETS = ("spam", "spam_2")


def split(sets: dict[str, str], into: Path, fold: int = 0) -> dict[str, Path]:
    """Symlink farms: train_spam, train_ham, and one test dir per set."""
    dirs = {}
    for name, src in sets.items():
        label = "spam" if name in SPAM_SETS else "ham"
        for f in sorted(os.listdir(src)):
            if f == "cmds":
                continue
            part = f"test_{name}" if fold_of(f, 5) == fold else f"train_{label}"
            d = dirs.setdefault(part, into / part)
            d.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.join(src, f), d / f"{name}.{f}")
    return dirs


def mailgate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, capture_output=True, text=True,
                          check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", default=default_corpus())
    ap.add_argument("--stock-rules", action="store_true", help="also SpamAssassin's stock rules")
    ap.add_argument("--folds", type=int, default=1, help="1: the 80/20 split (fold 0); 5: 5-fold cross-validation")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.corpus):
        print(f"eval_pipeline: no corpus at {args.corpus}; nothing measured")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-eval-"))
    try:
        sets = unpack(args.corpus, str(tmp / "corpus"))
        config = tmp / "eval.toml"
        config.write_text(f"""
[dns]
nameservers = ["127.0.0.1:{free_port()}"]
timeout = 0.2
[bayes]
model = "{tmp / 'bayes.model'}"
[rules]
stock_rules = {'true' if args.stock_rules else 'false'}
[checks]
disabled = ["sender_auth", "uribl"]
""")
        per_set: dict[str, list[int]] = {}
        for fold in range(args.folds):
            dirs = split(sets, tmp / f"split{fold}", fold)
            mailgate("train", "-c", str(config), "--spam", str(dirs["train_spam"]), "--ham",
                     str(dirs["train_ham"]), "-o", str(tmp / "bayes.model"), cwd=tmp)
            for name in HAM_SETS + SPAM_SETS:
                d = dirs.get(f"test_{name}")
                if d is None:
                    continue
                out = mailgate("score", "--json", "-c", str(config), str(d), cwd=tmp).stdout
                scores = [json.loads(line)["score"] for line in out.splitlines()]
                counts = per_set.setdefault(name, [0, 0])
                counts[0] += len(scores)
                counts[1] += sum(s >= 5.0 for s in scores)
        how = "held-out fold 0 of 5 (80/20)" if args.folds == 1 else f"{args.folds}-fold cross-validation"
        print(f"whole DATA pipeline, {how} by file-name hash, threshold 5.0, "
              f"stock rules {'on' if args.stock_rules else 'off'}")
        print(f"{'set':<12} {'messages':>8} {'>= 5.0':>7} {'rate':>8}")
        totals = {"ham": [0, 0], "spam": [0, 0]}
        for name, (n, hits) in per_set.items():
            label = "spam" if name in SPAM_SETS else "ham"
            totals[label][0] += n
            totals[label][1] += hits
            print(f"{name:<12} {n:>8} {hits:>7} {100 * hits / max(1, n):>7.2f}%")
        (nh, fp), (ns, tp) = totals["ham"], totals["spam"]
        print(f"ham false positives {fp}/{nh} = {100 * fp / max(1, nh):.2f} % (target <= 0.2 %); "
              f"spam recall {tp}/{ns} = {100 * tp / max(1, ns):.2f} % (target >= 97 %)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
