"""Unit tests for exporter.bridge: parsing, flattening, naming, escaping, caps, expiry, the
hostile corpus and the `bridge:` config block. In-process, no gevent, injected clock."""

from __future__ import annotations

import re
import subprocess
import tracemalloc

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.bridge import (ERROR_REASONS, BridgeCollector, BridgeStore, bridged_name,
                             field_name, sanitize_metric_name)
from exporter.config import BridgeConfig, BridgeMapping, ConfigError, load_settings

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


# --- parsing and flattening -------------------------------------------------------------

def test_zigbee_json_flattened_with_topic_label():
    _, store, b = make(BridgeConfig(topic_labels=("zigbee2mqtt/+device",)))
    b.ingest("zigbee2mqtt/kitchen", ZIGBEE)
    labels = dict(site="s1", topic="zigbee2mqtt/kitchen", device="kitchen")
    assert value(store, "mqtt_temperature", **labels) == 21.5
    assert value(store, "mqtt_humidity", **labels) == 40
    assert value(store, "mqtt_battery_level", **labels) == 88
    assert value(store, "mqtt_linkquality", **labels) == 120
    assert value(store, "mqtt_state", **labels) == 1
    assert value(store, "mqtt_bridge_series", site="s1") == 5


def test_shelly_scalars_use_last_non_numeric_level():
    _, store, b = make(BridgeConfig(topic_labels=("shellies/+device/#",)))
    b.ingest("shellies/shelly1-AB/relay/0", b"on")
    b.ingest("shellies/shelly1-AB/relay/0/power", b"12.5")
    b.ingest("shellies/shelly1-AB/temperature", b"40.1")
    b.ingest("shellies/shelly1-AB/online", b"true")
    lab = dict(site="s1", device="shelly1-AB")
    assert value(store, "mqtt_relay", topic="shellies/shelly1-AB/relay/0", **lab) == 1
    assert value(store, "mqtt_power", topic="shellies/shelly1-AB/relay/0/power", **lab) == 12.5
    assert value(store, "mqtt_temperature", topic="shellies/shelly1-AB/temperature", **lab) == 40.1
    assert value(store, "mqtt_online", topic="shellies/shelly1-AB/online", **lab) == 1
    b.ingest("shellies/shelly1-AB/relay/0", b"off")
    assert value(store, "mqtt_relay", topic="shellies/shelly1-AB/relay/0", **lab) == 0


@pytest.mark.parametrize("payload,expected", [
    (b"21", 21), (b" -3.25\n", -3.25), (b"1e3", 1000), (b"true", 1), (b"False", 0),
    (b"ON", 1), (b"off", 0), (b" Online ", 1), (b"OFFLINE", 0), (b"open", 1), (b"closed", 0),
])
def test_scalar_payloads(payload, expected):
    _, store, b = make()
    b.ingest("s1/x/level", payload)
    assert value(store, "mqtt_level", site="s1", topic="s1/x/level") == expected


def test_custom_states_merged_over_defaults():
    _, store, b = make(BridgeConfig(states=(("heat", 2.0), ("on", 5.0))))
    b.ingest("s1/hvac/mode", b"HEAT")
    b.ingest("s1/hvac/power", b"on")
    b.ingest("s1/hvac/ok", b"yes")
    assert value(store, "mqtt_mode", site="s1", topic="s1/hvac/mode") == 2
    assert value(store, "mqtt_power", site="s1", topic="s1/hvac/power") == 5
    assert value(store, "mqtt_ok", site="s1", topic="s1/hvac/ok") == 1


def test_lists_by_index_bools_and_nested():
    _, store, b = make()
    b.ingest("s1/dev", b'{"a":{"b":{"c":3}},"l":[1,{"x":2},[true,false]],"t":true,"s":"text","n":null}')
    lab = dict(site="s1", topic="s1/dev")
    assert value(store, "mqtt_a_b_c", **lab) == 3
    assert value(store, "mqtt_l_0", **lab) == 1
    assert value(store, "mqtt_l_1_x", **lab) == 2
    assert value(store, "mqtt_l_2_0", **lab) == 1
    assert value(store, "mqtt_l_2_1", **lab) == 0
    assert value(store, "mqtt_t", **lab) == 1
    assert value(store, "mqtt_bridge_series", site="s1") == 6


def test_top_level_array_uses_topic_field():
    _, store, b = make()
    b.ingest("s1/power/phases", b"[230.1, 229.8]")
    assert value(store, "mqtt_phases_0", site="s1", topic="s1/power/phases") == 230.1
    assert value(store, "mqtt_phases_1", site="s1", topic="s1/power/phases") == 229.8


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


def test_mappings_only_mapped_values_gauge_and_counter():
    mappings = (
        BridgeMapping(topic="meter/+", path=("energy", "total"), metric="meter_energy_joules",
                      type="counter", scale=3600.0, help="Energy."),
        BridgeMapping(topic="meter/+", path=("power",), metric="meter_power_watts"),
        BridgeMapping(topic="plain/+", metric="plain_value"),
    )
    _, store, b = make(BridgeConfig(mappings=mappings))
    b.ingest("meter/m1", b'{"energy":{"total":2.5},"power":100,"other":7}')
    b.ingest("plain/p", b"12")
    s = samples(store)
    lab = frozenset(dict(site="s1", topic="meter/m1").items())
    assert s[("meter_energy_joules_total", lab)] == 9000
    assert s[("meter_power_watts", lab)] == 100
    assert s[("plain_value", frozenset(dict(site="s1", topic="plain/p").items()))] == 12
    assert not any(name == "mqtt_other" for name, _ in s)
    text = store.render_text()
    assert "# TYPE meter_energy_joules_total counter" in text
    assert "# HELP meter_energy_joules_total Energy." in text


def test_label_values_escaped():
    _, store, b = make(BridgeConfig(topic_labels=("+/+dev",)))
    topic = 'a/we"ird\\dev\nname'
    b.ingest(topic, b"1")
    text = store.render_text()
    assert r'dev="we\"ird\\dev\nname"' in text
    assert value(store, "mqtt_we_ird_dev_name", site="s1", topic=topic, dev='we"ird\\dev\nname') == 1


# --- names ------------------------------------------------------------------------------

def test_collision_with_exporter_families_impossible():
    _, store, b = make()
    b.ingest("s1/x", b'{"site_up": 1, "bridge_series": 2, "exporter_build_info": 3}')
    names = {name for name, _ in samples(store)}
    assert "mqtt_field_site_up" in names and "mqtt_site_up" not in names
    assert "mqtt_field_bridge_series" in names
    assert "mqtt_field_exporter_build_info" in names
    for name in names - {n for n in names if n.startswith("mqtt_bridge_")}:
        assert not name.startswith(("mqtt_site_", "mqtt_exporter_", "mqtt_bridge_", "process_"))
    assert bridged_name("", "process_cpu_seconds_total") == "field_process_cpu_seconds_total_value"


def test_camel_case_and_reserved_suffixes():
    assert field_name(["colorTemp"]) == "color_temp"
    assert field_name(["HTTPStatus", "x:y"]) == "http_status_x_y"
    assert field_name(["°C"]) == "c"
    assert field_name(["", "__"]) == "value"
    assert bridged_name("mqtt_", "energy_total") == "mqtt_energy_total_value"
    assert bridged_name("mqtt_", "x_count") == "mqtt_x_count_value"
    assert bridged_name("", "0abc") == "_0abc"
    assert bridged_name("", "energy_total", "counter") == "energy"


@given(st.text())
def test_sanitizer_valid_and_idempotent(text):
    name = sanitize_metric_name(text)
    assert VALID_NAME.fullmatch(name)
    assert sanitize_metric_name(name) == name


@given(st.lists(st.one_of(st.text(), st.integers(0, 100)), max_size=6), st.sampled_from(["", "mqtt_", "x_"]))
def test_field_and_bridged_names_valid(parts, prefix):
    field = field_name(parts)
    assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", field)
    assert field_name([field]) == field
    name = bridged_name(prefix, field)
    assert VALID_NAME.fullmatch(name) and ":" not in name
    assert not name.startswith(("mqtt_site_", "mqtt_exporter_", "mqtt_bridge_", "process_"))


json_leaf = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False,
                                                             width=32), st.booleans())
json_doc = st.recursive(
    st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), json_leaf, max_size=4),
    lambda kids: st.one_of(
        st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), kids, max_size=4),
        st.lists(kids, max_size=3)),
    max_leaves=20)


def _leaves(doc, path=()):
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from _leaves(v, path + (k,))
        else:
            yield path + (k,), (1 if v is True else 0 if v is False else v)


@settings(max_examples=200, deadline=None)
@given(json_doc)
def test_flattener_every_leaf_once(doc):
    _, store, b = make(BridgeConfig(max_depth=64))
    b.ingest("s1/doc", orjson.dumps(doc))
    exported = {name: v for (name, labels), v in samples(store).items()
                if not name.startswith("mqtt_bridge_")}
    top = ("doc",) if isinstance(doc, list) else ()  # a top-level array uses the topic's field
    expected: dict[str, float] = {}
    for path, v in _leaves(doc, top):
        expected[bridged_name("mqtt_", field_name(path))] = v  # the last writer wins
    assert set(exported) == set(expected)
    for name in exported:
        assert VALID_NAME.fullmatch(name)
    # distinct paths may flatten to one name ("a_b" vs "a"/"b"): values then come from one of them
    if len({field_name(p) for p, _ in _leaves(doc, top)}) == len(list(_leaves(doc, top))):
        assert exported == pytest.approx(expected)


# --- hostile payloads -------------------------------------------------------------------

HOSTILE = [
    (b"\x00\x01\x02binary", "binary"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"),
    (b"caf\xe9 \xff\xfe", "invalid_utf8"),
    (b'{"a": "\xff"}', "invalid_utf8"),
    (b'{"a": 1', "invalid_json"),
    (b"[1, 2,]", "invalid_json"),
    (b'{"a": NaN}', "non_finite"),
    (b"x" * 70000, "too_large"),
    (b"[" * 20 + b"1" + b"]" * 20, "too_deep"),
    (b"[" * 5000 + b"]" * 5000, "too_deep"),
    (b"[" * 3000 + b"]" * 3000, "too_deep"),
    (b"NaN", "non_finite"), (b"-inf", "non_finite"), (b"Infinity", "non_finite"),
    (b"1e999", "non_finite"), (b'{"a": 1e999}', "non_finite"),
    (b"hello", "no_numeric_value"), (b'{"a": "text"}', "no_numeric_value"), (b"{}", "no_numeric_value"),
]


def test_hostile_corpus_counted_by_reason_and_dropped():
    _, store, b = make()
    expected = dict.fromkeys(ERROR_REASONS, 0)
    for payload, reason in HOSTILE:
        b.ingest("s1/hostile", payload)  # never raises
        expected[reason] += 1
    assert errors(store) == expected
    assert value(store, "mqtt_bridge_series", site="s1") == 0
    b.ingest("s1/hostile", b"7")
    assert value(store, "mqtt_value", site="s1", topic="s1/hostile") is None
    assert value(store, "mqtt_hostile", site="s1", topic="s1/hostile") == 7


def test_too_deep_drops_whole_payload():
    _, store, b = make(BridgeConfig(max_depth=2))
    b.ingest("s1/d", b'{"ok": 1, "a": {"b": {"c": 2}}}')
    assert value(store, "mqtt_ok", site="s1", topic="s1/d") is None
    assert errors(store)["too_deep"] == 1
    b.ingest("s1/d", b'{"ok": 1, "a": {"b": 2}}')
    assert value(store, "mqtt_a_b", site="s1", topic="s1/d") == 2


def test_ingest_never_raises_on_odd_inputs():
    _, store, b = make()
    for payload in (b"", bytearray(b"5"), memoryview(b"6"), b" ", b"\n"):
        b.ingest("s1/odd", payload)
    b.ingest("s1/odd", None)  # a bug elsewhere must not become an exception here
    assert value(store, "mqtt_odd", site="s1", topic="s1/odd") == 6


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


# --- config -----------------------------------------------------------------------------

def load(tmp_path, bridge, **env):
    site = {"name": "s1", "host": "127.0.0.1"}
    if bridge is not ...:
        site["bridge"] = bridge
    (tmp_path / "sites.yml").write_text(yaml.safe_dump({"sites": [site]}))
    return load_settings({"MQTT_INSTANCE_ID": "t", **env}, cwd=str(tmp_path))


def test_config_defaults_and_off(tmp_path):
    assert load(tmp_path, ...).sites[0].bridge is None
    assert load(tmp_path, False).sites[0].bridge is None
    assert load(tmp_path, True).sites[0].bridge == BridgeConfig()
    settings_ = load(tmp_path, {"prefix": "home_", "max_series": 50, "expire_after": 30,
                                "ignore": ["a/#"], "states": {"heat": 2, True: 1},
                                "topic_labels": ["+/+device"], "topic_label": False,
                                "mappings": [{"topic": "m/+", "path": "a.b", "metric": "m_x",
                                              "type": "counter", "scale": 2, "help": "h"}],
                                "max_payload_bytes": 1000, "max_depth": 4},
                     MQTT_BRIDGE_MAX_SERIES="500")
    cfg = settings_.sites[0].bridge
    assert cfg.prefix == "home_" and cfg.max_series == 50 and cfg.expire_after == 30.0
    assert cfg.states == (("heat", 2.0), ("true", 1.0))
    assert cfg.mappings == (BridgeMapping("m/+", ("a", "b"), "m_x", "counter", 2.0, "h"),)
    assert settings_.bridge_max_series == 500


@pytest.mark.parametrize("bridge,key,message", [
    ("yes", "bridge", "expected boolean or mapping"),
    ({"prefx": "a_"}, "bridge.prefx", "did you mean 'prefix'"),
    ({"prefix": "Bad-"}, "bridge.prefix", "invalid prefix"),
    ({"prefix": "mqtt_site_"}, "bridge.prefix", "namespace"),
    ({"max_series": 0}, "bridge.max_series", ">= 1"),
    ({"max_series": "10"}, "bridge.max_series", "expected integer"),
    ({"expire_after": 0}, "bridge.expire_after", "> 0"),
    ({"max_depth": 100}, "bridge.max_depth", "1..64"),
    ({"ignore": ["a/#/b"]}, "bridge.ignore", "'#' must be the whole last level"),
    ({"states": {"x": "one"}}, "bridge.states", "finite number"),
    ({"topic_labels": ["+/sensors/+"]}, "bridge.topic_labels", "captures nothing"),
    ({"topic_labels": ["+site/x"]}, "bridge.topic_labels", "reserved"),
    ({"topic_labels": ["+a/+a"]}, "bridge.topic_labels", "used twice"),
    ({"topic_label": "no"}, "bridge.topic_label", "expected boolean"),
    ({"mappings": [{"topic": "a", "metric": "mqtt_site_up"}]}, "bridge.mappings[1].metric", "namespace"),
    ({"mappings": [{"topic": "a", "metric": "x_total"}]}, "bridge.mappings[1].metric", "a gauge"),
    ({"mappings": [{"topic": "a", "metric": "x", "type": "hist"}]}, "bridge.mappings[1].type", "'gauge' or 'counter'"),
    ({"mappings": [{"metric": "x"}]}, "bridge.mappings[1].topic", "required"),
    ({"mappings": [{"topic": "a", "metric": "x", "path": "a..b"}]}, "bridge.mappings[1].path", "empty element"),
    ({"mappings": [{"topic": "a", "metric": "x", "scale": "2"}]}, "bridge.mappings[1].scale", "finite number"),
    ({"mappings": [{"topic": "a", "metric": "x", "unit": "W"}]}, "bridge.mappings[1].unit", "unknown key"),
])
def test_config_errors(tmp_path, bridge, key, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, bridge)
    path = str(tmp_path / "sites.yml")
    assert any(e.startswith(f"{path}: site 's1' (#1): key '{key}': ") and message in e
               for e in info.value.errors), info.value.errors


def test_config_env_total_cap_validated(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, True, MQTT_BRIDGE_MAX_SERIES="0")
    assert any(e.startswith("environment: MQTT_BRIDGE_MAX_SERIES") for e in info.value.errors)


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


def test_example_bridge_file_is_valid():
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "bridge.yml")
    settings_ = load_settings({"MQTT_INSTANCE_ID": "t", "MQTT_SITES_FILE": os.path.abspath(path)})
    bridged = {s.name: s.bridge for s in settings_.sites}
    assert bridged["home"].topic_labels and bridged["meters"].mappings and bridged["site_88"] is None


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


@pytest.mark.parametrize("payload", [b'{"t":NaN}', b'{"t":Infinity}', b'{"t":-Infinity}'])
def test_json_nan_and_infinity_literals_are_non_finite(payload):
    _, store, b = make()
    b.ingest("s1/x", payload)
    assert errors(store)["non_finite"] == 1 and errors(store)["invalid_json"] == 0
