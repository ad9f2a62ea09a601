"""A site's ``bridge:`` block (MQTT payloads -> metrics): its keys and their checks.

``bridge: true`` turns the bridge on with the defaults, ``false`` (or no key) leaves it off,
a mapping sets options (:data:`BRIDGE_TABLE`), and ``mappings:`` lists explicit mappings
(:data:`MAPPING_TABLE`). The defaults are the dataclasses' own. The names the bridge reserves
come from ``exporter.bridge.constants`` (a leaf module: no import of the bridge machinery).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..bridge.constants import RESERVED_LABELS, RESERVED_METRIC_PREFIXES, RESERVED_SUFFIXES
from .checks import (
    ANY,
    BOOLEAN,
    INTEGER,
    INVALID,
    LIST,
    MAPPING,
    NUMBER,
    STRING,
    TOPIC_FILTER_PATTERN,
    Check,
    Field,
    Kind,
    Problems,
    Table,
    is_number,
    topic_filter_problem,
    topic_filters,
    type_name,
)

LABEL_NAME_PATTERN = r"[a-zA-Z_][a-zA-Z0-9_]*"
_RESERVED_PREFIX_PATTERN = "^(?:" + "|".join(RESERVED_METRIC_PREFIXES) + ")"


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


_DEFAULT = BridgeConfig()
_DEFAULT_MAPPING = BridgeMapping(topic="")


# --- steps: the checks a kind, range or pattern cannot say ----------------------------


def _prefix_not_reserved(prefix: str, check: Check) -> Any:
    if prefix.startswith(RESERVED_METRIC_PREFIXES):
        return check.fail(f"{prefix!r} is in a namespace of the exporter's own metrics")
    return prefix


def _path_elements(path: str, check: Check) -> Any:
    parts = tuple(path.split(".")) if path else ()
    if any(not p for p in parts):
        return check.fail(f"invalid path {path!r}: empty element (use a.b.c)")
    return parts


def _metric_not_reserved(metric: str, check: Check) -> Any:
    if metric.startswith(RESERVED_METRIC_PREFIXES):
        return check.fail(f"{metric!r} is in a namespace of the exporter's own metrics "
                          f"({', '.join(p + '*' for p in RESERVED_METRIC_PREFIXES)})")
    if check.values.get("type") == "gauge" and metric.endswith(RESERVED_SUFFIXES):
        return check.fail(f"a gauge must not end in _total, _count, _sum or _bucket: {metric!r}")
    return metric


def _states(states: dict[Any, Any], check: Check) -> Any:
    pairs = []
    for k, v in states.items():
        # YAML reads unquoted ON/off/yes as booleans: accept them as their spelling.
        text = {True: "true", False: "false"}.get(k, k) if isinstance(k, bool) else k
        if not isinstance(text, str) or not text.strip():
            check.fail(f"state {k!r}: expected a non-empty string key")
        elif not is_number(v) or isinstance(v, bool):
            check.fail(f"state {text!r}: expected a finite number, got {type_name(v)}")
        else:
            pairs.append((text.strip().lower(), float(v)))
    return tuple(pairs) if len(pairs) == len(states) else INVALID


def _topic_label_pattern(pattern: str, check: Check) -> Any:
    levels = pattern.split("/")
    names = [lv[1:] for lv in levels if lv.startswith("+") and len(lv) > 1]
    plain = "/".join("+" if lv.startswith("+") else lv for lv in levels)
    problems = len(check.problems)
    if problem := topic_filter_problem(plain):
        check.fail(f"invalid pattern {pattern!r}: {problem}")
    elif not names:
        check.fail(f"pattern {pattern!r} captures nothing; write a level "
                   "as +name to make it the label 'name'")
    for label in names:
        if not re.fullmatch(LABEL_NAME_PATTERN, label) or label.startswith("__"):
            check.fail(f"pattern {pattern!r}: invalid label name {label!r}")
        elif label in RESERVED_LABELS:
            check.fail(f"pattern {pattern!r}: label name {label!r} is reserved")
    if len(set(names)) != len(names):
        check.fail(f"pattern {pattern!r}: a label name is used twice")
    return INVALID if len(check.problems) > problems else pattern


def _mappings(mappings: list[Any], check: Check) -> Any:
    problems = len(check.problems)
    parsed = [parse_mapping(m, f"mappings[{i}]", check.problems) for i, m in enumerate(mappings, 1)]
    return INVALID if len(check.problems) > problems else tuple(parsed)


# --- the declarations -----------------------------------------------------------------

MAPPING_TABLE = Table("bridge mapping", (
    Field("topic", STRING, "Topic filter whose payloads this mapping reads.", required=True,
          required_message="required topic filter", null_is_absent=True, steps=(topic_filters,),
          schema={"pattern": TOPIC_FILTER_PATTERN, "minLength": 1}),
    Field("path", STRING, "Dotted path of the value inside a JSON payload (a.b.c); empty or "
          "absent: the whole (scalar) payload.", default=_DEFAULT_MAPPING.path,
          default_doc='"" (whole payload)', steps=(_path_elements,),
          schema={"pattern": r"^(?:[^.]+(?:\.[^.]+)*)?$"}),
    Field("type", ANY, "Metric type.", default=_DEFAULT_MAPPING.type, choices=("gauge", "counter"),
          doc_type="string"),
    Field("metric", STRING, "Metric name (used as is: no prefix). Not in the exporter's own "
          "namespaces; a gauge must not end in _total, _count, _sum or _bucket.", required=True,
          null_is_absent=True, pattern=LABEL_NAME_PATTERN,
          pattern_message="invalid metric name {value!r}: use [a-zA-Z_][a-zA-Z0-9_]*",
          steps=(_metric_not_reserved,), schema={"not": {"pattern": _RESERVED_PREFIX_PATTERN}}),
    Field("scale", NUMBER, "Factor applied to the value (e.g. 3600000 for kWh -> J).",
          default=_DEFAULT_MAPPING.scale, expected="a finite number", convert=float),
    Field("help", STRING, "HELP text of the metric.", default=_DEFAULT_MAPPING.help,
          null_is_absent=True, default_doc="-"),
), schema={
    # a gauge (the default type) must not take a counter/histogram/summary suffix
    "if": {"not": {"required": ["type"], "properties": {"type": {"const": "counter"}}}},
    "then": {"properties": {"metric": {"not": {"pattern": "(?:" + "|".join(RESERVED_SUFFIXES) + ")$"}}}},
})

_FILTER = Field("filter", STRING, "A topic filter.", steps=(topic_filters,))
_PATTERN = Field("pattern", Kind("a non-empty string", lambda v: isinstance(v, str) and bool(v),
                                 {"type": "string", "minLength": 1}),
                 "A topic pattern.", type_message="expected {expected}",
                 steps=(_topic_label_pattern,))

BRIDGE_TABLE = Table("bridge", (
    Field("prefix", STRING, "Prefix of every bridged metric name (prefix + field name); may be "
          "empty, not in the exporter's own namespaces.", default=_DEFAULT.prefix,
          pattern=r"(?:[a-z_][a-z0-9_]*)?",
          pattern_message="invalid prefix {value!r}: use lowercase [a-z_][a-z0-9_]*",
          steps=(_prefix_not_reserved,), schema={"not": {"pattern": _RESERVED_PREFIX_PATTERN}}),
    Field("max_series", INTEGER, "This site's series cap: new series over it are dropped and "
          "counted (MQTT_BRIDGE_MAX_SERIES caps all sites together).",
          default=_DEFAULT.max_series, minimum=1),
    Field("max_payload_bytes", INTEGER, "Longer payloads are dropped (reason too_large).",
          default=_DEFAULT.max_payload_bytes, minimum=1),
    Field("max_depth", INTEGER, "JSON nested deeper is dropped whole (reason too_deep).",
          default=_DEFAULT.max_depth, minimum=1, maximum=64),
    Field("expire_after", NUMBER, "Seconds without an update before a series disappears.",
          default=_DEFAULT.expire_after, default_doc=f"{_DEFAULT.expire_after:g}", minimum=0,
          exclusive_minimum=True, range_message="expected a number of seconds > 0, got {value!r}",
          convert=float),
    Field("topic_label", BOOLEAN, "Add a topic=\"<topic>\" label to every bridged series.",
          default=_DEFAULT.topic_label),
    Field("ignore", LIST, "Topic filters whose messages are not bridged.", default=_DEFAULT.ignore,
          doc_type="list of topic filters",
          items=_FILTER, convert=tuple),
    Field("states", MAPPING, "Extra state strings and their values, merged over the defaults "
          "(on/off, true/false, yes/no, online/offline, open/closed; case-insensitive).",
          default=_DEFAULT.states, default_doc="{}", expected="mapping of string to number",
          steps=(_states,), schema={"additionalProperties": {"type": "number"}}),
    Field("topic_labels", LIST, "Topic patterns; the first that matches names labels: a level "
          "written +name becomes the label 'name'.", default=_DEFAULT.topic_labels,
          doc_type="list of topic patterns",
          items=_PATTERN, convert=tuple),
    Field("mappings", LIST, "Explicit mappings: only the mapped values of their topics become "
          "metrics (see the mapping keys).", default=_DEFAULT.mappings, steps=(_mappings,),
          doc_type="list of mappings"),
))


def parse_mapping(raw: Any, key: str, problems: Problems) -> BridgeMapping | None:
    """One entry of ``mappings:``; problems go to ``problems`` under ``<key>.<sub>``."""
    if not isinstance(raw, dict):
        problems.key(key, f"expected mapping, got {type_name(raw)}")
        return None
    first = len(problems)
    values = MAPPING_TABLE.read(raw, problems.nested(f"{key}."))
    if len(problems) > first:
        return None
    return BridgeMapping(**values)


def parse_bridge(raw: Any, problems: Problems) -> BridgeConfig | None:
    """The ``bridge:`` block: ``true``, ``false``/``null`` or a mapping; None when off or invalid."""
    if raw is True:
        return BridgeConfig()
    if raw is False or raw is None:
        return None
    if not isinstance(raw, dict):
        problems.key("bridge", f"expected boolean or mapping, got {type_name(raw)}")
        return None
    first = len(problems)
    values = BRIDGE_TABLE.read(raw, problems.nested("bridge."))
    if len(problems) > first:
        return None
    return BridgeConfig(**values)
