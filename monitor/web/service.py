"""The console inside ``mailgate run``: built from ``[web]``, bound with the
SMTP ports (one that cannot be bound stops the start, exit 1), given the
spool, the queue, the event sink and the tracking store once they exist, and
the digest timer."""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("mailgate.web")


def _learner(config):
    from monitor.actions import learner_for

    return learner_for(config)


def health_of(gateway) -> list[dict]:
    """Scanner and DNSBL state as the running checks know it."""
    out = []
    runtime = getattr(gateway.factory, "runtime", None) if gateway.factory is not None else None
    if runtime is None:
        return out
    for checks in runtime.pipeline.by_stage.values():
        for check in checks:
            for s in getattr(check, "scanners", ()) or ():
                stats, breaker = getattr(s, "stats", None), getattr(s, "breaker", None)
                down = bool(breaker is not None and breaker.is_open) or (
                    stats is not None and stats.self_test_ok is False)
                detail = []
                if stats is not None:
                    detail.append(f"{stats.scans} scans, {stats.infected} infected, {stats.failed} failed")
                    detail.append({None: "self-test not run yet", True: "self-test ok",
                                   False: "self-test FAILED"}[stats.self_test_ok])
                    if stats.last_failure:
                        detail.append(f"last failure: {stats.last_failure}")
                if breaker is not None and breaker.is_open:
                    detail.append("circuit open: not asked until it recovers")
                out.append({"name": f"scanner {s.name}", "up": not down, "detail": "; ".join(detail)})
            for z in getattr(check, "zones", ()) or ():
                name = getattr(z, "name", None) or getattr(z, "zone", None) or str(z)
                if any(h["name"] == f"DNS list {name}" for h in out):
                    continue
                out.append({"name": f"DNS list {name}", "up": True,
                            "detail": f"used by {check.name}; answer errors are in /metrics"})
    return out


class WebConsole:
    def __init__(self, gateway, config):
        from gateway.service import password_pool, server_tls
        from monitor.web.server import Console

        self.gateway = gateway
        self.settings = config.web
        self.tls_options = None
        if self.settings.tls:
            from gateway.errors import ConfigError

            if not config.server.tls_certificate:
                raise ConfigError("web.tls = true: needs [server] tls_certificate and tls_key")
            self.tls_options = server_tls(config.server)
        self.console = Console(self.settings, reactor=gateway.reactor, run_in_thread=gateway.run_in_thread,
                               password_thread=password_pool(gateway.reactor), tls=self.tls_options is not None,
                               metrics=self._metrics(gateway))
        self.digests = None

    @staticmethod
    def _metrics(gateway):
        """``/metrics`` when the monitor's metrics are there (monitor/metrics.py)."""
        registry = getattr(gateway, "metrics_registry", None) or getattr(gateway, "registry", None)
        if registry is None:
            return None
        from monitor.metrics import metrics_resource

        return metrics_resource(registry, gateway.run_in_thread)

    @classmethod
    def from_gateway(cls, gateway, config) -> Optional["WebConsole"]:
        web = getattr(config, "web", None)
        if web is None or not web.enabled:
            return None
        return cls(gateway, config)

    @property
    def url(self) -> str:
        hp = self.settings.listen
        host = f"[{hp.host}]" if ":" in hp.host else hp.host
        return f"{'https' if self.tls_options else 'http'}://{host}:{hp.port}"

    def listen(self):
        """Bind now (before the reactor runs), or CannotListen naming the address."""
        from twisted.internet.error import CannotListenError

        from gateway.service import CannotListen

        hp, reactor, site = self.settings.listen, self.gateway.reactor, self.console.site()
        interface = "::" if hp.host == "*" else hp.host
        try:
            if self.tls_options is not None:
                port = reactor.listenSSL(hp.port, site, self.tls_options, interface=interface)
            else:
                port = reactor.listenTCP(hp.port, site, interface=interface)
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or e.socketError
            raise CannotListen(f"cannot listen on {hp} (web console): {reason}") from None
        from monitor.web.users import read_users

        try:
            admins = [u for u in read_users(self.settings.users).values() if u.role == "admin"]
        except Exception as e:  # the console still runs: the login page says why nobody gets in
            admins = []
            log.error("web users file %s: %s", self.settings.users, e)
        log.info("web console at %s/%s", self.url, "" if admins else
                 f" (no admin yet: create one with `mailgate web adduser NAME`, users file {self.settings.users})")
        return port

    def attach(self, spool, store=None) -> None:
        """Once the spool and queue exist: what the pages read and act through."""
        from monitor.actions import Actions
        from monitor.web.server import Backend

        gw, reactor = self.gateway, self.gateway.reactor
        config = gw.config
        events = gw.events

        def emit(event):  # actions run in the pool; the sink's subscribers live on the reactor
            reactor.callFromThread(events.emit, event)

        def wake():
            reactor.callFromThread(lambda: gw.queue.flush())

        actions = Actions(spool, emit, config.spam.subject_tag, learner=_learner(config), wake=wake)
        bayes = getattr(config, "bayes", None)
        self.console.attach(Backend(actions=actions, spool=spool, store=store, spam=lambda: gw.config.spam,
                                    bayes_model=bayes.model if bayes is not None else "",
                                    health=lambda: health_of(gw), digest_key=self.settings.digest_key))
        self._start_digests(spool, store, emit, wake)

    def _start_digests(self, spool, store, emit, wake) -> None:
        s = self.settings
        if not s.digest_key or not s.digest_interval:
            log.info("quarantine digests off (%s)", "no [web] digest_key" if not s.digest_key else
                     "[web] digest_interval = 0")
            return
        if store is None:
            log.warning("quarantine digests off: they list the tracking store's quarantine index, and it is off")
            return
        from monitor.digest import next_run, send_digests

        gw, reactor = self.gateway, self.gateway.reactor
        base = s.public_url or self.url
        sender = s.digest_sender or f"postmaster@{gw.config.server.hostname}"

        def run():
            d = gw.run_in_thread(send_digests, store, spool, key=s.digest_key, base_url=base, sender=sender,
                                 hostname=gw.config.server.hostname, emit=emit, wake=wake)
            d.addCallbacks(lambda sent: log.info("quarantine digests sent=%d", len(sent)),
                           lambda f: log.error("quarantine digests failed: %s", f.getErrorMessage()))
            d.addBoth(lambda _: schedule())

        def schedule():
            if gw.stopping:
                return
            now = reactor.seconds()
            self.digests = reactor.callLater(next_run(now, s.digest_at, s.digest_interval) - now, run)

        schedule()

    def stop(self) -> None:
        if self.digests is not None and self.digests.active():
            self.digests.cancel()
