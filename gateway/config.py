"""The config schema, its defaults, and loading from TOML.

Defaults live here beside the schema; a file overrides them.  Plugin packages
(rules/, classifiers/, scanners/) contribute their own sections through
``gateway.plugins``; ``load`` composes one model from both and validates the
whole file at once, so a bad file is refused with every key, value and reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
)

from gateway.errors import ConfigError


class Section(BaseModel):
    """Base for every config section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- value types -----------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """'5d', '30m', '90s', '10' or a number -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 2h or 5d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError("expected a duration such as 30s, 5m, 2h or 5d")
    return float(m.group(1)) * _UNITS[m.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration)]


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(value: Any, default_port: int | None = None) -> HostPort:
    """'127.0.0.1:2525', '[::1]:25', 'mail.example.test:25' -> HostPort."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a string host:port")
    text = value.strip()
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", text) or re.match(r"^([^:\[\]]+)(?::(\d+))?$", text)
    if not m:
        raise ValueError("expected host:port, with IPv6 addresses in brackets as [::1]:25")
    host, port = m.group(1), m.group(2)
    if port is None:
        if default_port is None:
            raise ValueError("a port is required (host:port)")
        port = default_port
    port = int(port)
    if not 0 < port < 65536:
        raise ValueError("port must be between 1 and 65535")
    if ":" in host:
        ipaddress.IPv6Address(host.split("%")[0])
    return HostPort(host, port)


def _listen(value: Any) -> HostPort:
    hp = parse_hostport(value)
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        if hp.host not in ("localhost", "*"):
            raise ValueError("listen address must be an IP address") from None
    return hp


def _nameserver(value: Any) -> HostPort:
    hp = parse_hostport(value, default_port=53)
    ipaddress.ip_address(hp.host)  # raises a ValueError naming the problem
    return hp


def _network(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a CIDR network string")
    return str(ipaddress.ip_network(value.strip(), strict=False))


_DOMAIN = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


def normalize_domain(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a domain name")
    d = value.strip().lower().rstrip(".")
    try:
        d = d.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("not a valid domain name") from None
    if not _DOMAIN.match(d):
        raise ValueError("not a valid domain name")
    return d


class _ReadFile:
    """Marks a setting naming a file the gateway reads: ``check_files`` opens it."""


ListenAddress = Annotated[HostPort, BeforeValidator(_listen)]
# "" means unset; any other value must name a readable file (see check_files)
ReadableFile = Annotated[str, _ReadFile()]
NameServer = Annotated[HostPort, BeforeValidator(_nameserver)]
Network = Annotated[str, BeforeValidator(_network)]
Domain = Annotated[str, BeforeValidator(normalize_domain)]


@dataclass(frozen=True)
class Route:
    """Where mail for a domain goes next."""

    kind: str  # "smtp" | "mx" | "local"
    host: str = ""
    port: int = 25
    path: str = ""
    mx_lookup: bool = False  # smtp:host:port without brackets looks up MX of host

    def __str__(self) -> str:
        if self.kind == "mx":
            return "mx"
        if self.kind == "local":
            return f"local:{self.path}"
        h = f"[{self.host}]" if not self.mx_lookup else self.host
        return f"smtp:{h}:{self.port}"


def parse_route(value: Any) -> Route:
    if isinstance(value, Route):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a route string")
    text = value.strip()
    if text == "mx":
        return Route("mx")
    if text.startswith("local:"):
        path = text[len("local:"):]
        if not path:
            raise ValueError("local: needs a Maildir path, as local:var/mail")
        return Route("local", path=path)
    if text.startswith("smtp:"):
        rest = text[len("smtp:"):]
        bracketed = rest.startswith("[")
        hp = parse_hostport(rest, default_port=25)
        if not bracketed:
            normalize_domain(hp.host)
        return Route("smtp", host=hp.host, port=hp.port, mx_lookup=not bracketed)
    raise ValueError('expected "smtp:[host]:port", "smtp:host:port", "mx" or "local:PATH"')


RouteSpec = Annotated[Route, BeforeValidator(parse_route)]


def _subject_tag(value: str) -> str:
    if value.count("%s") != 1:
        raise ValueError('must contain %s exactly once, where the subject goes (as "SPAM*** %s")')
    return value


# --- core sections ---------------------------------------------------------


class ServerSettings(Section):
    listen: list[ListenAddress] = Field(default_factory=lambda: [_listen("127.0.0.1:2525")])
    hostname: Domain = Field(default_factory=lambda: normalize_domain(socket.getfqdn() or "localhost"))
    max_message_size: int = Field(10 * 1024 * 1024, gt=0)
    max_recipients: int = Field(100, gt=0)
    max_connections: int = Field(1000, gt=0)
    max_connections_per_ip: int = Field(50, gt=0)
    idle_timeout: Duration = 300.0
    # wait this long before the greeting; a client that talks first is refused
    greet_pause: Duration = 0.0
    # every limit is a deadline, not an idle timer (Postfix's
    # smtpd_per_request_deadline): a command must be complete within
    # idle_timeout of the previous reply however its bytes trickle in, and
    # DATA within idle_timeout plus one second per min_data_rate bytes received
    min_data_rate: int = Field(500, gt=0)
    max_session_time: Duration = Field(3600.0, gt=0)
    # MIME parts nested deeper are opaque bytes to every content check (and
    # score MIME_NESTING_TOO_DEEP); the parser recurses per level, hence the cap
    max_mime_depth: int = Field(100, ge=2, le=500)
    tls_certificate: ReadableFile = ""
    tls_key: ReadableFile = ""


class RelaySettings(Section):
    domains: list[Domain] = Field(default_factory=list)
    trusted_networks: list[Network] = Field(default_factory=list)


class DnsSettings(Section):
    nameservers: list[NameServer] = Field(default_factory=list)
    timeout: float = Field(3.0, gt=0, le=60)
    cache_size: int = Field(10000, ge=0)


class SpamSettings(Section):
    threshold: float = 5.0
    subject_tag: Annotated[str, AfterValidator(_subject_tag)] = "SPAM*** %s"
    reject_threshold: float = 15.0
    quarantine_threshold: Optional[float] = None


class QueueSettings(Section):
    dir: str = "var/queue"
    lifetime: Duration = 5 * 86400.0
    retry_min: Duration = 300.0
    retry_max: Duration = 4000.0
    delivery_concurrency: int = Field(50, gt=0)
    # per next hop (Postfix's default_destination_concurrency_limit): one hung
    # server cannot take every slot
    destination_concurrency: int = Field(20, gt=0)
    # this many failed connections in a row mark a next hop dead for
    # destination_dead_time: its mail is deferred without connecting
    destination_dead_after: int = Field(5, gt=0)
    destination_dead_time: Duration = Field(60.0, gt=0)
    # per-phase deadlines of the SMTP client (RFC 5321 4.5.3.2, Postfix's smtp_*_timeout)
    connect_timeout: Duration = Field(30.0, gt=0)
    helo_timeout: Duration = Field(300.0, gt=0)
    mail_timeout: Duration = Field(300.0, gt=0)
    rcpt_timeout: Duration = Field(300.0, gt=0)
    data_init_timeout: Duration = Field(120.0, gt=0)
    data_xfer_timeout: Duration = Field(180.0, gt=0)
    data_done_timeout: Duration = Field(600.0, gt=0)
    # how often the spool is searched for messages nothing will try again
    sweep_interval: Duration = Field(60.0, gt=0)
    # deliver from a child process (another core); false: in the SMTP process
    delivery_process: bool = True


class AuthSettings(Section):
    users_file: ReadableFile = ""
    # AUTH without TLS: "never", "loopback" (clients on 127.0.0.0/8 and ::1) or "always"
    allow_without_tls: Literal["never", "loopback", "always"] = "loopback"
    # failures per connection, then 421 and close (Postfix's smtpd_hard_error_limit for AUTH)
    max_failures: int = Field(3, gt=0)
    # wait before each 535 (Dovecot's auth_failure_delay): slows guessing, costs us nothing
    failure_delay: Duration = 2.0
    # failures per client address within client_failure_window, counted in the store
    max_client_failures: int = Field(20, gt=0)
    client_failure_window: Duration = Field(3600.0, gt=0)


class StageDeadlines(Section):
    """How long each stage's checks may take; a check past it is Failed(tempfail)."""

    connect: Duration = Field(30.0, gt=0)
    helo: Duration = Field(30.0, gt=0)
    mail: Duration = Field(60.0, gt=0)
    rcpt: Duration = Field(60.0, gt=0)
    data: Duration = Field(120.0, gt=0)


class ChecksSettings(Section):
    disabled: list[str] = Field(default_factory=list)
    order: list[str] = Field(default_factory=list)
    deadlines: StageDeadlines = Field(default_factory=StageDeadlines)


class LogSettings(Section):
    level: str = "info"
    # the Subject in the per-message log line (quoted, one line, bounded);
    # off where subjects are personal data the log must not keep
    subject: bool = True

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be one of debug, info, warning, error")
        return v.lower()


def _tracking_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a URL string")
    v = value.strip()
    if v and not re.match(r"^(postgresql(\+psycopg)?://\S+|sqlite:///\S+)$", v):
        raise ValueError('expected "" (SQLite under queue.dir), "postgresql://user@host:port/db" '
                         'or "sqlite:///PATH"')
    return v


class TrackingSettings(Section):
    """[tracking]: the store of every message's facts (monitor/tracking.py)."""

    enabled: bool = True
    # "" = SQLite (WAL) at <queue.dir>/tracking.sqlite; "postgresql://..." for several gateways
    url: Annotated[str, BeforeValidator(_tracking_url)] = ""
    # this gateway's name in a shared store; "" = server.hostname
    node: str = ""
    retention: Duration = Field(30 * 86400.0, gt=0)
    quarantine_retention: Duration = Field(14 * 86400.0, gt=0)
    # the writer thread commits every batch_interval or batch_size facts, whichever comes first
    batch_size: int = Field(500, gt=0)
    batch_interval: Duration = Field(0.5, gt=0)
    # facts waiting for the writer; past this they are dropped (counted, logged), never waited for
    max_pending: int = Field(100000, gt=0)
    prune_interval: Duration = Field(3600.0, gt=0)


def _optional_listen(value: Any) -> Optional[HostPort]:
    return None if value in ("", None) else _listen(value)


class MetricsSettings(Section):
    """[metrics]: Prometheus /metrics (monitor/metrics.py)."""

    enabled: bool = True
    # "" = served as /metrics on the web console's listener only; "host:port" = also on its own
    listen: Annotated[Optional[HostPort], BeforeValidator(_optional_listen)] = None


CORE_SECTIONS: dict[str, type[Section]] = {
    "server": ServerSettings,
    "relay": RelaySettings,
    "dns": DnsSettings,
    "spam": SpamSettings,
    "queue": QueueSettings,
    "auth": AuthSettings,
    "checks": ChecksSettings,
    "log": LogSettings,
    "tracking": TrackingSettings,
    "metrics": MetricsSettings,
}


def _default_for(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return Field(default_factory=annotation)
    return Field(default_factory=list)  # e.g. list[ScannerSettings]


def build_model(plugin_sections: dict[str, Any]) -> type[BaseModel]:
    """One model for the whole file: core sections plus those of plugins."""
    from gateway.store import StoreSettings  # the store module builds on Section, hence here

    fields: dict[str, Any] = {}
    for name, model in {**CORE_SECTIONS, "store": StoreSettings, **plugin_sections}.items():
        fields[name] = (model, _default_for(model))
    fields["routes"] = (dict[str, RouteSpec], Field(default_factory=lambda: {"*": Route("mx")}))
    fields["scores"] = (dict[str, float], Field(default_factory=dict))
    model = create_model(
        "Config", __config__=ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True), **fields
    )
    return model


def _route_keys_valid(routes: dict[str, Route]) -> list[str]:
    problems = []
    for key in routes:
        if key == "*":
            continue
        try:
            normalize_domain(key.lstrip("."))
        except ValueError:
            problems.append(f"routes.{key!r}: not a domain name or \"*\"")
    return problems


def format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            reason = "unknown key"
        else:
            reason = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        out.append(f"{key}{shown}: {reason}")
    return out


def validate(data: dict, plugin_sections: dict[str, Any], path: str | None = None):
    model = build_model(plugin_sections)
    try:
        config = model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err), path) from None
    problems = _route_keys_valid(config.routes)
    if config.spam.reject_threshold < config.spam.threshold:
        problems.append(
            f"spam.reject_threshold = {config.spam.reject_threshold}: must not be below spam.threshold"
            f" ({config.spam.threshold})"
        )
    if bool(config.server.tls_certificate) != bool(config.server.tls_key):
        problems.append("server.tls_certificate / server.tls_key: give both or neither")
    if problems:
        raise ConfigError(problems, path)
    return config


def check_files(config, path: str | None = None) -> None:
    """Every ``ReadableFile`` setting names a file we can open, or ConfigError
    lists each that does not.  Not part of ``validate``: the commands that only
    read the spool (queue list, the delivery process) need no certificate, and
    must not refuse to work because one went missing."""
    problems = []
    for key, value in _file_settings(config):
        reason = _unreadable(value)
        if reason:
            problems.append(f"{key} = {value!r}: {reason}")
    if problems:
        raise ConfigError(problems, path)


def _file_settings(config):
    """(dotted key, value) of each non-empty ReadableFile in the config's sections."""
    for name in type(config).model_fields:
        value = getattr(config, name)
        sections = [(name, value)] if isinstance(value, BaseModel) else (
            [(f"{name}.{i}", v) for i, v in enumerate(value) if isinstance(v, BaseModel)]
            if isinstance(value, list) else [])
        for prefix, section in sections:
            for field_name, info in type(section).model_fields.items():
                if any(isinstance(m, _ReadFile) for m in info.metadata) and getattr(section, field_name):
                    yield f"{prefix}.{field_name}", getattr(section, field_name)


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be read, or None.  Opening it is the only honest test."""
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a directory, not a file"
    except PermissionError:
        return "not readable (permission denied)"
    except OSError as e:
        return f"cannot read ({e.strerror})"


def read_toml(path: str) -> dict:
    return parse_toml(read_source(path), path)


def read_source(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path) from None


def parse_toml(source: bytes, path: str) -> dict:
    try:
        return tomllib.loads(source.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}", path) from None


# The config `make run` uses when no file is given: a gateway a new user can
# send a message to at once and read the result in a Maildir.
EMBEDDED_DEFAULT = """
[server]
listen = ["127.0.0.1:2525"]
hostname = "mailgate.localhost"
[relay]
domains = ["example.test"]
trusted_networks = ["127.0.0.0/8", "::1/128"]
[routes]
"example.test" = "local:var/mail"
"*" = "local:var/mail"
[queue]
dir = "var/queue"
"""


def find_config_path(explicit: str | None) -> str | None:
    """-c FILE, then $MAILGATE_CONFIG, then ./mailgate.toml; None = embedded."""
    if explicit:
        return explicit
    env = os.environ.get("MAILGATE_CONFIG")
    if env:
        return env
    if os.path.exists("mailgate.toml"):
        return "mailgate.toml"
    return None


def load(path: str | None, plugin_sections: dict[str, Any] | None = None):
    """Load and validate; ``path=None`` loads the embedded default."""
    return load_with_source(path, plugin_sections)[0]


def load_with_source(path: str | None, plugin_sections: dict[str, Any] | None = None) -> tuple[Any, bytes]:
    """``load``, and the exact bytes it validated: what the delivery process
    is given, so it never runs a file the gateway has not accepted."""
    if plugin_sections is None:
        from gateway.plugins import discover

        plugin_sections = discover().sections
    source = EMBEDDED_DEFAULT.encode() if path is None else read_source(path)
    label = path or "(embedded default)"
    return validate(parse_toml(source, label), plugin_sections, label), source


def route_for(routes: dict[str, Route], domain: str) -> Route:
    """Exact domain, then parent domains given as '.example.test', then '*'."""
    domain = domain.lower().rstrip(".")
    if domain in routes:
        return routes[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        parent = "." + ".".join(labels[i:])
        if parent in routes:
            return routes[parent]
    return routes.get("*", Route("mx"))
