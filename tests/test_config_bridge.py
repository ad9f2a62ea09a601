"""Tests for exporter.config.bridge: the `bridge:` block of a site (moved from test_bridge.py)."""

from __future__ import annotations

import pytest
import yaml

from exporter.config import BridgeConfig, BridgeMapping, ConfigError, load_settings


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
    ({"mappings": [{"topic": "a", "metric": "x", "type": "hist"}]}, "bridge.mappings[1].type",
     "'gauge' or 'counter'"),
    ({"mappings": [{"metric": "x"}]}, "bridge.mappings[1].topic", "required"),
    ({"mappings": [{"topic": "a", "metric": "x", "path": "a..b"}]}, "bridge.mappings[1].path",
     "empty element"),
    ({"mappings": [{"topic": "a", "metric": "x", "scale": "2"}]}, "bridge.mappings[1].scale",
     "finite number"),
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


def test_example_bridge_file_is_valid():
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "bridge.yml")
    settings_ = load_settings({"MQTT_INSTANCE_ID": "t", "MQTT_SITES_FILE": os.path.abspath(path)})
    bridged = {s.name: s.bridge for s in settings_.sites}
    assert bridged["home"].topic_labels and bridged["meters"].mappings and bridged["site_88"] is None
