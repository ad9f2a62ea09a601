"""The bridge end to end: real Mosquitto, the exporter as a subprocess, payloads published by a
real client, values read back from /metrics."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support import mqtt_client, site, wait_until

ZIGBEE = b'{"temperature":21.5,"humidity":40,"linkquality":120,"battery":88,"state":"ON"}'


def publish(broker, messages):
    """Publish [(topic, payload)] at QoS 1 and wait for every PUBACK."""
    client = mqtt_client(broker)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()


def started(exporter_factory, sites, **kwargs):
    exp = exporter_factory(sites, **kwargs).wait_ready()
    for s in sites:
        exp.wait_metric("mqtt_site_up", lambda v: v == 1, timeout=10, site=s["name"])
    return exp


BRIDGE = {"topic_labels": ["zigbee2mqtt/+device", "shellies/+device/#"]}


def test_zigbee_shelly_and_plain_numbers(broker, exporter_factory):
    exp = started(exporter_factory, [site("home", broker, bridge=BRIDGE,
                                          topics=["zigbee2mqtt/#", "shellies/#", "home/#"])])
    publish(broker, [
        ("zigbee2mqtt/kitchen", ZIGBEE),
        ("shellies/shelly1-AB/relay/0", b"on"),
        ("shellies/shelly1-AB/relay/0/power", b"12.5"),
        ("shellies/shelly1-AB/temperature", b"40.1"),
        ("home/boiler/pressure", b"1.8"),
    ])
    exp.wait_metric("mqtt_bridge_messages_total", lambda v: v == 5, timeout=10, site="home")
    m = exp.metrics()

    def get(name, **labels):
        return m.get((name, frozenset(dict(site="home", **labels).items())))

    z = dict(topic="zigbee2mqtt/kitchen", device="kitchen")
    assert get("mqtt_temperature", **z) == 21.5
    assert get("mqtt_humidity", **z) == 40
    assert get("mqtt_linkquality", **z) == 120
    assert get("mqtt_battery", **z) == 88
    assert get("mqtt_state", **z) == 1
    sh = dict(device="shelly1-AB")
    assert get("mqtt_relay", topic="shellies/shelly1-AB/relay/0", **sh) == 1
    assert get("mqtt_power", topic="shellies/shelly1-AB/relay/0/power", **sh) == 12.5
    assert get("mqtt_temperature", topic="shellies/shelly1-AB/temperature", **sh) == 40.1
    assert get("mqtt_pressure", topic="home/boiler/pressure") == 1.8
    assert get("mqtt_bridge_series") == 9
    # the exporter's own status echo is never bridged
    assert not any(labels and dict(labels).get("topic") == "home/backend/status" for _, labels in m)


def test_hostile_payloads_do_not_touch_the_connection(broker, exporter_factory):
    exp = started(exporter_factory, [site("s1", broker, bridge=True)])
    hostile = [b"\x00\xff\x00", b"caf\xe9", b'{"a":', b"x" * 70000, b"[" * 3000 + b"]" * 3000,
               b"NaN", b"inf", b"hello", b'{"a":1e999}']
    publish(broker, [("s1/bad", p) for p in hostile] + [("s1/good", b"42")])
    exp.wait_metric("mqtt_good", lambda v: v == 42, timeout=10, site="s1", topic="s1/good")
    m = exp.metrics()
    errors = {dict(labels)["reason"]: v for (name, labels), v in m.items()
              if name == "mqtt_bridge_payload_errors_total"}
    assert errors == {"binary": 1, "invalid_utf8": 1, "invalid_json": 1, "too_large": 1,
                      "too_deep": 1, "non_finite": 3, "no_numeric_value": 1}
    assert exp.metric("mqtt_site_up", site="s1") == 1
    assert exp.metric("mqtt_site_connects_total", site="s1") == 1
    assert exp.metric("mqtt_bridge_series", site="s1") == 1


def test_site_without_bridge_exports_no_bridged_series(broker, exporter_factory):
    exp = started(exporter_factory, [site("plain", broker), site("br", broker, bridge=True)])
    publish(broker, [("plain/t", b"1"), ("plain/j", ZIGBEE), ("br/t", b"2")])
    exp.wait_metric("mqtt_t", lambda v: v == 2, timeout=10, site="br", topic="br/t")
    exp.wait_metric("mqtt_site_messages_received_total", lambda v: v == 2, timeout=10,
                    site="plain")
    m = exp.metrics()
    # the exporter's own per-site families (mqtt_site_*, mqtt_exporter_*) only: nothing bridged
    assert not [k for k in m if dict(k[1]).get("site") == "plain" and k[0].startswith("mqtt_")
                and not k[0].startswith(("mqtt_site_", "mqtt_exporter_"))]


def test_no_bridge_at_all_has_no_bridge_families(broker, exporter_factory):
    exp = started(exporter_factory, [site("plain", broker)])
    assert "mqtt_bridge_" not in exp.metrics_text()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_clean_with_bridged_series(broker, exporter_factory):
    exp = started(exporter_factory, [site("home", broker, bridge=BRIDGE,
                                          topics=["zigbee2mqtt/#", "shellies/#", "home/#"])])
    publish(broker, [("zigbee2mqtt/kitchen", ZIGBEE), ("shellies/s1/relay/0", b"on"),
                     ("home/x", b'{"energy_total": 3, "colorTemp": 2}')])
    exp.wait_metric("mqtt_bridge_series", lambda v: v == 8, timeout=10, site="home")
    text = exp.metrics_text()
    assert "mqtt_energy_total_value" in text and "mqtt_color_temp" in text
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # gzip, as Prometheus asks for it
    import gzip
    import urllib.request
    req = urllib.request.Request(exp.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert "mqtt_color_temp" in gzip.decompress(r.read()).decode()


def test_short_expire_after_removes_stale_series(broker, exporter_factory):
    exp = started(exporter_factory, [site("s1", broker, bridge={"expire_after": 1})])
    publish(broker, [("s1/stale", b"1")])
    exp.wait_metric("mqtt_stale", lambda v: v == 1, timeout=10, site="s1", topic="s1/stale")
    wait_until(lambda: exp.metric("mqtt_stale", site="s1", topic="s1/stale") is None, 10,
               message="series expired")
    assert exp.metric("mqtt_bridge_series_expired_total", site="s1") == 1
    assert exp.metric("mqtt_bridge_series", site="s1") == 0
