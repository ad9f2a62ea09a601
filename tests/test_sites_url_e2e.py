"""MQTT_SITES_URL end to end: the exporter as a subprocess, a real Mosquitto, and a real HTTP
endpoint on 127.0.0.1 (tests/support/sites_server.py) serving the sites document.

Broker-side proof for "untouched": the broker's own log shows no new connection and no
disconnect of the kept client IDs.
"""
from __future__ import annotations

import re

import pytest

from tests.support import retained, site, wait_until
from tests.support.sites_server import SitesServer

POLL = "0.3"
PASSWORD = "url-pa55word"
TOKEN = "bearer-t0ken-e2e"
QUERY = "tenant=qu3ry-secret"

pytestmark = pytest.mark.timeout(60)


def cid(name: str) -> str:
    return f"{name}_itest"


@pytest.fixture
def endpoint():
    server = SitesServer()
    yield server
    server.stop()


def start(exporter_factory, server: SitesServer, url: str | None = None, **env: str):
    return exporter_factory([], env={"MQTT_SITES_URL": url or server.url,
                                     "MQTT_SITES_RELOAD_SECONDS": POLL, **env})


def metric(proc, name: str) -> float | None:
    return proc.metric(name)


def wait_connected(broker, *names: str, timeout: float = 10) -> None:
    wait_until(lambda: all(broker.live(cid(n)) == 1 for n in names), timeout,
               message=f"{names} connected\n{broker.log_text()[-2000:]}")


def test_sites_follow_the_endpoint_and_untouched_sites_keep_their_connection(
        broker, exporter_factory, endpoint, status_watcher):
    endpoint.set_sites([site("keep", broker), site("gone", broker)])
    endpoint.start()
    watcher = status_watcher(broker)
    proc = start(exporter_factory, endpoint)
    wait_connected(broker, "keep", "gone")
    proc.wait_metric("mqtt_exporter_config_last_reload_successful", lambda v: v == 1, 5)

    # Nothing changes: polls are conditional (304), and no reload is counted.
    reloads = metric(proc, "mqtt_exporter_config_reloads_total")
    seen_304 = endpoint.count(304)
    wait_until(lambda: endpoint.count(304) >= seen_304 + 3, 10, message="three 304s")
    assert metric(proc, "mqtt_exporter_config_reloads_total") == reloads == 1
    assert all(r.header("If-None-Match") == endpoint.etag
               for r in endpoint.snapshot()[1:]), endpoint.snapshot()

    endpoint.set_sites([site("keep", broker), site("new", broker)])
    wait_connected(broker, "new")
    watcher.wait_for("gone/backend/status", "offline", 10)
    wait_until(lambda: broker.live(cid("gone")) == 0, 5, message="gone disconnected")
    log = broker.log_text()
    assert re.search(rf"^\d+: Client {cid('gone')} disconnected\.$", log, re.M), log
    assert retained(broker, "gone/backend/status") == "offline"
    assert (broker.connects(cid("keep")), broker.disconnects(cid("keep"))) == (1, 0)
    assert broker.connects(cid("new")) == 1
    proc.wait_log(r"Sites reloaded from http://127\.0\.0\.1:\d+/sites: 1 added, 1 removed, 0 changed", 5)
    assert metric(proc, "mqtt_exporter_config_reloads_total") == 2
    assert metric(proc, "mqtt_exporter_config_sites") == 2


def test_endpoint_down_or_bad_document_keeps_the_last_good_sites(
        broker, exporter_factory, endpoint, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    endpoint.token = TOKEN
    endpoint.set_sites([site("a", broker)])
    endpoint.start()
    url = endpoint.url_with(f"exporter:{PASSWORD}", QUERY)
    proc = start(exporter_factory, endpoint, url, MQTT_SITES_URL_TOKEN_FILE=str(token_file),
                 LOG_LEVEL="DEBUG")
    wait_connected(broker, "a")
    assert endpoint.snapshot()[0].header("Authorization") == f"Bearer {TOKEN}"

    endpoint.stop()
    proc.wait_metric("mqtt_exporter_config_last_reload_successful", lambda v: v == 0, 5)
    status, body = proc.health(verbose=True)
    assert status == 200 and body["status"] == "healthy", body
    [error] = body["config"]["errors"]
    assert error.startswith(f"{endpoint.url}: cannot fetch: "), error  # refused, or reset
    assert metric(proc, "mqtt_exporter_config_reload_failures_total") >= 1

    endpoint.start()  # same document: the next read is a whole one, and the status recovers
    proc.wait_metric("mqtt_exporter_config_last_reload_successful", lambda v: v == 1, 5)
    assert proc.health(verbose=True)[1]["config"]["errors"] == []

    failures = metric(proc, "mqtt_exporter_config_reload_failures_total")
    endpoint.set_sites([site("a", broker), site("b", broker), site("bad", broker, port=0)])
    proc.wait_metric("mqtt_exporter_config_reload_failures_total", lambda v: v == failures + 1,
                     5)
    assert metric(proc, "mqtt_exporter_config_last_reload_successful") == 0
    errors = proc.health(verbose=True)[1]["config"]["errors"]
    assert any("bad" in e and "port" in e for e in errors), errors
    proc.wait_log(r"Sites reload rejected, keeping the running configuration", 5)
    assert broker.connects(cid("b")) == 0  # rejected whole: the valid new site did not start
    assert (broker.connects(cid("a")), broker.disconnects(cid("a"))) == (1, 0)

    texts = {"log": proc.log_text(), "metrics": proc.metrics_text(),
             "health": proc.http_get("/health?verbose=true")[2].decode()}
    for where, text in texts.items():
        for secret in (PASSWORD, TOKEN, QUERY):
            assert secret not in text, (where, secret)
    assert endpoint.url in texts["log"]


def test_endpoint_down_at_start_then_up(broker, exporter_factory, endpoint):
    proc = start(exporter_factory, endpoint).wait_ready()
    # HTTP is up before the first fetch is done: wait for its failure to be recorded.
    status, body = wait_until(lambda: (r := proc.health(verbose=True))[1]["config"]["errors"]
                              and r, 5, message="the first fetch's error in /health")
    assert status == 503 and body["status"] == "critical", body
    assert body["config"]["loaded"] is False
    assert "Connection refused" in body["config"]["errors"][0]
    endpoint.set_sites([site("late", broker)])
    endpoint.start()
    wait_connected(broker, "late")
    wait_until(lambda: proc.health()[0] == 200, 5, message="/health 200")
    assert metric(proc, "mqtt_exporter_config_last_reload_successful") == 1
