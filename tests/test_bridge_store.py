"""exporter.bridge.store and .render: caps, expiry, cardinality bounds, escaping, and the
text renderer against generate_latest (every helper `samples` call compares the two)."""

from __future__ import annotations

import subprocess
import tracemalloc

from exporter.bridge import ERROR_REASONS, BridgeStore
from exporter.config import BridgeConfig
from tests.test_bridge import ZIGBEE, FakeClock, errors, make, value


def test_label_values_escaped():
    _, store, b = make(BridgeConfig(topic_labels=("+/+dev",)))
    topic = 'a/we"ird\\dev\nname'
    b.ingest(topic, b"1")
    text = store.render_text()
    assert r'dev="we\"ird\\dev\nname"' in text
    assert value(store, "mqtt_we_ird_dev_name", site="s1", topic=topic, dev='we"ird\\dev\nname') == 1


# --- cap and expiry ---------------------------------------------------------------------

def test_per_site_cap_drops_new_series_keeps_updating_old():
    _, store, b = make(BridgeConfig(max_series=3))
    b.ingest("s1/a", b'{"x":1,"y":2,"z":3,"w":4}')
    assert value(store, "mqtt_bridge_series", site="s1") == 3
    assert value(store, "mqtt_bridge_series_dropped_total", site="s1") == 1
    b.ingest("s1/a", b'{"x":10,"y":20,"z":30,"w":40}')
    assert value(store, "mqtt_x", site="s1", topic="s1/a") == 10
    assert value(store, "mqtt_w", site="s1", topic="s1/a") is None
    assert value(store, "mqtt_bridge_series_dropped_total", site="s1") == 2


def test_total_cap_over_sites():
    clock = FakeClock()
    store = BridgeStore(clock, max_series=4)
    b1 = store.site("a", BridgeConfig(max_series=3))
    b2 = store.site("b", BridgeConfig(max_series=3))
    b1.ingest("a/t", b'{"x":1,"y":2,"z":3}')
    b2.ingest("b/t", b'{"x":1,"y":2,"z":3}')
    assert store.total == 4
    assert value(store, "mqtt_bridge_series_dropped_total", site="b") == 2


def test_expiry_with_injected_clock():
    clock, store, b = make(BridgeConfig(expire_after=60))
    b.ingest("s1/old", b"1")
    clock.t += 30
    b.ingest("s1/new", b"2")
    clock.t += 31  # old: 61 s without update, new: 31 s
    assert value(store, "mqtt_old", site="s1", topic="s1/old") is None
    assert value(store, "mqtt_new", site="s1", topic="s1/new") == 2
    assert value(store, "mqtt_bridge_series_expired_total", site="s1") == 1
    assert value(store, "mqtt_bridge_series", site="s1") == 1
    b.ingest("s1/old", b"3")  # comes back as a new series
    assert value(store, "mqtt_old", site="s1", topic="s1/old") == 3
    clock.t += 100
    assert value(store, "mqtt_bridge_series", site="s1") == 0
    assert "mqtt_old" not in store.render_text()


def test_expiry_frees_room_under_the_cap_without_a_scrape():
    clock, store, b = make(BridgeConfig(expire_after=10, max_series=2))
    b.ingest("s1/a", b"1")
    b.ingest("s1/b", b"1")
    clock.t += 11
    b.ingest("s1/c", b"1")  # a new series triggers the amortised sweep
    assert store.total == 1
    assert value(store, "mqtt_c", site="s1", topic="s1/c") == 1


def test_cardinality_attack_bounded():
    cap = 1000
    tracemalloc.start()
    try:
        _, store, b = make(BridgeConfig(max_series=cap))
        for i in range(100_000):
            b.ingest(f"s1/attack/{i}", b'{"v":1}')
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.total == cap
    assert value(store, "mqtt_bridge_series", site="s1") == cap
    assert value(store, "mqtt_bridge_series_dropped_total", site="s1") == 100_000 - cap
    assert len(b._topics) <= b.max_topics
    assert peak < 30 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_errors_known_from_zero_and_promtool_clean(tmp_path):
    _, store, b = make(BridgeConfig(topic_labels=("zigbee2mqtt/+device",)))
    b.ingest("zigbee2mqtt/kitchen", ZIGBEE)
    b.ingest("s1/c", b'{"colorTemp": 3, "energy_total": 5, "x:y": 1}')
    assert errors(store) == dict.fromkeys(ERROR_REASONS, 0)
    proc = subprocess.run(["promtool", "check", "metrics"], input=store.render_text(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cardinality_attack_with_nested_keys_on_one_topic_is_bounded():
    """Distinct nested keys on one topic: over the cap nothing is kept, not even the
    JSON tree positions of the dropped values."""
    cap = 10
    tracemalloc.start()
    try:
        _, store, b = make(BridgeConfig(max_series=cap))
        for i in range(50_000):
            b.ingest("s1/attack", b'{"k%d":{"x":1}}' % i)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.total == cap
    assert value(store, "mqtt_bridge_series_dropped_total", site="s1") == 50_000 - cap
    assert current < 5 * 2**20, f"{current / 2**20:.1f} MiB still held"




def test_drop_sites_forgets_their_series_and_counters_and_keeps_the_others():
    """A reload that removes (or changes) bridged sites: their series go in one pass, the
    other site's stay, and a changed site can be bridged again under its name."""
    _, store, s1 = make(site="s1")
    s2 = store.site("s2", BridgeConfig(), "s2/backend/status")
    s1.ingest("s1/sensors/a", ZIGBEE)
    s2.ingest("s2/sensors/a", ZIGBEE)
    before = store.total
    assert store.drop_sites(["s1", "unknown"]) == before // 2
    assert store.total == before // 2 and set(store.sites) == {"s2"}
    assert [b.name for b in store.bridges] == ["s2"]
    assert value(store, "mqtt_temperature", site="s2", topic="s2/sensors/a") == 21.5
    assert value(store, "mqtt_temperature", site="s1", topic="s1/sensors/a") is None
    assert value(store, "mqtt_bridge_payload_errors_total", site="s1", reason="decode") is None
    again = store.site("s1", BridgeConfig(), "s1/backend/status")
    again.ingest("s1/sensors/a", ZIGBEE)
    assert value(store, "mqtt_temperature", site="s1", topic="s1/sensors/a") == 21.5
    assert store.drop_sites([]) == 0
