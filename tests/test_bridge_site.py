"""exporter.bridge.site: the per-site hot path (ingest): topics, labels, ignore rules,
messages counted, never raising."""

from __future__ import annotations

from exporter.config import BridgeConfig
from tests.test_bridge import make, value


def test_update_in_place_and_messages_counted():
    _, store, b = make()
    for i in range(5):
        b.ingest("s1/t", b'{"v": %d}' % i)
    assert value(store, "mqtt_v", site="s1", topic="s1/t") == 4
    assert value(store, "mqtt_bridge_series", site="s1") == 1
    assert value(store, "mqtt_bridge_messages_total", site="s1") == 5


def test_ignored_topics_status_and_sys():
    _, store, b = make(BridgeConfig(ignore=("s1/debug/#", "+/raw")))
    for topic in ("s1/backend/status", "$SYS/broker/load", "s1/debug/x", "dev/raw"):
        b.ingest(topic, b"1")
    b.ingest("s1/kept", b"1")
    assert value(store, "mqtt_bridge_series", site="s1") == 1
    assert value(store, "mqtt_bridge_messages_total", site="s1") == 1


def test_topic_label_off_and_first_pattern_wins():
    _, store, b = make(BridgeConfig(topic_label=False,
                                    topic_labels=("+room/sensors/+device", "+/sensors/+other")))
    b.ingest("hall/sensors/th1", b'{"temperature": 20}')
    assert value(store, "mqtt_temperature", site="s1", room="hall", device="th1") == 20


def test_ingest_never_raises_on_odd_inputs():
    _, store, b = make()
    for payload in (b"", bytearray(b"5"), memoryview(b"6"), b" ", b"\n"):
        b.ingest("s1/odd", payload)
    b.ingest("s1/odd", None)  # a bug elsewhere must not become an exception here
    assert value(store, "mqtt_odd", site="s1", topic="s1/odd") == 6


