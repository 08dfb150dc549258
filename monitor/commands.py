"""``mailgate web adduser NAME [--role admin|viewer]``: a console user."""

from __future__ import annotations

import getpass
import sys

from gateway.errors import MailGateError


def cmd_web(args) -> int:
    from gateway.cli import load_config
    from monitor.web.users import add_user, check_name

    config = load_config(args)
    check_name(args.name)
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if password != getpass.getpass("again: "):
            raise MailGateError("the two passwords differ")
    else:  # scripts and tests: the first line of stdin
        password = sys.stdin.readline().rstrip("\r\n")
    replaced = add_user(config.web.users, args.name, args.role, password)
    print(f"{'replaced' if replaced else 'added'} {args.role} {args.name} in {config.web.users}; "
          f"they can log in at once")
    return 0


def register_commands(sub, parent) -> None:
    p = sub.add_parser("web", parents=[parent], help="manage the web console")
    wsub = p.add_subparsers(dest="web_command", required=True)
    a = wsub.add_parser("adduser", parents=[parent], help="add (or replace) a console user; password from the terminal or stdin")
    a.add_argument("name")
    a.add_argument("--role", choices=["admin", "viewer"], default="admin")
    a.set_defaults(func=cmd_web)
