"""Finding checks by name and ordering them from config."""

import pytest

from gateway.config import validate
from gateway.errors import ConfigError
from gateway.plugins import discover, select


def test_discovery_finds_the_checks_of_all_packages():
    cat = discover()
    assert {"gtube", "header_sanity"} <= set(cat.checks)
    assert all(isinstance(n, str) for n in cat.sections)


def test_order_and_disabled_from_config():
    cat = discover()
    config = validate({"checks": {"order": ["header_sanity", "gtube"], "disabled": []}}, cat.sections)
    names = [c.name for c in select(cat, config)]
    assert names.index("header_sanity") < names.index("gtube") and names[:2] == ["header_sanity", "gtube"]
    config = validate({"checks": {"disabled": ["gtube"]}}, cat.sections)
    assert "gtube" not in [c.name for c in select(cat, config)]


def test_unknown_check_names_are_refused():
    cat = discover()
    config = validate({"checks": {"disabled": ["no_such_check"]}}, cat.sections)
    with pytest.raises(ConfigError, match="no_such_check"):
        select(cat, config)


# --- declared symbols ---------------------------------------------------------------

import ast  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from gateway.plugins import PLUGIN_PACKAGES, Symbol, SymbolTable, check_scores, symbol_table  # noqa: E402

SYMBOL_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# functions of check modules that pass their first argument on to Result(...)
SYMBOL_HELPERS = {"_refuse_or_score", "_unknown"}

# Result(...) calls whose symbol is computed, and how each is declared: a test
# below drives each kind.  A new computed symbol fails the scan until it is
# declared and listed here.
COMPUTED = {
    ("rules.sa_check", "h.name"): "rule names of the loaded rule files (SaRules.declared_symbols)",
    ("rules.uribl", "sym"): "zone symbols and codes of [uribl] (Uribl.declared_symbols)",
    ("rules.ratelimit", "self.symbol"): "each limit's class attribute, declared in its symbols",
    ("rules.lists", "f'{self.prefix}_BLOCKLISTED'"): "IP_/SENDER_ prefixes, declared per class",
    ("rules.lists", "f'{self.prefix}_ALLOWLISTED'"): "IP_/SENDER_ prefixes, declared per class",
    ("rules.sender_auth", "sym"): "a key of SCORES (the code indexes it), all declared",
    ("rules.sender_auth", "r.symbol"): "an earlier result given its header: no new symbol",
    ("rules.helo", "symbol"): "the literal passed to _refuse_or_score",
    ("rules.sender", "symbol"): "the literal passed to _unknown",
    ("rules.scoring", "r.symbol"): "the decider re-weighing a result: no new symbol",
    ("rules._dnslists", "zone.symbol"): "zone symbols of [rbl]/[rhsbl] (zone_symbols)",
    ("rules._dnslists", "code.symbol"): "codes of [rbl]/[rhsbl] zones (zone_symbols)",
    ("rules._dnslists", "c.symbol"): "bits of [rbl]/[rhsbl] zones (zone_symbols)",
    ("classifiers.bayes_check", "symbol"): "a name of BANDS",
    ("classifiers.bayes_check", "EXTRA_BAND[0]"): "BAYES_999",
    ("scanners.base", "f'VIRUS_{_symbol_part(n)}'"): "the VIRUS_* family",
}


def result_calls():
    """(module, first argument) of every Result(...) (or helper) call in the check packages."""
    for pkg in PLUGIN_PACKAGES:
        base = importlib.import_module(pkg).__path__[0]
        for root, _, files in os.walk(base):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(root, f)
                module = ".".join([pkg, *os.path.relpath(path[:-3], base).split(os.sep)])
                with open(path, encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and node.args:
                        fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                        if fn == "Result" or fn in SYMBOL_HELPERS:
                            yield module, node.args[0]


def default_table():
    cat = discover()
    return symbol_table(cat, validate({}, cat.sections))


def test_every_literal_symbol_a_check_emits_is_declared_and_every_computed_one_is_known():
    table = default_table()
    undeclared, unknown_kinds, literals = [], [], 0
    for module, arg in result_calls():
        name = None
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            name = arg.value
        elif isinstance(arg, ast.Name) and isinstance(getattr(importlib.import_module(module), arg.id, None), str):
            name = getattr(importlib.import_module(module), arg.id)  # a module constant (SYMBOL)
        if name is not None:
            literals += 1
            if name not in table:
                undeclared.append(f"{module}: {name}")
        elif (module, ast.unparse(arg)) not in COMPUTED:
            unknown_kinds.append(f"{module}: Result({ast.unparse(arg)}, ...)")
    assert literals > 30  # the scan found the checks' symbols at all
    assert undeclared == [], "emitted but not declared"
    assert unknown_kinds == [], "computed symbols nobody declared: declare them and list them in COMPUTED"


def test_computed_symbols_are_declared():
    from classifiers.bayes_check import BANDS, EXTRA_BAND
    from rules.lists import IpLists, SenderLists
    from rules.ratelimit import CHECKS as LIMITS
    from rules.sender_auth import SCORES

    table = default_table()
    names = [n for n, _ in BANDS] + [EXTRA_BAND[0]] + list(SCORES) + [c.symbol for c in LIMITS]
    names += [f"{c.prefix}_{kind}" for c in (IpLists, SenderLists) for kind in ("BLOCKLISTED", "ALLOWLISTED")]
    assert [n for n in names if n not in table] == []
    assert table.get("VIRUS_CLAMD").name == "VIRUS_*" and table.get("VIRUS_FOUND").name == "VIRUS_FOUND"


def test_zone_symbols_come_from_the_config():
    cat = discover()
    config = validate({
        "rbl": {"zones": [{"zone": "zen.example", "score": 2.0, "codes": {"127.0.0.4": {"symbol": "ZEN_XBL",
                                                                                          "score": 4.0}}},
                          {"zone": "multi.example", "bits": {2: "MULTI_TWO"}},
                          {"zone": "wl.example", "score": -1.0}]},
        "rhsbl": {"zones": [{"zone": "dbl.example"}]},
        "uribl": {"zones": [{"zone": "uri.example", "codes": {"127.0.1.2": "URI_PHISH"}}]},
        "scores": {"ZEN_XBL": 5.0},
    }, cat.sections)
    table = symbol_table(cat, config)
    assert table.get("RBL_ZEN_EXAMPLE") == Symbol("RBL_ZEN_EXAMPLE", 2.0, "dnsbl",
                                                  "Client address listed in the blocklist zen.example")
    assert table.get("ZEN_XBL").score == 4.0 and "127.0.0.4" in table.get("ZEN_XBL").description
    assert "MULTI_TWO" in table and "allow list" in table.get("RBL_WL_EXAMPLE").description
    assert table.get("RHSBL_DBL_EXAMPLE").group == "rhsbl"
    assert {"URIBL_URI_EXAMPLE", "URI_PHISH"} <= {s.name for s in table}
    check_scores(config, table)  # a zone's symbol may be weighed in [scores]


def test_spamassassin_rules_emitted_are_declared_with_their_describe():
    from gateway.records import Envelope, Message, Recipient, Session, Transaction
    from rules.sa_check import SaRules

    cat = discover()
    config = validate({}, cat.sections)
    table = symbol_table(cat, config)
    check = SaRules.from_config(config, type("S", (), {"extra": {}})())
    spam = (b"From: \"win@prize.test\" <x@prize.test>\r\nTo: bob@example.test\r\n"
            b"Subject: FREE MONEY $1,000,000 WAITING FOR YOU NOW CLAIM TODAY\r\n\r\n"
            b"Claim your $1,000,000 prize now! Click http://prize.test/claim\r\n")
    txn = Transaction(Session("Q", "192.0.2.1", helo="x"), Envelope("Q", "x@prize.test",
                                                                    recipients=[Recipient("bob@example.test",
                                                                                          "example.test")]),
                      Message(spam))
    hits = check.evaluate(txn)
    assert hits, "the sample should hit some shipped rule"
    for r in hits:
        assert r.symbol in table and table.get(r.symbol).group == "spamassassin"
        assert table.get(r.symbol).description == (r.detail if r.detail != r.symbol else "")


def test_a_symbol_table_finds_names_then_families_most_specific_first():
    table = SymbolTable([Symbol("VIRUS_*", 0.0, "av", "family"), Symbol("VIRUS_FOUND", 100.0, "av", "found"),
                         Symbol("VIRUS_CL*", 0.0, "av", "clam family")])
    assert table.get("VIRUS_FOUND").description == "found"
    assert table.get("VIRUS_CLAMD").description == "clam family"
    assert table.get("VIRUS_SOPHIE").description == "family"
    assert table.get("NOPE") is None and table.description("NOPE") == ""
    assert len(table) == 3 and "VIRUS_X" in table


def test_an_unknown_scores_key_is_refused_naming_it():
    cat = discover()
    config = validate({"scores": {"BAYES_99": 4.0, "BAYES_99X": 1.0}}, cat.sections)
    with pytest.raises(ConfigError) as e:
        check_scores(config, symbol_table(cat, config), "m.toml")
    assert str(e.value) == "m.toml: scores.BAYES_99X = 1.0: unknown symbol, no check declares 'BAYES_99X'"


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_check_config_and_run_refuse_an_unknown_scores_key(tmp_path, command):
    from tests.support.gateway import base_config
    from tests.support.ports import free_port

    path = tmp_path / "m.toml"
    path.write_text(base_config(free_port(), str(tmp_path / "queue"), None) + "\n[scores]\nGTUBE = 500\nGTUB = 1.0\n")
    p = subprocess.run([sys.executable, "-m", "gateway.cli", command, "-c", str(path)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "scores.GTUB = 1.0: unknown symbol, no check declares 'GTUB'" in p.stderr
    assert "GTUBE" not in p.stderr.replace("'GTUB'", "") and "Traceback" not in p.stderr
