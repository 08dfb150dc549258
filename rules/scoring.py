"""The one decider: results, weights and thresholds in, a Verdict out.

Checks only report evidence (``Result``) or that they could not check
(``Failed``).  This module alone picks the action and, for refusals, the
typed reply that ``gateway/smtp.py`` will send (the transaction runner adds
the queue id to it).  Each result in a verdict carries its symbol's declared
description (``gateway.plugins.Symbol``), so headers and the monitor can say
what a hit means without asking the checks again.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from gateway.errors import Reject, Reply, TempFail
from gateway.records import Action, Failed, Result, Verdict

# Why a check may ask for a refusal -> the reply.  ``{detail}`` is the
# check's detail text (a virus name, a DNSBL zone), kept short on purpose.
REFUSALS: dict[str, Reply] = {
    "relay": Reject(554, "5.7.1", "Relay access denied"),
    "unknown_user": Reject(550, "5.1.1", "Recipient address rejected: User unknown"),
    "sender_domain": Reject(550, "5.1.8", "Sender address rejected: Domain not found"),
    "sender_syntax": Reject(501, "5.1.7", "Bad sender address syntax"),
    "blocklist": Reject(554, "5.7.1", "Access denied"),
    "helo": Reject(554, "5.7.1", "HELO/EHLO rejected: {detail}"),
    "rbl": Reject(554, "5.7.1", "Service unavailable; client host blocked using {detail}"),
    "dmarc": Reject(550, "5.7.1", "Rejected by DMARC policy for {detail}"),
    "policy": Reject(554, "5.7.1", "Message refused by policy: {detail}"),
    "spam": Reject(554, "5.7.1", "Message refused as spam"),
    "virus": Reject(554, "5.7.0", "Message contains a virus: {detail}"),
    "banned": Reject(554, "5.7.1", "Message contains a banned attachment: {detail}"),
    "early_talker": Reject(554, "5.5.0", "Protocol error: talking before the greeting"),
    "greylist": TempFail(451, "4.7.1", "Greylisted, please try again later"),
    "ratelimit": TempFail(451, "4.7.1", "Rate limit exceeded, please try again later"),
    "callout": TempFail(451, "4.4.3", "Recipient verification unavailable, try again later"),
    "tempfail": TempFail(451, "4.3.0", "Temporary failure: {detail}"),
}
QUARANTINE = "quarantine"

SCANNER_TROUBLE = TempFail(451, "4.3.0", "Temporary failure: {detail}, please try again later")
INTERNAL_ERROR = TempFail(451, "4.3.0", "Internal error, please try again later")


def render(reply: Reply, detail: str = "") -> Reply:
    if "{detail}" not in reply.text:
        return reply
    safe = " ".join(detail.split())[:200] or "unspecified"
    return type(reply)(reply.code, reply.enhanced, reply.text.format(detail=safe))


def read_scores_file(path: str) -> dict[str, float]:
    """A ``[scores]`` TOML file (``mailgate fit-scores`` writes one): symbol
    = points.  Read at startup and reload, with the rest of the config."""
    import math
    import tomllib

    from gateway.errors import ConfigError

    where = f"rules.learned_scores = {path!r}"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; write it with `mailgate fit-scores`") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not valid TOML ({e})") from None
    table = data.get("scores")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: has no [scores] table")
    out = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: scores.{name} = {value!r}: not a finite number")
        out[name] = float(value)
    return out


class Scorer:
    """Turns records into decisions.  ``weights`` overrides a symbol's score."""

    def __init__(
        self,
        threshold: float = 5.0,
        reject_threshold: float = 15.0,
        quarantine_threshold: Optional[float] = None,
        weights: Optional[Mapping[str, float]] = None,
        refusals: Optional[Mapping[str, Reply]] = None,
        symbols=None,
    ):
        self.threshold = threshold
        self.reject_threshold = reject_threshold
        self.quarantine_threshold = quarantine_threshold
        self.weights = dict(weights or {})
        self.refusals = dict(REFUSALS, **(refusals or {}))
        # gateway.plugins.SymbolTable (anything with description(name) -> str); None: no descriptions
        self.symbols = symbols

    @classmethod
    def from_config(cls, config, symbols=None) -> "Scorer":
        s = config.spam
        weights = {}
        rules = getattr(config, "rules", None)  # a plugin section: absent without the rules plugin
        learned = getattr(rules, "learned_scores", "") if rules is not None else ""
        if learned:
            weights.update(read_scores_file(learned))
        weights.update(config.scores)  # the admin's [scores] overrides what was learned
        return cls(s.threshold, s.reject_threshold, s.quarantine_threshold, weights, symbols=symbols)

    def weight(self, result: Result) -> float:
        return self.weights.get(result.symbol, result.score)

    def weighed(self, records: Iterable) -> list[Result]:
        """Results with config weights applied and their declared description
        (the form reported in headers and events)."""
        out = []
        for r in records:
            if isinstance(r, Result):
                w = self.weight(r)
                text = r.description or (self.symbols.description(r.symbol) if self.symbols is not None else "")
                out.append(r if w == r.score and text == r.description else
                           Result(r.symbol, w, r.detail, r.refuse, r.header, text))
        return out

    def refusal(self, result: Result) -> Optional[Reply]:
        if result.refuse is None or result.refuse == QUARANTINE:
            return None
        reply = self.refusals.get(result.refuse, self.refusals["policy"])
        return render(reply, result.detail or result.symbol)

    @staticmethod
    def failure_reply(failures: Iterable[Failed]) -> Optional[Reply]:
        for f in failures:
            if f.severity == "error":
                return INTERNAL_ERROR
        for f in failures:
            if f.severity == "tempfail":
                return render(SCANNER_TROUBLE, f.reason)
        return None

    def decide_stage(self, records: Iterable) -> Optional[Reply]:
        """Envelope stages: the first refusal, else trouble, else go on."""
        records = list(records)
        for r in records:
            if isinstance(r, Result):
                reply = self.refusal(r)
                if reply is not None:
                    return reply
        return self.failure_reply([r for r in records if isinstance(r, Failed)])

    def decide(self, records: Iterable) -> Verdict:
        """End of DATA: everything the transaction gathered -> one Verdict."""
        records = list(records)
        results = self.weighed(records)
        failures = [r for r in records if isinstance(r, Failed)]
        score = round(sum(r.score for r in results), 3)
        verdict = Verdict(Action.ACCEPT, score, self.threshold, results, failures)

        rejects = [(r, self.refusal(r)) for r in results if r.refuse and r.refuse != QUARANTINE]
        # a permanent refusal outranks a temporary one: the message is refused either way
        perm = [(r, rep) for r, rep in rejects if isinstance(rep, Reject)]
        if perm:
            # viruses first, so the reply names the virus
            perm.sort(key=lambda p: p[0].refuse != "virus")
            verdict.action, verdict.reply = Action.REJECT, perm[0][1]
            return verdict
        if any(r.refuse == QUARANTINE for r in results):
            verdict.action = Action.QUARANTINE
            return verdict
        trouble = self.failure_reply(failures) or (rejects[0][1] if rejects else None)
        if trouble is not None:
            verdict.action, verdict.reply = Action.TEMPFAIL, trouble
            return verdict
        if score >= self.reject_threshold:
            verdict.action = Action.REJECT
            verdict.reply = self.refusals["spam"]
        elif self.quarantine_threshold is not None and score >= self.quarantine_threshold:
            verdict.action = Action.QUARANTINE
        elif score >= self.threshold:
            verdict.action = Action.TAG
        return verdict
