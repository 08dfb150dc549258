"""A real downstream SMTP server for tests: aiosmtpd on a free loopback port.

The sink runs in its own thread with its own asyncio loop (aiosmtpd's
``Controller``), so it answers whether or not the test's Twisted reactor is
running, and a subprocess gateway can deliver to it too.

Behaviour is configurable per sink:

- ``known_users``: a set of addresses (case-insensitive); any other recipient
  gets ``550 5.1.1`` at RCPT.  ``None`` accepts everyone.
- ``rcpt_reply`` / ``data_reply`` / ``mail_reply``: a reply line that replaces
  the normal one (``"451 4.3.0 try later"``, ``"554 5.7.1 no"``), or a dict
  ``{address: reply}`` for RCPT to pick recipients.
- ``greeting``: a reply line sent instead of the 220 greeting (``"421 4.3.2
  busy"``); the sink then answers nothing but QUIT properly, as a real server
  that refuses service would.
- ``tls=True``: offer STARTTLS with a self-signed certificate made at start
  (an EC key through the ``cryptography`` package, in a temp dir);
  ``starttls_reply`` (``"454 4.7.0 TLS not available"``) then refuses it.

What arrived is in ``messages`` (``Received`` objects) with ``.data`` exactly
as received after dot-unstuffing: CRLF line ends, nothing added.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Optional, Union

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from tests.support.ports import free_port


@dataclass
class Received:
    """One message as the sink got it."""

    mail_from: str  # "" for the null sender
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    helo: Optional[str] = None
    tls: bool = False
    peer: tuple = ()


def make_self_signed(directory: str, common_name: str = "localhost") -> tuple[str, str]:
    """Write cert.pem and key.pem (self-signed, EC P-256) into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(common_name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = f"{directory}/cert.pem", f"{directory}/key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


class _Handler:
    """aiosmtpd hooks; every reply decision reads the owning Sink's settings."""

    def __init__(self, sink: "Sink"):
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.sink._note_helo(hostname)
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        self.sink._note_helo(hostname)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.sink.mail_reply:
            return self.sink.mail_reply
        # aiosmtpd gives the null sender as "<>" and needs it non-empty
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.sink.rcpt_reply
        if isinstance(reply, dict):
            reply = reply.get(address) or reply.get(address.lower())
        if reply:
            return reply
        known = self.sink.known_users
        if known is not None and address.lower() not in known:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.sink.data_reply:
            return self.sink.data_reply
        number = self.sink._store(
            Received(
                mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                data=bytes(envelope.original_content),
                mail_options=list(envelope.mail_options),
                helo=session.host_name,
                tls=session.ssl is not None,
                peer=tuple(session.peer or ()),
            )
        )
        return f"250 2.0.0 OK queued as SINK{number}"


class _SinkSMTP(SMTP):
    """aiosmtpd's server with an optional replacement greeting."""

    def __init__(self, *args, greeting: Optional[str] = None, starttls_reply: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._greeting = greeting
        self._starttls_reply = starttls_reply
        self._greeted = False

    async def smtp_STARTTLS(self, arg: str):
        if self._starttls_reply:
            await super().push(self._starttls_reply)
            return
        await super().smtp_STARTTLS(arg)

    async def push(self, status: str) -> None:
        if not self._greeted:
            self._greeted = True
            if self._greeting:
                status = self._greeting
        await super().push(status)

    async def smtp_EHLO(self, hostname: str):
        if self._greeting:
            await super().push("503 5.5.1 service refused at greeting; only QUIT")
            return
        await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str):
        if self._greeting:
            await super().push("503 5.5.1 service refused at greeting; only QUIT")
            return
        await super().smtp_HELO(hostname)


class _Controller(Controller):
    def __init__(self, handler, sink: "Sink", **kwargs):
        super().__init__(handler, **kwargs)
        self._sink = sink

    def factory(self):
        return _SinkSMTP(self.handler, greeting=self._sink.greeting, starttls_reply=self._sink.starttls_reply,
                         **self.SMTP_kwargs)


class Sink:
    """A downstream SMTP server on loopback.  ``start()`` before use, ``stop()`` after."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: Optional[int] = None,
        *,
        known_users: Optional[set[str]] = None,
        mail_reply: Optional[str] = None,
        rcpt_reply: Union[str, dict, None] = None,
        data_reply: Optional[str] = None,
        greeting: Optional[str] = None,
        tls: bool = False,
        starttls_reply: Optional[str] = None,
        hostname: str = "sink.test",
    ):
        self.host = host
        self.port = port or free_port(host)
        self.known_users = {u.lower() for u in known_users} if known_users is not None else None
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.greeting = greeting
        self.tls = tls
        self.starttls_reply = starttls_reply
        self.hostname = hostname
        self.messages: list[Received] = []
        self.helos: list[str] = []  # every HELO/EHLO name, in order
        self.cert_path: Optional[str] = None
        self._cond = threading.Condition()
        self._controller: Optional[Controller] = None
        self._tmpdir: Optional[str] = None

    # -- called from the sink's thread -------------------------------------
    def _store(self, message: Received) -> int:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()
            return len(self.messages)

    def _note_helo(self, name: str) -> None:
        with self._cond:
            self.helos.append(name)

    # -- test side -----------------------------------------------------------
    def start(self) -> "Sink":
        kwargs = {}
        if self.tls:
            self._tmpdir = tempfile.mkdtemp(prefix="mailgate-sink-")
            self.cert_path, key_path = make_self_signed(self._tmpdir)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.cert_path, key_path)
            kwargs.update(tls_context=context, require_starttls=False)
        self._controller = _Controller(
            _Handler(self),
            self,
            hostname=self.host,
            port=self.port,
            server_hostname=self.hostname,
            **kwargs,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def wait_for(self, n: int, timeout: float = 10) -> bool:
        """True once at least ``n`` messages have arrived, False after ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.messages) >= n, timeout)

    @property
    def address(self) -> str:
        """As a route wants it: ``[127.0.0.1]:PORT``."""
        return f"[{self.host}]:{self.port}"

    def __enter__(self) -> "Sink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Sink {self.host}:{self.port} messages={len(self.messages)}>"


@pytest.fixture
def sink():
    """A started Sink accepting everything; change its behaviour via attributes
    (``sink.rcpt_reply = "451 4.3.0 try later"``) before the client connects."""
    s = Sink().start()
    try:
        yield s
    finally:
        s.stop()
