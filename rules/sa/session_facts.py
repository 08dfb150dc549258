"""The SMTP session a message file would have had at our gateway.

``mailgate score`` and ``tools/eval_pipeline.py`` judge files, not live
sessions.  Pretending every file came from 127.0.0.1 makes SpamAssassin's
ALL_TRUSTED fire on all of them and hides every rule on the sending relay, so
the facts come from the file's own Received chain, read as SpamAssassin reads
it (rules.sa.received): the client is the hop that brought the message in
from outside, the first untrusted relay, as if our gateway had received it
there.  A message that never left trusted hosts keeps its oldest trusted hop
(the host it started from, loopback only when it really came from there); a
file without any Received header has no known client (0.0.0.0).

The recipient is the first of, in this order:

- ``X-Original-To`` (Postfix): the envelope recipient as it arrived, before
  alias expansion, which is what an MX in front would have been given;
- the oldest ``Delivered-To`` that is an address (qmail and Postfix add one at
  each local delivery, the oldest is closest to the boundary; ezmlm's
  "mailing list ..." ones are not recipients);
- the first ``To`` address (a header, not the envelope: a list or Bcc copy
  names someone else);
- ``postmaster@localhost``.

The envelope sender is SpamAssassin's guess for a file (``envelope_sender_of``):
what the boundary hop's MTA recorded as envelope-from, else a Return-Path (or
X-Envelope-From, Envelope-Sender) above every Received header.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from gateway.errors import MailGateError
from gateway.mime import getaddresses
from rules.sa.received import INFERRED, Relay, TrustConfig, header_end, parse_all, received_headers, walk

UNKNOWN_CLIENT = "0.0.0.0"
_FIELD = re.compile(rb"(?m)^([!-9;-~]+)[ \t]*:(.*(?:\r?\n[ \t].*)*)")


@dataclass(frozen=True)
class SessionFacts:
    client_ip: str  # UNKNOWN_CLIENT when the file names none
    client_rdns: str
    helo: Optional[str]
    rcpt: str
    sender: str
    client_source: str  # "received[N]" (which header, 0 = topmost), "--client-ip" or "none"
    rcpt_source: str  # the header the recipient came from, "--rcpt" or "default"


def _headers(raw: bytes) -> list[tuple[str, str]]:
    head = raw[:header_end(raw)]
    return [(m.group(1).decode("ascii", "replace").lower(),
             re.sub(r"\r?\n[ \t]", " ", m.group(2).decode("utf-8", "replace")).strip())
            for m in _FIELD.finditer(head)]


def _first_address(value: str) -> str:
    for _, addr in getaddresses([value]):
        if "@" in addr:
            return addr
    return ""


def recipient_of(fields: list[tuple[str, str]]) -> tuple[str, str]:
    """(recipient, the header it came from) by the order the module explains."""
    for name in ("x-original-to",):
        for k, v in fields:
            if k == name and _first_address(v):
                return _first_address(v), "X-Original-To"
    delivered = [v for k, v in fields if k == "delivered-to" and not v.lower().startswith("mailing list")]
    for v in reversed(delivered):
        if _first_address(v):
            return _first_address(v), "Delivered-To"
    for k, v in fields:
        if k == "to" and _first_address(v):
            return _first_address(v), "To"
    return "postmaster@localhost", "default"


def envelope_sender_of(fields: list[tuple[str, str]], hop: Optional[Relay]) -> str:
    """PerMsgStatus::get_envelope_from, as SpamAssassin guesses it for a file: the
    envelope sender the boundary hop's MTA recorded, else X-Envelope-From,
    Envelope-Sender or Return-Path when above every Received header (one added
    below a Received header is not the final delivery's); "" when none."""
    if hop is not None and hop.envfrom is not None and ("@" in hop.envfrom[1:] or hop.envfrom == ""):
        return hop.envfrom
    names = [k for k, _ in fields]
    first_received = names.index("received") if "received" in names else len(names)
    x_sender = next((v for k, v in fields if k == "x-sender"), "")
    if "@" in x_sender and any(k == "received" and "(fetchmail" in v for k, v in fields):
        return ""  # fetchmail reuses a list's X-Sender: no envelope sender can be trusted
    for name in ("x-envelope-from", "envelope-sender", "return-path"):
        for n, (k, v) in enumerate(fields):
            if k == name:
                if n < first_received:
                    return _first_address(v) or v.strip().strip("<>").strip()
                break
    return ""


def _checked_ip(text: str) -> str:
    try:
        addr = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise MailGateError(f"--client-ip {text!r}: not an IPv4 or IPv6 address") from None
    return str(addr)


def check_options(client_ip: Optional[str] = None, rcpt: Optional[str] = None) -> None:
    """MailGateError for a bad --client-ip or --rcpt, before any message is read."""
    if client_ip is not None:
        _checked_ip(client_ip)
    if rcpt is not None and "@" not in rcpt:
        raise MailGateError(f"--rcpt {rcpt!r}: not an address (user@domain)")


def session_facts(raw: bytes, trust: TrustConfig = INFERRED,
                  client_ip: Optional[str] = None, helo: Optional[str] = None,
                  rcpt: Optional[str] = None) -> SessionFacts:
    """The session facts for a message file; ``client_ip``/``helo``/``rcpt``
    (the command's options) win over what the file says."""
    # (no originating_ip_headers: an X-Originating-IP address was never an SMTP client)
    chain = walk(parse_all(received_headers(raw)), trust)
    hop: Optional[Relay] = None
    if client_ip is not None:
        ip = _checked_ip(client_ip)
        hop = next((r for r in chain.untrusted + chain.trusted if _same(r.ip, ip)), None)
        source = "--client-ip"
    else:
        hop = chain.untrusted[0] if chain.untrusted else (chain.trusted[-1] if chain.trusted else None)
        ip = hop.ip if hop is not None else UNKNOWN_CLIENT
        source = f"received[{hop.index}]" if hop is not None else "none"
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:  # a header with an address SpamAssassin accepts and Python does not
            ip, source, hop = UNKNOWN_CLIENT, "none", None
    fields = _headers(raw)
    check_options(rcpt=rcpt)
    if rcpt is not None:
        rcpt_value, rcpt_source = rcpt.strip("<> "), "--rcpt"
    else:
        rcpt_value, rcpt_source = recipient_of(fields)
    sender = envelope_sender_of(fields, hop)
    return SessionFacts(
        client_ip=ip,
        client_rdns=hop.rdns if hop is not None else "",
        helo=helo if helo is not None else (hop.helo or None if hop is not None else None),
        rcpt=rcpt_value, sender=sender, client_source=source, rcpt_source=rcpt_source,
    )


def _same(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False
