"""The check interface and how checks are found.

A check is a small class in one file of ``rules/``, ``classifiers/`` or
``scanners/``.  A module lists its checks in ``CHECKS`` and the config
sections it owns in ``SECTIONS``; the gateway imports the packages by name
and builds the pipeline from what it finds, ordered and switched by the
``[checks]`` config.  Nothing is registered at import time into a global:
``discover()`` returns a fresh catalogue each call.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional

from gateway.records import Stage

PLUGIN_PACKAGES = ("rules", "classifiers", "scanners")


class Check:
    """Base class for checks.

    ``check(txn)`` returns an iterable of ``Result``/``Failed`` records, a
    Deferred firing with one, or a coroutine (run as an asyncio task, so
    dnspython's async resolver works under the asyncio reactor).  It never
    writes an SMTP reply and never raises on bad input; an exception is
    treated as a failure of the gateway (451 4.3.0, logged with the queue id).
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    # Lower runs first within a stage unless [checks] order says otherwise.
    priority: ClassVar[int] = 100
    # Checks that are off unless [checks] enables them by listing them in order.
    default_enabled: ClassVar[bool] = True
    # check() is CPU work on the message (regexes, MIME walks): the pipeline runs
    # it in the thread pool with the stage's other blocking checks, in one trip
    blocking: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Any, services: "Services") -> Optional["Check"]:
        """Build the check, or return None when the config switches it off."""
        return cls()

    def check(self, txn) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release resources when a reload replaces this check."""


@dataclass
class Services:
    """Collaborators injected into checks, each with a real default."""

    reactor: Any
    resolver: Any = None  # gateway.resolver.Resolver
    store: Any = None  # gateway.store state (counters, greylist, caches)
    run_in_thread: Callable[..., Any] = None  # (fn, *args) -> Deferred
    log: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class Catalogue:
    checks: dict[str, type[Check]] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    command_modules: list[Any] = field(default_factory=list)


def _modules(package_name: str) -> Iterable[Any]:
    try:
        package = importlib.import_module(package_name)
    except ModuleNotFoundError as e:
        if e.name == package_name:
            return
        raise
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        yield importlib.import_module(f"{package_name}.{info.name}")


def discover(packages: Iterable[str] = PLUGIN_PACKAGES) -> Catalogue:
    cat = Catalogue()
    for pkg in packages:
        for module in _modules(pkg):
            for cls in getattr(module, "CHECKS", ()):
                if cls.name in cat.checks and cat.checks[cls.name] is not cls:
                    raise RuntimeError(f"two checks named {cls.name!r}: {module.__name__}")
                cat.checks[cls.name] = cls
            for name, model in getattr(module, "SECTIONS", {}).items():
                if name in cat.sections and cat.sections[name] is not model:
                    raise RuntimeError(f"two config sections named {name!r}: {module.__name__}")
                cat.sections[name] = model
            if hasattr(module, "register_commands"):
                cat.command_modules.append(module)
    return cat


def select(catalogue: Catalogue, config: Any) -> list[type[Check]]:
    """The enabled check classes in run order."""
    order = list(config.checks.order)
    disabled = set(config.checks.disabled)
    unknown = [n for n in order + sorted(disabled) if n not in catalogue.checks]
    if unknown:
        from gateway.errors import ConfigError

        raise ConfigError(f"checks: unknown check name(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(catalogue.checks))}")
    chosen = [
        cls for name, cls in catalogue.checks.items()
        if name not in disabled and (cls.default_enabled or name in order)
    ]
    rank = {n: i for i, n in enumerate(order)}
    chosen.sort(key=lambda c: (rank.get(c.name, len(rank)), c.priority, c.name))
    return chosen
