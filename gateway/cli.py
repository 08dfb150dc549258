"""The ``mailgate`` command.

Every subcommand takes ``-c FILE`` after its own name; without it
``$MAILGATE_CONFIG``, then ``./mailgate.toml``, then the embedded default.
Errors a person can fix are printed as one clear line with exit status 2,
never a traceback.

Plugin packages add subcommands with a module-level
``register_commands(subparsers, parent)`` that calls
``subparsers.add_parser(name, parents=[parent])`` and sets ``func`` to a
callable taking the parsed args and returning an exit status.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from gateway.errors import MailGateError


def config_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-c", "--config", metavar="FILE", help="config file (TOML)")
    return parent


def load_config(args):
    """The validated config for a subcommand's ``-c`` (or its fallbacks)."""
    from gateway import config as cfg

    return cfg.load(cfg.find_config_path(getattr(args, "config", None)))


def build_parser() -> argparse.ArgumentParser:
    from gateway import commands
    from gateway.plugins import discover

    parser = argparse.ArgumentParser(prog="mailgate", description="Anti-spam and anti-virus SMTP gateway")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parent = config_parent()
    commands.register_commands(sub, parent)
    for module in discover().command_modules:
        module.register_commands(sub, parent)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MailGateError as e:
        print(f"mailgate {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
