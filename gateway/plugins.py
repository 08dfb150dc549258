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

PLUGIN_PACKAGES = ("rules", "classifiers", "scanners", "monitor")


@dataclass(frozen=True)
class Symbol:
    """A symbol a check may report, as rspamd's scores.d and SpamAssassin's
    ``describe`` declare them: its default score, its group and one line
    saying what it means (shown beside each hit in headers and the monitor).

    A name ending in ``*`` declares a family whose members are named at run
    time from what was found (``VIRUS_*``: ``VIRUS_CLAMD`` names the engine
    that saw it); every member shares the family's score, group and text.
    """

    name: str
    score: float
    group: str
    description: str

    @property
    def is_family(self) -> bool:
        return self.name.endswith("*")


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
    # every symbol check() may report (see Symbol); a check whose symbols come
    # from its config or rule files overrides declared_symbols instead
    symbols: ClassVar[tuple[Symbol, ...]] = ()

    @classmethod
    def declared_symbols(cls, config: Any, services: Optional["Services"] = None) -> tuple[Symbol, ...]:
        """The symbols this check may report under ``config``.  ``services``
        (when given) lets a check reuse what it already loaded (rule files)."""
        return cls.symbols

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


class SymbolTable:
    """Every declared symbol, by name; families (``VIRUS_*``) by prefix."""

    def __init__(self, symbols: Iterable[Symbol] = ()):
        self.exact: dict[str, Symbol] = {}
        self.families: list[Symbol] = []
        for sym in symbols:
            if sym.is_family:
                self.families.append(sym)
            else:
                self.exact.setdefault(sym.name, sym)
        self.families.sort(key=lambda s: -len(s.name))  # the most specific family wins

    def get(self, name: str) -> Optional[Symbol]:
        sym = self.exact.get(name)
        if sym is not None:
            return sym
        for fam in self.families:
            if name.startswith(fam.name[:-1]):
                return fam
        return None

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __iter__(self):
        yield from self.exact.values()
        yield from self.families

    def __len__(self) -> int:
        return len(self.exact) + len(self.families)

    def description(self, name: str) -> str:
        sym = self.get(name)
        return sym.description if sym is not None else ""


def symbol_table(catalogue: Catalogue, config: Any, services: Optional[Services] = None) -> SymbolTable:
    """All symbols the catalogue's checks declare under ``config``, enabled or
    not: a ``[scores]`` line for a check switched off is not a typo."""
    symbols: list[Symbol] = []
    for cls in catalogue.checks.values():
        symbols.extend(cls.declared_symbols(config, services))
    return SymbolTable(symbols)


def check_scores(config: Any, table: SymbolTable, path: Optional[str] = None) -> None:
    """ConfigError naming each ``[scores]`` key that no check declares: a
    typo there would otherwise weigh nothing, silently."""
    unknown = [k for k in config.scores if k not in table]
    if unknown:
        from gateway.errors import ConfigError

        raise ConfigError([f"scores.{k} = {config.scores[k]!r}: unknown symbol, no check declares {k!r}"
                           for k in unknown], path)


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
