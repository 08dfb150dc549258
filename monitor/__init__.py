"""The monitor: the tracking store (monitor/tracking.py), the Prometheus
metrics (monitor/metrics.py) and the web console (monitor/web/).

``Monitor`` is what one process subscribes to its event sink, built from
``[tracking]`` and ``[metrics]``:

* ``"receiver"`` (``mailgate run``): the store, and metrics with the SMTP
  side's families and collectors (queue, quarantine, scanners, Bayes); the
  delivery families too when it delivers itself, else read from the file the
  delivery process writes (see monitor/metrics.py for why);
* ``"delivery"`` (``mailgate deliver``): the store, and metrics with the
  delivery families only, written to that file;
* ``"cli"`` (``mailgate queue/quarantine ...``): the store only, so admin
  actions are tracked and audited.

This module imports nothing heavy: ``gateway.plugins.discover`` imports the
package for every command.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Optional

log = logging.getLogger("mailgate.monitor")

ROLES = ("receiver", "delivery", "cli")


class Monitor:
    def __init__(self, tracking=None, metrics=None, dump_path: Optional[str] = None,
                 metrics_listen=None):
        self.tracking = tracking  # monitor.tracking.TrackingStore or None
        self.metrics = metrics  # monitor.metrics.Metrics or None
        self.dump_path = dump_path
        self.metrics_listen = metrics_listen
        self.dumper = None

    @classmethod
    def from_config(cls, config, role: str, *, checks: Optional[Callable[[], Iterable[Any]]] = None,
                    symbols: Any = None, queue_dir: Optional[str] = None) -> "Monitor":
        """``checks``: the running checks (for scanner and Bayes state);
        ``symbols``: the symbol table or a callable returning it;
        ``queue_dir``: the spool's root when it is not ``queue.dir``."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        tracking = metrics = None
        if config.tracking.enabled:
            from monitor.tracking import TrackingStore

            tracking = TrackingStore.from_config(config, queue_dir=queue_dir)
        queue_dir = os.path.abspath(queue_dir or config.queue.dir)
        dump_path = None
        if config.metrics.enabled and role != "cli":
            from monitor.metrics import DELIVERD_FILE, Metrics

            dump_path = os.path.join(queue_dir, DELIVERD_FILE)
            if role == "receiver":
                child = config.queue.delivery_process
                bayes = getattr(config, "bayes", None)
                metrics = Metrics(receiving=True, delivering=not child, symbols=symbols, spool_root=queue_dir,
                                  checks=checks, bayes_model=lambda: getattr(bayes, "model", None),
                                  tracking=tracking, delivery_file=dump_path if child else None)
                if child:
                    _remove(dump_path)  # a stale file of a previous run is not this run's counts
                dump_path = None
            else:
                metrics = Metrics(receiving=False, delivering=True)
        return cls(tracking, metrics, dump_path, config.metrics.listen if role == "receiver" else None)

    @property
    def registry(self):
        return self.metrics.registry if self.metrics is not None else None

    def subscribers(self) -> list:
        subs = []
        if self.tracking is not None:
            subs.append(self.tracking.subscriber())
        if self.metrics is not None:
            subs.append(self.metrics.subscriber())
        return subs

    def start(self, reactor, run_in_thread=None) -> list:
        """Timers and the metrics' own listener (``[metrics] listen``); the ports bound."""
        ports = []
        if self.metrics is not None and self.dump_path:
            from monitor.metrics import Dumper

            self.dumper = Dumper(self.metrics, self.dump_path, reactor, run_in_thread)
            self.dumper.start()
        if self.metrics is not None and self.metrics_listen is not None:
            from monitor.metrics import listen

            ports.append(listen(self.metrics.registry, self.metrics_listen, reactor))
            log.info("metrics on http://%s/metrics", self.metrics_listen)
        return ports

    def close(self) -> None:
        """Writes what is pending (facts, the last metrics) and stops."""
        if self.dumper is not None:
            self.dumper.stop()
        if self.tracking is not None:
            self.tracking.close()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("metrics: cannot remove %s: %s", path, e)
