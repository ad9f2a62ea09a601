"""MQTT-to-Prometheus bridge: message payloads become gauge (or counter) samples.

One :class:`BridgeStore` per service holds every bridged series, the caps, the expiry and the
bridge's own counters. One :class:`SiteBridge` per bridged site is what the site's connection
calls for every message: ``ingest(topic: str, payload: bytes)``. :class:`BridgeCollector`
exposes the store to a prometheus_client registry, and :meth:`BridgeStore.render_text` renders
the same families directly in the Prometheus text format (used by ``/metrics``).

Modules: :mod:`.constants` (names, states and error reasons the configuration validates
against), :mod:`.names` (metric and field names), :mod:`.topics` (filters, the compiled topic),
:mod:`.decoders` (payload formats: the decoder table, the error reasons table),
:mod:`.store` (series, families, caps, expiry), :mod:`.render` (exposition), :mod:`.site`
(the per-site hot path).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import ERROR_REASONS
from .decoders import DECODERS, Decoder
from .names import bridged_name, field_name, sanitize_metric_name
from .render import BridgeCollector
from .site import SiteBridge
from .store import BridgeStore, Clock, SiteStats
from .topics import topic_matches

if TYPE_CHECKING:
    from ..config import BridgeConfig, Settings

__all__ = ["DECODERS", "ERROR_REASONS", "BridgeCollector", "BridgeStore", "Decoder", "SiteBridge",
           "SiteStats", "bridged_name", "build", "field_name", "sanitize_metric_name",
           "topic_matches"]


def build(settings: Settings, clock: Clock) -> tuple[BridgeStore | None, dict[str, SiteBridge]]:
    """The service's store and one SiteBridge per bridged site (None, {} when none is)."""
    bridged: list[tuple[str, BridgeConfig, str]] = [
        (s.name, config, s.status_topic) for s in settings.sites
        if (config := getattr(s, "bridge", None)) is not None]
    if not bridged:
        return None, {}
    store = BridgeStore(clock, settings.bridge_max_series)
    return store, {name: store.site(name, config, status) for name, config, status in bridged}
