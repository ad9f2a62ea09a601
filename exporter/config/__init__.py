"""Configuration: environment settings plus the YAML sites file, validated in one pass.

`load_settings()` reads MQTT_*, EXPORTER_LISTEN and LOG_* with environs, then the sites
file, collects every problem and raises `ConfigError` once with all of them. Passwords
come only from environment variables or files and are wrapped in `Secret`, which prints
as '***'; no error message or summary ever contains one. Nothing here touches the network
or writes anything.
"""

from __future__ import annotations

import difflib
import hmac
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import marshmallow as ma
import yaml
from environs import Env, EnvValidationError

from ..bridge.constants import DEFAULT_STATES, RESERVED_LABELS, RESERVED_METRIC_PREFIXES  # noqa: F401

PROTOCOLS = ("3.1.1", "5")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
SITE_KEYS = (
    "name", "host", "port", "enabled", "protocol", "username", "password_env",
    "password_file", "topics", "keepalive", "tls", "ca_file", "bridge",
)
TOP_LEVEL_KEYS = ("sites",)
SITE_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
LITERAL_PASSWORD = "literal passwords are not allowed; use password_env or password_file"

# --- bridge (MQTT payloads -> metrics, see exporter/bridge.py) ---
BRIDGE_KEYS = (
    "prefix", "max_series", "expire_after", "ignore", "states", "topic_labels", "topic_label",
    "mappings", "max_payload_bytes", "max_depth",
)
MAPPING_KEYS = ("topic", "path", "metric", "type", "scale", "help")
BRIDGE_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]*")
BRIDGE_METRIC_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True)
class BridgeMapping:
    """One explicit mapping: the value at ``path`` of payloads on ``topic`` -> ``metric``."""

    topic: str
    path: tuple[str, ...] = ()  # () = the whole (scalar) payload
    metric: str = ""
    type: str = "gauge"  # or "counter"
    scale: float = 1.0
    help: str | None = None


@dataclass(frozen=True)
class BridgeConfig:
    """A site's ``bridge:`` block; ``SiteConfig.bridge`` is None when the bridge is off."""

    prefix: str = "mqtt_"
    max_series: int = 10_000
    expire_after: float = 600.0
    ignore: tuple[str, ...] = ()
    states: tuple[tuple[str, float], ...] = ()  # merged over DEFAULT_STATES
    topic_labels: tuple[str, ...] = ()
    topic_label: bool = True
    mappings: tuple[BridgeMapping, ...] = ()
    max_payload_bytes: int = 65536
    max_depth: int = 8


class Secret:
    """A secret string: str() and repr() give '***'; reveal() returns the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "***"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class SiteConfig:
    name: str
    host: str
    port: int
    enabled: bool = True
    protocol: str = "3.1.1"
    username: str | None = None
    password: Secret | None = None
    password_source: str | None = None  # "env:VAR" or "file:/path"; safe to print
    topics: tuple[str, ...] = ()
    keepalive: int = 60
    tls: bool = False
    ca_file: str | None = None
    bridge: BridgeConfig | None = None

    def client_id(self, instance_id: str) -> str:
        return f"{self.name}_i{instance_id}"

    @property
    def broker(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def status_topic(self) -> str:
        return f"{self.name}/backend/status"


@dataclass(frozen=True)
class Settings:
    sites_file: str
    instance_id: str
    clean_session: bool = True
    lwt_enabled: bool = True
    keepalive: int = 60
    shutdown_timeout: float = 5.0
    cooldown_seconds: float = 30.0
    state_dir: str = "./state"
    listen_host: str = "0.0.0.0"
    listen_port: int = 8000
    log_level: str = "INFO"
    log_format: str = "text"
    backoff_min_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    stable_seconds: float = 10.0
    connect_timeout: float = 10.0
    bridge_max_series: int = 100_000
    sites: tuple[SiteConfig, ...] = ()


class ConfigError(Exception):
    """Every configuration problem found, one line each in `errors`."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --- environment -------------------------------------------------------------------


class _SourceEnv(Env):
    """An environs Env that reads `source` (not os.environ), then values from read_env()."""

    def __init__(self, source: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._source = source
        self.add_parser("listen_address", _parse_listen)
        self.add_parser("log_level_name", _parse_log_level)
        self.add_parser("log_format_name", _parse_log_format)

    def _get_value(self, env_key: str, default: Any) -> Any:
        if env_key in self._source:
            return self._source[env_key]
        return self._environ.get(env_key, default)

    def lookup(self, name: str) -> str | None:
        """The raw value of one variable, or None when unset."""
        return self._get_value(name, None)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host_ok = _is_ipv6(host[1:-1])
        host = host[1:-1]
    else:
        host_ok = bool(host) and ":" not in host
    if not host_ok or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ma.ValidationError(
            f"expected host:port with port 1..65535 (e.g. 0.0.0.0:8000 or [::1]:8000), got {value!r}"
        )
    return host, int(port)


def _parse_log_level(value: str) -> str:
    if value.strip().upper() not in LOG_LEVELS:
        raise ma.ValidationError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.strip().upper()


def _parse_log_format(value: str) -> str:
    if value.strip().lower() not in LOG_FORMATS:
        raise ma.ValidationError(f"must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value.strip().lower()


def _read_environment(env: _SourceEnv, errors: list[str]) -> dict[str, Any]:
    non_empty = ma.validate.Length(min=1, error="must not be empty")
    positive = ma.validate.Range(min=0, min_inclusive=False)
    values: dict[str, Any] = dict(
        sites_file=env.str("MQTT_SITES_FILE", "sites.yml", validate=non_empty),
        instance_id=env.str("MQTT_INSTANCE_ID", socket.gethostname(), validate=non_empty),
        clean_session=env.bool("MQTT_CLEAN_SESSION", True),
        lwt_enabled=env.bool("MQTT_LWT_ENABLED", True),
        keepalive=env.int("MQTT_KEEP_ALIVE", 60, validate=ma.validate.Range(1, 65535)),
        shutdown_timeout=env.float("MQTT_SHUTDOWN_TIMEOUT", 5.0, validate=positive),
        cooldown_seconds=env.float("MQTT_COOLDOWN_SECONDS", 30.0, validate=ma.validate.Range(min=0)),
        state_dir=env.str("MQTT_STATE_DIR", "./state", validate=non_empty),
        listen=env.listen_address("EXPORTER_LISTEN", "0.0.0.0:8000"),
        log_level=env.log_level_name("LOG_LEVEL", "INFO"),
        log_format=env.log_format_name("LOG_FORMAT", "text"),
        backoff_min_seconds=env.float("MQTT_BACKOFF_MIN_SECONDS", 1.0, validate=positive),
        backoff_max_seconds=env.float("MQTT_BACKOFF_MAX_SECONDS", 60.0, validate=positive),
        stable_seconds=env.float("MQTT_STABLE_SECONDS", 10.0, validate=positive),
        connect_timeout=env.float("MQTT_CONNECT_TIMEOUT", 10.0, validate=positive),
        bridge_max_series=env.int("MQTT_BRIDGE_MAX_SERIES", 100_000,
                                  validate=ma.validate.Range(min=1)),
    )
    try:
        env.seal()
    except EnvValidationError as exc:
        for var, messages in dict(exc.error_messages).items():
            errors.extend(f"environment: {var}: {message}" for message in messages)
    low, high = values["backoff_min_seconds"], values["backoff_max_seconds"]
    if low is not None and high is not None and high < low:
        errors.append(
            f"environment: MQTT_BACKOFF_MAX_SECONDS: must be >= MQTT_BACKOFF_MIN_SECONDS ({low})"
        )
    return values


# --- sites file --------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: SafeLoader reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # Never str(exc): it quotes the offending source line, which may hold a secret.
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "parse error"
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "list", dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _unknown_key(key: Any, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
    return "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")


def _topic_filter_problem(topic: str) -> str | None:
    if not topic:
        return "must not be empty"
    if "\0" in topic:
        return "must not contain NUL"
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "longer than 65535 bytes"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be the whole last level"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def _read_secret_file(path: str) -> tuple[str | None, str | None]:
    """(password, None) or (None, problem); the problem never contains the content."""
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except UnicodeDecodeError:
        return None, f"password file {path!r} is not valid UTF-8"
    except OSError as exc:
        return None, f"cannot read password file {path!r}: {exc.strerror or type(exc).__name__}"
    content = content.removesuffix("\n").removesuffix("\r")
    if not content:
        return None, f"password file {path!r} is empty"
    return content, None


def _parse_site(
    raw: Any,
    index: int,
    path: str,
    lookup: Callable[[str], str | None],
    default_keepalive: int,
    errors: list[str],
) -> SiteConfig | None:
    name = raw.get("name") if isinstance(raw, dict) else None
    named = isinstance(name, str) and SITE_NAME_RE.fullmatch(name) is not None
    where = f"{path}: site '{name}' (#{index})" if named else f"{path}: site #{index}"
    if not isinstance(raw, dict):
        errors.append(f"{where}: must be a mapping, got {_type_name(raw)}")
        return None
    first_error = len(errors)

    def fail(key: Any, message: str) -> None:
        errors.append(f"{where}: key '{key}': {message}")

    def get(key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        if key not in raw:
            if required:
                fail(key, "required")
            return default
        value = raw[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            fail(key, f"expected {_type_name(kind())}, got {_type_name(value)}")
            return None
        if kind is str and not value:
            fail(key, "must not be empty")
            return None
        return value

    for key in raw:
        if key == "password":
            fail(key, LITERAL_PASSWORD)
        elif key not in SITE_KEYS:
            fail(key, _unknown_key(key, SITE_KEYS))

    if get("name", str, required=True) is not None and not named:
        fail("name", f"invalid name {name!r}: use only letters, digits, '_' and '-'")

    host = get("host", str, required=True)
    if host is not None and (
        any(c.isspace() for c in host) or (":" in host and not _is_ipv6(host))
    ):
        fail("host", f"invalid host {host!r}: a host name or IP address (IPv6 without brackets)")

    tls = get("tls", bool, False)
    port = get("port", int, 8883 if tls else 1883)
    if port is not None and not 1 <= port <= 65535:
        fail("port", f"must be 1..65535, got {port}")
    enabled = get("enabled", bool, True)

    protocol = raw.get("protocol", "3.1.1")
    if type(protocol) is int:
        protocol = str(protocol)
    if protocol not in PROTOCOLS:
        shown = repr(protocol) if isinstance(protocol, (str, float)) else _type_name(protocol)
        fail("protocol", f"must be '3.1.1' or '5', got {shown}")

    username = get("username", str)
    password = password_source = None
    if "password_env" in raw and "password_file" in raw:
        fail("password_file", "password_env and password_file are mutually exclusive; use one")
    elif (var := get("password_env", str)) is not None:
        value = lookup(var)
        if not value:
            fail("password_env", f"environment variable {var} is {'empty' if value == '' else 'not set'}")
        else:
            password, password_source = Secret(value), f"env:{var}"
    elif (secret_path := get("password_file", str)) is not None:
        value, problem = _read_secret_file(secret_path)
        if problem:
            fail("password_file", problem)
        else:
            password, password_source = Secret(value), f"file:{secret_path}"

    topics = get("topics", list)
    if topics == []:
        fail("topics", "empty list; omit the key to subscribe to '<name>/#'")
    for i, topic in enumerate(topics or [], 1):
        if not isinstance(topic, str):
            fail("topics", f"filter #{i}: expected string, got {_type_name(topic)}")
        elif problem := _topic_filter_problem(topic):
            fail("topics", f"invalid topic filter {topic!r}: {problem}")

    keepalive = get("keepalive", int, default_keepalive)
    if "keepalive" in raw and keepalive is not None and not 5 <= keepalive <= 65535:
        fail("keepalive", f"must be 5..65535, got {keepalive}")

    ca_file = get("ca_file", str)
    if ca_file is not None:
        if tls is not True:
            fail("ca_file", "only allowed with tls: true")
        else:
            try:  # what paho's tls_set does at start: check-config catches a bad bundle
                ssl.create_default_context().load_verify_locations(cafile=ca_file)
            except ssl.SSLError:
                fail("ca_file", f"{ca_file!r} holds no valid PEM certificate")
            except OSError as exc:
                fail("ca_file", f"cannot read {ca_file!r}: {exc.strerror or type(exc).__name__}")

    bridge = _parse_bridge(raw["bridge"], fail) if "bridge" in raw else None

    if len(errors) > first_error:
        return None
    return SiteConfig(
        name=name, host=host, port=port, enabled=enabled, protocol=protocol,
        username=username, password=password, password_source=password_source,
        topics=tuple(topics or [f"{name}/#"]), keepalive=keepalive, tls=tls, ca_file=ca_file,
        bridge=bridge,
    )


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and value == value and abs(value) != float("inf")


def _parse_mapping(raw: Any, key: str, fail: Callable[[str, str], None]) -> BridgeMapping | None:
    if not isinstance(raw, dict):
        fail(key, f"expected mapping, got {_type_name(raw)}")
        return None
    ok = True

    def bad(sub: str, message: str) -> None:
        nonlocal ok
        ok = False
        fail(f"{key}.{sub}", message)

    for k in raw:
        if k not in MAPPING_KEYS:
            bad(str(k), _unknown_key(k, MAPPING_KEYS))
    topic = raw.get("topic")
    if not isinstance(topic, str):
        bad("topic", "required topic filter" if topic is None else
            f"expected string, got {_type_name(topic)}")
    elif problem := _topic_filter_problem(topic):
        bad("topic", f"invalid topic filter {topic!r}: {problem}")
    path = raw.get("path", "")
    if not isinstance(path, str):
        bad("path", f"expected string, got {_type_name(path)}")
        path = ""
    parts = tuple(path.split(".")) if path else ()
    if any(not p for p in parts):
        bad("path", f"invalid path {path!r}: empty element (use a.b.c)")
    kind = raw.get("type", "gauge")
    if kind not in ("gauge", "counter"):
        bad("type", f"must be 'gauge' or 'counter', got {kind!r}")
    metric = raw.get("metric")
    if not isinstance(metric, str):
        bad("metric", "required" if metric is None else f"expected string, got {_type_name(metric)}")
    elif not BRIDGE_METRIC_RE.fullmatch(metric):
        bad("metric", f"invalid metric name {metric!r}: use [a-zA-Z_][a-zA-Z0-9_]*")
    elif metric.startswith(RESERVED_METRIC_PREFIXES):
        bad("metric", f"{metric!r} is in a namespace of the exporter's own metrics "
            f"({', '.join(p + '*' for p in RESERVED_METRIC_PREFIXES)})")
    elif kind == "gauge" and metric.endswith(("_total", "_count", "_sum", "_bucket")):
        bad("metric", f"a gauge must not end in _total, _count, _sum or _bucket: {metric!r}")
    scale = raw.get("scale", 1.0)
    if not _is_number(scale):
        bad("scale", f"expected a finite number, got {_type_name(scale)}")
    help_text = raw.get("help")
    if help_text is not None and not isinstance(help_text, str):
        bad("help", f"expected string, got {_type_name(help_text)}")
    if not ok:
        return None
    return BridgeMapping(topic=topic, path=parts, metric=metric, type=kind, scale=float(scale),
                         help=help_text)


def _parse_bridge(raw: Any, fail: Callable[[str, str], None]) -> BridgeConfig | None:
    """The ``bridge:`` block: ``true``, ``false`` or a mapping; problems go to ``fail``."""
    if raw is True:
        return BridgeConfig()
    if raw is False or raw is None:
        return None
    if not isinstance(raw, dict):
        fail("bridge", f"expected boolean or mapping, got {_type_name(raw)}")
        return None
    values: dict[str, Any] = {}
    ok = True

    def bad(sub: str, message: str) -> None:
        nonlocal ok
        ok = False
        fail(f"bridge.{sub}", message)

    for key in raw:
        if key not in BRIDGE_KEYS:
            bad(str(key), _unknown_key(key, BRIDGE_KEYS))

    prefix = raw.get("prefix", "mqtt_")
    if not isinstance(prefix, str):
        bad("prefix", f"expected string, got {_type_name(prefix)}")
    elif prefix and not BRIDGE_PREFIX_RE.fullmatch(prefix):
        bad("prefix", f"invalid prefix {prefix!r}: use lowercase [a-z_][a-z0-9_]*")
    elif any(prefix.startswith(p) for p in RESERVED_METRIC_PREFIXES):
        bad("prefix", f"{prefix!r} is in a namespace of the exporter's own metrics")
    else:
        values["prefix"] = prefix

    for key, high in (("max_series", None), ("max_payload_bytes", None), ("max_depth", 64)):
        if key not in raw:
            continue
        value = raw[key]
        if type(value) is not int:
            bad(key, f"expected integer, got {_type_name(value)}")
        elif value < 1 or (high is not None and value > high):
            bad(key, f"must be 1..{high}, got {value}" if high else f"must be >= 1, got {value}")
        else:
            values[key] = value

    expire = raw.get("expire_after", 600)
    if not _is_number(expire) or expire <= 0:
        bad("expire_after", f"expected a number of seconds > 0, got {expire!r}"
            if _is_number(expire) else f"expected number, got {_type_name(expire)}")
    else:
        values["expire_after"] = float(expire)

    topic_label = raw.get("topic_label", True)
    if not isinstance(topic_label, bool):
        bad("topic_label", f"expected boolean, got {_type_name(topic_label)}")
    else:
        values["topic_label"] = topic_label

    ignore = raw.get("ignore", [])
    if not isinstance(ignore, list):
        bad("ignore", f"expected list, got {_type_name(ignore)}")
    else:
        for i, f in enumerate(ignore, 1):
            if not isinstance(f, str):
                bad("ignore", f"filter #{i}: expected string, got {_type_name(f)}")
            elif problem := _topic_filter_problem(f):
                bad("ignore", f"invalid topic filter {f!r}: {problem}")
        values["ignore"] = tuple(ignore)

    states = raw.get("states", {})
    if not isinstance(states, dict):
        bad("states", f"expected mapping of string to number, got {_type_name(states)}")
    else:
        pairs = []
        for k, v in states.items():
            # YAML reads unquoted ON/off/yes as booleans: accept them as their spelling.
            text = {True: "true", False: "false"}.get(k, k) if isinstance(k, bool) else k
            if not isinstance(text, str) or not text.strip():
                bad("states", f"state {k!r}: expected a non-empty string key")
            elif not _is_number(v) or isinstance(v, bool):
                bad("states", f"state {text!r}: expected a finite number, got {_type_name(v)}")
            else:
                pairs.append((text.strip().lower(), float(v)))
        values["states"] = tuple(pairs)

    patterns = raw.get("topic_labels", [])
    if not isinstance(patterns, list):
        bad("topic_labels", f"expected list, got {_type_name(patterns)}")
    else:
        for i, pattern in enumerate(patterns, 1):
            if not isinstance(pattern, str) or not pattern:
                bad("topic_labels", f"pattern #{i}: expected a non-empty string")
                continue
            levels = pattern.split("/")
            names = [lv[1:] for lv in levels if lv.startswith("+") and len(lv) > 1]
            plain = "/".join("+" if lv.startswith("+") else lv for lv in levels)
            if problem := _topic_filter_problem(plain):
                bad("topic_labels", f"invalid pattern {pattern!r}: {problem}")
            elif not names:
                bad("topic_labels", f"pattern {pattern!r} captures nothing; write a level "
                    "as +name to make it the label 'name'")
            for label in names:
                if not LABEL_NAME_RE.fullmatch(label) or label.startswith("__"):
                    bad("topic_labels", f"pattern {pattern!r}: invalid label name {label!r}")
                elif label in RESERVED_LABELS:
                    bad("topic_labels", f"pattern {pattern!r}: label name {label!r} is reserved")
            if len(set(names)) != len(names):
                bad("topic_labels", f"pattern {pattern!r}: a label name is used twice")
        values["topic_labels"] = tuple(patterns)

    mappings = raw.get("mappings", [])
    if not isinstance(mappings, list):
        bad("mappings", f"expected list, got {_type_name(mappings)}")
    else:
        parsed = [_parse_mapping(m, f"bridge.mappings[{i}]", fail)
                  for i, m in enumerate(mappings, 1)]
        if any(m is None for m in parsed):
            ok = False
        values["mappings"] = tuple(m for m in parsed if m is not None)

    return BridgeConfig(**values) if ok else None


def _load_sites(
    path: str,
    lookup: Callable[[str], str | None],
    default_keepalive: int,
    errors: list[str],
) -> tuple[SiteConfig, ...]:
    def fail(message: str) -> tuple[SiteConfig, ...]:
        errors.append(f"{path}: {message}")
        return ()

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return fail("file not found")
    except UnicodeDecodeError:
        return fail("cannot read file: not valid UTF-8")
    except OSError as exc:
        return fail(f"cannot read file: {exc.strerror or type(exc).__name__}")
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        return fail(_yaml_problem(exc))

    if not isinstance(document, dict):
        return fail(f"top level must be a mapping with a 'sites' list, got {_type_name(document)}")
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            errors.append(f"{path}: top-level key '{key}': {_unknown_key(key, TOP_LEVEL_KEYS)}")
    raw_sites = document.get("sites")
    if "sites" not in document:
        return fail("missing 'sites' list")
    if not isinstance(raw_sites, list):
        return fail(f"'sites' must be a list, got {_type_name(raw_sites)}")
    if not raw_sites:
        return fail("no sites configured")

    sites = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raw_sites, 1):
        site = _parse_site(raw, index, path, lookup, default_keepalive, errors)
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and SITE_NAME_RE.fullmatch(name):
            if name in first_index:
                errors.append(
                    f"{path}: site '{name}' (#{index}): key 'name': "
                    f"duplicate name; already used by site #{first_index[name]}"
                )
            first_index.setdefault(name, index)
        if site is not None:
            sites.append(site)
    return tuple(sites)


# --- public entry points -----------------------------------------------------------


def load_settings(environ: Mapping[str, str] | None = None, cwd: str | None = None) -> Settings:
    """Read and validate everything; raise ConfigError listing every problem.

    environ None means os.environ plus `<cwd>/.env` (the process environment wins);
    a given mapping is used as-is. A relative MQTT_SITES_FILE is resolved against cwd.
    """
    cwd = os.getcwd() if cwd is None else cwd
    errors: list[str] = []
    env = _SourceEnv(os.environ if environ is None else environ)
    if environ is None:
        try:
            env.read_env(os.path.join(cwd, ".env"), recurse=False)
        except (OSError, ValueError) as exc:  # ValueError: .env is a directory
            errors.append(f"environment: .env: cannot read: {getattr(exc, 'strerror', None) or exc}")
    values = _read_environment(env, errors)

    sites: tuple[SiteConfig, ...] = ()
    if values["sites_file"] is not None:
        values["sites_file"] = os.path.join(cwd, values["sites_file"])
        sites = _load_sites(values["sites_file"], env.lookup, values["keepalive"] or 60, errors)
    if errors:
        raise ConfigError(errors)
    listen_host, listen_port = values.pop("listen")
    return Settings(**values, listen_host=listen_host, listen_port=listen_port, sites=sites)


def summarize_site(site: SiteConfig, instance_id: str) -> str:
    """One line describing a site for `check-config`; never the password itself."""
    parts = [
        f"{site.name}: {site.broker} {'mqtts' if site.tls else 'mqtt'} {site.protocol}",
        f"client_id={site.client_id(instance_id)}",
        f"user={site.username or '-'}",
        f"password={site.password_source or '-'}",
        f"topics={','.join(site.topics)}",
        f"keepalive={site.keepalive}",
    ]
    if site.ca_file:
        parts.append(f"ca_file={site.ca_file}")
    if site.bridge is not None:
        parts.append(f"bridge=on(prefix={site.bridge.prefix or '-'},"
                     f"max_series={site.bridge.max_series})")
    parts.append("enabled" if site.enabled else "disabled")
    return " ".join(parts)
