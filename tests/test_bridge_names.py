"""exporter.bridge.names: metric and field names (valid, idempotent, never in the exporter's
own namespaces), and topic filter matching (exporter.bridge.topics)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from exporter.bridge import bridged_name, field_name, sanitize_metric_name, topic_matches
from tests.test_bridge import VALID_NAME, make, samples


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


def test_topic_filters_match_like_mqtt():
    def m(f, t):
        return topic_matches(tuple(f.split("/")), t.split("/"))
    assert m("a/+/c", "a/b/c") and m("a/+dev/#", "a/x/y/z") and m("a/#", "a")
    assert not m("a/+", "a/b/c") and not m("a/b", "a") and not m("#", "$SYS/x")
    assert m("$SYS/#", "$SYS/broker/load")
