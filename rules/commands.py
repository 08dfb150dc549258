"""``mailgate rules lint`` and ``mailgate dkim keygen``."""

from __future__ import annotations

import os
from collections import Counter


def cmd_rules_lint(args) -> int:
    from gateway.cli import load_config
    from rules.sa.ruleset import KINDS
    from rules.sa_check import load_engine, rule_dirs

    config = load_config(args)
    settings = config.rules
    dirs = rule_dirs(settings)
    engine = load_engine(settings)
    rs = engine.rs
    print(f"rule directories: {', '.join(dirs) if dirs else '(none)'}")
    print(f"files read: {len(rs.files)}")
    counts = rs.counts()
    skipped_by_kind = Counter(s.kind for s in rs.skipped.values())
    print("loaded by kind:")
    for kind in KINDS:
        evals = sum(1 for r in rs.rules.values() if r.kind == kind and r.eval is not None)
        extra = f" ({evals} eval)" if evals else ""
        print(f"  {kind:<11} {counts.get(kind, 0):>5}{extra}  skipped {skipped_by_kind.get(kind, 0)}")
    regex_loaded = sum(1 for r in rs.rules.values() if r.parsed is not None)
    regex_skipped = sum(1 for s in rs.skipped.values() if s.regex)
    total = regex_loaded + regex_skipped
    share = 100.0 * regex_skipped / total if total else 0.0
    print(f"regex rules: {regex_loaded} loaded, {regex_skipped} skipped ({share:.1f}% skipped)")
    print(f"eval rules skipped: {sum(1 for s in rs.skipped.values() if not s.regex)}")
    print(f"rules run per message (non-zero score or needed by a scored meta): {len(engine.active)}")
    if engine.prefilters:
        behind = sum(len(p.covered) for p in engine.prefilters.values())
        refused = {k: r for p in engine.prefilters.values() for k, r in p.refused.items()}
        print(f"hyperscan prefilter: {behind} regex rules behind it, {len(refused)} refused by Hyperscan "
              f"(those run their Python regex on every message)")
        for name, reason in sorted(refused.items()):
            print(f"  {name}: {reason}")
    elif engine.use_prefilter:
        print("hyperscan prefilter: off (the hyperscan module is not installed; x86-64 only)")
    if rs.skipped:
        print("skipped:")
        for s in sorted(rs.skipped.values(), key=lambda s: s.source):
            print(f"  {s.source}: {s.name} ({s.kind}): {s.reason}")
    if rs.disabled:
        print(f"meta rules naming rules defined nowhere (read as 0, as SpamAssassin 4 does): "
              f"{len(rs.disabled)}")
        for line in sorted(rs.disabled.values())[:20]:
            print(f"  {line}")
        if len(rs.disabled) > 20:
            print(f"  ... and {len(rs.disabled) - 20} more")
    if rs.problems:
        print("problems:")
        for p in rs.problems:
            print(f"  {p}")
    print(f"rules: {len(rs.rules)} loaded, {len(rs.skipped)} skipped")
    return 0


def cmd_dkim_keygen(args) -> int:
    from gateway.config import normalize_domain
    from gateway.errors import ConfigError
    from rules.dkim_sign import DkimKey, generate_key, txt_record, write_key

    try:
        domain = normalize_domain(args.domain)
    except ValueError:
        raise ConfigError(f"not a domain name: {args.domain!r}") from None
    try:
        selector = DkimKey(selector=args.selector, key_file="-").selector
    except Exception:
        raise ConfigError(f"not a DKIM selector: {args.selector!r} (DNS labels: letters, digits, -)") from None
    if args.bits not in (1024, 2048, 3072, 4096):
        raise ConfigError("--bits must be 1024, 2048, 3072 or 4096")
    key_dir = args.dir
    if key_dir is None:
        try:
            from gateway.cli import load_config

            key_dir = load_config(args).dkim_sign.key_dir
        except Exception:
            key_dir = "var/dkim"
    path = os.path.join(key_dir, f"{domain}.{selector}.key")
    pem, public = generate_key(args.bits)
    write_key(path, pem, force=args.force)
    print(f"# private key written to {path} (mode 600); add to the config:")
    print(f'#   [dkim_sign.domains."{domain}"]')
    print(f'#   selector = "{selector}"')
    print(f'#   key_file = "{os.path.abspath(path)}"')
    print("# publish this TXT record:")
    print(txt_record(domain, selector, public))
    return 0


def register_commands(sub, parent) -> None:
    rules = sub.add_parser("rules", help="content rules (SpamAssassin syntax)")
    rules_sub = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    rules_sub.required = True
    lint = rules_sub.add_parser("lint", parents=[parent],
                                help="load every rule file, report what is loaded and skipped")
    lint.set_defaults(func=cmd_rules_lint)

    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", metavar="SUBCOMMAND")
    dkim_sub.required = True
    keygen = dkim_sub.add_parser("keygen", parents=[parent],
                                 help="write a signing key and print the DNS TXT record")
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("selector", metavar="SELECTOR")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--dir", default=None, help="directory for the key (default [dkim_sign] key_dir)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    keygen.set_defaults(func=cmd_dkim_keygen)
