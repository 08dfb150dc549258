"""``[web]``: where the console listens, who may log in, the quarantine digests."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from gateway.config import Duration, ListenAddress, Section, _listen

_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class WebSettings(Section):
    # on unless configured off: an admin should never have to find out it exists
    enabled: bool = True
    listen: ListenAddress = Field(default_factory=lambda: _listen("127.0.0.1:8025"))
    # HTTPS with [server] tls_certificate / tls_key (the session cookie is then Secure)
    tls: bool = False
    # name:role:hash lines, written by `mailgate web adduser NAME`
    users: str = "var/web-users"
    # the console's address as recipients' browsers reach it, for the digest links;
    # "" = http(s)://<listen>
    public_url: str = ""
    session_lifetime: Duration = Field(8 * 3600.0, gt=0)
    # failed logins per client address within login_failure_window, then 429
    max_login_failures: int = Field(5, gt=0)
    login_failure_window: Duration = Field(900.0, gt=0)
    # HMAC-SHA256 key of the digest links; digests are sent only when it is set
    digest_key: str = ""
    # how often each recipient with quarantined mail gets a digest; 0 = never
    digest_interval: Duration = 86400.0
    # UTC time of day of the first digest after start-up (HH:MM)
    digest_at: str = "07:00"
    # the digest's From; "" = postmaster@<server.hostname>
    digest_sender: str = ""

    @field_validator("digest_key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v and len(v) < 16:
            raise ValueError("must be at least 16 characters (a random string: openssl rand -hex 32)")
        return v

    @field_validator("digest_at")
    @classmethod
    def _at(cls, v: str) -> str:
        if not _CLOCK.match(v):
            raise ValueError("expected a UTC time of day as HH:MM, such as 07:00")
        return v

    @field_validator("public_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError("expected an http:// or https:// URL, such as https://mailgate.example.test:8025")
        return v.rstrip("/")
