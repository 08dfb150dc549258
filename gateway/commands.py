"""The gateway's own subcommands: run, check-config, score, queue, quarantine."""

from __future__ import annotations

import sys


def cmd_check_config(args) -> int:
    from gateway.cli import load_config

    config = load_config(args)
    print(f"config ok: listen={','.join(str(l) for l in config.server.listen)} "
          f"domains={','.join(config.relay.domains) or '-'}")
    return 0


def register_commands(sub, parent) -> None:
    p = sub.add_parser("check-config", parents=[parent], help="validate the config and exit")
    p.set_defaults(func=cmd_check_config)
