"""DKIM signing of outbound mail (dkimpy).

Mail from a client that may relay (a trusted network, or authenticated) is
signed for the domain of its From: address when ``[dkim_sign.domains]`` has
a key for that domain or a parent of it.  The check returns the signature as
``Result.header``; the finisher puts it on top of the delivered message.

    [dkim_sign.domains."example.com"]
    selector = "mg2026"
    key_file = "/etc/mailgate/dkim/example.com.mg2026.key"

``mailgate dkim keygen DOMAIN SELECTOR`` writes such a key and prints the
TXT record to publish (see rules/commands.py).
"""

from __future__ import annotations

import base64
import logging
import os
from typing import Optional

import dkim
from pydantic import Field, field_validator

from gateway.config import Domain, Section
from gateway.errors import ConfigError
from gateway.mime import getaddresses
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage

log = logging.getLogger("mailgate.dkim")

DEFAULT_HEADERS = [
    "From", "Reply-To", "Sender", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To",
    "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "List-Unsubscribe",
]
CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple")


class DkimKey(Section):
    selector: str
    key_file: str

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        v = v.strip()
        if not v or not all(part and all(c.isalnum() or c == "-" for c in part) for part in v.split(".")):
            raise ValueError("a selector is one or more DNS labels (letters, digits, -)")
        return v


class DkimSignSettings(Section):
    domains: dict[Domain, DkimKey] = Field(default_factory=dict)
    headers: list[str] = Field(default_factory=lambda: list(DEFAULT_HEADERS))
    canonicalization: str = "relaxed/relaxed"
    # where `mailgate dkim keygen` writes keys
    key_dir: str = "var/dkim"

    @field_validator("canonicalization")
    @classmethod
    def _canon(cls, v: str) -> str:
        if v not in CANONICALIZATIONS:
            raise ValueError(f"must be one of {', '.join(CANONICALIZATIONS)}")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        if not any(h.lower() == "from" for h in v):
            raise ValueError("From must be signed (RFC 6376)")
        return v


def read_key(path: str) -> bytes:
    """The PEM private key from ``path``; a clear error when it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"dkim_sign: cannot read key file {path}: {e.strerror}") from None
    try:
        dkim.crypto.parse_pem_private_key(data)
    except Exception:
        raise ConfigError(f"dkim_sign: {path} is not a PEM RSA private key") from None
    return data


def key_for(domains: dict, domain: str) -> Optional[tuple[str, object]]:
    """(signing domain, key settings) for ``domain`` or its nearest parent."""
    labels = domain.lower().rstrip(".").split(".")
    for i in range(len(labels) - 1):
        d = ".".join(labels[i:])
        if d in domains:
            return d, domains[d]
    return None


def from_domain(msg) -> Optional[str]:
    values = msg.get_all("From") or []
    pairs = [a for _, a in getaddresses([str(v) for v in values]) if "@" in a]
    if len(pairs) != 1:
        return None  # none, or several authors: nothing one signature can vouch for
    return pairs[0].rpartition("@")[2].lower().rstrip(".") or None


class DkimSign(Check):
    name = "dkim_sign"
    stage = Stage.DATA
    symbols = (Symbol("DKIM_SIGNED", 0.0, "dkim", "Signed with our own DKIM key on the way out"),)
    priority = 900  # after the content checks

    def __init__(self, settings: DkimSignSettings, keys: dict[str, bytes], run_in_thread=None):
        self.settings = settings
        self.keys = keys
        self.run_in_thread = run_in_thread
        head, body = settings.canonicalization.split("/")
        self.canonicalize = (head.encode(), body.encode())
        self.include = [h.encode() for h in settings.headers]

    @classmethod
    def from_config(cls, config, services):
        settings = config.dkim_sign
        if not settings.domains:
            return None
        keys = {d: read_key(k.key_file) for d, k in settings.domains.items()}
        return cls(settings, keys, getattr(services, "run_in_thread", None))

    def sign(self, raw: bytes, domain: str) -> Optional[tuple[str, str]]:
        found = key_for(self.settings.domains, domain)
        if found is None:
            return None
        d, key = found
        sig = dkim.sign(raw, key.selector.encode(), d.encode(), self.keys[d],
                        canonicalize=self.canonicalize, include_headers=self.include)
        text = sig.decode("ascii")
        name, _, value = text.partition(":")
        return d, value.strip()

    def _check(self, txn):
        if not txn.session.may_relay:
            return []
        domain = from_domain(txn.message.parsed)
        if domain is None:
            return []
        try:
            signed = self.sign(txn.message.raw, domain)
        except dkim.DKIMException as e:
            return [Failed(self.name, f"cannot sign for {domain}: {e}")]
        if signed is None:
            return []
        d, value = signed
        sel = self.settings.domains[d].selector
        return [Result("DKIM_SIGNED", 0.0, f"d={d} s={sel}", header=("DKIM-Signature", value))]

    def check(self, txn):
        if self.run_in_thread is not None:
            return self.run_in_thread(self._check, txn)
        return self._check(txn)


def generate_key(bits: int = 2048) -> tuple[bytes, str]:
    """(PEM private key, base64 public key for the p= tag)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(pub).decode("ascii")


def txt_record(domain: str, selector: str, public_b64: str) -> str:
    """The zone-file line to publish, split into strings of at most 255 bytes."""
    value = f"v=DKIM1; k=rsa; p={public_b64}"
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def write_key(path: str, pem: bytes, force: bool = False) -> None:
    if os.path.exists(path) and not force:
        raise ConfigError(f"{path} exists; use --force to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


CHECKS = (DkimSign,)
SECTIONS = {"dkim_sign": DkimSignSettings}
