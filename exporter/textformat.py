"""Prometheus text format 0.0.4 spelling, identical to prometheus_client's ``generate_latest``.

Shared by the two renderers that write ``/metrics`` straight from state
(:func:`exporter.metrics.render_service_text`, :meth:`exporter.bridge.BridgeStore.render_text`).
"""
from __future__ import annotations

from math import inf

from prometheus_client.utils import floatToGoString


def escape_label_value(value: str) -> str:
    """Backslash, double quote and newline escaped."""
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_value(value: float) -> str:
    """floatToGoString's spelling, with shortcuts for the common cases: small integers,
    finite floats below 1e6 (which floatToGoString spells as ``repr``: Go switches to an
    exponent only from 1e6 on, and only for positive values), and floats from 1e6 to 1e16
    (Unix timestamps), spelled as floatToGoString does."""
    kind = type(value)
    if kind is int and -10**15 < value < 1_000_000:
        return f"{value}.0"
    if kind is float and -inf < value < 1e6:
        return repr(value)
    if kind is float and 1e6 <= value < 1e16:  # timestamps: repr has a dot and no exponent here
        spelled = repr(value)
        dot = spelled.index(".")
        mantissa = f"{spelled[0]}.{spelled[1:dot]}{spelled[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text
