"""The console's users file: ``name:role:hash`` lines, ``#`` comments.

The hash is the gateway's own PBKDF2 format (``gateway.auth.hash_password``,
``{PBKDF2-SHA256}iterations$salt$digest``), checked by the same code as SMTP
AUTH passwords.  Roles: ``admin`` may change things, ``viewer`` only looks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.atomic import replaced_file
from gateway.errors import ConfigError, MailGateError

ROLES = ("admin", "viewer")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class WebUser:
    name: str
    role: str
    secret: str


def read_users(path: str) -> dict[str, WebUser]:
    """The users in ``path``; a missing file is no users (nobody can log in yet)."""
    users: dict[str, WebUser] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return users
    except OSError as e:
        raise ConfigError(f"web.users = {path!r}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"web.users = {path!r}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, role, secret = (line.split(":", 2) + ["", ""])[:3]
        if not _NAME.match(name) or role not in ROLES or not secret.startswith("{PBKDF2-SHA256}"):
            raise ConfigError(f"web.users = {path!r} line {n}: expected name:admin|viewer:{{PBKDF2-SHA256}}...")
        users[name] = WebUser(name, role, secret)
    return users


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise MailGateError(f"user name {name!r}: letters, digits and . _ @ - only (at most 64)")
    return name


def add_user(path: str, name: str, role: str, password: str) -> bool:
    """Add or replace ``name``; -> True if it replaced one.  Written atomically, mode 0600."""
    from gateway.auth import hash_password

    check_name(name)
    if role not in ROLES:
        raise MailGateError(f"role {role!r}: must be one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise MailGateError("password: at least 8 characters")
    users = read_users(path)
    replaced = name in users
    users[name] = WebUser(name, role, hash_password(password))
    with replaced_file(path, "w", prefix=".web-users-", permissions=0o600, encoding="utf-8") as f:
        f.write("# MailGate web console users: name:role:hash (mailgate web adduser NAME)\n")
        for u in users.values():
            f.write(f"{u.name}:{u.role}:{u.secret}\n")
    return replaced
