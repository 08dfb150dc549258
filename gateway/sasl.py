"""SMTP AUTH exchanges (RFC 4954) and the failure policy around them.

Each mechanism is a small state machine fed the client's decoded responses;
a step either asks for more (a ``Challenge``) or is done (``Credentials`` for
twisted.cred).  We do not use twisted.mail's challengers: they parse with
``split`` and tuple unpacking, so a PLAIN response without NULs or a CRAM-MD5
response without a space raises deep inside the protocol.  Here every
malformed response is a ``SaslError`` carrying the reply it deserves.

``AuthGuard`` is the Postfix/Dovecot policy: a delay after every failure, a
limit per connection (then 421 and close) and a limit per client address
over a window, counted in the shared store so that several gateways and
reconnecting clients see one count.
"""

from __future__ import annotations

import binascii
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

from twisted.cred import credentials

from gateway.errors import Reject, Reply, TempFail
from gateway.store import StoreUnavailable

log = logging.getLogger("mailgate.smtp")

MALFORMED = Reject(501, "5.5.2", "Error: malformed authentication response")
NOT_UTF8 = Reject(501, "5.5.2", "Error: user name or password is not UTF-8")
NO_INITIAL_RESPONSE = Reject(501, "5.5.2", "Error: this mechanism takes no initial response")
AUTHZID_REFUSED = Reject(535, "5.7.8", "Error: authorization identity differs from the user name")


class SaslError(Exception):
    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Challenge:
    data: bytes  # sent base64-encoded after 334


Step = Union[Challenge, credentials.IUsernamePassword, credentials.IUsernameHashedPassword]


def _utf8(raw: bytes) -> bytes:
    """``raw`` if it is UTF-8.  Credentials keep bytes, as twisted.cred's checkers expect."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(NOT_UTF8) from None
    return raw


class Plain:
    """RFC 4616: ``[authzid] NUL authcid NUL passwd`` in one response."""

    name = "PLAIN"

    def step(self, response: Optional[bytes]) -> Step:
        if response is None:
            return Challenge(b"")
        parts = response.split(b"\x00")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SaslError(MALFORMED)
        authzid, user, password = parts
        if authzid and authzid != user:
            raise SaslError(AUTHZID_REFUSED)
        _utf8(password)
        return credentials.UsernamePassword(_utf8(user), password)


class Login:
    """The de facto LOGIN mechanism: user name, then password."""

    name = "LOGIN"

    def __init__(self):
        self._user: Optional[bytes] = None

    def step(self, response: Optional[bytes]) -> Step:
        if response is None:
            return Challenge(b"Username:")
        if self._user is None:
            if not response:
                raise SaslError(MALFORMED)
            self._user = _utf8(response)
            return Challenge(b"Password:")
        _utf8(response)
        return credentials.UsernamePassword(self._user, response)


class CramMD5:
    """RFC 2195: the server's challenge, answered ``user SP hex-digest``."""

    name = "CRAM-MD5"

    def __init__(self, hostname: str, clock: Callable[[], float] = time.time):
        self._creds = credentials.CramMD5Credentials(hostname.encode())
        # RFC 2195 wants a unique msg-id-like challenge; twisted's own uses
        # a random number and the time too
        self._creds.challenge = b"<%d.%d@%s>" % (int.from_bytes(os.urandom(6), "big"), int(clock()),
                                                 hostname.encode())
        self._started = False

    def step(self, response: Optional[bytes]) -> Step:
        if not self._started:
            if response is not None:
                raise SaslError(NO_INITIAL_RESPONSE)
            self._started = True
            return Challenge(self._creds.challenge)
        user, sep, digest = (response or b"").rpartition(b" ")
        if not sep or not user or len(digest) != 32:
            raise SaslError(MALFORMED)
        try:
            binascii.unhexlify(digest)
        except binascii.Error:
            raise SaslError(MALFORMED) from None
        self._creds.username = _utf8(user)
        self._creds.response = digest.lower()
        return self._creds


MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def new_mechanism(name: str, hostname: str):
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "CRAM-MD5":
        return CramMD5(hostname)
    raise KeyError(name)


TOO_MANY_FAILURES = TempFail(421, "4.7.0", "Error: too many authentication failures")
CLIENT_BLOCKED = TempFail(421, "4.7.0", "Error: too many authentication failures from your address, "
                                        "try again later")


class AuthGuard:
    """Counts failures per client address in the store.

    ``run`` turns the store's coroutines into Deferreds (the pipeline's
    ``as_deferred`` in the gateway; ``defer.ensureDeferred`` in tests that
    use the memory store without an asyncio loop).  The limits come with
    each call, from the session's config snapshot, so a reload applies them.
    """

    def __init__(self, store, run: Callable):
        self.store = store
        self.run = run

    @staticmethod
    def _key(ip) -> str:
        return f"authfail:{ip}"

    def blocked(self, ip, settings):
        """A Deferred firing True when this address has failed too often.

        A store that cannot answer blocks nobody, whatever ``[store]
        on_error`` says, and the line says so: an outage of the shared store
        must not lock every user out (nor hang the AUTH command), and the
        password check still guards each attempt."""
        return self.run(self._blocked(ip, settings))

    async def _blocked(self, ip, settings) -> bool:
        try:
            n = await self.store.get(self._key(ip))
        except StoreUnavailable as e:
            log.warning("client=%s auth failures not checked (AUTH_GUARD_FAIL): %s", ip, e)
            return False
        return int(n or 0) >= settings.max_client_failures

    def failed(self, ip, settings):
        return self.run(self.store.incr(self._key(ip), settings.client_failure_window))
