"""One consistent snapshot of everything a session needs: the config, the
checks built from it, the decider and the finisher.  A reload builds a new
Runtime and swaps it in; sessions keep the one they started with."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from gateway.headers import Finisher
from gateway.pipeline import Pipeline
from gateway.plugins import Catalogue, Services, check_scores, select, symbol_table
from rules.scoring import Scorer

log = logging.getLogger("mailgate.runtime")


@dataclass
class Runtime:
    config: Any
    pipeline: Pipeline
    scorer: Scorer
    finisher: Finisher
    local_domains: frozenset
    trusted_networks: tuple

    def is_trusted(self, ip) -> bool:
        return any(ip.version == net.version and ip in net for net in self.trusted_networks)

    def close(self) -> None:
        self.pipeline.close()


def build_runtime(config, catalogue: Catalogue, services: Services) -> Runtime:
    checks = []
    for cls in select(catalogue, config):
        check = cls.from_config(config, services)
        if check is not None:
            checks.append(check)
    log.info("checks=%s", ",".join(f"{c.stage.value}:{c.name}" for c in checks) or "-")
    # after the checks: a check that loaded rule files declares their symbols from what it loaded
    symbols = symbol_table(catalogue, config, services)
    try:
        check_scores(config, symbols)  # a [scores] typo refuses the config, at start as at reload
    except Exception:
        for c in checks:
            c.close()
        raise
    return Runtime(
        config=config,
        pipeline=Pipeline.from_config(checks, config, services),
        scorer=Scorer.from_config(config, symbols),
        finisher=Finisher(config.server.hostname, config.spam.subject_tag),
        local_domains=frozenset(config.relay.domains),
        trusted_networks=tuple(ipaddress.ip_network(n) for n in config.relay.trusted_networks),
    )
