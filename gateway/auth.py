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

from twisted.cred import checkers, credentials, error, portal
from twisted.internet import defer
from twisted.mail import imap4, smtp
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
    return users


def _verify(stored: str, password: bytes) -> bool:
    if stored.startswith("{PBKDF2-SHA256}"):
        try:
            iterations, salt, digest = stored[len("{PBKDF2-SHA256}"):].split("$")
            computed = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(salt), int(iterations))
            return hmac.compare_digest(computed, base64.b64decode(digest))
        except (ValueError, TypeError):
            return False
    return hmac.compare_digest(stored.removeprefix("{PLAIN}").encode(), password)


@implementer(checkers.ICredentialsChecker)
class UsersFileChecker:
    credentialInterfaces = (credentials.IUsernamePassword, credentials.IUsernameHashedPassword)

    def __init__(self, users: dict[str, str]):
        self.users = users

    def requestAvatarId(self, creds):
        name = creds.username.decode() if isinstance(creds.username, bytes) else creds.username
        stored = self.users.get(name)
        if stored is None:
            return defer.fail(error.UnauthorizedLogin())
        if credentials.IUsernamePassword.providedBy(creds):
            password = creds.password if isinstance(creds.password, bytes) else creds.password.encode()
            ok = _verify(stored, password)
        else:  # CRAM-MD5: only a plain secret can answer the challenge
            ok = not stored.startswith("{PBKDF2") and creds.checkPassword(stored.removeprefix("{PLAIN}").encode())
        return defer.succeed(name) if ok else defer.fail(error.UnauthorizedLogin())


@implementer(portal.IRealm)
class AuthRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        return smtp.IMessageDelivery, AuthUser(avatarId), lambda: None


def make_portal(users_file: str):
    """-> (portal, challengers) or (None, {}) when AUTH is off."""
    if not users_file:
        return None, {}
    p = portal.Portal(AuthRealm(), [UsersFileChecker(read_users(users_file))])
    challengers = {
        b"PLAIN": imap4.PLAINCredentials,
        b"LOGIN": imap4.LOGINCredentials,
        b"CRAM-MD5": credentials.CramMD5Credentials,
    }
    return p, challengers
