"""The envelope sender: a domain that exists, and bounces with one recipient.

``sender_domain`` (MAIL): a sender domain with neither MX nor A/AAAA
(NXDOMAIN, or the name exists with none of them) is ``SENDER_DOMAIN_UNKNOWN``
and refused with 550 5.1.8, or only scored when ``[sender]
reject_unknown_domain = false``.  A domain publishing a null MX (RFC 7505,
``MX 0 .``) accepts no mail, so bounces to it cannot be delivered:
``SENDER_NULL_MX``, treated the same way.  A lookup that times out or fails
is ``Failed``: never a refusal.  The null sender, address literals and
sessions that may relay are not checked.

``null_sender_rcpts`` (RCPT): the null sender is accepted (bounces must get
through) but a bounce goes to one recipient, so a further recipient is
refused (554 5.7.1) beyond ``[sender] null_sender_max_recipients``.
"""

from __future__ import annotations

from pydantic import Field

from gateway.config import Section
from gateway.plugins import Check, Symbol
from gateway.records import Failed, Result, Stage


class SenderSettings(Section):
    # false: SENDER_DOMAIN_UNKNOWN / SENDER_NULL_MX only add their score
    reject_unknown_domain: bool = True
    null_sender_max_recipients: int = Field(1, ge=1)


class SenderDomain(Check):
    name = "sender_domain"
    stage = Stage.MAIL
    symbols = (
        Symbol("SENDER_DOMAIN_UNKNOWN", 3.0, "sender", "Sender domain does not exist or has no MX, A or AAAA"),
        Symbol("SENDER_NULL_MX", 3.0, "sender", "Sender domain accepts no mail (null MX)"),
    )
    priority = 10

    def __init__(self, resolver, reject: bool = True):
        self.resolver = resolver
        self.reject = reject

    @classmethod
    def from_config(cls, config, services):
        return cls(services.resolver, config.sender.reject_unknown_domain)

    def _unknown(self, symbol: str, domain: str, why: str):
        return [Result(symbol, 3.0, f"{domain} ({why})", refuse="sender_domain" if self.reject else None)]

    async def check(self, txn):
        domain = txn.envelope.sender_domain
        if not domain or domain.startswith("[") or txn.session.may_relay:
            return []
        mx = await self.resolver.mx(domain)
        if mx.ok:
            hosts = [r.split()[-1] for r in mx.records]
            if hosts == ["."]:
                return self._unknown("SENDER_NULL_MX", domain, "null MX")
            return []
        if mx.failed:
            return [Failed(self.name, f"MX {domain}: {mx.status}")]
        if mx.status == "nxdomain":
            return self._unknown("SENDER_DOMAIN_UNKNOWN", domain, "no such domain")
        a = await self.resolver.query(domain, "A")
        if a.ok:
            return []
        aaaa = await self.resolver.query(domain, "AAAA")
        if aaaa.ok:
            return []
        if a.failed or aaaa.failed:
            return [Failed(self.name, f"A/AAAA {domain}: {a.status}/{aaaa.status}")]
        return self._unknown("SENDER_DOMAIN_UNKNOWN", domain, "no MX, A or AAAA")


class NullSenderRecipients(Check):
    name = "null_sender_rcpts"
    stage = Stage.RCPT
    symbols = (Symbol("NULL_SENDER_MULTI_RCPT", 0.0, "sender", "A bounce (null sender) to more than one recipient"),)
    priority = 10

    def __init__(self, max_recipients: int = 1):
        self.max_recipients = max_recipients

    @classmethod
    def from_config(cls, config, services):
        return cls(config.sender.null_sender_max_recipients)

    def check(self, txn):
        env = txn.envelope
        if env.sender != "" or txn.session.may_relay:
            return []
        # the recipient under judgement may or may not be in the list yet
        others = [r for r in env.recipients if r is not txn.rcpt]
        if len(others) >= self.max_recipients:
            return [Result("NULL_SENDER_MULTI_RCPT", 0.0, "a bounce has one recipient", refuse="policy")]
        return []


CHECKS = (SenderDomain, NullSenderRecipients)
SECTIONS = {"sender": SenderSettings}
