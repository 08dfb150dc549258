"""Delivery in its own process, as Postfix splits smtpd from qmgr/smtp.

The gateway's SMTP process receives, judges and spools; a child process
(``mailgate deliver``) owns the queue manager and the SMTP client.  On a
2-core machine this puts receiving and delivering on different cores
instead of one interpreter lock.

The spool is the interface; the pipe only says "look now".  The parent
writes one line per event to the child's stdin: a queue id (just spooled),
``FLUSH`` or ``RELOAD``.  End of file means the parent is gone or stopping:
the child finishes the attempts under way and exits, leaving the rest in the
spool for the next start.  A lock file keeps two delivery processes from
working one spool (a restarted gateway waits for the old child to finish).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from typing import Optional

from twisted.internet import defer, protocol

from gateway.spool import QueueEntry, Spool

log = logging.getLogger("mailgate.deliverd")

RESPAWN_DELAY = 1.0


class _Child(protocol.ProcessProtocol):
    def __init__(self, agent: "DeliveryAgent"):
        self.agent = agent

    def processEnded(self, reason):
        self.agent._child_ended(reason.value.exitCode)


RUNNING_CONFIG = "config.running.toml"


class DeliveryAgent:
    """Parent side: spools, tells the child, and keeps a child running."""

    def __init__(self, spool: Spool, reactor, run_in_thread, config_source: bytes):
        self.spool = spool
        self.reactor = reactor
        self.run_in_thread = run_in_thread
        # the child reads the config the parent accepted, not the admin's file:
        # a child restarted while that file is broken still gets a good one
        self.config_path = os.path.join(spool.root, RUNNING_CONFIG)
        self._write_config(config_source)
        self.transport = None
        self.stopping = False
        self.ended: Optional[defer.Deferred] = None

    def _write_config(self, source: bytes) -> None:
        tmp = f"{self.config_path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold passwords
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        os.replace(tmp, self.config_path)

    def start(self) -> None:
        args = [sys.executable, "-m", "gateway.cli", "deliver", "-c", self.config_path]
        env = dict(os.environ, MAILGATE_SPOOL=self.spool.root)
        self.transport = self.reactor.spawnProcess(_Child(self), sys.executable, args, env=env,
                                                   childFDs={0: "w", 1: 1, 2: 2})
        log.info("delivery process started pid=%s", self.transport.pid)

    def _child_ended(self, code) -> None:
        self.transport = None
        if self.stopping:
            if self.ended is not None and not self.ended.called:
                self.ended.callback(code)
            return
        log.error("delivery process ended (exit %s); starting a new one in %.0fs", code, RESPAWN_DELAY)
        self.reactor.callLater(RESPAWN_DELAY, self._respawn)

    def _respawn(self) -> None:
        if not self.stopping and self.transport is None:
            self.start()

    def _tell(self, line: str) -> None:
        if self.transport is not None:
            self.transport.write(line.encode() + b"\n")

    # the two callables GatewayFactory needs
    def enqueue(self, entry: QueueEntry, data: bytes) -> defer.Deferred:
        d = self.run_in_thread(self.spool.store, entry, data)
        d.addCallback(lambda _: self._tell(entry.queue_id))
        return d

    def quarantine(self, entry: QueueEntry, data: bytes, verdict) -> defer.Deferred:
        from gateway.queue import quarantine_record

        return self.run_in_thread(self.spool.quarantine_store, entry.queue_id, data,
                                  quarantine_record(entry, verdict, len(data)))

    def flush(self) -> None:
        self._tell("FLUSH")

    def reload(self, config_source: bytes) -> None:
        try:
            self._write_config(config_source)
        except OSError as e:
            log.error("delivery process keeps its config: cannot write %s: %s", self.config_path, e)
            return
        self._tell("RELOAD")

    def stop(self) -> defer.Deferred:
        """Close the pipe; fires when the child has finished what it was doing."""
        self.stopping = True
        if self.transport is None:
            return defer.succeed(None)
        self.ended = defer.Deferred()
        self.transport.closeStdin()
        return self.ended


# --- the child ----------------------------------------------------------------------


class _Commands(protocol.Protocol):
    """Lines from the parent on stdin."""

    def __init__(self, daemon: "DeliveryDaemon"):
        self.daemon = daemon
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self.daemon.command(line.decode("ascii", "replace").strip())

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.daemon.parent_gone()


class DeliveryDaemon:
    def __init__(self, config, config_path, reactor):
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.queue = None
        self.events = None
        self.monitor = None
        self.lock_fd = None

    def start(self) -> defer.Deferred:
        from twisted.internet import stdio

        spool = Spool(os.environ.get("MAILGATE_SPOOL") or self.config.queue.dir)
        stdio.StandardIO(_Commands(self), stdout=os.open(os.devnull, os.O_WRONLY))
        d = _deferred_in_thread(self.reactor, self._lock, spool.root)
        return d.addCallback(lambda _: self._begin(spool))

    def _lock(self, root: str) -> None:
        """Waits (in a thread) until no other delivery process works this spool."""
        self.lock_fd = os.open(os.path.join(root, "deliver.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)

    def _begin(self, spool: Spool):
        from twisted.internet.threads import deferToThreadPool

        from gateway.delivery import Deliverer
        from gateway.queue import QueueManager
        from gateway.resolver import Resolver
        from gateway.service import build_sink, client_tls

        pool = self.reactor.getThreadPool()
        pool.adjustPoolsize(4, 20)

        def run_in_thread(fn, *a, **kw):
            return deferToThreadPool(self.reactor, pool, fn, *a, **kw)

        config = self.config
        deliverer = Deliverer.from_config(config, self.reactor, Resolver.from_config(config.dns), run_in_thread,
                                          client_tls())
        # this process's own sink: its delivery facts reach the same subscribers as the receiver's
        from monitor import Monitor

        self.monitor = Monitor.from_config(config, "delivery", queue_dir=spool.root)
        self.monitor.start(self.reactor, run_in_thread)  # the metrics file the receiver's /metrics reads
        self.events = build_sink(config, self.monitor)
        self.queue = QueueManager(spool, deliverer, self.reactor, run_in_thread, config.queue,
                                  config.server.hostname, clean_tmp=False, events=self.events)
        log.info("delivery process pid=%d working %s", os.getpid(), spool.root)
        return self.queue.start()

    def command(self, line: str) -> None:
        if self.queue is None or not line:
            return
        if line == "FLUSH":
            self.queue.flush()
        elif line == "RELOAD":
            self.reload()
        else:
            self.queue.schedule(line, 0)

    def reload(self) -> None:
        from gateway import config as cfg
        from gateway.errors import MailGateError

        try:
            new = cfg.load(self.config_path)
        except MailGateError as e:
            log.error("delivery: reload refused, keeping the running config: %s", e)
            return
        resolver = self.queue.deliverer.resolver
        if new.dns != self.config.dns:  # the next attempts ask the new servers
            from gateway.resolver import Resolver

            resolver = Resolver.from_config(new.dns)
        self.config = new
        self.queue.reconfigure(new, resolver)
        from gateway.service import reconfigure_sink

        reconfigure_sink(self.events, new)
        log.info("delivery process reloaded routes: %s", ", ".join(f"{k} -> {v}" for k, v in new.routes.items()))

    def parent_gone(self) -> None:
        log.info("delivery process: parent closed the pipe; finishing attempts under way")
        d = self.queue.stop() if self.queue is not None else defer.succeed(None)
        d.addBoth(lambda _: self.monitor.close() if self.monitor is not None else None)
        d.addBoth(lambda _: self.reactor.stop())


def _deferred_in_thread(reactor, fn, *args):
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


def run(config, config_path: Optional[str]) -> int:
    from gateway.service import install_reactor, setup_logging

    reactor = install_reactor()
    setup_logging(config.log.level)
    daemon = DeliveryDaemon(config, config_path, reactor)
    # signals are the parent's business: a terminal's ^C or the service
    # manager's SIGTERM reach the whole group, and we finish via the pipe
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reactor.callWhenRunning(lambda: daemon.start().addErrback(_fatal, reactor))
    reactor.run(installSignalHandlers=False)
    return 0


def _fatal(failure, reactor):
    log.error("delivery process cannot start: %s", failure.getErrorMessage(),
              exc_info=(failure.type, failure.value, failure.getTracebackObject()))
    reactor.stop()
