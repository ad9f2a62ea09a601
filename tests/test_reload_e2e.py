"""Hot reload of the sites file (issue #10, item 1), the exporter as a real subprocess.

A changed file (seen by polling every MQTT_SITES_RELOAD_SECONDS) and SIGHUP apply the new
sites: added ones connect, removed ones publish `offline` and disconnect cleanly, changed ones
reconnect with their new configuration, untouched ones keep their broker connection (checked
broker-side: no new connection, no disconnect). An invalid file is rejected whole, its
problems logged, the running sites kept. Every wait is on a log line, a metric or a broker
event.
"""

from __future__ import annotations

import os
import signal

import pytest
import yaml

from tests.support import retained, site, wait_until

pytestmark = pytest.mark.timeout(60)

INSTANCE = "test"
FAST_ENV = {"MQTT_BACKOFF_MIN_SECONDS": "0.2", "MQTT_BACKOFF_MAX_SECONDS": "1",
            "MQTT_CONNECT_TIMEOUT": "5"}


def cid(name: str) -> str:
    return f"{name}_i{INSTANCE}"


def up(proc) -> dict[str, float]:
    return {dict(labels)["site"]: v for (n, labels), v in proc.metrics().items()
            if n == "mqtt_site_up"}


def value(proc, name: str) -> float:
    return proc.metrics()[(name, frozenset())]


def replace_sites(proc, sites: list[dict]) -> None:
    """Rewrite the sites file atomically (write + rename, as a ConfigMap update does), so the
    poller never reads half a file."""
    tmp = proc.sites_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"sites": sites}, sort_keys=False))
    os.replace(tmp, proc.sites_file)
    proc.sites = sites


def start(exporter_factory, broker, names, env=None):
    proc = exporter_factory([site(n, broker) for n in names], instance_id=INSTANCE,
                            env={**FAST_ENV, **(env or {})})
    proc.wait_ready(15)
    wait_until(lambda: up(proc) == dict.fromkeys(names, 1.0), 15, message=proc.log_tail())
    for n in names:
        wait_until(lambda n=n: broker.connects(cid(n)) == 1, 10, message=broker.log_text())
    return proc


def test_a_changed_file_adds_removes_and_changes_sites_and_leaves_the_rest(
        broker, exporter_factory):
    proc = start(exporter_factory, broker, ["keep", "gone", "moved"],
                 env={"MQTT_SITES_RELOAD_SECONDS": "0.2"})
    replace_sites(proc, [site("keep", broker), site("moved", broker, keepalive=17),
                         site("added", broker)])
    proc.wait_log(r"Sites reloaded from .*: 1 added, 1 removed, 1 changed; 3 sites \(3 in the "
                  r"document\) \(added: added; removed: gone; changed: moved\)", 10)
    wait_until(lambda: up(proc) == {"keep": 1.0, "moved": 1.0, "added": 1.0}, 10,
               message=proc.log_tail())
    # Removed: a clean goodbye (offline retained, DISCONNECT), no reconnect.
    wait_until(lambda: broker.disconnects(cid("gone")) == 1, 10, message=broker.log_text())
    assert retained(broker, "gone/backend/status") == "offline"
    assert broker.connects(cid("gone")) == 1 and broker.live(cid("gone")) == 0
    # Changed: goodbye, then the new configuration (keepalive 17) under the same client ID.
    wait_until(lambda: broker.connects(cid("moved")) == 2, 10, message=broker.log_text())
    assert broker.disconnects(cid("moved")) == 1 and broker.takeovers() == 0
    assert f"as {cid('moved')} (p2, c1, k17)" in broker.log_text()
    assert retained(broker, "moved/backend/status") == "online"
    # Added: connected once.
    assert broker.connects(cid("added")) == 1
    assert retained(broker, "added/backend/status") == "online"
    # Untouched: the same connection throughout.
    assert broker.connects(cid("keep")) == 1 and broker.disconnects(cid("keep")) == 0
    assert value(proc, "mqtt_exporter_config_last_reload_successful") == 1
    assert value(proc, "mqtt_exporter_config_reloads_total") == 1
    assert value(proc, "mqtt_exporter_config_sites") == 3
    status, body = proc.health(verbose=True)
    assert status == 200 and body["status"] == "healthy", body
    assert [s["name"] for s in body["sites"]] == ["keep", "moved", "added"]
    assert body["config"]["last_changes"] == "1 added, 1 removed, 1 changed"


def test_an_invalid_file_is_rejected_whole_and_the_running_sites_stay(
        broker, exporter_factory):
    proc = start(exporter_factory, broker, ["one", "two"],
                 env={"MQTT_SITES_RELOAD_SECONDS": "0.2"})
    before = value(proc, "mqtt_exporter_config_last_reload_success_timestamp_seconds")
    # A valid addition next to an invalid change: nothing of it is applied.
    replace_sites(proc, [site("one", broker), site("two", broker, keepalive="often"),
                         site("three", broker)])
    proc.wait_log(r"Sites reload rejected, keeping the running configuration", 10)
    log = proc.log_text()
    assert f"{proc.sites_file}: site 'two' (#2): key 'keepalive'" in log, proc.log_tail()
    assert value(proc, "mqtt_exporter_config_last_reload_successful") == 0
    assert value(proc, "mqtt_exporter_config_reload_failures_total") == 1
    assert value(proc, "mqtt_exporter_config_last_reload_success_timestamp_seconds") == before
    status, body = proc.health(verbose=True)
    assert status == 200 and body["status"] == "healthy", body  # the last good sites run
    assert not body["config"]["last_reload_successful"]
    assert any("key 'keepalive'" in e for e in body["config"]["errors"]), body["config"]
    assert up(proc) == {"one": 1.0, "two": 1.0}
    for n in ("one", "two"):
        assert broker.connects(cid(n)) == 1 and broker.disconnects(cid(n)) == 0
    assert broker.connects(cid("three")) == 0
    # Fixed: applied, and the metric says so again.
    replace_sites(proc, [site("one", broker), site("two", broker), site("three", broker)])
    proc.wait_log(r"Sites reloaded from .*: 1 added, 0 removed, 0 changed", 10)
    wait_until(lambda: value(proc, "mqtt_exporter_config_last_reload_successful") == 1, 5)
    assert value(proc, "mqtt_exporter_config_last_reload_success_timestamp_seconds") > before
    wait_until(lambda: broker.connects(cid("three")) == 1, 10, message=broker.log_text())
    for n in ("one", "two"):
        assert broker.connects(cid(n)) == 1 and broker.disconnects(cid(n)) == 0


def test_sighup_reloads_when_polling_is_off(broker, exporter_factory):
    """MQTT_SITES_RELOAD_SECONDS=0: only SIGHUP reloads; a removed file is a failed reload
    that keeps the sites; SIGHUP with the file back applies it."""
    proc = start(exporter_factory, broker, ["first"], env={"MQTT_SITES_RELOAD_SECONDS": "0"})
    replace_sites(proc, [site("first", broker), site("second", broker)])
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"Sites reloaded from .*: 1 added, 0 removed, 0 changed", 10)
    wait_until(lambda: broker.connects(cid("second")) == 1, 10, message=broker.log_text())
    sites = proc.sites
    proc.sites_file.unlink()
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"Sites could not be read, keeping the running configuration", 10)
    assert "file not found" in proc.log_text()
    assert value(proc, "mqtt_exporter_config_last_reload_successful") == 0
    assert up(proc) == {"first": 1.0, "second": 1.0}
    replace_sites(proc, sites[:1])
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"Sites reloaded from .*: 0 added, 1 removed, 0 changed", 10)
    wait_until(lambda: broker.disconnects(cid("second")) == 1, 10, message=broker.log_text())
    assert broker.connects(cid("first")) == 1 and broker.disconnects(cid("first")) == 0
    assert up(proc) == {"first": 1.0}
