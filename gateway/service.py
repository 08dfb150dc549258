"""Service wiring: the only place that installs and starts the reactor.

Builds the collaborators from the config (resolver, store, spool, delivery,
queue manager, checks), listens, and handles signals: SIGTERM stops
accepting, finishes what is in flight and exits 0; SIGHUP re-reads the
config and swaps it in atomically, or keeps the old one and logs why;
SIGUSR1 flushes the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Optional

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


class Gateway:
    def __init__(self, config, config_path: Optional[str], reactor, source: Optional[bytes] = None):
        from twisted.internet.threads import deferToThreadPool

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
        self.resolver = Resolver.from_config(config.dns)
        self.services = Services(reactor=reactor, resolver=self.resolver, store=self._make_store(config),
                                 run_in_thread=run_in_thread, log=logging.getLogger("mailgate.check"))
        self.config = config
        self.ports = []
        self.factory = None
        self.queue = None  # DeliveryAgent (a child process delivers) or QueueManager
        self.stopping = False

    @staticmethod
    def _make_store(config):
        from gateway.store import from_config

        return from_config(config)

    # --- start -----------------------------------------------------------------

    def start(self):
        from twisted.internet import endpoints

        from gateway import config as cfg
        from gateway.auth import make_portal
        from gateway.deliverd import DeliveryAgent
        from gateway.delivery import Deliverer
        from gateway.queue import QueueManager
        from gateway.runtime import build_runtime
        from gateway.smtp import GatewayFactory
        from gateway.spool import Spool

        config = self.config
        runtime = build_runtime(config, self.catalogue, self.services)
        spool = Spool(config.queue.dir)
        self._write_pid(spool.root)
        spool.clean_tmp()  # before we listen: nothing of ours can be half-written yet
        if config.queue.delivery_process:
            if self.source is None:
                self.source = cfg.load_with_source(self.config_path, self.catalogue.sections)[1]
            self.queue = DeliveryAgent(spool, self.reactor, self.run_in_thread, self.source)
        else:
            deliverer = Deliverer(
                reactor=self.reactor, resolver=self.resolver, routes=config.routes,
                hostname=config.server.hostname, connect_timeout=config.queue.connect_timeout,
                tls_client_context_factory=client_tls(), run_in_thread=self.run_in_thread,
            )
            self.queue = QueueManager(spool, deliverer, self.reactor, self.run_in_thread, config.queue,
                                      config.server.hostname, clean_tmp=False)
        portal, challengers = make_portal(config.auth.users_file)
        self.factory = GatewayFactory(
            runtime, self.reactor, enqueue=self.queue.enqueue, quarantine=self.queue.quarantine,
            portal=portal, challengers=challengers, tls_context=_server_tls(config.server),
        )
        for hp in config.server.listen:
            host = "::" if hp.host == "*" else hp.host
            iface = host.replace(":", r"\:")
            ep = endpoints.serverFromString(self.reactor, f"tcp:{hp.port}:interface={iface}:backlog=1024")
            ep.listen(self.factory).addCallbacks(self._listening, self._listen_failed, callbackArgs=(hp,),
                                                 errbackArgs=(hp,))
        self.queue.start()
        # after reactor.run has installed Twisted's own handlers (SIGCHLD
        # reaps the delivery process), ours replace its SIGTERM/SIGINT
        self.reactor.callWhenRunning(self._install_signals)
        routes = ", ".join(f"{k} -> {v}" for k, v in config.routes.items())
        log.info("mailgate starting: config=%s hostname=%s domains=%s routes: %s",
                 self.config_path or "(embedded default)", config.server.hostname,
                 ",".join(config.relay.domains) or "-", routes)

    def _listening(self, port, hp):
        self.ports.append(port)
        log.info("listening on %s", hp)

    def _listen_failed(self, failure, hp):
        log.error("cannot listen on %s: %s", hp, failure.getErrorMessage())
        self.exit_code = 1
        self.reactor.stop()

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
        from gateway.runtime import build_runtime

        try:
            new, source = cfg.load_with_source(self.config_path, self.catalogue.sections)
            runtime = build_runtime(new, self.catalogue, self.services)
        except MailGateError as e:
            log.error("reload refused, keeping the running config: %s", e)
            return
        except Exception:
            log.exception("reload failed, keeping the running config")
            return
        old = self.factory.runtime
        self.factory.runtime = runtime
        self.config = new
        self.source = source
        if hasattr(self.queue, "reload"):
            self.queue.reload(source)
        else:
            self.queue.settings = new.queue
            self.queue.deliverer.routes = new.routes
        log.info("reloaded config=%s threshold=%s", self.config_path or "(embedded default)", new.spam.threshold)
        # sessions that started before keep the old checks until they end
        self.reactor.callLater(SHUTDOWN_GRACE * 20, old.close)

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
                    p._close()
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
        log.info("stopped")
        if self.reactor.running:
            self.reactor.stop()


def _server_tls(server):
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
    gateway.exit_code = 0
    gateway.start()  # raises MailGateError for a config it cannot use
    reactor.run()
    return gateway.exit_code
