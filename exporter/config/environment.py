"""The environment variables, each declared once in :data:`ENV_VARS`.

Where the values come from: a mapping given by the caller (tests), used as is; or the process
environment plus ``<cwd>/.env``, read with environs' public API (``Env.read_env``; the process
environment wins). Either way the raw strings are parsed by the same marshmallow fields environs
would use, so a bad value gives marshmallow's message ("Not a valid integer.") under
``environment: <VAR>: ``.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import marshmallow as ma
from environs import Env

from .shard import MAX_SHARDS, parse_shard
from .sites import Lookup, instance_id_problem, is_ipv6

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")


def parse_listen(value: str) -> tuple[str, int]:
    """host:port or [v6]:port -> (host, port)."""
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host_ok = is_ipv6(host[1:-1])
        host = host[1:-1]
    else:
        host_ok = bool(host) and ":" not in host
    if not host_ok or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ma.ValidationError(
            f"expected host:port with port 1..65535 (e.g. 0.0.0.0:8000 or [::1]:8000), got {value!r}"
        )
    return host, int(port)


def parse_log_level(value: str) -> str:
    """A level name, any case -> upper case."""
    if value.strip().upper() not in LOG_LEVELS:
        raise ma.ValidationError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.strip().upper()


def parse_instance_id(value: str) -> str:
    """MQTT_INSTANCE_ID: non-empty, no whitespace or control characters, bounded (sites.py)."""
    if problem := instance_id_problem(value):
        raise ma.ValidationError(problem)
    return value


def parse_log_format(value: str) -> str:
    """text or json, any case -> lower case."""
    if value.strip().lower() not in LOG_FORMATS:
        raise ma.ValidationError(f"must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value.strip().lower()


_FIELDS: dict[str, type[ma.fields.Field[Any]]] = {
    "string": ma.fields.Str, "boolean": ma.fields.Bool, "integer": ma.fields.Int,
    "number": ma.fields.Float,
}


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: its ``Settings`` attribute, type, default, range and help.

    ``kind`` is string, boolean, integer or number (a marshmallow field) unless ``parser``
    (a function that raises ``marshmallow.ValidationError``) reads the value. A default is
    not validated, but goes through ``parser`` (as environs' custom parsers do); a callable
    default is called when the variable is unset.
    """

    name: str
    setting: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    non_empty: bool = False
    parser: Callable[[str], Any] | None = None
    default_doc: str | None = None
    #: The command-line flag that overrides the variable (exporter style), if any.
    flag: str | None = None

    def field(self) -> ma.fields.Field[Any]:
        """The marshmallow field that parses a set value (the one environs would use)."""
        validate: list[Callable[[Any], Any]] = []
        if self.non_empty:
            validate.append(ma.validate.Length(min=1, error="must not be empty"))
        if self.minimum is not None or self.maximum is not None:
            validate.append(ma.validate.Range(
                min=self.minimum, max=self.maximum, min_inclusive=not self.exclusive_minimum))
        return _FIELDS[self.kind](validate=validate)

    def parse(self, raw: str) -> Any:
        """The value of a set variable; raises marshmallow.ValidationError."""
        if self.parser is not None:
            return self.parser(raw)
        return self.field().deserialize(raw)

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


_HOSTNAME_DOC = "the host name"

#: Every environment variable the exporter reads, in the order they are checked.
ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("MQTT_SITES_FILE", "sites_file", "string", "sites.yml",
           "Path of the sites file (relative: to the working directory).", non_empty=True,
           flag="--sites.file"),
    EnvVar("MQTT_SITES_URL", "sites_url", "string", "",
           "HTTP(S) URL that serves the sites document (the same schema as the sites file, "
           "JSON or YAML); when set it replaces MQTT_SITES_FILE. Polled every "
           "MQTT_SITES_RELOAD_SECONDS with conditional requests (ETag, Last-Modified); on a "
           "failure the last good set of sites stays.", default_doc="empty (use the file)",
           flag="--sites.url"),
    EnvVar("MQTT_SITES_URL_TOKEN_FILE", "sites_url_token_file", "string", "",
           "File whose content is sent to MQTT_SITES_URL as `Authorization: Bearer <token>` "
           "(read at every request, so a rotated token is picked up).",
           default_doc="empty (no Authorization header)"),
    EnvVar("MQTT_SITES_RELOAD_SECONDS", "sites_reload_seconds", "number", 30.0,
           "How often the sites file is checked for a change (modification time, size, inode) "
           "or MQTT_SITES_URL is polled; a change is applied without a restart (SIGHUP reloads "
           "at once). 0: only on SIGHUP.", minimum=0),
    EnvVar("MQTT_SHARD", "shard", "string", "",
           "This replica's shard as i/N (0 <= i < N): it holds only the sites that rendezvous "
           "hashing of their names assigns to shard i of N.", parser=parse_shard,
           default_doc="empty (all sites)", flag="--shard"),
    EnvVar("MQTT_SHARDS", "shards", "integer", 0,
           "Number of shards, with this replica's shard i taken from its host name "
           "`<name>-<i>` (a StatefulSet pod); set it equal to the StatefulSet's replicas. "
           "Not together with MQTT_SHARD.", minimum=0, maximum=MAX_SHARDS,
           default_doc="`0` (off)"),
    EnvVar("MQTT_INSTANCE_ID", "instance_id", "string", socket.gethostname,
           "This instance's ID: client IDs are <site>_i<ID>. Must differ between instances "
           "that share a broker. At most 128 bytes; no whitespace or control characters.",
           non_empty=True, parser=parse_instance_id, default_doc=_HOSTNAME_DOC),
    EnvVar("MQTT_CLEAN_SESSION", "clean_session", "boolean", True,
           "Connect with a clean session (v3.1.1) / clean start (v5)."),
    EnvVar("MQTT_LWT_ENABLED", "lwt_enabled", "boolean", True,
           "Set a retained Last Will 'offline' on <site>/backend/status and publish 'online'."),
    EnvVar("MQTT_KEEP_ALIVE", "keepalive", "integer", 60,
           "Keepalive in seconds; a site's keepalive key overrides it.", minimum=1, maximum=65535),
    EnvVar("MQTT_SHUTDOWN_TIMEOUT", "shutdown_timeout", "number", 5.0,
           "Seconds the whole shutdown may take (offline messages, disconnects).",
           minimum=0, exclusive_minimum=True),
    EnvVar("MQTT_COOLDOWN_SECONDS", "cooldown_seconds", "number", 30.0,
           "Seconds a site waits before reconnecting after a suspected client-ID takeover.",
           minimum=0),
    EnvVar("MQTT_STATE_DIR", "state_dir", "string", "./state",
           "Directory for state kept across restarts; must be writable (created if missing).",
           non_empty=True, flag="--state.dir"),
    EnvVar("EXPORTER_LISTEN", "listen", "host:port", "0.0.0.0:8000",
           "Address of the HTTP server (/metrics, /healthz); IPv6 as [::1]:8000.",
           parser=parse_listen, flag="--web.listen-address"),
    EnvVar("LOG_LEVEL", "log_level", "string", "INFO",
           f"Log level: {', '.join(LOG_LEVELS)} (any case).", parser=parse_log_level,
           flag="--log.level"),
    EnvVar("LOG_FORMAT", "log_format", "string", "text",
           f"Log format: {' or '.join(LOG_FORMATS)} (any case).", parser=parse_log_format,
           flag="--log.format"),
    EnvVar("MQTT_BACKOFF_MIN_SECONDS", "backoff_min_seconds", "number", 1.0,
           "First reconnect delay in seconds.", minimum=0, exclusive_minimum=True),
    EnvVar("MQTT_BACKOFF_MAX_SECONDS", "backoff_max_seconds", "number", 60.0,
           "Longest reconnect delay in seconds (>= MQTT_BACKOFF_MIN_SECONDS).",
           minimum=0, exclusive_minimum=True),
    EnvVar("MQTT_STABLE_SECONDS", "stable_seconds", "number", 10.0,
           "Seconds a connection must stay up before the backoff resets.",
           minimum=0, exclusive_minimum=True),
    EnvVar("MQTT_CONNECT_TIMEOUT", "connect_timeout", "number", 10.0,
           "Seconds to wait for a CONNACK.", minimum=0, exclusive_minimum=True),
    EnvVar("MQTT_BRIDGE_MAX_SERIES", "bridge_max_series", "integer", 100_000,
           "Cap on bridged series over all sites together.", minimum=1),
    EnvVar("MQTT_PRESENCE_ENABLED", "presence_enabled", "boolean", True,
           "Publish a retained presence record on <site>/backend/instance and watch it, to "
           "identify another process that uses the same client ID (needs publish and "
           "subscribe rights on that topic)."),
    EnvVar("MQTT_PRESENCE_INTERVAL_SECONDS", "presence_interval_seconds", "number", 30.0,
           "How often each site republishes its presence record and checks that the broker "
           "echoes it back: a connection that stops receiving its own record has lost its "
           "session to another client (brokers such as amqtt never close the old connection).",
           minimum=1),
    EnvVar("MQTT_DUPLICATE_COOLDOWN_MAX_SECONDS", "duplicate_cooldown_max_seconds", "number",
           600.0, "Ceiling of the cooldown while a duplicate instance is identified: it "
           "doubles from MQTT_COOLDOWN_SECONDS at each takeover up to this.", minimum=0),
    EnvVar("MQTT_BROKER_EVENT_WINDOW_SECONDS", "broker_event_window_seconds", "number", 1.0,
           "Connection losses of two or more sites of one broker within this many seconds "
           "are a broker event (restart, crash, network), never a takeover.",
           minimum=0, exclusive_minimum=True),
    EnvVar("EXPORTER_WEB_CONFIG_FILE", "web_config_file", "string", "",
           "Web config file (Prometheus exporter-toolkit format: tls_server_config, "
           "basic_auth_users) that puts TLS and/or basic auth in front of /metrics and /health; "
           "empty: plain HTTP without auth. Relative: to the working directory.",
           default_doc="empty (off)", flag="--web.config.file"),
    EnvVar("EXPORTER_HTTP_MAX_CONNECTIONS", "http_max_connections", "integer", 64,
           "Cap on concurrent HTTP connections; fewer when the descriptor limit leaves less "
           "after the sites. At the cap a new connection replaces the one that has waited "
           "longest for its request.", minimum=1, maximum=65535),
    EnvVar("EXPORTER_HTTP_TIMEOUT_SECONDS", "http_timeout_seconds", "number", 10.0,
           "Seconds an HTTP client has to send its request line and headers (and finish a TLS "
           "handshake), and the longest pause in any read or write of a connection.",
           minimum=0, exclusive_minimum=True),
    EnvVar("EXPORTER_SITE_CONNECT_HISTOGRAM", "site_connect_histogram", "boolean", False,
           "Also export the connect-duration histogram per site "
           "(mqtt_site_connect_duration_seconds, 14 series a site); off: per broker "
           "endpoint (mqtt_broker_connect_duration_seconds) and the last duration per site."),
)


def process_environment(cwd: str, errors: list[str]) -> Lookup:
    """os.environ plus ``<cwd>/.env`` (the process environment wins), via environs."""
    env = Env()
    try:
        env.read_env(os.path.join(cwd, ".env"), recurse=False)
    except (OSError, ValueError) as exc:  # ValueError: .env is a directory
        errors.append(f"environment: .env: cannot read: {getattr(exc, 'strerror', None) or exc}")

    def lookup(name: str) -> str | None:
        return env.str(name, None)

    return lookup


def source(name: str, flagged: Collection[str] = ()) -> str:
    """How an error names a variable: ``environment: VAR`` or, when a command-line flag set
    it, ``flag --the.flag (VAR)``."""
    var = next((v for v in ENV_VARS if v.name == name), None)
    if var is not None and var.flag is not None and name in flagged:
        return f"flag {var.flag} ({name})"
    return f"environment: {name}"


def read_environment(lookup: Lookup, errors: list[str],
                     flagged: Collection[str] = ()) -> dict[str, Any]:
    """Every variable's value by setting name (None where invalid; problems in ``errors``).

    ``flagged``: the variables whose value came from a command-line flag (named so in errors).
    """
    values: dict[str, Any] = {}
    for var in ENV_VARS:
        raw = lookup(var.name)
        if raw is None and var.parser is None:
            values[var.setting] = var.default_value()
            continue
        if raw is None:
            raw = var.default_value()
        try:
            values[var.setting] = var.parse(raw)
        except ma.ValidationError as exc:
            values[var.setting] = None
            errors.extend(f"{source(var.name, flagged)}: {message}" for message in _messages(exc))
    low, high = values["backoff_min_seconds"], values["backoff_max_seconds"]
    if low is not None and high is not None and high < low:
        errors.append(
            f"environment: MQTT_BACKOFF_MAX_SECONDS: must be >= MQTT_BACKOFF_MIN_SECONDS ({low})"
        )
    return values


def state_dir_problem(path: str, cwd: str) -> str | None:
    """Why ``path`` (relative: to ``cwd``) cannot be the state directory, or None; writes nothing.

    A missing directory is fine when its nearest existing ancestor is a writable directory
    (``run`` creates it, see :func:`ensure_state_dir`).
    """
    probe = os.path.join(cwd, path)
    missing = False
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe, missing = parent, True
    if not os.path.isdir(probe):
        return (f"{path}: cannot be created: {probe} is not a directory" if missing
                else f"{path}: not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"{path}: cannot be created: {probe} is not writable" if missing
                else f"{path}: not writable")
    return None


def ensure_state_dir(path: str) -> str | None:
    """Create the state directory if missing and prove it writable with a temporary file
    (what ``run`` does before connecting); the problem, or None."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"{path}: not writable: {exc.strerror or exc}"
    return None


def _messages(exc: ma.ValidationError) -> list[str]:
    messages = exc.messages
    return [str(m) for m in messages] if isinstance(messages, list) else [str(messages)]
