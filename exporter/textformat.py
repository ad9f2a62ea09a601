"""Prometheus text format 0.0.4 spelling, identical to prometheus_client's ``generate_latest``.

Shared by the two renderers that write ``/metrics`` straight from state
(:func:`exporter.metrics.render_service_text`, :meth:`exporter.bridge.BridgeStore.render_text`).
"""
from __future__ import annotations

from prometheus_client.utils import floatToGoString


def escape_label_value(value: str) -> str:
    """Backslash, double quote and newline escaped."""
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_value(value) -> str:
    """floatToGoString's spelling, with a shortcut for the common small integers."""
    if type(value) is int and -10**15 < value < 1_000_000:
        return f"{value}.0"
    return floatToGoString(value)
