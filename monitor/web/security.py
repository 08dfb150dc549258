"""Sessions, CSRF tokens, login failure limits and the headers every response carries.

All of it lives on the reactor thread (dicts, no locks) and costs microseconds;
password hashing, the only slow part of a login, runs in the password pool.
"""

from __future__ import annotations

import hmac
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

COOKIE = b"mailgate_session"

# No inline script or style anywhere (every page's JS and CSS is a file from
# /static); not framable; forms post only to us.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def security_headers(tls: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate CSP 2
        (b"cross-origin-opener-policy", b"same-origin"),
    ]
    if tls:
        headers.append((b"strict-transport-security", b"max-age=31536000"))
    return headers


@dataclass
class Session:
    token: str
    csrf: str
    expires: float
    user: Optional[str] = None  # None: not logged in yet (the login form's own CSRF token)
    role: str = ""
    flash: list = field(default_factory=list)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class Sessions:
    def __init__(self, clock, lifetime: float, max_sessions: int = 10000):
        self.clock = clock
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._by_token: dict[str, Session] = {}

    def new(self, user: Optional[str] = None, role: str = "") -> Session:
        self._prune()
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), self.clock() + self.lifetime, user, role)
        self._by_token[s.token] = s
        return s

    def get(self, token: Optional[str]) -> Optional[Session]:
        if not token:
            return None
        s = self._by_token.get(token)
        if s is None:
            return None
        if s.expires <= self.clock():
            del self._by_token[token]
            return None
        return s

    def end(self, session: Session) -> None:
        self._by_token.pop(session.token, None)

    def end_user(self, user: str) -> None:
        for token in [t for t, s in self._by_token.items() if s.user == user]:
            del self._by_token[token]

    def _prune(self) -> None:
        now = self.clock()
        for token in [t for t, s in self._by_token.items() if s.expires <= now]:
            del self._by_token[token]
        # a flood of anonymous visits cannot grow memory without bound: the oldest go first
        while len(self._by_token) >= self.max_sessions:
            oldest = min(self._by_token.values(), key=lambda s: s.expires)
            del self._by_token[oldest.token]


def csrf_ok(session: Optional[Session], sent: Optional[str]) -> bool:
    return session is not None and bool(sent) and hmac.compare_digest(session.csrf.encode(), sent.encode())


class FailureLimit:
    """At most ``limit`` failed logins per client address within ``window`` seconds."""

    def __init__(self, clock, limit: int, window: float, max_addresses: int = 100000):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, deque] = {}

    def _recent(self, address: str) -> deque:
        q = self._failures.get(address)
        if q is None:
            return deque()
        cutoff = self.clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._failures[address]
        return q

    def blocked(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        q = self._recent(address)
        if len(q) < self.limit:
            return 0.0
        return max(1.0, q[0] + self.window - self.clock())

    def failed(self, address: str) -> None:
        if address not in self._failures and len(self._failures) >= self.max_addresses:
            for a in list(self._failures):  # drop the expired ones first
                self._recent(a)
            if len(self._failures) >= self.max_addresses:
                self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(address, deque()).append(self.clock())

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)
