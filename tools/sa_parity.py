"""Parity with SpamAssassin: the same stock rules, message by message.

Scores the SpamAssassin public corpus twice, with SpamAssassin itself
(spamd ``--local`` answering ``spamc -R``: no Bayes, no network tests,
``required_score 5``, so SpamAssassin's score set 0) and with
``mailgate score --json`` (the DATA-stage checks offline: stock rules on, no
Bayes, sender authentication / URIBL / DNSBL off, DNS pointed at a closed
loopback port), and prints per message the stock rules only one side hit,
then the totals:

- *same rules*: the share of messages whose stock-rule sets are equal;
- *score*: the share whose stock-rule scores differ by less than 0.1.

Left out of the comparison, on both sides:

- ``MG_*``: MailGate's own rules (SpamAssassin does not have them);
- ``BAYES_*``: Bayes is off on both sides (they would only hit by mistake);
- rules with ``tflags net`` in the stock rules (``RCVD_IN_*``, ``URIBL_*``,
  ``DKIM_VALID*``, ``SPF_*``, razor/pyzor/DCC, ``DNS_FROM_*`` ...):
  SpamAssassin never runs them with ``--local`` and our DNS answers nothing;
- SPF/DKIM/DMARC results owned by ``sender_auth`` (off: it needs the
  senders' DNS).

Relay rules are compared, but a second pair of figures leaves them out
too, while the Received-chain parsing is being rewritten: the relay evals
(``check_all_trusted``, ``check_no_relays``, ``check_relays_unparseable``,
``check_for_forged_received_trail``, ``helo_ip_mismatch``,
``check_for_no_rdns_dotcom_helo``), rules on the ``X-Spam-Relays-*`` and
``X-Spam-Last-*-Relay`` pseudo-headers, the ``RDNS_*``,
``HELO_DYNAMIC_*``, ``KHOP_*``, ``*_DIRECT_MX`` families, and every meta
rule that reads one of them (``SPOOFED_FREEMAIL_NO_RDNS``,
``TO_NO_BRKTS_NORDNS_HTML``, metas with ``!ALL_TRUSTED`` ...).  On our side
only names of stock rules are compared (``FROM_MALFORMED`` of
``header_sanity`` is not SpamAssassin's).

Messages are normalised the same way for both sides: the mbox ``From `` line
is dropped (as ``mailgate score`` does) and upstream ``X-Spam-*`` headers are
removed (SpamAssassin deletes them itself before its checks).

SpamAssassin's answers are cached on disk, keyed by the message's sha256,
SpamAssassin's version and its site config
(``~/.cache/mailgate/sa_parity``), so a second run only pays for MailGate.

    python -m tools.sa_parity [--corpus DIR] [--sets spam,easy_ham] [--limit N] [--quiet]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.ports import free_port  # noqa: E402

# SpamAssassin's site config for the comparison (what ../shared/recipes/
# start-spamd.sh does, plus a report that lists every hit with its score).
# Bayes and auto-learning off keep its answers deterministic; skip_rbl_checks
# and --local keep every lookup off the network.
SITE_CF = """\
required_score 5.0
report_safe 0
use_bayes 0
bayes_auto_learn 0
skip_rbl_checks 1
clear_report_template
report TESTS=_TESTSSCORES(,)_
"""
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailgate" / "sa_parity"
# the rules' compiled Hyperscan databases, reused across runs (outside the repo)
PREFILTER_CACHE = CACHE.parent / "rules-prefilter"
SCORE_TOLERANCE = 0.1
# The Received-chain rules another piece of work is rewriting (issue 12
# item 1): the relay evals, rules on the X-Spam-Relays-* pseudo-headers, the
# name families the issue lists, and every meta rule that reads one of them.
RELAY_NAMES = re.compile(r"^(RDNS_|HELO_DYNAMIC_|ALL_TRUSTED$|.*_DIRECT_MX$|KHOP_|FORGED_RCVD_TRAIL$)")
RELAY_EVALS = frozenset({
    "check_all_trusted", "check_no_relays", "check_relays_unparseable", "check_for_forged_received_trail",
    "helo_ip_mismatch", "check_for_no_rdns_dotcom_helo", "check_for_sender_no_reverse",
})
RELAY_HEADERS = re.compile(r"^X-Spam-(Relays-|Last-)", re.I)
SENDER_AUTH = re.compile(r"^(SPF_|DKIM_|DMARC_|__DKIM|T_SPF|T_DKIM)")
SETS = ("easy_ham", "easy_ham_2", "hard_ham", "spam", "spam_2")


def sa_version() -> str:
    out = subprocess.run(["spamassassin", "-V"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"SpamAssassin version (\S+)", out)
    if not m:
        raise RuntimeError(f"spamassassin -V said: {out!r}")
    return m.group(1)


def normalise(raw: bytes) -> bytes:
    """The message both sides see: no mbox envelope line, no upstream ``X-Spam-*``."""
    raw = raw.replace(b"\r\n", b"\n")
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    head, sep, body = raw.partition(b"\n\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the header before
            if not dropping:
                kept.append(line)
            continue
        dropping = line[:7].lower() == b"x-spam-"
        if not dropping:
            kept.append(line)
    return b"\n".join(kept) + sep + body


# --- SpamAssassin -------------------------------------------------------------


class Spamd:
    """spamd --local on a free loopback port, our child; stop() ends it."""

    def __init__(self, children: int = 2):
        # its own directory, readable by the user spamd scans as (a mkdtemp
        # directory of ours is not)
        self.workdir = Path(tempfile.mkdtemp(prefix="mailgate-spamd-"))
        os.chmod(self.workdir, 0o755)
        self.children = children
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Spamd":
        site = self.workdir / "site"
        home = self.workdir / "home"
        site.mkdir(parents=True)
        home.mkdir(parents=True)
        # the distribution's .pre files load the plugins the stock rules need
        for name in os.listdir("/etc/spamassassin"):
            if name.endswith(".pre"):
                shutil.copy(os.path.join("/etc/spamassassin", name), site / name)
        (site / "local.cf").write_text(SITE_CF)
        self.port = free_port()
        cmd = [spamd_path(), f"--listen=127.0.0.1:{self.port}", "--allowed-ips=127.0.0.1", "--local",
               "--nouser-config", f"--helper-home-dir={home}", f"--siteconfigpath={site}",
               f"--max-children={self.children}", f"--min-children={self.children}", "--min-spare=1",
               f"--pidfile={self.workdir / 'spamd.pid'}", f"--syslog={self.workdir / 'spamd.log'}"]
        if os.geteuid() == 0:
            # spamd refuses to scan as root; debian-spamd is the package's own user
            user = "debian-spamd" if _user_exists("debian-spamd") else "nobody"
            pw = pwd.getpwnam(user)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            cmd.append(f"--username={user}")
        # its log goes to a file: a pipe nobody reads fills up and blocks spamd
        self.log_path = self.workdir / "spamd.err"
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"spamd exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_bytes()[-2000:]!r}")
            ping = subprocess.run(["spamc", "-d", "127.0.0.1", "-p", str(self.port), "-K"], capture_output=True)
            if ping.returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("spamd did not answer PING within 120 s")

    def check(self, message: bytes) -> tuple[float, dict[str, float]]:
        """spamc -R: ``score/required`` then our report ``TESTS=A=1.0,B=2.0``.
        ``-x``: an error is an error, not a silent "0/0"; ``-s``: no size cap."""
        out = subprocess.run(["spamc", "-d", "127.0.0.1", "-p", str(self.port), "-R", "-x", "-s", "67108864"],
                             input=message, capture_output=True, timeout=300)
        if out.returncode not in (0, 1):
            raise RuntimeError(f"spamc exited with {out.returncode}: {out.stderr[-500:]!r}")
        return parse_report(out.stdout.decode("utf-8", "replace"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def spamd_path() -> str:
    for p in (shutil.which("spamd"), "/usr/sbin/spamd"):
        if p and os.access(p, os.X_OK):
            return p
    raise RuntimeError("spamd is not installed (tools/install-system-deps.sh installs it)")


def parse_report(text: str) -> tuple[float, dict[str, float]]:
    lines = text.strip().splitlines()
    m = re.match(r"^(-?[\d.]+)/(-?[\d.]+)$", lines[0].strip()) if lines else None
    if not m:
        raise RuntimeError(f"unexpected spamc -R answer: {text[:200]!r}")
    tests: dict[str, float] = {}
    # the report is wrapped at 78 columns, inside the list too
    body = "".join(line.strip() for line in lines[1:])
    if not body.startswith("TESTS="):
        raise RuntimeError(f"unexpected spamc -R report: {text[:300]!r}")
    listed = body[6:]
    for item in filter(None, [] if listed == "none" else listed.split(",")):  # "none": _TESTS_ of no hit
        name, eq, score = item.partition("=")
        if not eq or not re.fullmatch(r"\w+", name):
            raise RuntimeError(f"unexpected item {item!r} in spamc -R report: {text[:300]!r}")
        tests[name] = float(score)
    return float(m.group(1)), tests


def sa_key(message: bytes, version: str) -> str:
    conf = hashlib.sha256(SITE_CF.encode()).hexdigest()[:12]
    return f"{version}-{conf}-{hashlib.sha256(message).hexdigest()}"


def sa_results(messages: dict[str, bytes], cache: Optional[Path], log=print) -> dict[str, tuple[float, dict[str, float]]]:
    """label -> (score, {rule: score}) from SpamAssassin, cached per message."""
    version = sa_version()
    out: dict[str, tuple[float, dict[str, float]]] = {}
    todo: list[str] = []
    for label, msg in messages.items():
        path = cache / sa_key(msg, version) if cache else None
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            out[label] = (data["score"], data["tests"])
        else:
            todo.append(label)
    if not todo:
        return out
    log(f"# SpamAssassin {version}: {len(todo)} of {len(messages)} messages not cached, running spamd --local")
    spamd = Spamd().start()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=spamd.children + 1) as pool:
            for label, result in zip(todo, pool.map(lambda lb: spamd.check(messages[lb]), todo)):
                out[label] = result
                if cache is not None:
                    cache.mkdir(parents=True, exist_ok=True)
                    tmp = cache / (sa_key(messages[label], version) + ".tmp")
                    tmp.write_text(json.dumps({"score": result[0], "tests": result[1]}))
                    tmp.replace(cache / sa_key(messages[label], version))
    finally:
        spamd.stop()
    return out


# --- MailGate -------------------------------------------------------------------


def mailgate_config(tmp: Path) -> Path:
    """Stock rules on; every check that needs the network or a model off; DNS
    at a closed loopback port, so a lookup that slips through gets nothing."""
    config = tmp / "parity.toml"
    config.write_text(f"""
[dns]
nameservers = ["127.0.0.1:{free_port()}"]
timeout = 0.2
[bayes]
model = "{tmp / 'no-bayes.model'}"
[rules]
stock_rules = true
cache_dir = "{PREFILTER_CACHE}"
[checks]
disabled = ["sender_auth", "uribl", "bayes", "dnsbl", "dnsbl_reject", "rhsbl", "dkim_sign", "antivirus"]
""")
    return config


def mailgate_results(paths: dict[str, Path], tmp: Path) -> dict[str, tuple[float, dict[str, float]]]:
    """label -> (score, {symbol: score}) from ``mailgate score --json``."""
    config = mailgate_config(tmp)
    by_path = {str(p): label for label, p in paths.items()}
    out: dict[str, tuple[float, dict[str, float]]] = {}
    root = tmp / "messages"
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "score", "--json", "-c", str(config), str(root)],
                          cwd=tmp, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        label = by_path.get(rec["path"])
        if label is not None:
            out[label] = (rec["score"], rec["tests"])
    missing = set(paths) - set(out)
    if missing:
        raise RuntimeError(f"mailgate score answered for {len(out)} of {len(paths)} messages "
                           f"(exit {proc.returncode}): {proc.stderr[-3000:]}")
    return out


# --- comparing --------------------------------------------------------------------


@dataclass
class Excluded:
    net: set[str]  # tflags net: never compared
    relay: set[str]  # relay rules: compared in the first figure only
    # every stock rule name: what MailGate reports beside them (FROM_MALFORMED
    # of header_sanity, its own checks' symbols) is not SpamAssassin's
    stock: Optional[set[str]] = None


def excluded_rules(stock_dirs: Optional[list[str]] = None) -> Excluded:
    """The stock rules left out (see the module docstring), from the rule files."""
    from rules.sa import ruleset
    from rules.sa_check import stock_dirs as default_stock

    rs = ruleset.load(stock_dirs if stock_dirs is not None else default_stock())
    net = {name for name, flags in rs.tflags.items() if "net" in flags}
    relay = {name for name, r in rs.rules.items()
             if RELAY_NAMES.match(name) or (r.eval is not None and r.eval[0] in RELAY_EVALS)
             or any(RELAY_HEADERS.match(h) for h in r.headers)}
    relay |= {name for name in rs.skipped if RELAY_NAMES.match(name)}
    metas = {name: set(ruleset.meta_names(r.meta)) for name, r in rs.rules.items() if r.kind == "meta"}
    grew = True
    while grew:
        grew = False
        for name, deps in metas.items():
            if name not in relay and deps & relay:
                relay.add(name)
                grew = True
    stock = set(rs.rules) | set(rs.skipped) | set(rs.scores)
    return Excluded(net, relay, stock)


def compared(tests: dict[str, float], excluded: Excluded, relay: bool, ours: bool = False) -> dict[str, float]:
    """The hits compared; on our side (``ours``) only the names of stock
    rules: SpamAssassin's side is not filtered by name, so a stock rule our
    parser lost would still show."""
    return {n: s for n, s in tests.items()
            if not (n.startswith(("MG_", "BAYES_")) or n in excluded.net or SENDER_AUTH.match(n)
                    or (not relay and n in excluded.relay)
                    or (ours and excluded.stock is not None and n not in excluded.stock))}


@dataclass
class Comparison:
    messages: int = 0
    same_rules: int = 0
    same_score: int = 0
    same_rules_norelay: int = 0
    same_score_norelay: int = 0
    only_sa: dict[str, int] = field(default_factory=dict)
    only_mg: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def compare(sa: dict[str, tuple[float, dict[str, float]]], mg: dict[str, tuple[float, dict[str, float]]],
            excluded: Excluded) -> Comparison:
    c = Comparison()
    for label in sorted(sa):
        if label not in mg:
            continue
        c.messages += 1
        for relay in (True, False):
            a = compared(sa[label][1], excluded, relay)
            b = compared(mg[label][1], excluded, relay, ours=True)
            same = set(a) == set(b)
            close = abs(sum(a.values()) - sum(b.values())) < SCORE_TOLERANCE
            if relay:
                c.same_rules += same
                c.same_score += close
                if not same or not close:
                    only_a = sorted(set(a) - set(b))
                    only_b = sorted(set(b) - set(a))
                    for n in only_a:
                        c.only_sa[n] = c.only_sa.get(n, 0) + 1
                    for n in only_b:
                        c.only_mg[n] = c.only_mg.get(n, 0) + 1
                    c.lines.append(f"{label}\tsa={sum(a.values()):.3f}\tmg={sum(b.values()):.3f}\t"
                                   f"only_sa={','.join(only_a) or '-'}\tonly_mg={','.join(only_b) or '-'}")
            else:
                c.same_rules_norelay += same
                c.same_score_norelay += close
    return c


def print_table(c: Comparison, excluded: Excluded, out=print, top: int = 25) -> None:
    n = max(1, c.messages)
    out(f"{'SpamAssassin parity':<44} {'messages':>8} {'same rules':>11} {'|score diff| < 0.1':>19}")
    out(f"{'all stock rules (net, MG_, BAYES_ aside)':<44} {c.messages:>8} {100 * c.same_rules / n:>10.2f}% "
        f"{100 * c.same_score / n:>18.2f}%")
    out(f"{'  and the relay rules aside too':<44} {c.messages:>8} {100 * c.same_rules_norelay / n:>10.2f}% "
        f"{100 * c.same_score_norelay / n:>18.2f}%")
    out("target: >= 98 % on both (issue 12)")
    rules = sorted(set(c.only_sa) | set(c.only_mg), key=lambda r: -(c.only_sa.get(r, 0) + c.only_mg.get(r, 0)))
    if rules:
        out(f"{'rule':<32} {'only SpamAssassin':>17} {'only MailGate':>14}{'':>3}relay")
        for r in rules[:top]:
            out(f"{r:<32} {c.only_sa.get(r, 0):>17} {c.only_mg.get(r, 0):>14}{'':>3}"
                f"{'yes' if r in excluded.relay else ''}")


def corpus_messages(corpus: str, sets: Optional[Iterable[str]], limit: int,
                    names: Optional[Iterable[str]] = None) -> dict[str, bytes]:
    """``set/file`` -> normalised message, ``limit`` per set (0: all), or
    just the ``names`` given; only the tarballs of the sets asked for are read."""
    import tarfile

    wanted = set(names) if names is not None else None
    want_sets = set(sets) if sets else ({n.split("/", 1)[0] for n in wanted} if wanted else set(SETS))
    out: dict[str, bytes] = {}
    for tarball in sorted(os.listdir(corpus)):
        if not tarball.endswith((".tar.bz2", ".tar.gz", ".tar")):
            continue
        with tarfile.open(os.path.join(corpus, tarball)) as tar:
            for m in tar:
                set_name, _, file_name = m.name.partition("/")
                if set_name not in want_sets:
                    break  # one set per tarball in the public corpus
                if not m.isfile() or file_name in ("", "cmds") or "/" in file_name:
                    continue
                if wanted is not None and m.name not in wanted:
                    continue
                raw = tar.extractfile(m).read()
                out[m.name] = normalise(raw)
    if limit:
        kept: dict[str, int] = {}
        for label in sorted(out):
            s = label.split("/", 1)[0]
            kept[s] = kept.get(s, 0) + 1
            if kept[s] > limit:
                del out[label]
    return dict(sorted(out.items()))


def write_messages(messages: dict[str, bytes], tmp: Path) -> dict[str, Path]:
    paths = {}
    for label, raw in messages.items():
        p = tmp / "messages" / label
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(raw)
        paths[label] = p
    return paths


def run(messages: dict[str, bytes], cache: Optional[Path], log=print) -> tuple[Comparison, Excluded]:
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-parity-"))
    try:
        paths = write_messages(messages, tmp)
        sa = sa_results(messages, cache, log)
        mg = mailgate_results(paths, tmp)
        excluded = excluded_rules()
        return compare(sa, mg, excluded), excluded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    from tools.bench_bayes import default_corpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=default_corpus())
    ap.add_argument("--sets", help=f"comma-separated sets (default: all of {', '.join(SETS)})")
    ap.add_argument("--limit", type=int, default=0, help="at most N messages per set (0: all)")
    ap.add_argument("--no-cache", action="store_true", help=f"do not read or write {CACHE}")
    ap.add_argument("--quiet", action="store_true", help="only the totals, not one line per differing message")
    ap.add_argument("--top", type=int, default=25, help="differing rules to list")
    args = ap.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",")] if args.sets else None
    for s in sets or ():
        if s not in SETS:
            ap.error(f"--sets: unknown set {s!r} (known: {', '.join(SETS)})")
    if args.limit < 0:
        ap.error("--limit must be >= 0")
    if not os.path.isdir(args.corpus):
        print(f"sa_parity: no corpus at {args.corpus}; nothing measured")
        return 0
    for prog in ("spamassassin", "spamc"):
        if not shutil.which(prog):
            print(f"sa_parity: {prog} is not installed (tools/install-system-deps.sh installs it)")
            return 1
    messages = corpus_messages(args.corpus, sets, args.limit)
    c, excluded = run(messages, None if args.no_cache else CACHE)
    if not args.quiet:
        print("# messages whose stock rules differ: label, stock-rule score each side, rules only one side hit")
        for line in c.lines:
            print(line)
    print_table(c, excluded, top=args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
