"""The bridge's constants: names it reserves, state strings it knows, error reasons it counts.

A leaf module (imports nothing of the exporter), so the configuration can validate a
``bridge:`` block against them without importing the bridge's machinery.
"""
from __future__ import annotations

#: State strings understood by default (matched case-insensitively, surrounding spaces ignored).
DEFAULT_STATES: dict[str, float] = {
    "on": 1, "off": 0, "true": 1, "false": 0, "yes": 1, "no": 0,
    "online": 1, "offline": 0, "open": 1, "closed": 0,
}
#: Families the exporter owns; bridged names never start with these (see names.bridged_name).
RESERVED_METRIC_PREFIXES = ("mqtt_site_", "mqtt_exporter_", "mqtt_bridge_", "mqtt_broker_", "process_",
                            "python_")
#: Label names a bridged series cannot take from a topic.
RESERVED_LABELS = ("site", "topic", "le", "quantile")
#: Suffixes promtool reserves for counters, histograms and summaries; a bridged gauge
#: ending with one gets ``_value`` appended.
RESERVED_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
#: Why a payload was dropped: every reason is exported from 0 per bridged site.
ERROR_REASONS = ("binary", "invalid_utf8", "invalid_json", "too_large", "too_deep",
                 "non_finite", "no_numeric_value")
