"""The sites file: YAML read strictly (duplicate keys rejected), each site checked against
:data:`SITE_TABLE`.

Every problem names the file, the site (by name when it has a valid one, always by its
position) and the key. Passwords come only from an environment variable or a file, are wrapped
in :class:`Secret`, and never appear in a message: YAML errors are reported by position and
problem only, never with the offending line.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

import yaml

from ..gcpause import collector_paused
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
from .tls import (
    CA_FILE_DEPRECATED,
    INSECURE_WARNING,
    TlsConfig,
    site_ca_file_step,
    tls_step,
)

#: Looks up an environment variable: its value, or None when unset.
Lookup = Callable[[str], str | None]

PROTOCOLS = ("3.1.1", "5")
SITE_NAME_PATTERN = r"[A-Za-z0-9_-]+"
SITE_NAME_RE = re.compile(SITE_NAME_PATTERN)
LITERAL_PASSWORD = "literal passwords are not allowed; use password_env or password_file"

# --- limits: every input is bounded before anything connects ---------------------------
#
# MQTT client identifiers and topic names are UTF-8 strings of at most 65535 bytes (MQTT
# 3.1.1 1.5.3, 5.0 1.5.4). A site name becomes the client ID <name>_i<MQTT_INSTANCE_ID> and
# the topics <name>/backend/status and <name>/backend/instance (17 bytes added) and the
# default filter <name>/#. With at most 256 bytes of name and 128 of instance ID, the
# longest client ID is 386 bytes and the longest topic 273: valid with a margin of more
# than 65000 bytes, and still short enough for metric labels and log lines.

#: Site names: [A-Za-z0-9_-] only, so characters are bytes.
SITE_NAME_MAX_BYTES = 256
#: MQTT_INSTANCE_ID, in UTF-8 bytes.
INSTANCE_ID_MAX_BYTES = 128
#: A host name (without a trailing dot), as DNS allows; each label at most 63.
HOST_NAME_MAX_CHARS = 253
#: The sites file is read only up to this size (and must be a regular file).
SITES_FILE_MAX_BYTES = 16 * 1024 * 1024
#: Collections (mappings, lists) nested deeper than this are refused while parsing.
YAML_MAX_DEPTH = 64
#: The longest client ID and topic the limits allow (checked by the tests).
CLIENT_ID_MAX_BYTES = SITE_NAME_MAX_BYTES + len("_i") + INSTANCE_ID_MAX_BYTES
TOPIC_MAX_BYTES = SITE_NAME_MAX_BYTES + len("/backend/instance")

#: The limits as docs/configuration.md explains them (rendered by docs.py).
LIMITS_DOC = (
    "Every input is bounded, and a value over a limit is a configuration error (exit 2)",
    "reported before anything connects:",
    "",
    f"- **Sites file**: a regular file (not a directory, FIFO or device) of at most "
    f"{SITES_FILE_MAX_BYTES // (1024 * 1024)} MiB,",
    f"  UTF-8, with mappings and lists nested at most {YAML_MAX_DEPTH} deep.",
    f"- **Site name**: at most {SITE_NAME_MAX_BYTES} characters. MQTT client IDs and topic "
    "names are UTF-8",
    "  strings of at most 65535 bytes; the name becomes the client ID "
    "`<name>_i<MQTT_INSTANCE_ID>`",
    "  and the topics `<name>/backend/status` and `<name>/backend/instance`. With "
    "`MQTT_INSTANCE_ID`",
    f"  at most {INSTANCE_ID_MAX_BYTES} bytes, a client ID has at most {CLIENT_ID_MAX_BYTES} "
    f"bytes and a topic at most {TOPIC_MAX_BYTES}:",
    "  far inside the protocol's limit, and short enough for labels and log lines.",
    "- **Client ID length**: MQTT 3.1.1 only guarantees 1-23 bytes of `[0-9a-zA-Z]`. Every",
    "  client ID the exporter builds contains `_`, so it already relies on the broker",
    "  accepting more than that guaranteed minimum; longer IDs are therefore neither warned",
    f"  about nor rejected. Mosquitto accepts them (tested with the {CLIENT_ID_MAX_BYTES}-byte "
    "maximum); a broker",
    "  with a lower cap refuses the CONNECT (identifier rejected): the site reports `refused`.",
    f"- **Host**: no whitespace or control characters; an IP address, or a host name of at "
    f"most {HOST_NAME_MAX_CHARS}",
    "  characters whose dot-separated labels are 1-63 characters each (what the resolver",
    "  accepts).",
)


def valid_site_name(name: Any) -> TypeGuard[str]:
    """A name that may appear in messages: the allowed characters, within the length limit."""
    return (isinstance(name, str) and len(name) <= SITE_NAME_MAX_BYTES
            and SITE_NAME_RE.fullmatch(name) is not None)


def shown(value: str, limit: int = 64) -> str:
    """repr() of a value for a message, cut to ``limit`` characters (control characters escaped)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def instance_id_problem(value: str) -> str | None:
    """What is wrong with an MQTT_INSTANCE_ID, or None."""
    if not value:
        return "must not be empty"
    if any(c.isspace() or not c.isprintable() for c in value):
        return f"invalid value {shown(value)}: no whitespace or control characters"
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > INSTANCE_ID_MAX_BYTES:
        return (f"{size} bytes long; at most {INSTANCE_ID_MAX_BYTES} (it is part of every "
                "client ID <site>_i<ID>)")
    return None


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
    tls: TlsConfig | None = None  # None: plain MQTT
    bridge: BridgeConfig | None = None
    #: Not errors, but worth a line: check-config prints them, the service logs them at start.
    warnings: tuple[str, ...] = ()

    @property
    def ca_file(self) -> str | None:
        """The CA bundle the broker is verified with (None: the system CAs)."""
        return self.tls.ca_file if self.tls is not None else None

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


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be a broker host (no echo of the value), or None."""
    if any(c.isspace() or not c.isprintable() for c in host):
        return "no whitespace or control characters"
    if ":" in host:
        return None if is_ipv6(host) else "a host name or IP address (IPv6 without brackets)"
    name = host.removesuffix(".")
    if len(name) > HOST_NAME_MAX_CHARS:
        return f"a host name has at most {HOST_NAME_MAX_CHARS} characters, got {len(name)}"
    try:  # what the resolver does with it at connect time
        name.encode("idna")
    except UnicodeError:
        return "not a valid host name: each dot-separated label must have 1-63 characters"
    return None


def _host(host: str, check: Check) -> Any:
    if problem := host_problem(host):
        return check.fail(f"invalid host {shown(host)}: {problem}")
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


def _bridge(raw: Any, check: Check) -> Any:
    first = len(check.problems)
    bridge = parse_bridge(raw, check.problems)
    return INVALID if len(check.problems) > first else bridge


# --- the declaration ------------------------------------------------------------------

#: The keys of a site, in the order they are checked (port's default depends on tls).
SITE_TABLE = Table("site", (
    Field("name", STRING, "Unique in the file; letters, digits, '_' and '-'. Used in metric "
          "labels, the client ID (<name>_i<MQTT_INSTANCE_ID>) and the status topic "
          "<name>/backend/status. At most 256 characters.", required=True, non_empty=True,
          pattern=SITE_NAME_PATTERN, max_length=SITE_NAME_MAX_BYTES,
          length_message="{length} characters long; at most {max_length} (the name is part of "
          "the client ID and of topic names)", schema={"maxLength": SITE_NAME_MAX_BYTES},
          pattern_message="invalid name {value!r}: use only letters, digits, '_' and '-'"),
    Field("host", STRING, "Broker host name (at most 253 characters) or IP address (IPv6 "
          "without brackets); no whitespace or control characters.",
          required=True, non_empty=True, steps=(_host,),
          schema={"pattern": r"^[^\s\x00-\x1f\x7f]+$"}),
    Field("tls", ANY, "true: TLS, verified with the system CAs; a mapping: TLS with the TLS "
          "keys (ca_file, cert_file, key_file, server_name, insecure_skip_verify); false: plain "
          "MQTT. TLS changes the default port to 8883.",
          default=None, default_doc="false", doc_type="boolean or mapping", steps=(tls_step,)),
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
    Field("ca_file", STRING, "Deprecated alias of tls.ca_file (works with tls: true; "
          "check-config warns).", non_empty=True, steps=(site_ca_file_step,)),
    Field("bridge", ANY, "Turn payloads into metrics: true for the defaults, or a mapping of "
          "bridge keys (see below).", default=None, default_doc="off", steps=(_bridge,),
          doc_type="boolean or mapping"),
), forbidden={"password": LITERAL_PASSWORD}, schema={
    "not": {"required": ["password_env", "password_file"]},
    "if": {"required": ["ca_file"]},
    "then": {"required": ["tls"], "properties": {"tls": {"not": {"const": False}}}},
})

#: The top level of the file: one key.
TOP_LEVEL_KEYS = ("sites",)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one, refuses
    collections nested deeper than YAML_MAX_DEPTH while composing (PyYAML's composer recurses:
    a 10 000-deep document would end in RecursionError), and turns a scalar Python cannot
    convert (an int of more than 4300 digits, 2026-13-45) into a YAML error with a position."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        nests = self.check_event(yaml.MappingStartEvent, yaml.SequenceStartEvent)
        if nests and self._depth >= YAML_MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"mappings and lists nested deeper than {YAML_MAX_DEPTH} levels",
                self.peek_event().start_mark)  # type: ignore[no-untyped-call]
        self._depth += nests
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= nests

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # never str(exc): it may quote the value
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot convert this {kind} value ({type(exc).__name__})",
                node.start_mark) from None

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
                    None, None, f"duplicate key {shown(key) if isinstance(key, str) else repr(key)}",
                    key_node.start_mark
                )
        return super().construct_mapping(node, deep)


#: libyaml's parser (optional in PyYAML), or None.
_CParser: Any = getattr(getattr(yaml, "_yaml", None), "CParser", None)


class _FastStrictLoader(*((_CParser,) if _CParser else ()), _StrictLoader):  # type: ignore[misc]
    """:class:`_StrictLoader` on libyaml's parser (C events; 3x faster at 10 000 sites) with
    the same composer (depth limit), constructor (duplicate keys, conversions) and resolver.

    Trusted only with documents it accepts: on any YAML error :func:`load_yaml` parses again
    with :class:`_StrictLoader`, whose messages (and verdict) are the reference.
    """

    def __init__(self, stream: str) -> None:
        _CParser.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0

    # The Python composer on C events (CParser's own composer would skip the depth limit).
    get_single_node = yaml.composer.Composer.get_single_node
    compose_document = yaml.composer.Composer.compose_document
    check_node = yaml.composer.Composer.check_node
    get_node = yaml.composer.Composer.get_node


#: Text that libyaml and PyYAML read alike (no difference in 400 000 random documents and
#: mutated sites files): printable ASCII and newlines, without tabs, tags, block scalars,
#: anchors, aliases, complex keys, directives, backslashes. They differ on some of those
#: (libyaml accepts "a:\tb", "|#" and "!", PyYAML does not); such files take the reference
#: loader.
_LIBYAML_SAFE = re.compile(r"[\n a-zA-Z0-9\"#$'()+,\-./:;=\[\]^_{}~]*")


def load_yaml(text: str) -> Any:
    """The document in ``text``, read strictly (:class:`_StrictLoader`'s rules and errors)."""
    if _CParser is not None and _LIBYAML_SAFE.fullmatch(text):
        try:
            return yaml.load(text, Loader=_FastStrictLoader)  # a SafeLoader's constructor
        except yaml.YAMLError:
            pass  # the reference loader says what is wrong, in its own words
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader


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
    named = valid_site_name(name)
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
    warnings = []
    if (ca_file := values.pop("ca_file")) is not None:  # the deprecated alias of tls.ca_file
        values["tls"] = replace(values["tls"], ca_file=ca_file)
        warnings.append(f"{problems.where}: key 'ca_file': {CA_FILE_DEPRECATED}")
    if values["tls"] is not None and values["tls"].insecure_skip_verify:
        warnings.append(f"{problems.where}: key 'tls.insecure_skip_verify': {INSECURE_WARNING}")
    return SiteConfig(**values, password=password, password_source=password_source,
                      warnings=tuple(warnings))


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def read_sites_text(path: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, problem): a regular file of at most SITES_FILE_MAX_BYTES, UTF-8.

    Opened non-blocking (a FIFO would block open()) and checked with fstat before any read;
    at most the limit plus one byte is ever read (/dev/zero never ends).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, "file not found"
    except OSError as exc:
        return None, f"cannot read file: {exc.strerror or type(exc).__name__}"
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            return None, f"not a regular file ({kind})"
        chunks, size = [], 0
        while size <= SITES_FILE_MAX_BYTES:
            chunk = os.read(fd, min(1 << 20, SITES_FILE_MAX_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            return None, "not a regular file (a directory)"
        return None, f"cannot read file: {exc.strerror or type(exc).__name__}"
    finally:
        os.close(fd)
    if size > SITES_FILE_MAX_BYTES:
        return None, (f"larger than {SITES_FILE_MAX_BYTES} bytes "
                      f"({SITES_FILE_MAX_BYTES // (1024 * 1024)} MiB), the limit of a sites file")
    try:
        return b"".join(chunks).decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "cannot read file: not valid UTF-8"


def load_sites(
    path: str, lookup: Lookup, default_keepalive: int, errors: list[str]
) -> tuple[SiteConfig, ...]:
    """Every valid site of the file at ``path``; every problem goes to ``errors``."""
    text, problem = read_sites_text(path)
    if text is None:
        Problems(errors, path, word="top-level key").at(problem or "cannot read file")
        return ()
    return parse_sites_text(text, path, lookup, default_keepalive, errors)


@collector_paused  # the document's nodes and sites are many objects that live on
def parse_sites_text(
    text: str, path: str, lookup: Lookup, default_keepalive: int, errors: list[str]
) -> tuple[SiteConfig, ...]:
    """Every valid site of a sites document (YAML, or JSON, its subset) read from ``path``
    (a file name or URL, as problems name it); every problem goes to ``errors``."""
    problems = Problems(errors, path, word="top-level key")
    try:
        document = load_yaml(text)
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
        if valid_site_name(name):
            if name in first_index:
                Problems(errors, f"{path}: site '{name}' (#{index})").key(
                    "name", f"duplicate name; already used by site #{first_index[name]}")
            first_index.setdefault(name, index)
        if site is not None:
            sites.append(site)
    return tuple(sites)
