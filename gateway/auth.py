"""SMTP AUTH users: a small file checked by a twisted.cred checker.

Users file, one user a line, ``#`` comments::

    alice:{PLAIN}s3cret                 # works with PLAIN, LOGIN and CRAM-MD5
    bob:{PBKDF2-SHA256}600000$<salt b64>$<hash b64>   # PLAIN and LOGIN only

CRAM-MD5 needs the shared secret itself, so it only works for {PLAIN} users
(the usual trade-off; prefer PLAIN over TLS).  ``mailgate passwd`` prints a
PBKDF2 line.  Passwords are never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Callable

from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer
from twisted.mail import smtp
from zope.interface import implementer

from gateway.errors import ConfigError


@dataclass(frozen=True)
class AuthUser:
    username: str


def hash_password(password: str, iterations: int = 600_000) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{{PBKDF2-SHA256}}{iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def read_users(path: str) -> dict[str, str]:
    users = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, secret = line.partition(":")
                if not sep or not name or not secret:
                    raise ConfigError(f"{path}:{n}: expected user:password")
                users[name] = secret
    except OSError as e:
        raise ConfigError(f"auth.users_file = {path!r}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"auth.users_file = {path!r}: not UTF-8 text") from None
    return users


def users_of(auth_settings) -> dict[str, str]:
    """The users ``[auth]`` names: none when AUTH is off (no users_file)."""
    return read_users(auth_settings.users_file) if auth_settings.users_file else {}


# What an unknown user's password is checked against: a PBKDF2 entry with
# the default cost whose digest (all zeros) no password hashes to in practice
DECOY = "{PBKDF2-SHA256}600000$bWFpbGdhdGUtZGVjb3k=$" + base64.b64encode(b"\0" * 32).decode()


def _verify(stored: str, password: bytes) -> bool:
    if stored.startswith("{PBKDF2-SHA256}"):
        try:
            iterations, salt, digest = stored[len("{PBKDF2-SHA256}"):].split("$")
            computed = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(salt), int(iterations))
            return hmac.compare_digest(computed, base64.b64decode(digest))
        except (ValueError, TypeError):
            return False
    return hmac.compare_digest(stored.removeprefix("{PLAIN}").encode(), password)


def _matches(stored: str, creds) -> bool:
    """Whether ``creds`` prove the secret ``stored``; may be slow (PBKDF2)."""
    if credentials.IUsernamePassword.providedBy(creds):
        password = creds.password if isinstance(creds.password, bytes) else creds.password.encode()
        return _verify(stored, password)
    # CRAM-MD5: only a plain secret can answer the challenge
    return not stored.startswith("{PBKDF2") and creds.checkPassword(stored.removeprefix("{PLAIN}").encode())


def _username(creds) -> str | None:
    """The name as text, or None for one that is not UTF-8 (no such user)."""
    name = creds.username
    if isinstance(name, str):
        return name
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return None


@implementer(checkers.ICredentialsChecker)
class UsersFileChecker:
    """Checks AUTH credentials against the users file's entries.

    Every verification runs through ``run_in_thread`` (PBKDF2 costs tens of
    milliseconds by design; on the reactor it would stall every session), and
    the Deferred it returns is the answer.  One checker serves the gateway's
    whole life: a reload ``replace``s its users, so a revoked user is refused
    at once, on connections already open as well as new ones.
    """

    credentialInterfaces = (credentials.IUsernamePassword, credentials.IUsernameHashedPassword)

    def __init__(self, run_in_thread: Callable[..., defer.Deferred], users: dict[str, str] | None = None):
        self.run_in_thread = run_in_thread
        self.users: dict[str, str] = dict(users or {})

    def replace(self, users: dict[str, str]) -> None:
        # one assignment: a login in flight sees the old users or the new, never a mix
        self.users = dict(users)

    def requestAvatarId(self, creds) -> defer.Deferred:
        name = _username(creds)
        stored = self.users.get(name) if name is not None else None
        # an unknown user costs what a known one does: the time to answer
        # must not tell an attacker which names exist
        d = self.run_in_thread(_matches, stored or DECOY, creds)
        d.addCallback(self._outcome, name if stored is not None else None)
        return d

    @staticmethod
    def _outcome(ok: bool, name: str | None):
        if not ok or name is None:
            raise error.UnauthorizedLogin()
        return name


@implementer(portal.IRealm)
class AuthRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        return smtp.IMessageDelivery, AuthUser(avatarId), lambda: None


def make_portal(checker: UsersFileChecker) -> portal.Portal:
    """The SMTP factory's portal, around ``checker``."""
    return portal.Portal(AuthRealm(), [checker])
