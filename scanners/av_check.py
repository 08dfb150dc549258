"""The DATA-stage "antivirus" check: every configured scanner, in parallel,
on every message, before the 250.

Infected -> ``VIRUS_FOUND`` with ``refuse="virus"`` (554 5.7.0 naming the
virus) or ``refuse="quarantine"``; a refusal is never outweighed by an allow
list.  A failed or timed-out scanner -> ``Failed(severity="tempfail")``
(451 4.3.0) or, with ``on_error = "accept-tagged"``, delivery with
``X-Virus-Scanned: unscanned (reason)``.  Clean -> ``X-Virus-Scanned:
MailGate (engines)``.  With no ``[[scanners]]`` the check is switched off and
the gateway still runs.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from twisted.internet import defer

from gateway.plugins import Check, Symbol
from gateway.records import Stage
from scanners.base import (CLEAN_SYMBOL, UNSCANNED_SYMBOL, VIRUS_SCORE, VIRUS_SYMBOL, GuardedScanner, Scanner,
                           scan_all, to_records)
from scanners.settings import AvSettings, ScannerSettings

log = logging.getLogger("mailgate.scanners")


def build_adapter(s: ScannerSettings) -> Scanner:
    name = s.label
    if s.type == "clamd":
        from scanners.clamd import ClamdScanner

        if s.socket:
            return ClamdScanner(socket_path=s.socket, timeout=s.timeout, name=name)
        return ClamdScanner(host=s.address.host, port=s.address.port, timeout=s.timeout, name=name)
    if s.type == "command":
        from scanners.command import CommandScanner, profile_from_settings

        return CommandScanner(profile_from_settings(s), timeout=s.timeout, tmp_dir=s.tmp_dir, name=name)
    if s.type == "sophie":
        from scanners.sophie import SophieScanner

        return SophieScanner(s.socket, timeout=s.timeout, tmp_dir=s.tmp_dir, name=name)
    if s.type == "trophie":
        from scanners.trophie import TrophieScanner

        return TrophieScanner(s.socket, timeout=s.timeout, tmp_dir=s.tmp_dir, name=name)
    if s.type == "icap":
        from scanners.icap import IcapScanner

        return IcapScanner(s.address.host, s.address.port, service=s.service, method=s.method,
                           timeout=s.timeout, name=name)
    raise ValueError(f"unknown scanner type {s.type!r}")  # the schema prevents this


def build_scanners(settings: list[ScannerSettings], reactor: Any, run_in_thread) -> list[GuardedScanner]:
    names: dict[str, int] = {}
    out = []
    for s in settings:
        adapter = build_adapter(s)
        # two tables of one type get distinct names in headers and logs
        n = names.get(adapter.name, 0)
        names[adapter.name] = n + 1
        if n:
            adapter.name = f"{adapter.name}#{n + 1}"
        out.append(GuardedScanner(
            adapter, reactor, run_in_thread, timeout=s.timeout, max_size=s.max_size,
            retries=s.retries, failure_threshold=s.failure_threshold, circuit_reset=s.circuit_reset))
    return out


def _default_run_in_thread(reactor):
    from twisted.internet.threads import deferToThreadPool

    def run(fn, *args):
        return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)

    return run


class AntivirusCheck(Check):
    name = "antivirus"
    stage = Stage.DATA
    symbols = (
        Symbol(VIRUS_SYMBOL, VIRUS_SCORE, "antivirus", "A virus scanner found a virus"),
        Symbol("VIRUS_*", 0.0, "antivirus", "This scanner found the virus (VIRUS_<ENGINE>)"),
        Symbol(CLEAN_SYMBOL, 0.0, "antivirus", "Every virus scanner found the message clean"),
        Symbol(UNSCANNED_SYMBOL, 0.0, "antivirus", "Delivered unscanned: a scanner failed (on_error = accept-tagged)"),
    )
    priority = 20

    def __init__(self, scanners: list[GuardedScanner], av: AvSettings):
        self.scanners = scanners
        self.av = av

    @classmethod
    def from_config(cls, config, services) -> Optional["AntivirusCheck"]:
        settings = list(getattr(config, "scanners", None) or [])
        if not settings:
            return None
        av = getattr(config, "av", None) or AvSettings()
        run = services.run_in_thread or _default_run_in_thread(services.reactor)
        check = cls(build_scanners(settings, services.reactor, run), av)
        server = getattr(config, "server", None)
        biggest = getattr(server, "max_message_size", 0)
        for st in settings:
            if biggest and st.max_size < biggest:
                log.warning("scanner=%s max_size=%d is below server.max_message_size=%d: bigger messages"
                            " are never scanned and count as scanner failures (on_error=%s)",
                            st.label, st.max_size, biggest, av.on_error)
        for s in check.scanners:
            log.info("scanner=%s configured=%s timeout=%gs", s.name, s.adapter.describe(), s.timeout)
            s.start_self_test(av.self_test_interval)
        return check

    def check(self, txn) -> defer.Deferred:
        d = scan_all(self.scanners, txn.message.raw)
        d.addCallback(self._records, txn)
        return d

    def _records(self, results, txn) -> list:
        outcomes = [(s.name, o) for s, o in results]
        for name, o in outcomes:
            kind = type(o).__name__
            detail = ",".join(getattr(o, "names", ())) or getattr(o, "reason", "")
            # the gateway's per-message line carries the verdict; this says which engine
            level = {"Clean": logging.DEBUG, "Infected": logging.INFO}.get(kind, logging.WARNING)
            log.log(level, "queue_id=%s scanner=%s result=%s%s", txn.queue_id, name, kind.lower(),
                    f" detail={detail!r}" if detail else "")
        return to_records(outcomes, self.av.on_infected, self.av.on_error, self.name)

    def close(self) -> None:
        for s in self.scanners:
            s.stop()


CHECKS = (AntivirusCheck,)
SECTIONS = {"scanners": list[ScannerSettings], "av": AvSettings}
