"""The sites file: YAML read strictly (duplicate keys rejected), each site checked against
:data:`SITE_TABLE`.

Every problem names the file, the site (by name when it has a valid one, always by its
position) and the key. Passwords come only from an environment variable or a file, are wrapped
in :class:`Secret`, and never appear in a message: YAML errors are reported by position and
problem only, never with the offending line.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from .bridge import BridgeConfig, parse_bridge
from .checks import (
    ANY,
    BOOLEAN,
    INTEGER,
    INVALID,
    LIST,
    STRING,
    TOPIC_FILTER_PATTERN,
    Check,
    Field,
    Problems,
    Table,
    report_unknown_keys,
    topic_filters,
    type_name,
)

#: Looks up an environment variable: its value, or None when unset.
Lookup = Callable[[str], str | None]

PROTOCOLS = ("3.1.1", "5")
SITE_NAME_PATTERN = r"[A-Za-z0-9_-]+"
SITE_NAME_RE = re.compile(SITE_NAME_PATTERN)
LITERAL_PASSWORD = "literal passwords are not allowed; use password_env or password_file"


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
    """One site of the sites file, validated; ``password`` prints as '***'."""

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

    @property
    def presence_topic(self) -> str:
        """Where each process using this site's client ID keeps its retained presence record."""
        return f"{self.name}/backend/instance"


def is_ipv6(host: str) -> bool:
    """True for an IPv6 address without brackets."""
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


# --- steps: the checks a kind, range or pattern cannot say ----------------------------


def _host(host: str, check: Check) -> Any:
    if any(c.isspace() for c in host) or (":" in host and not is_ipv6(host)):
        return check.fail(f"invalid host {host!r}: a host name or IP address (IPv6 without brackets)")
    return host


def _protocol_shown(value: Any) -> str:
    return repr(value) if isinstance(value, (str, float)) else type_name(value)


def _password_from_env(var: str, check: Check) -> Any:
    lookup: Lookup = check.context["lookup"]
    value = lookup(var)
    if not value:
        return check.fail(f"environment variable {var} is {'empty' if value == '' else 'not set'}")
    return (Secret(value), f"env:{var}")


def read_secret_file(path: str) -> tuple[str | None, str | None]:
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


def _password_from_file(path: str, check: Check) -> Any:
    value, problem = read_secret_file(path)
    if problem or value is None:
        return check.fail(problem or "")
    return (Secret(value), f"file:{path}")


def _ca_file(ca_file: str, check: Check) -> Any:
    if check.values.get("tls") is not True:
        return check.fail("only allowed with tls: true")
    try:  # what paho's tls_set does at start: check-config catches a bad bundle
        ssl.create_default_context().load_verify_locations(cafile=ca_file)
    except ssl.SSLError:
        return check.fail(f"{ca_file!r} holds no valid PEM certificate")
    except OSError as exc:
        return check.fail(f"cannot read {ca_file!r}: {exc.strerror or type(exc).__name__}")
    return ca_file


def _bridge(raw: Any, check: Check) -> Any:
    first = len(check.problems)
    bridge = parse_bridge(raw, check.problems)
    return INVALID if len(check.problems) > first else bridge


# --- the declaration ------------------------------------------------------------------

#: The keys of a site, in the order they are checked (port's default depends on tls).
SITE_TABLE = Table("site", (
    Field("name", STRING, "Unique in the file; letters, digits, '_' and '-'. Used in metric "
          "labels, the client ID (<name>_i<MQTT_INSTANCE_ID>) and the status topic "
          "<name>/backend/status.", required=True, non_empty=True, pattern=SITE_NAME_PATTERN,
          pattern_message="invalid name {value!r}: use only letters, digits, '_' and '-'"),
    Field("host", STRING, "Broker host name or IP address (IPv6 without brackets).",
          required=True, non_empty=True, steps=(_host,), schema={"pattern": r"^\S+$"}),
    Field("tls", BOOLEAN, "Connect with TLS (changes the default port to 8883).", default=False),
    Field("port", INTEGER, "Broker port.", default=lambda c: 8883 if c.values.get("tls") else 1883,
          default_doc="1883, or 8883 with tls: true", minimum=1, maximum=65535),
    Field("enabled", BOOLEAN, "false keeps the site in the file but opens no connection.",
          default=True),
    Field("protocol", ANY, 'MQTT version: "3.1.1" or "5" (quote 3.1.1: it is not a YAML number).',
          default="3.1.1", coerce=lambda v: str(v) if type(v) is int else v, choices=PROTOCOLS,
          show=_protocol_shown, doc_type="string", schema={"enum": [*PROTOCOLS, 5]}),
    Field("username", STRING, "User name for the broker.", non_empty=True),
    Field("password_env", STRING, "Name of the environment variable that holds the password.",
          non_empty=True, yields_to=("password_file",), steps=(_password_from_env,)),
    Field("password_file", STRING, "Path of a file whose content is the password (one trailing "
          "newline is ignored). Not together with password_env.", non_empty=True,
          excludes=("password_env",), steps=(_password_from_file,)),
    Field("topics", LIST, "Topic filters to subscribe to.", doc_type="list of topic filters",
          default=lambda c: (f"{c.values['name']}/#",), default_doc='["<name>/#"]', non_empty=True,
          empty_message="empty list; omit the key to subscribe to '<name>/#'",
          items=Field("filter", STRING, "A topic filter.", steps=(topic_filters,),
                      schema={"pattern": TOPIC_FILTER_PATTERN, "minLength": 1}),
          convert=tuple),
    Field("keepalive", INTEGER, "Keepalive in seconds for this site.",
          default=lambda c: c.context["keepalive"], default_doc="MQTT_KEEP_ALIVE",
          minimum=5, maximum=65535),
    Field("ca_file", STRING, "CA bundle (PEM) to verify the broker's certificate; only with "
          "tls: true.", non_empty=True, steps=(_ca_file,)),
    Field("bridge", ANY, "Turn payloads into metrics: true for the defaults, or a mapping of "
          "bridge keys (see below).", default=None, default_doc="off", steps=(_bridge,),
          doc_type="boolean or mapping"),
), forbidden={"password": LITERAL_PASSWORD}, schema={
    "not": {"required": ["password_env", "password_file"]},
    "if": {"required": ["ca_file"]},
    "then": {"required": ["tls"], "properties": {"tls": {"const": True}}},
})

#: The top level of the file: one key.
TOP_LEVEL_KEYS = ("sites",)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
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


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what; never str(exc): it quotes the offending line, which may hold a secret."""
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "parse error"
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def parse_site(
    raw: Any, index: int, path: str, lookup: Lookup, default_keepalive: int, errors: list[str]
) -> SiteConfig | None:
    """One entry of ``sites:``; None (problems in ``errors``) when it is not valid."""
    name = raw.get("name") if isinstance(raw, dict) else None
    named = isinstance(name, str) and SITE_NAME_RE.fullmatch(name) is not None
    problems = Problems(errors, f"{path}: site '{name}' (#{index})" if named else f"{path}: site #{index}")
    if not isinstance(raw, dict):
        problems.at(f"must be a mapping, got {type_name(raw)}")
        return None
    first = len(problems)
    values = SITE_TABLE.read(raw, problems, {"lookup": lookup, "keepalive": default_keepalive})
    if len(problems) > first:
        return None
    from_env, from_file = values.pop("password_env"), values.pop("password_file")
    password, password_source = from_env or from_file or (None, None)
    return SiteConfig(**values, password=password, password_source=password_source)


def load_sites(
    path: str, lookup: Lookup, default_keepalive: int, errors: list[str]
) -> tuple[SiteConfig, ...]:
    """Every valid site of the file at ``path``; every problem goes to ``errors``."""
    problems = Problems(errors, path, word="top-level key")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        problems.at("file not found")
        return ()
    except UnicodeDecodeError:
        problems.at("cannot read file: not valid UTF-8")
        return ()
    except OSError as exc:
        problems.at(f"cannot read file: {exc.strerror or type(exc).__name__}")
        return ()
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        problems.at(yaml_problem(exc))
        return ()

    if not isinstance(document, dict):
        problems.at(f"top level must be a mapping with a 'sites' list, got {type_name(document)}")
        return ()
    report_unknown_keys(document, TOP_LEVEL_KEYS, problems)
    raw_sites = document.get("sites")
    if "sites" not in document:
        problems.at("missing 'sites' list")
    elif not isinstance(raw_sites, list):
        problems.at(f"'sites' must be a list, got {type_name(raw_sites)}")
    elif not raw_sites:
        problems.at("no sites configured")
    else:
        return _parse_sites(raw_sites, path, lookup, default_keepalive, errors)
    return ()


def _parse_sites(
    raw_sites: list[Any], path: str, lookup: Lookup, default_keepalive: int, errors: list[str]
) -> tuple[SiteConfig, ...]:
    sites = []
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raw_sites, 1):
        site = parse_site(raw, index, path, lookup, default_keepalive, errors)
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and SITE_NAME_RE.fullmatch(name):
            if name in first_index:
                Problems(errors, f"{path}: site '{name}' (#{index})").key(
                    "name", f"duplicate name; already used by site #{first_index[name]}")
            first_index.setdefault(name, index)
        if site is not None:
            sites.append(site)
    return tuple(sites)
