"""Prometheus metrics: an event subscriber, collectors read at scrape, and /metrics.

Each ``Metrics`` has its own ``CollectorRegistry`` (never prometheus_client's
global one): two gateways in one test process, or a reload, never share a
counter.  Counters and histograms are fed by the events (``gateway.events``);
what is state rather than an event (queue depth, quarantine size, scanner
health, the Bayes model's age, the tracking writer's backlog) is read by
collectors when Prometheus scrapes, and the scrape runs in a thread, never on
the reactor (``metrics_resource``).

Names follow Prometheus conventions: ``mailgate_messages_total{action="tag"}``,
``_seconds`` histograms, ``_total`` counters.  Labels are bounded: a symbol
no check declares counts as ``symbol="other"``; DNS list zones, routes and
scanners are capped at ``MAX_LABELS`` distinct values each (then "other").

Two processes, one /metrics.  Delivery outcomes happen in the delivery
process (gateway/deliverd.py), the rest in the receiver.  The delivery
process keeps its own registry with the delivery families only and writes
it in the text exposition format to ``<queue.dir>/metrics/deliverd.prom``
(atomically, in a thread, at most every ``DUMP_INTERVAL`` seconds and only
when something changed); the receiver's registry has a collector that reads
that file at scrape and hands on its families, which the receiver does not
have itself.  Why not prometheus_client's multiprocess mode: it is chosen by
an environment variable read when prometheus_client is first imported,
switches every metric of the process to mmap files (a registry per instance
then shares values by name), and cannot carry our scrape-time collectors.
Why not counting deliveries back out of the tracking store: the counts
would depend on tracking being on, go down when it prunes, and cost a query
per scrape.  A delivery process that restarts starts its counters at zero,
which Prometheus reads as the counter reset it is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Optional

from gateway import events as ev

log = logging.getLogger("mailgate.metrics")

MAX_LABELS = 64  # distinct zones / routes / scanners / reasons per family; more become "other"
DUMP_INTERVAL = 5.0  # seconds between the delivery process's writes of its metrics file
QUEUE_CACHE = 5.0  # seconds a spool scan is reused: frequent scrapes do not re-read a big queue
DELIVERD_FILE = os.path.join("metrics", "deliverd.prom")
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DELAY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0,
                 5 * 86400.0)
DNS_LIST_CHECKS = ("dnsbl", "dnsbl_reject", "rhsbl", "uribl")


class _Bounded:
    """Label values as they come, up to ``cap`` distinct; then "other"."""

    def __init__(self, cap: Optional[int] = None):
        self.cap = MAX_LABELS if cap is None else cap
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        with self._lock:
            if len(self.seen) < self.cap:
                self.seen.add(value)
                return value
        return "other"


def route_label(route: str) -> str:
    """``mx:example.test`` is one per recipient domain: all MX routing is "mx"."""
    return "mx" if route.startswith("mx:") or route == "mx" else (route or "none")


class Metrics:
    """The metrics of one process.

    ``receiving``: the families of the SMTP side (and its collectors);
    ``delivering``: the delivery families.  The receiver of a gateway with a
    delivery process has ``delivering=False`` and ``delivery_file`` set; the
    delivery process has ``receiving=False``.
    ``symbols``: something with ``in`` (gateway.plugins.SymbolTable), or a
    callable returning one (it changes on reload); None counts every symbol.
    ``checks``: callable returning the running checks (scanners, Bayes).
    """

    def __init__(self, *, receiving: bool = True, delivering: bool = True, symbols: Any = None,
                 spool_root: Optional[str] = None, checks: Optional[Callable[[], Iterable[Any]]] = None,
                 bayes_model: Optional[Callable[[], Optional[str]]] = None, tracking: Any = None,
                 delivery_file: Optional[str] = None, clock: Callable[[], float] = time.time):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()  # collectors are not called at registration: the gateway is not up yet
        self.receiving, self.delivering = receiving, delivering
        self._symbols = symbols
        self.clock = clock
        self.changed = False  # something was counted since the last dump
        r = self.registry
        if receiving:
            self.messages = Counter("mailgate_messages", "Messages answered at the end of DATA, by action "
                                    "(dropped: the client left before the answer)", ["action"], registry=r)
            self.refusals = Counter("mailgate_refusals", "Refusals (4xx and 5xx), by the stage that refused",
                                    ["stage", "code_class"], registry=r)
            self.symbol_hits = Counter("mailgate_symbol_hits", "Symbols in the verdicts of answered messages",
                                       ["symbol"], registry=r)
            self.connections = Counter("mailgate_connections", "SMTP connections accepted", registry=r)
            self.connections_current = Gauge("mailgate_connections_current", "SMTP connections open now",
                                             registry=r)
            self.check_seconds = Histogram("mailgate_check_duration_seconds", "Time one check took", ["stage", "check"],
                                           buckets=DURATION_BUCKETS, registry=r)
            self.stage_seconds = Histogram("mailgate_stage_duration_seconds", "Time one stage's checks took",
                                           ["stage"], buckets=DURATION_BUCKETS, registry=r)
            self.dnsbl_errors = Counter("mailgate_dnsbl_errors", "DNS list lookups that gave no usable answer "
                                        "(timeouts, SERVFAIL, error codes), by zone", ["zone"], registry=r)
            self.quarantined = Counter("mailgate_quarantined", "Messages put in quarantine, by reason", ["reason"],
                                       registry=r)
            self.released = Counter("mailgate_released", "Quarantined messages released", registry=r)
            self.deleted = Counter("mailgate_deleted", "Messages deleted by an admin", ["where"], registry=r)
            self.learned = Counter("mailgate_learned", "Messages learned by admins and users", ["label"], registry=r)
            self.admin_actions = Counter("mailgate_admin_actions", "Admin actions (web and CLI)", ["action"],
                                         registry=r)
            self._zone = _Bounded()
            self._reason = _Bounded(16)
            self._admin = _Bounded()
            self._stage_check = _Bounded(256)
            if spool_root:
                r.register(QueueCollector(spool_root, clock))
            if checks is not None:
                r.register(ScannerCollector(checks))
            if bayes_model is not None or checks is not None:
                r.register(BayesCollector(bayes_model or (lambda: None), checks or (lambda: ()), clock))
            if tracking is not None:
                r.register(TrackingCollector(tracking))
            if delivery_file:
                r.register(FileCollector(delivery_file))
        if delivering:
            self.deliveries = Counter("mailgate_deliveries", "Recipients of delivery attempts, by route and outcome "
                                      "(sent, deferred, failed)", ["route", "status"], registry=r)
            self.delivery_delay = Histogram("mailgate_delivery_delay_seconds", "Time from arrival to delivery "
                                            "of a recipient that was sent, by route", ["route"],
                                            buckets=DELAY_BUCKETS, registry=r)
            self.deferred = Counter("mailgate_deferred", "Recipients deferred for a retry", registry=r)
            self.bounced = Counter("mailgate_bounced", "Recipients bounced (DSN sent or suppressed)", registry=r)
            self._route = _Bounded()
        self._handlers = self._table()

    # --- the subscriber ---------------------------------------------------------------

    def subscriber(self) -> Callable[[Any], None]:
        return self

    def __call__(self, event) -> None:
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)
            self.changed = True

    def reconfigure(self, config) -> None:
        """A reload: nothing to do (the symbol table is read through its callable)."""

    def symbol_label(self, name: str) -> str:
        table = self._symbols() if callable(self._symbols) else self._symbols
        if table is None or name in table:
            return name
        return "other"

    def _table(self) -> dict:
        out = {}
        if self.receiving:
            out.update({ev.MessageAnswered: self._answered, ev.ClientGone: self._gone, ev.StageRefused: self._refused,
                        ev.ConnectionOpened: self._opened, ev.ConnectionClosed: self._closed,
                        ev.StageJudged: self._judged, ev.Quarantined: self._quarantined,
                        ev.Released: self._released, ev.Deleted: self._deleted, ev.Learned: self._learned,
                        ev.AdminAction: self._admin_action})
        if self.delivering:
            out.update({ev.DeliveryAttempted: self._attempted, ev.Deferred: self._deferred, ev.Bounced: self._bounced})
        return out

    def _answered(self, e) -> None:
        action = e.verdict.action.value
        code = getattr(e.reply, "code", 250) or 250
        if code >= 400:
            self.refusals.labels("data", f"{code // 100}xx").inc()
            if action not in ("reject", "tempfail"):  # e.g. the spool could not be written
                action = "reject" if code >= 500 else "tempfail"
        self.messages.labels(action).inc()
        self._symbol_hits(e.verdict)

    def _gone(self, e) -> None:
        self.messages.labels("dropped").inc()

    def _symbol_hits(self, verdict) -> None:
        for name in {getattr(r, "symbol", None) for r in verdict.results} - {None}:
            self.symbol_hits.labels(self.symbol_label(name)).inc()

    def _refused(self, e) -> None:
        code = getattr(e.reply, "code", 500) or 500
        self.refusals.labels(e.stage, f"{code // 100}xx").inc()

    def _opened(self, e) -> None:
        self.connections.inc()
        self.connections_current.inc()

    def _closed(self, e) -> None:
        self.connections_current.dec()

    def _judged(self, e) -> None:
        stage = str(getattr(e.stage, "value", e.stage))
        for t in e.timings:
            key = self._stage_check(f"{stage}\0{t.check}")
            check = t.check if key != "other" else "other"
            self.check_seconds.labels(stage, check).observe(max(0.0, t.seconds))
        seconds = getattr(e, "seconds", 0.0) or (max((t.seconds for t in e.timings), default=0.0))
        if e.timings or seconds:
            self.stage_seconds.labels(stage).observe(max(0.0, seconds))
        for rec in e.records:
            if type(rec).__name__ == "Failed" and getattr(rec, "check", "") in DNS_LIST_CHECKS:
                zone = rec.reason.split(":", 1)[0].strip() if ":" in rec.reason else "unknown"
                self.dnsbl_errors.labels(self._zone(zone)).inc()

    def _quarantined(self, e) -> None:
        self.quarantined.labels(self._reason(e.reason or "score")).inc()

    def _released(self, e) -> None:
        self.released.inc()

    def _deleted(self, e) -> None:
        self.deleted.labels("quarantine" if e.where == "quarantine" else "queue").inc()

    def _learned(self, e) -> None:
        self.learned.labels("spam" if e.label == "spam" else "ham").inc()

    def _admin_action(self, e) -> None:
        self.admin_actions.labels(self._admin(e.action)).inc()

    def _attempted(self, e) -> None:
        route = self._route(route_label(getattr(e, "route", "") or e.next_hop or ""))
        for o in e.outcomes:
            status = o.status if o.status in ("sent", "deferred", "failed") else "other"
            self.deliveries.labels(route, status).inc()
            if status == "sent":
                self.delivery_delay.labels(route).observe(max(0.0, e.delay))

    def _deferred(self, e) -> None:
        self.deferred.inc(len(e.recipients))

    def _bounced(self, e) -> None:
        self.bounced.inc(len(e.recipients))

    # --- exposition ----------------------------------------------------------------------

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class QueueCollector:
    """``mailgate_queue_messages{state}`` and ``mailgate_quarantine_messages``,
    read from the spool (gateway/spool.py) at scrape, at most every QUEUE_CACHE seconds."""

    def __init__(self, root: str, clock: Callable[[], float]):
        self.root = root
        self.clock = clock
        self._cached: Optional[tuple[float, dict, int]] = None
        self._lock = threading.Lock()

    def _scan(self) -> tuple[dict, int]:
        from gateway.spool import Spool

        spool = Spool(self.root)
        now = self.clock()
        states = {"active": 0, "deferred": 0, "held": 0}
        for entry in spool.entries():
            if not entry.pending:
                continue
            if entry.held:
                states["held"] += 1
            elif entry.attempts and entry.next_try > now:
                states["deferred"] += 1
            else:
                states["active"] += 1
        quarantined = sum(1 for n in os.listdir(spool.quarantine) if n.endswith(".json"))
        return states, quarantined

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > QUEUE_CACHE:
                try:
                    states, quarantined = self._scan()
                except OSError as e:
                    log.warning("metrics: cannot read the spool %s: %s", self.root, e)
                    return
                self._cached = (now, states, quarantined)
            _, states, quarantined = self._cached
        g = GaugeMetricFamily("mailgate_queue_messages", "Messages in the queue, by state (active: due now; "
                              "deferred: waiting for a retry; held: by an admin)", labels=["state"])
        for state, n in states.items():
            g.add_metric([state], n)
        yield g
        yield GaugeMetricFamily("mailgate_quarantine_messages", "Messages in quarantine", value=quarantined)


class ScannerCollector:
    """Each running anti-virus engine: up or down, its self-test, its scans."""

    def __init__(self, checks: Callable[[], Iterable[Any]]):
        self.checks = checks
        self._name = _Bounded()

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("mailgate_scanner_up", "1 when the scanner answers and passed its last EICAR "
                               "self-test (0: circuit open or self-test failed)", labels=["scanner"])
        test = GaugeMetricFamily("mailgate_scanner_self_test_ok", "1: the last EICAR self-test saw EICAR; 0: it "
                                 "did not (absent before the first)", labels=["scanner"])
        test_ts = GaugeMetricFamily("mailgate_scanner_self_test_timestamp_seconds", "When the last EICAR "
                                    "self-test finished (Unix time)", labels=["scanner"])
        scans = CounterMetricFamily("mailgate_scanner_scans", "Scans by outcome", labels=["scanner", "result"])
        for s in _scanners(self.checks()):
            name = self._name(str(getattr(s, "name", "scanner")))
            stats, breaker = getattr(s, "stats", None), getattr(s, "breaker", None)
            ok = getattr(stats, "self_test_ok", None)
            down = bool(breaker is not None and breaker.is_open) or ok is False
            up.add_metric([name], 0 if down else 1)
            if ok is not None:
                test.add_metric([name], 1 if ok else 0)
            at = getattr(stats, "self_test_at", None) or getattr(stats, "last_self_test", None)
            if at:
                test_ts.add_metric([name], float(at))
            if stats is not None:
                for result in ("clean", "infected", "failed"):
                    scans.add_metric([name, result], getattr(stats, result, 0))
        yield from (up, test, test_ts, scans)


def _scanners(checks: Iterable[Any]) -> list:
    out = []
    for check in checks:
        out.extend(getattr(check, "scanners", ()) or ())
    return out


class BayesCollector:
    """The Bayes model's age (from its file) and size (from the loaded model)."""

    def __init__(self, path: Callable[[], Optional[str]], checks: Callable[[], Iterable[Any]],
                 clock: Callable[[], float]):
        self.path, self.checks, self.clock = path, checks, clock

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        paths = [self.path()] + [getattr(getattr(c, "holder", None), "path", None) for c in self.checks()]
        path = next((p for p in paths if p), None)
        if path:
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                mtime = None
            if mtime is not None:
                yield GaugeMetricFamily("mailgate_bayes_model_age_seconds", "Seconds since the Bayes model file "
                                        "was written (trained or autolearned)", value=max(0.0, self.clock() - mtime))
        for c in self.checks():
            model = getattr(getattr(c, "holder", None), "model", None)
            if model is not None and hasattr(model, "nspam"):
                g = GaugeMetricFamily("mailgate_bayes_model_messages", "Messages the loaded Bayes model was "
                                      "trained on", labels=["label"])
                g.add_metric(["spam"], model.nspam)
                g.add_metric(["ham"], model.nham)
                yield g
                return


class TrackingCollector:
    """The tracking writer's health: what waits, what was dropped or lost."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.store
        yield GaugeMetricFamily("mailgate_tracking_pending", "Facts waiting for the tracking writer", value=s.pending)
        yield CounterMetricFamily("mailgate_tracking_written", "Facts written to the tracking store", value=s.written)
        yield CounterMetricFamily("mailgate_tracking_dropped", "Facts dropped because the writer was behind",
                                  value=s.dropped)
        yield CounterMetricFamily("mailgate_tracking_failed", "Facts lost because the store could not be written",
                                  value=s.failed)


class FileCollector:
    """The families another process (the delivery process) wrote to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def collect(self):
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return  # no delivery process has written yet
        except OSError as e:
            log.warning("metrics: cannot read %s: %s", self.path, e)
            return
        try:
            yield from list(text_string_to_metric_families(text))
        except ValueError as e:
            log.warning("metrics: %s is not in the exposition format: %s", self.path, e)


class Dumper:
    """The delivery process's side: its registry to ``path`` every DUMP_INTERVAL
    seconds when something changed, in a thread (a write can block on disk)."""

    def __init__(self, metrics: Metrics, path: str, reactor, run_in_thread: Optional[Callable] = None,
                 interval: float = DUMP_INTERVAL):
        self.metrics, self.path, self.reactor, self.interval = metrics, path, reactor, interval
        self.run_in_thread = run_in_thread
        self._loop = None
        self._busy = False

    def start(self) -> None:
        from twisted.internet import task

        self.metrics.changed = True  # the first write says the families exist, with nothing yet
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def tick(self):
        if self._busy or not self.metrics.changed:
            return None
        self.metrics.changed = False
        self._busy = True
        run = self.run_in_thread
        if run is None:
            from twisted.internet.threads import deferToThread

            run = deferToThread
        d = run(self.write)

        def done(result):
            self._busy = False
            return None

        d.addErrback(lambda f: log.error("metrics: cannot write %s: %s", self.path, f.getErrorMessage()))
        return d.addBoth(done)

    def write(self) -> None:
        data = self.metrics.exposition()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def stop(self) -> None:
        """The last counts, written now (the process is ending)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        try:
            self.write()
        except OSError as e:
            log.error("metrics: cannot write %s: %s", self.path, e)


def metrics_resource(registry, run_in_thread: Optional[Callable] = None):
    """A twisted.web Resource serving ``registry`` as GET /metrics.  The
    collectors (the spool scan above all) run in a thread: a scrape never
    stalls SMTP sessions."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from twisted.internet.threads import deferToThread
    from twisted.web import resource, server

    run = run_in_thread or deferToThread

    class MetricsResource(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
            request.setHeader(b"Cache-Control", b"no-store")
            d = run(generate_latest, registry)

            def write(body):
                if not request.finished and not getattr(request, "_disconnected", False):
                    request.write(body)
                    request.finish()

            def failed(f):
                log.error("metrics: scrape failed: %s", f.getErrorMessage())
                if not request.finished and not getattr(request, "_disconnected", False):
                    request.setResponseCode(500)
                    request.write(b"scrape failed\n")
                    request.finish()

            d.addCallbacks(write, failed)
            return server.NOT_DONE_YET

    return MetricsResource()


def listen(registry, address, reactor):
    """``[metrics] listen``: /metrics on its own address too; the listening port."""
    from twisted.web import resource, server

    root = resource.Resource()
    root.putChild(b"metrics", metrics_resource(registry))
    return reactor.listenTCP(address.port, server.Site(root), interface="::" if address.host == "*" else address.host)
