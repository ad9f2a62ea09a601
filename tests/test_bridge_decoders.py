"""exporter.bridge.decoders: the payload formats (JSON, plain numbers, state strings, explicit
mappings), the hostile corpus by error reason, and the decoder table as a seam."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.bridge import DECODERS, ERROR_REASONS, BridgeStore, Decoder, bridged_name, field_name
from exporter.config import BridgeConfig, BridgeMapping
from tests.test_bridge import VALID_NAME, ZIGBEE, FakeClock, errors, make, samples, value

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


@pytest.mark.parametrize("payload", [b'{"t":NaN}', b'{"t":Infinity}', b'{"t":-Infinity}'])
def test_json_nan_and_infinity_literals_are_non_finite(payload):
    _, store, b = make()
    b.ingest("s1/x", payload)
    assert errors(store)["non_finite"] == 1 and errors(store)["invalid_json"] == 0


# --- the decoder table is the seam for payload formats ------------------------------------

def decode_kv(site, entry, payload, now):
    """A made-up format, ``power=12.5;voltage=230``: one decoder, nothing else changes."""
    if b"=" not in payload or payload[:1] in (b"{", b"["):
        return False  # not this format: the other decoders are asked
    try:
        pairs = dict(part.split(b"=", 1) for part in payload.split(b";"))
        values = {k.decode(): float(v) for k, v in pairs.items()}
    except ValueError:
        return False
    for key, v in values.items():
        site.put(entry, entry.root.leaves, key, (key,), v, now)
    return True


def test_a_new_payload_format_is_one_decoder():
    store = BridgeStore(FakeClock())
    table = (*DECODERS, Decoder("kv", decode_kv))
    b = store.site("s1", BridgeConfig(), decoders=table)
    b.ingest("s1/meter", b"power=12.5;voltage=230")
    b.ingest("s1/meter", b"power=13")
    b.ingest("s1/meter", b"7")  # still a plain number on the same topic
    b.ingest("s1/meter", b"power=14")
    lab = dict(site="s1", topic="s1/meter")
    assert value(store, "mqtt_power", **lab) == 14
    assert value(store, "mqtt_voltage", **lab) == 230
    assert value(store, "mqtt_meter", **lab) == 7
    assert errors(store) == dict.fromkeys(ERROR_REASONS, 0)

    _, plain, b2 = make()  # the default table does not know the format
    b2.ingest("s1/meter", b"power=12.5")
    assert errors(plain)["no_numeric_value"] == 1


def test_a_topic_decoder_takes_every_payload_of_its_topics():
    def length(site, entry, payload, now):
        site.put(entry, entry.scalar, None, ("length",), len(payload), now)
        return True

    store = BridgeStore(FakeClock())
    raw = Decoder("length", length, topics=lambda site, entry: entry.topic.startswith("raw/"))
    b = store.site("s1", BridgeConfig(), decoders=(raw, *DECODERS))
    b.ingest("raw/x", b"hello")
    b.ingest("raw/x", b'{"a": 1}')
    b.ingest("s1/json", b'{"a": 1}')
    assert value(store, "mqtt_length", site="s1", topic="raw/x") == 8
    assert value(store, "mqtt_a", site="s1", topic="raw/x") is None
    assert value(store, "mqtt_a", site="s1", topic="s1/json") == 1


def test_a_topic_switching_formats_is_decoded_by_each_payload():
    """The topic's remembered decoder never decides alone: any payload gets its own format."""
    _, store, b = make(BridgeConfig(states=(("1", 5.0),)))
    lab = dict(site="s1", topic="s1/x")
    for payload, expected in [(b"2", 2), (b"on", 1), (b"1", 5), (b" ON ", 1), (b"3.5", 3.5),
                              (b"nan", None), (b"hello", None), (b"4", 4)]:
        b.ingest("s1/x", payload)
        if expected is not None:
            assert value(store, "mqtt_x", **lab) == expected, payload
    b.ingest("s1/x", b'{"y": 1}')
    assert value(store, "mqtt_y", **lab) == 1
    assert errors(store)["non_finite"] == 1 and errors(store)["no_numeric_value"] == 1
