"""Shared helpers of the bridge tests (tests/test_bridge_*.py) and the in-process wiring of the
bridge into a Service. In-process, no gevent, injected clock."""

from __future__ import annotations

import re

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.bridge import ERROR_REASONS, BridgeCollector, BridgeStore
from exporter.config import BridgeConfig, load_settings

VALID_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
ZIGBEE = b'{"temperature":21.5,"humidity":40,"battery":{"level":88},"linkquality":120,"state":"ON"}'


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return self.t


def make(config: BridgeConfig | None = None, total: int = 100_000, site: str = "s1"):
    clock = FakeClock()
    store = BridgeStore(clock, total)
    bridge = store.site(site, config or BridgeConfig(), f"{site}/backend/status")
    return clock, store, bridge


def samples(store) -> dict:
    """{(sample name, frozenset(labels)): value} through prometheus_client's own parser."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(store))
    text = generate_latest(registry).decode()
    assert text == store.render_text(), "fast renderer differs from generate_latest"
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(store, name, **labels):
    return samples(store).get((name, frozenset(labels.items())))


def errors(store, site="s1"):
    return {r: value(store, "mqtt_bridge_payload_errors_total", site=site, reason=r)
            for r in ERROR_REASONS}



def test_service_wires_bridge_only_for_bridged_sites(tmp_path):
    from exporter.metrics import build_registry
    from exporter.supervisor import Service

    (tmp_path / "sites.yml").write_text(yaml.safe_dump({"sites": [
        {"name": "a", "host": "127.0.0.1", "bridge": True},
        {"name": "b", "host": "127.0.0.1"}]}))
    settings_ = load_settings({"MQTT_INSTANCE_ID": "t", "MQTT_STATE_DIR": str(tmp_path / "st")},
                              cwd=str(tmp_path))
    service = Service(settings_)
    a, b = service.connections
    assert a.bridge is not None and b.bridge is None
    a.bridge.ingest("a/t", b"5")
    registry = build_registry(service)
    assert registry.get_sample_value("mqtt_t", {"site": "a", "topic": "a/t"}) == 5
    assert registry.get_sample_value("mqtt_bridge_series", {"site": "a"}) == 1
    assert registry.get_sample_value("mqtt_bridge_series", {"site": "b"}) is None

    (tmp_path / "sites.yml").write_text(yaml.safe_dump({"sites": [{"name": "b", "host": "127.0.0.1"}]}))
    plain = Service(load_settings({"MQTT_INSTANCE_ID": "t", "MQTT_STATE_DIR": str(tmp_path / "st")},
                                  cwd=str(tmp_path)))
    assert plain.bridge_store is None
    assert build_registry(plain).get_sample_value("mqtt_bridge_series", {"site": "b"}) is None


