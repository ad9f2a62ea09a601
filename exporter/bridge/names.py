"""Metric and field names of bridged series: valid, snake_case, and never in the exporter's own
namespaces. Pure functions, computed once per series (when it is created), never per message."""
from __future__ import annotations

import re
from collections.abc import Iterable

from .constants import RESERVED_METRIC_PREFIXES, RESERVED_SUFFIXES

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_CAMEL1 = re.compile(r"([a-z0-9])([A-Z])")
_CAMEL2 = re.compile(r"([A-Z]+)([A-Z][a-z])")
_NON_FIELD = re.compile(r"[^a-z0-9]+")


def sanitize_metric_name(name: str) -> str:
    """Any string -> a valid Prometheus metric name (``[a-zA-Z_:][a-zA-Z0-9_:]*``).

    Invalid characters become ``_``; a leading digit (or an empty name) gets a ``_`` in
    front. Idempotent.
    """
    name = _INVALID_NAME_CHARS.sub("_", name)
    if not name or name[0].isdigit():
        name = "_" + name
    return name


def field_name(parts: Iterable[object]) -> str:
    """A JSON path (or a topic level) -> a snake_case field: ``("battery", "levelPct")`` ->
    ``battery_level_pct``. Lowercase ``[a-z0-9_]``, no leading, trailing or double ``_``;
    ``value`` when nothing is left. Idempotent on its own output."""
    out = []
    for part in parts:
        text = str(part)
        text = _CAMEL2.sub(r"\1_\2", _CAMEL1.sub(r"\1_\2", text)).lower()
        text = _NON_FIELD.sub("_", text).strip("_")
        if text:
            out.append(text)
    return "_".join(out) or "value"


def bridged_name(prefix: str, field: str, kind: str = "gauge") -> str:
    """The metric (family) name of a bridged field: ``prefix + field``, made valid and safe.

    - a name that would start with one of the exporter's own namespaces
      (:data:`RESERVED_METRIC_PREFIXES`, e.g. ``mqtt_`` + ``site_up``) becomes
      ``<prefix>field_<field>`` (``mqtt_field_site_up``): a collision with ``mqtt_site_*``,
      ``mqtt_exporter_*``, ``mqtt_bridge_*`` or ``process_*`` is impossible;
    - a gauge ending in ``_total``/``_count``/``_sum``/``_bucket`` gets ``_value`` appended;
    - a counter's family name has no ``_total`` (the sample gets it).
    """
    name = sanitize_metric_name(prefix + field)
    if name.startswith(RESERVED_METRIC_PREFIXES):
        name = sanitize_metric_name(f"{prefix}field_{field}")
    if kind == "counter":
        if name.endswith("_total"):
            name = name[:-6]
    elif name.endswith(RESERVED_SUFFIXES):
        name += "_value"
    return name
