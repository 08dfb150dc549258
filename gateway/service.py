"""Service wiring: the only place that installs and starts the reactor.

Builds the collaborators from the config (resolver, store, spool, delivery,
queue manager, checks), listens, and handles signals: SIGTERM stops
accepting, finishes what is in flight and exits 0; SIGHUP re-reads the
config and swaps it in atomically, or keeps the old one and logs why;
SIGUSR1 flushes the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger("mailgate.service")

SHUTDOWN_GRACE = 30.0  # seconds sessions get to finish after SIGTERM


def install_reactor():
    """The asyncio reactor, with its loop also the current loop: dnspython's
    async resolver needs both (DESIGN.md, pitfalls)."""
    from twisted.internet import asyncioreactor

    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor

        return reactor
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet import reactor

    return reactor


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_mailgate", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        handler._mailgate = True
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([STDLibLogObserver(name="twisted")], redirectStandardIO=False)


def subscribers(config, monitor=None) -> list:
    """Everything that hears the gateway's events (``gateway.events``), built
    from the config: the receiving process, the delivery process and the
    CLI's service layer each build theirs here, so all three write the same
    facts to the same places."""
    from gateway.events import LogLine

    subs: list = [LogLine(subject=config.log.subject)]
    # The monitor's subscribers (the tracking store, the Prometheus metrics),
    # each built from its own config section ([tracking], [metrics]); the
    # CLI, which passes none, gets the store: its admin actions are tracked too
    if monitor is None:
        from monitor import Monitor

        monitor = Monitor.from_config(config, "cli")
    subs.extend(monitor.subscribers())
    return subs


def build_sink(config, monitor=None):
    from gateway.events import EventSink

    return EventSink(subscribers(config, monitor))


def reconfigure_sink(sink, config) -> None:
    """A reload: the subscribers follow the new config (the sink itself stays,
    so sessions and queue that hold it need not be told)."""
    from gateway.events import LogLine

    for sub in sink.subscribers:
        if isinstance(sub, LogLine):
            sub.subject = config.log.subject
        elif hasattr(sub, "reconfigure"):  # the monitor's (tracking retention and batching)
            sub.reconfigure(config)


class CannotListen(Exception):
    """A listen address cannot be bound: `mailgate run` exits 1 naming it,
    before it has touched the spool or started a delivery process."""


# What a running gateway cannot swap: its sockets are bound, its spool and
# delivery process are set up, its store holds live state (greylist, counters).
NEEDS_RESTART = ("server.listen", "queue.dir", "queue.delivery_process", "store", "tracking.enabled",
                 "tracking.url", "metrics", "web")


def _setting(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def needs_restart(running, new) -> list[str]:
    """The NEEDS_RESTART keys whose value in ``new`` differs from what runs."""
    return [key for key in NEEDS_RESTART if _setting(running, key) != _setting(new, key)]


def changed_sections(old, new) -> list[str]:
    return [name for name in type(new).model_fields if getattr(old, name, None) != getattr(new, name)]


@dataclass
class Front:
    """What a new SMTP session is given, all built from one config before any
    of it is swapped in: a file that cannot be read refuses the whole config."""

    runtime: Any
    tls_context: Any  # None: no STARTTLS
    users: dict
    auth: bool  # AUTH offered (a users_file is configured)
    services: Any


class Gateway:
    def __init__(self, config, config_path: Optional[str], reactor, source: Optional[bytes] = None):
        from twisted.internet.threads import deferToThreadPool

        from gateway.auth import UsersFileChecker, make_portal
        from gateway.plugins import Services, discover
        from gateway.resolver import Resolver

        self.config_path = config_path
        # the config text that was validated: the delivery process runs exactly this
        self.source = source
        self.reactor = reactor
        self.catalogue = discover()
        pool = reactor.getThreadPool()
        pool.adjustPoolsize(4, 20)

        def run_in_thread(fn, *args, **kw):
            return deferToThreadPool(reactor, pool, fn, *args, **kw)

        self.run_in_thread = run_in_thread
        self.services = Services(reactor=reactor, resolver=Resolver.from_config(config.dns),
                                 store=self._make_store(config), run_in_thread=run_in_thread,
                                 log=logging.getLogger("mailgate.check"))
        # one checker and portal for the gateway's life; a reload replaces the users.
        # Passwords are checked in their own low-priority threads: a flood of
        # AUTH attempts then costs spare CPU, never the reactor's
        self.checker = UsersFileChecker(password_pool(reactor))
        self.portal = make_portal(self.checker)
        self.config = config
        self.started_with = config  # what the restart-only settings really are
        self.ports = []
        self.factory = None
        self.queue = None  # DeliveryAgent (a child process delivers) or QueueManager
        self.stopping = False
        from monitor import Monitor

        # the tracking store and the metrics (the web console reads both)
        self.monitor = Monitor.from_config(config, "receiver", checks=self._running_checks,
                                           symbols=self._symbol_table)
        self.tracking, self.metrics_registry = self.monitor.tracking, self.monitor.registry
        self.events = build_sink(config, self.monitor)  # one sink for the gateway's life; a reload re-tunes its subscribers

    @property
    def resolver(self):
        return self.services.resolver

    @staticmethod
    def _make_store(config):
        from gateway.store import from_config

        return from_config(config)

    @property
    def label(self) -> str:
        return self.config_path or "(embedded default)"

    # --- what sessions see ---------------------------------------------------------

    def _build_front(self, config) -> Front:
        from gateway import config as cfg
        from gateway.auth import users_of
        from gateway.runtime import build_runtime

        cfg.check_files(config, self.label)
        tls_context = server_tls(config.server)
        users = users_of(config.auth)
        services = self._services_for(config.dns)
        # last: the checks hold resources, and nothing after this can fail
        runtime = build_runtime(config, self.catalogue, services)
        return Front(runtime, tls_context, users, bool(config.auth.users_file), services)

    def _services_for(self, dns):
        """The running Services, or a copy with a new resolver when [dns] changed
        (the checks built with it ask the new servers; the old go with the old checks)."""
        from gateway.resolver import Resolver

        if dns == self.config.dns:
            return self.services
        return dataclasses.replace(self.services, resolver=Resolver.from_config(dns))

    def _apply(self, front: Front) -> None:
        """Swaps what the factory hands new sessions; on the reactor thread with
        no wait in between, so no connection sees half of it."""
        self.checker.replace(front.users)
        self.services = front.services
        self.factory.runtime = front.runtime
        self.factory.tls_context = front.tls_context
        self.factory.portal = self.portal if front.auth else None

    # the factory exists before the queue (ports are bound first): it reaches the queue through these
    def _enqueue(self, entry, data):
        return self.queue.enqueue(entry, data)

    def _quarantine(self, entry, data, verdict):
        return self.queue.quarantine(entry, data, verdict)

    # --- start -----------------------------------------------------------------

    def start(self):
        """Raises MailGateError for a config it cannot use, CannotListen for an
        address it cannot bind: in both cases before the spool is touched."""
        from gateway.pipeline import as_deferred
        from gateway.sasl import AuthGuard
        from gateway.smtp import GatewayFactory
        from gateway.spool import Spool

        config = self.config
        front = self._build_front(config)
        self.factory = GatewayFactory(front.runtime, self.reactor, enqueue=self._enqueue,
                                      quarantine=self._quarantine,
                                      auth_guard=AuthGuard(self.services.store, as_deferred), events=self.events)
        self._apply(front)
        # bind before anything else: a second instance on a taken port must not
        # clean the first one's tmp files, take its pid file or work its queue
        self.ports = self._listen_all(config.server.listen)
        self.web = self._listen_web(config)
        self._listen_metrics()
        spool = Spool(config.queue.dir)
        self._write_pid(spool.root)
        spool.clean_tmp()  # nothing is served before reactor.run: nothing of ours can be half-written yet
        self.queue = self._make_queue(config, spool)
        self.queue.start()
        if self.web is not None:
            self.web.attach(spool, getattr(self, "tracking", None))
        # after reactor.run has installed Twisted's own handlers (SIGCHLD
        # reaps the delivery process), ours replace its SIGTERM/SIGINT
        self.reactor.callWhenRunning(self._install_signals)
        routes = ", ".join(f"{k} -> {v}" for k, v in config.routes.items())
        log.info("mailgate starting: config=%s hostname=%s domains=%s routes: %s", self.label,
                 config.server.hostname, ",".join(config.relay.domains) or "-", routes)

    def _make_queue(self, config, spool):
        from gateway import config as cfg
        from gateway.deliverd import DeliveryAgent
        from gateway.delivery import Deliverer
        from gateway.queue import QueueManager

        if config.queue.delivery_process:
            if self.source is None:
                self.source = cfg.load_with_source(self.config_path, self.catalogue.sections)[1]
            return DeliveryAgent(spool, self.reactor, self.run_in_thread, self.source)
        deliverer = Deliverer.from_config(config, self.reactor, self.resolver, self.run_in_thread, client_tls())
        return QueueManager(spool, deliverer, self.reactor, self.run_in_thread, config.queue,
                            config.server.hostname, clean_tmp=False, events=self.events)

    def _listen_all(self, addresses) -> list:
        """Binds every address now (listenTCP binds at once, before the reactor
        runs), or none: CannotListen names the first that failed."""
        from twisted.internet.error import CannotListenError

        ports = []
        for hp in addresses:
            try:
                ports.append(self.reactor.listenTCP(hp.port, self.factory, backlog=1024,
                                                    interface="::" if hp.host == "*" else hp.host))
            except CannotListenError as e:
                for port in ports:
                    port.stopListening()
                reason = getattr(e.socketError, "strerror", None) or e.socketError
                raise CannotListen(f"cannot listen on {hp}: {reason}") from None
            log.info("listening on %s", hp)
        return ports

    def _listen_web(self, config):
        """The web console ([web], monitor/web), bound with the SMTP ports: if
        its address cannot be bound, those are closed again and start fails."""
        from monitor.web.service import WebConsole

        web = WebConsole.from_gateway(self, config)
        if web is not None:
            try:
                self.ports.append(web.listen())
            except CannotListen:
                for port in self.ports:
                    port.stopListening()
                raise
        return web

    def _listen_metrics(self) -> None:
        """``[metrics] listen``, when set: bound with the others, or start fails."""
        from twisted.internet.error import CannotListenError

        try:
            self.ports.extend(self.monitor.start(self.reactor))
        except CannotListenError as e:
            for port in self.ports:
                port.stopListening()
            reason = getattr(e.socketError, "strerror", None) or e.socketError
            raise CannotListen(f"cannot listen on {self.config.metrics.listen} (metrics): {reason}") from None

    def _running_checks(self) -> list:
        """The checks sessions run now (the metrics read scanner and Bayes state from them)."""
        runtime = getattr(self.factory, "runtime", None) if self.factory is not None else None
        if runtime is None:
            return []
        return [c for checks in runtime.pipeline.by_stage.values() for c in checks]

    def _symbol_table(self):
        runtime = getattr(self.factory, "runtime", None) if self.factory is not None else None
        return getattr(getattr(runtime, "scorer", None), "symbols", None)

    def _write_pid(self, root: str):
        self.pid_path = os.path.join(root, "mailgate.pid")
        with open(self.pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")

    def _install_signals(self):
        def later(fn):
            return lambda *_: self.reactor.callFromThread(fn)

        signal.signal(signal.SIGTERM, later(self.shutdown))
        signal.signal(signal.SIGINT, later(self.shutdown))
        signal.signal(signal.SIGHUP, later(self.reload))
        signal.signal(signal.SIGUSR1, later(lambda: self.queue.flush()))

    # --- reload ----------------------------------------------------------------

    def reload(self):
        from gateway import config as cfg
        from gateway.errors import MailGateError

        try:
            new, source = cfg.load_with_source(self.config_path, self.catalogue.sections)
            front = self._build_front(new)
        except MailGateError as e:
            log.error("reload refused, keeping the running config: %s", e)
            return
        except Exception:
            log.exception("reload failed, keeping the running config")
            return
        old, old_runtime = self.config, self.factory.runtime
        self._apply(front)
        self._reload_queue(new, source)
        logging.getLogger().setLevel(new.log.level.upper())
        reconfigure_sink(self.events, new)
        self.config, self.source = new, source
        self._log_reloaded(old, new, front)
        # sessions that started before keep the old checks until they end
        self.reactor.callLater(SHUTDOWN_GRACE * 20, old_runtime.close)

    def _reload_queue(self, new, source: bytes) -> None:
        from gateway.deliverd import DeliveryAgent

        if isinstance(self.queue, DeliveryAgent):  # the delivery process re-reads the running config
            self.queue.reload(source)
            return
        self.queue.reconfigure(new, self.resolver)

    def _log_reloaded(self, old, new, front: Front) -> None:
        restart = needs_restart(self.started_with, new)
        tls = new.server.tls_certificate if front.tls_context is not None else "off"
        users = f"{len(front.users)} users" if front.auth else "off"
        log.info("reloaded config=%s threshold=%s changed=%s tls=%s auth=%s%s", self.label, new.spam.threshold,
                 ",".join(changed_sections(old, new)) or "-", tls, users,
                 f"; needs a restart: {', '.join(restart)} (running as before)" if restart else "")

    # --- shutdown ----------------------------------------------------------------

    def shutdown(self):
        from twisted.internet import defer

        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: no new connections; finishing sessions in flight")
        stops = [defer.maybeDeferred(p.stopListening) for p in self.ports]
        d = defer.DeferredList(stops)
        d.addCallback(lambda _: self._drain_sessions(self.reactor.seconds() + SHUTDOWN_GRACE))
        d.addCallback(lambda _: self.queue.stop())
        d.addBoth(lambda _: self._stopped())

    def _drain_sessions(self, deadline):
        from twisted.internet import defer, task

        from gateway.smtp import SHUTTING_DOWN

        def idle_close():
            for p in list(self.factory.connections):
                if p.envelope is None and not p._busy and p.mode == "COMMAND":
                    p._send(SHUTTING_DOWN)
                    p._close("shutdown")
            if not self.factory.connections or self.reactor.seconds() >= deadline:
                return True
            return False

        if idle_close():
            return defer.succeed(None)
        d = defer.Deferred()

        def poll():
            if idle_close():
                loop.stop()
                d.callback(None)

        loop = task.LoopingCall(poll)
        loop.clock = self.reactor
        loop.start(0.1, now=False)
        return d

    def _stopped(self):
        try:
            os.unlink(self.pid_path)
        except OSError:
            pass
        self.monitor.close()  # the facts still queued for the tracking store
        self.services.store.close()  # SQLite's thread, Redis's connections
        log.info("stopped")
        if self.reactor.running:
            self.reactor.stop()


PASSWORD_THREADS = 2  # at most this many PBKDF2 checks at once (the machine's cores, not more)
PASSWORD_NICE = 10  # their threads' nice value: the reactor, at 0, wins any contest for a core


def password_pool(reactor):
    """``run_in_thread`` for password checks: a pool of its own, whose
    threads lower their own priority, started at the first check (so a
    gateway that never ran its reactor has no threads to wait for at exit)
    and stopped with the reactor.

    Linux's setpriority() takes a thread id and sets that thread alone (a
    documented departure from POSIX); elsewhere the threads keep the
    process's priority and only the pool size bounds them.
    """
    import threading

    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    pools: list[ThreadPool] = []
    lowered = threading.local()

    def nice_then(fn, *args, **kw):
        if not getattr(lowered, "done", False):
            lowered.done = True
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PASSWORD_NICE)
            except (AttributeError, OSError) as e:
                log.warning("password threads keep normal priority: %s", e)
        return fn(*args, **kw)

    def run(fn, *args, **kw):
        if not pools:
            pools.append(ThreadPool(1, PASSWORD_THREADS, name="mailgate-password"))
            pools[0].start()
            reactor.addSystemEventTrigger("during", "shutdown", pools[0].stop)
        return deferToThreadPool(reactor, pools[0], nice_then, fn, *args, **kw)

    return run


def server_tls(server):
    if not server.tls_certificate:
        return None
    from twisted.internet import ssl

    from gateway.errors import ConfigError

    try:
        with open(server.tls_certificate, "rb") as f:
            cert = f.read()
        with open(server.tls_key, "rb") as f:
            key = f.read()
        return ssl.PrivateCertificate.loadPEM(key + b"\n" + cert).options()
    except OSError as e:
        raise ConfigError(f"server.tls_certificate/tls_key: cannot read ({e.strerror})") from None
    except Exception as e:
        raise ConfigError(f"server.tls_certificate = {server.tls_certificate!r}: not a usable PEM "
                          f"certificate and key ({e})") from None


def client_tls():
    """Opportunistic STARTTLS outbound: encrypt when offered; certificates are
    not verified (there is no trust path for MX hosts without DANE/MTA-STS)."""
    from twisted.internet import ssl

    return ssl.CertificateOptions(verify=False)


def run(config, config_path: Optional[str], source: Optional[bytes] = None) -> int:
    reactor = install_reactor()
    setup_logging(config.log.level)
    gateway = Gateway(config, config_path, reactor, source)
    try:
        gateway.start()  # raises MailGateError for a config it cannot use
    except CannotListen as e:
        log.error("%s; exiting, no delivery process started", e)
        return 1
    reactor.run()
    return 0
