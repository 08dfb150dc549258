"""The one interface every anti-virus adapter sits behind, and the plumbing
they share.

An adapter only speaks its engine's protocol: ``scan_blocking(data)`` takes
the raw message bytes and returns ``Clean``, ``Infected(names)`` or
``ScanFailed(reason)``; it may block (sockets, child processes) because
``GuardedScanner`` always calls it through ``services.run_in_thread``.

``GuardedScanner.scan(data)`` is what the check calls.  It fires with one of
the three outcomes, never with an error, and it alone owns:

* the size limit (a message the engine cannot take is a failure, said so),
* the timeout (the Deferred fires by the deadline even when the engine's
  thread is still stuck; the adapter's own socket/process timeouts then free
  the thread),
* retries of quick failures (a refused connection) within the same deadline,
* a circuit breaker: after ``failure_threshold`` failures in a row the engine
  is not asked for ``circuit_reset`` seconds, then one probe is let through,
* the EICAR self-test (at startup and every N minutes; an engine that cannot
  see EICAR is logged at ERROR level on every run until it can).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from twisted.internet import defer
from twisted.internet.task import LoopingCall

log = logging.getLogger("mailgate.scanners")

# The EICAR anti-virus test file, put together at run time so that this
# source file is not itself flagged by a scanner watching the repository.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


@dataclass(frozen=True)
class Clean:
    pass


@dataclass(frozen=True)
class Infected:
    names: tuple[str, ...]

    def __init__(self, names):
        if isinstance(names, str):
            names = (names,)
        object.__setattr__(self, "names", tuple(n for n in names if n) or ("unknown",))


@dataclass(frozen=True)
class ScanFailed:
    reason: str
    # a quick failure worth one more try inside the deadline (connection
    # refused, reset); timeouts and engine errors are not retried
    retry: bool = False


Outcome = Union[Clean, Infected, ScanFailed]


class Scanner:
    """An engine adapter.  Subclasses set ``engine`` and implement
    ``scan_blocking``; they never raise for engine trouble, they return
    ``ScanFailed`` (an exception is caught and reported as a failure too)."""

    engine: str = "unknown"

    def __init__(self, name: str = ""):
        self.name = name or self.engine

    def scan_blocking(self, data: bytes) -> Outcome:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


@dataclass
class Breaker:
    """Consecutive-failure circuit breaker on an injected clock."""

    threshold: int
    reset_after: float
    clock: Callable[[], float]
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False

    def allow(self) -> bool:
        if self.failures < self.threshold:
            return True
        if self.clock() >= self.open_until and not self.probing:
            self.probing = True  # half-open: one request finds out
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold:
            self.open_until = self.clock() + self.reset_after

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold


@dataclass
class ScanStats:
    scans: int = 0
    clean: int = 0
    infected: int = 0
    failed: int = 0
    timeouts: int = 0
    short_circuited: int = 0
    self_test_ok: Optional[bool] = None
    last_failure: str = ""


class GuardedScanner:
    """Timeouts, size limit, retries, circuit breaker and self-test around one
    adapter.  ``reactor`` gives the clock and timers (``task.Clock`` in tests);
    ``run_in_thread(fn, *args) -> Deferred`` runs the blocking adapter."""

    def __init__(
        self,
        adapter: Scanner,
        reactor: Any,
        run_in_thread: Callable[..., defer.Deferred],
        timeout: float = 30.0,
        max_size: int = 64 * 1024 * 1024,
        retries: int = 1,
        failure_threshold: int = 5,
        circuit_reset: float = 30.0,
    ):
        self.adapter = adapter
        self.reactor = reactor
        self.run_in_thread = run_in_thread
        self.timeout = timeout
        self.max_size = max_size
        self.retries = retries
        self.breaker = Breaker(failure_threshold, circuit_reset, reactor.seconds)
        self.stats = ScanStats()
        self._self_test_loop: Optional[LoopingCall] = None

    @property
    def name(self) -> str:
        return self.adapter.name

    def scan(self, data: bytes) -> defer.Deferred:
        """Fires with Clean, Infected or ScanFailed; never errbacks."""
        self.stats.scans += 1
        if len(data) > self.max_size:
            return defer.succeed(self._count(ScanFailed(
                f"message of {len(data)} bytes is over the scanner's limit of {self.max_size}")))
        if not self.breaker.allow():
            self.stats.short_circuited += 1
            return defer.succeed(self._count(ScanFailed(
                f"not asked after {self.breaker.failures} failures in a row"
                f" (last: {self.stats.last_failure or 'unknown'})")))
        deadline = self.reactor.seconds() + self.timeout
        result = defer.Deferred()
        state = {"done": False, "attempt": None}

        def finish(outcome: Outcome) -> None:
            if state["done"]:
                return
            state["done"] = True
            if timer.active():
                timer.cancel()
            result.callback(self._settle(outcome))

        def on_timeout() -> None:
            self.stats.timeouts += 1
            attempt = state["attempt"]
            finish(ScanFailed(f"timed out after {self.timeout:g}s"))
            if attempt is not None:
                attempt.cancel()  # a thread cannot be stopped; its answer is dropped

        def attempt(left: int) -> None:
            d = defer.maybeDeferred(self.run_in_thread, self._scan_safely, data)
            state["attempt"] = d
            d.addErrback(lambda f: ScanFailed(f"internal error: {f.getErrorMessage()}")
                         if not f.check(defer.CancelledError) else None)

            def answered(outcome: Optional[Outcome]) -> None:
                if outcome is None or state["done"]:
                    return
                if (isinstance(outcome, ScanFailed) and outcome.retry and left > 0
                        and self.reactor.seconds() < deadline):
                    attempt(left - 1)
                    return
                finish(outcome)

            d.addCallback(answered)

        timer = self.reactor.callLater(self.timeout, on_timeout)
        attempt(self.retries)
        return result

    def _scan_safely(self, data: bytes) -> Outcome:
        try:
            outcome = self.adapter.scan_blocking(data)
        except Exception as e:  # an adapter bug must not look like a clean scan
            log.exception("scanner=%s adapter raised", self.name)
            return ScanFailed(f"adapter error: {e}")
        if not isinstance(outcome, (Clean, Infected, ScanFailed)):
            return ScanFailed(f"adapter returned {outcome!r}")
        return outcome

    def _settle(self, outcome: Outcome) -> Outcome:
        if isinstance(outcome, ScanFailed):
            self.breaker.failure()
        else:
            self.breaker.success()
        return self._count(outcome)

    def _count(self, outcome: Outcome) -> Outcome:
        if isinstance(outcome, Clean):
            self.stats.clean += 1
        elif isinstance(outcome, Infected):
            self.stats.infected += 1
        else:
            self.stats.failed += 1
            self.stats.last_failure = outcome.reason
        return outcome

    # --- EICAR self-test ---------------------------------------------------

    def self_test(self) -> defer.Deferred:
        """Scan EICAR; fires with True when the engine saw it."""

        def judge(outcome: Outcome) -> bool:
            ok = isinstance(outcome, Infected)
            self.stats.self_test_ok = ok
            if ok:
                log.info("scanner=%s self_test=ok eicar=%s", self.name, ",".join(outcome.names))
            elif isinstance(outcome, ScanFailed):
                log.error("scanner=%s self_test=FAILED could not scan the EICAR test file: %s",
                          self.name, outcome.reason)
            else:
                log.error("scanner=%s self_test=FAILED the engine did NOT detect the EICAR test file;"
                          " its signatures are missing or it is not scanning: mail is NOT protected",
                          self.name)
            return ok

        return self.scan(EICAR).addCallback(judge)

    def start_self_test(self, interval: float) -> None:
        """Self-test now and every ``interval`` seconds (0 = only now)."""
        if interval <= 0:
            self.self_test()
            return
        loop = LoopingCall(self.self_test)
        loop.clock = self.reactor
        self._self_test_loop = loop
        loop.start(interval, now=True).addErrback(
            lambda f: log.error("scanner=%s self-test loop stopped: %s", self.name, f.getErrorMessage()))

    def stop(self) -> None:
        if self._self_test_loop is not None and self._self_test_loop.running:
            self._self_test_loop.stop()
        self._self_test_loop = None


def scan_all(scanners: list[GuardedScanner], data: bytes) -> defer.Deferred:
    """Every scanner in parallel; fires with [(scanner, outcome), ...]."""
    ds = [s.scan(data).addCallback(lambda o, s=s: (s, o)) for s in scanners]
    return defer.gatherResults(ds)


# --- outcomes -> records ------------------------------------------------------

VIRUS_SYMBOL = "VIRUS_FOUND"
CLEAN_SYMBOL = "AV_CLEAN"
UNSCANNED_SYMBOL = "AV_UNSCANNED"
VIRUS_SCORE = 100.0  # evidence for reports; the refusal, not the score, stops the message
HEADER = "X-Virus-Scanned"


def to_records(outcomes: list[tuple[str, Outcome]], on_infected: str = "reject",
               on_error: str = "tempfail", check: str = "antivirus") -> list:
    """``[(scanner_name, outcome), ...]`` -> Result/Failed records.

    Any infection wins: the message is refused (or quarantined) whatever the
    other engines said and whatever any allow list says, because a refusal is
    not a score.  Otherwise any failure makes the message "not scanned":
    451 (``tempfail``) or, with ``accept-tagged``, delivered with
    ``X-Virus-Scanned: unscanned (reason)`` and the failure still recorded.
    """
    from gateway.records import Failed, Result

    infected = [(n, o) for n, o in outcomes if isinstance(o, Infected)]
    failed = [(n, o) for n, o in outcomes if isinstance(o, ScanFailed)]
    if infected:
        names: list[str] = []
        for _, o in infected:
            names.extend(v for v in o.names if v not in names)
        refuse = "quarantine" if on_infected == "quarantine" else "virus"
        records: list = [Result(VIRUS_SYMBOL, VIRUS_SCORE, ", ".join(names), refuse=refuse)]
        # who saw it, for the log line and X-Spam-Status (no refusal of its own)
        records.extend(Result(f"VIRUS_{_symbol_part(n)}", 0.0, ", ".join(o.names)) for n, o in infected)
        records.extend(Failed(check, f"{n}: {o.reason}", severity="none") for n, o in failed)
        return records
    if failed:
        reason = "; ".join(f"{n}: {o.reason}" for n, o in failed)
        if on_error == "accept-tagged":
            return [
                Result(UNSCANNED_SYMBOL, 0.0, reason, header=(HEADER, _header_text(f"unscanned ({reason})"))),
                Failed(check, f"virus scan failed ({reason})", severity="none"),
            ]
        return [Failed(check, f"virus scan failed ({reason})", severity="tempfail")]
    engines = ", ".join(n for n, _ in outcomes)
    return [Result(CLEAN_SYMBOL, 0.0, engines, header=(HEADER, f"MailGate ({engines})"))]


def _symbol_part(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.upper())


def _header_text(text: str) -> str:
    # one line, printable ASCII: reasons can quote engine output
    text = " ".join(text.split())
    text = text.encode("ascii", "replace").decode("ascii")
    return text[:300]
