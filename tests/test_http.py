"""Integration tests of the HTTP interface: /health shapes, /metrics exposition, secret hygiene.

Real mosquitto brokers (harness.Broker), the exporter as a real subprocess
(harness.ExporterProcess), everything on 127.0.0.1. Waits are conditions with deadlines.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import HOST, free_port, mqtt_client, site, wait_until

# Fast retries towards dead ports, so backoff states show up quickly.
FAST = {"MQTT_BACKOFF_MIN_SECONDS": "0.2", "MQTT_BACKOFF_MAX_SECONDS": "1"}

SITE_STATES = ("connecting", "connected", "backoff", "cooldown", "disabled", "stopping")
REASONS = ("takeover", "connection_lost", "keepalive_timeout", "refused", "normal")
SHUTDOWN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, float("inf"))

EXPECTED_TYPES = {
    "mqtt_site_up": "gauge",
    "mqtt_site_state": "gauge",
    "mqtt_site_info": "gauge",  # an info metric: exposed as a gauge with value 1
    "mqtt_site_connects_total": "counter",
    "mqtt_site_disconnects_total": "counter",
    "mqtt_site_reconnect_attempts_total": "counter",
    "mqtt_site_cooldown_active": "gauge",
    "mqtt_site_cooldown_remaining_seconds": "gauge",
    "mqtt_site_cooldowns_total": "counter",
    "mqtt_site_messages_received_total": "counter",
    "mqtt_site_last_message_timestamp_seconds": "gauge",
    "mqtt_site_last_connect_duration_seconds": "gauge",
    "mqtt_site_subscriptions_refused_total": "counter",
    "mqtt_exporter_internal_errors_total": "counter",
    "mqtt_site_duplicate_instance": "gauge",
    "mqtt_site_duplicate_detections_total": "counter",
    "mqtt_broker_sites": "gauge",
    "mqtt_broker_sites_connected": "gauge",
    "mqtt_broker_connection_losses_total": "counter",
    "mqtt_broker_connect_duration_seconds": "histogram",
    "mqtt_exporter_shutdown_duration_seconds": "histogram",
    "mqtt_exporter_last_shutdown_timed_out": "gauge",
    "mqtt_exporter_build_info": "gauge",
    "mqtt_exporter_config_last_reload_successful": "gauge",
    "mqtt_exporter_config_last_reload_success_timestamp_seconds": "gauge",
    "mqtt_exporter_config_reloads_total": "counter",
    "mqtt_exporter_config_reload_failures_total": "counter",
    "mqtt_exporter_config_sites": "gauge",
    "mqtt_exporter_shard": "gauge",
    "mqtt_exporter_shards": "gauge",
}


def start_exporter(exporter_factory, sites, env=None, **kw):
    """exporter_factory(...) started and answering /health."""
    return exporter_factory(sites, env=env, **kw).wait_ready()


def dead_site(name: str) -> dict:
    """A site on a port where nothing listens (free a moment ago, and outside the ephemeral
    range, so no other suite's broker picks it with free_port())."""
    return {"name": name, "host": HOST, "port": free_port()}


def start(exporter_factory, sites, **kw):
    env = dict(FAST)
    env.update(kw.pop("env", {}) or {})
    return start_exporter(exporter_factory, sites, env=env, **kw)


def wait_health(exp, predicate, timeout=15.0, verbose=False):
    """Until predicate(status, body) holds; returns (status, body)."""
    last = [None]

    def check():
        if not exp.running:
            raise AssertionError(f"exporter exited (rc={exp.returncode})\n{exp.log_tail()}")
        last[0] = exp.health(verbose=verbose)
        return predicate(*last[0])

    wait_until(check, timeout, interval=0.05, message=f"health predicate; last {last[0]!r}")
    return last[0]


def request(exp, method: str, path: str, timeout: float = 5.0):
    conn = http.client.HTTPConnection(HOST, exp.port, timeout=timeout)
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# =========================================================================== /health shapes


@pytest.mark.timeout(60)
def test_health_healthy_two_sites_on_a_live_broker(broker, exporter_factory):
    exp = start(exporter_factory, [site("site_a", broker), site("site_b", broker)])
    code, body = wait_health(exp, lambda c, b: b.get("connections", {}).get("healthy") == 2)
    assert code == 200
    assert body == {
        "status": "healthy",
        "service": {"running": True, "instance_id": "test"},
        "connections": {"total": 2, "enabled": 2, "healthy": 2, "unhealthy": 0},
    }
    assert list(body) == ["status", "service", "connections"]


@pytest.mark.timeout(60)
def test_health_degraded_one_site_on_a_dead_port(broker, exporter_factory):
    exp = start(exporter_factory, [site("site_a", broker), dead_site("dead")])
    code, body = wait_health(exp, lambda c, b: b.get("connections", {}).get("healthy") == 1)
    assert code == 200
    assert body == {
        "status": "degraded",
        "service": {"running": True, "instance_id": "test"},
        "connections": {"total": 2, "enabled": 2, "healthy": 1, "unhealthy": 1},
    }


@pytest.mark.timeout(60)
def test_health_critical_only_dead_ports(exporter_factory):
    exp = start(exporter_factory, [dead_site("dead1"), dead_site("dead2")])
    # Wait until both have failed at least once: the state is then settled for real.
    wait_health(exp, lambda c, b: all(s["last_disconnect_reason"] == "refused" for s in b["sites"]),
                verbose=True)
    code, body = exp.health()
    assert code == 503
    assert body == {
        "status": "critical",
        "service": {"running": True, "instance_id": "test"},
        "connections": {"total": 2, "enabled": 2, "healthy": 0, "unhealthy": 2},
    }


@pytest.mark.timeout(60)
def test_health_disabled_site_counts_in_total_not_enabled(broker, exporter_factory):
    exp = start(exporter_factory, [site("site_a", broker), site("off", broker, enabled=False)])
    code, body = wait_health(exp, lambda c, b: b.get("connections", {}).get("healthy") == 1)
    assert code == 200
    assert body["status"] == "healthy"
    assert body["connections"] == {"total": 2, "enabled": 1, "healthy": 1, "unhealthy": 0}
    # The broker never saw the disabled site.
    assert broker.connects("off_itest") == 0


@pytest.mark.timeout(60)
def test_health_verbose_sites_and_alias(broker, exporter_factory):
    dead = dead_site("dead")
    exp = start(exporter_factory,
                [site("site_a", broker), dead, site("off", broker, enabled=False)])
    code, body = wait_health(
        exp, lambda c, b: b["sites"][0]["connected"] and b["sites"][1]["reconnects"] >= 1,
        verbose=True)
    assert code == 200 and body["status"] == "degraded"
    assert list(body)[:3] == ["status", "service", "connections"]
    required = {"name", "client_id", "enabled", "state", "connected", "connected_since",
                "last_disconnect_reason", "reconnects", "cooldown_remaining_s",
                "messages_received", "last_message_at", "broker"}
    by_name = {s["name"]: s for s in body["sites"]}
    assert [s["name"] for s in body["sites"]] == ["site_a", "dead", "off"]
    for s in body["sites"]:
        assert required <= set(s), f"missing {required - set(s)} in {s}"
        assert s["client_id"] == f"{s['name']}_itest"
    a, d, off = by_name["site_a"], by_name["dead"], by_name["off"]
    assert a["broker"] == f"{HOST}:{broker.port}"
    assert d["broker"] == f"{HOST}:{dead['port']}"
    assert a["enabled"] is True and a["state"] == "connected" and a["connected"] is True
    assert abs(a["connected_since"] - time.time()) < 60
    assert a["last_disconnect_reason"] is None and a["reconnects"] == 0
    assert a["messages_received"] == 0 and a["last_message_at"] is None
    assert a["cooldown_remaining_s"] == 0
    assert d["connected"] is False and d["state"] in ("connecting", "backoff")
    assert d["connected_since"] is None and d["last_disconnect_reason"] == "refused"
    assert off["enabled"] is False and off["state"] == "disabled" and off["connected"] is False

    # The old alias (with or without the slash) gives the same body as /health.
    wait_health(exp, lambda c, b: b["status"] == "degraded")
    plain = exp.http_get("/health")
    for path in ("/api/v1/mqtt/health/", "/api/v1/mqtt/health"):
        alias = exp.http_get(path)
        assert alias[0] == plain[0] == 200
        assert json.loads(alias[2]) == json.loads(plain[2])
        assert alias[1]["Content-Type"] == "application/json"
    alias_verbose = json.loads(exp.http_get("/api/v1/mqtt/health/?verbose=true")[2])
    assert [s["name"] for s in alias_verbose["sites"]] == ["site_a", "dead", "off"]


@pytest.mark.timeout(60)
def test_unknown_path_404_and_wrong_methods_405_with_allow(broker, exporter_factory):
    exp = start(exporter_factory, [site("site_a", broker)])
    for path in ("/nope", "/metricsx", "/health/extra", "/api/v1/mqtt/healthz"):
        assert exp.http_get(path)[0] == 404, path
    for path in ("/health", "/metrics", "/api/v1/mqtt/health/"):
        for method in ("POST", "PUT", "DELETE"):
            status, headers, _ = request(exp, method, path)
            assert status == 405, (method, path, status)
            allow = {m.strip() for m in headers.get("Allow", "").split(",")}
            assert "GET" in allow and method not in allow, (method, path, headers)
        assert request(exp, "GET", path)[0] in (200, 503)
    # HEAD on /health is allowed (it is in the Allow header of every 405).
    status, headers, body = request(exp, "HEAD", "/health")
    assert status == 200 and body == b""


@pytest.mark.timeout(60)
def test_head_metrics_is_allowed_as_advertised(broker, exporter_factory):
    exp = start(exporter_factory, [site("site_a", broker)])
    _, headers, _ = request(exp, "POST", "/metrics")
    assert "HEAD" in headers["Allow"]
    status, _, body = request(exp, "HEAD", "/metrics")
    assert status == 200 and body == b""


# =========================================================================== /metrics


def parse_meta(text: str) -> tuple[dict[str, str], set[str]]:
    types, helps = {}, set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)$", line)
        if m:
            types[m[1]] = m[2]
        m = re.match(r"# HELP (\S+) \S", line)
        if m:
            helps.add(m[1])
    return types, helps


def all_samples(text: str):
    for fam in text_string_to_metric_families(text):
        yield from fam.samples


@pytest.mark.timeout(60)
def test_metrics_names_types_labels_and_promtool(broker, exporter_factory):
    dead = dead_site("dead")
    exp = start(exporter_factory, [site("site_a", broker), dead, site("off", broker, enabled=False)])
    exp.wait_metric("mqtt_site_up", lambda v: v == 1.0, 15, site="site_a")
    exp.wait_metric("mqtt_site_disconnects_total", lambda v: (v or 0) >= 1, 15,
                    site="dead", reason="refused")
    text = exp.metrics_text()
    sites = ("site_a", "dead", "off")

    types, helps = parse_meta(text)
    mqtt_types = {k: v for k, v in types.items() if k.startswith("mqtt_")}
    assert mqtt_types == EXPECTED_TYPES
    assert set(EXPECTED_TYPES) <= helps, set(EXPECTED_TYPES) - helps

    samples = list(all_samples(text))
    assert not [s.name for s in samples if s.name.endswith("_created")]
    by = {}
    for s in samples:
        by.setdefault(s.name, []).append(s)
    for s in samples:
        if s.name.startswith("mqtt_site_"):
            assert s.labels.get("site") in sites, s
    # One series per site for the plain per-site metrics.
    for name in ("mqtt_site_up", "mqtt_site_connects_total", "mqtt_site_reconnect_attempts_total",
                 "mqtt_site_cooldown_active", "mqtt_site_cooldown_remaining_seconds",
                 "mqtt_site_cooldowns_total", "mqtt_site_messages_received_total",
                 "mqtt_site_last_message_timestamp_seconds",
                 "mqtt_site_last_connect_duration_seconds",
                 "mqtt_site_subscriptions_refused_total", "mqtt_exporter_internal_errors_total"):
        assert sorted(s.labels["site"] for s in by[name]) == sorted(sites), name
        assert all(set(s.labels) == {"site"} for s in by[name]), name

    def val(name, **labels):
        got = [s.value for s in by.get(name, []) if s.labels == labels]
        assert len(got) == 1, (name, labels, got)
        return got[0]

    assert val("mqtt_site_up", site="site_a") == 1.0
    assert val("mqtt_site_up", site="dead") == 0.0 and val("mqtt_site_up", site="off") == 0.0
    # State set: one series per state, exactly one at 1.
    for name in sites:
        states = {s.labels["state"]: s.value for s in by["mqtt_site_state"]
                  if s.labels["site"] == name}
        assert set(states) == set(SITE_STATES)
        assert sorted(states.values()) == [0.0] * 5 + [1.0], (name, states)
    assert val("mqtt_site_state", site="site_a", state="connected") == 1.0
    assert val("mqtt_site_state", site="off", state="disabled") == 1.0
    # Info.
    for name, port in (("site_a", broker.port), ("dead", dead["port"]), ("off", broker.port)):
        assert val("mqtt_site_info", site=name, client_id=f"{name}_itest",
                   broker=f"{HOST}:{port}", protocol="3.1.1") == 1.0
    # Every reason, every site, from 0.
    for name in sites:
        reasons = {s.labels["reason"]: s.value for s in by["mqtt_site_disconnects_total"]
                   if s.labels["site"] == name}
        assert set(reasons) == set(REASONS), (name, reasons)
    for name in ("site_a", "off"):
        for reason in REASONS:
            assert val("mqtt_site_disconnects_total", site=name, reason=reason) == 0.0
    assert val("mqtt_site_disconnects_total", site="dead", reason="refused") >= 1
    assert val("mqtt_site_connects_total", site="site_a") == 1.0
    assert 0 < val("mqtt_site_last_connect_duration_seconds", site="site_a") < 5
    assert val("mqtt_site_last_connect_duration_seconds", site="dead") == 0.0
    assert "mqtt_site_connect_duration_seconds_count" not in by  # opt-in only
    assert val("mqtt_broker_connect_duration_seconds_count", broker=f"{HOST}:{broker.port}") == 1
    # Exported from 0 for every site (alertable with increase() from the first scrape).
    for name in sites:
        assert val("mqtt_site_subscriptions_refused_total", site=name) == 0.0
        assert val("mqtt_exporter_internal_errors_total", site=name) == 0.0
    # Per broker endpoint with an enabled site ("off" shares site_a's broker): from 0.
    live, gone = f"{HOST}:{broker.port}", f"{HOST}:{dead['port']}"
    for name in ("mqtt_broker_sites", "mqtt_broker_sites_connected",
                 "mqtt_broker_connection_losses_total"):
        assert sorted(s.labels["broker"] for s in by[name]) == sorted((live, gone)), name
        assert all(set(s.labels) == {"broker"} for s in by[name]), name
    assert val("mqtt_broker_sites", broker=live) == 1.0
    assert val("mqtt_broker_sites", broker=gone) == 1.0
    assert val("mqtt_broker_sites_connected", broker=live) == 1.0
    assert val("mqtt_broker_sites_connected", broker=gone) == 0.0
    assert val("mqtt_broker_connection_losses_total", broker=live) == 0.0
    assert val("mqtt_broker_connection_losses_total", broker=gone) == 0.0
    # Shutdown histogram: these exact buckets, no labels.
    les = [float(s.labels["le"]) for s in by["mqtt_exporter_shutdown_duration_seconds_bucket"]]
    assert les == list(SHUTDOWN_BUCKETS)
    assert all(set(s.labels) == {"le"} for s in by["mqtt_exporter_shutdown_duration_seconds_bucket"])
    assert val("mqtt_exporter_shutdown_duration_seconds_count") == 0.0
    assert val("mqtt_exporter_last_shutdown_timed_out") == 0.0
    import exporter
    assert val("mqtt_exporter_build_info", version=exporter.__version__, instance_id="test") == 1.0

    proc = subprocess.run(["/usr/bin/promtool", "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.timeout(60)
def test_messages_are_counted_but_not_the_own_status_topic(broker_factory, exporter_factory):
    broker = broker_factory(extra_conf="log_type subscribe")
    exp = start(exporter_factory, [site("site_a", broker)])
    # The SUBSCRIBE was processed (mosquitto logs "<id> <qos> <filter>"): nothing we publish
    # from now on can be missed.
    broker.wait_log(r"^\d+: site_a_itest 0 site_a/#$", 15)
    c = mqtt_client(broker, client_id="test-publisher")
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    try:
        before = time.time()
        # Status-topic messages first (not counted), then the data.
        infos = [c.publish("site_a/backend/status", p, qos=1) for p in ("offline", "online")]
        infos += [c.publish("site_a/sensors/x", f'{{"v": {i}}}', qos=1) for i in range(5)]
        for info in infos:
            info.wait_for_publish(timeout=10)
        exp.wait_metric("mqtt_site_messages_received_total", lambda v: (v or 0) >= 5, 15,
                        site="site_a")
        # One more round-trip through the same ordered stream: a status message, then a
        # data message; when the data one is counted, everything before it was processed.
        c.publish("site_a/backend/status", "online", qos=1).wait_for_publish(timeout=10)
        c.publish("site_a/sensors/x", "6", qos=1).wait_for_publish(timeout=10)
        exp.wait_metric("mqtt_site_messages_received_total", lambda v: (v or 0) >= 6, 15,
                        site="site_a")
        after = time.time()
    finally:
        c.disconnect()
        c.loop_stop()
    m = exp.metrics()
    assert m[("mqtt_site_messages_received_total", frozenset({("site", "site_a")}))] == 6
    ts = m[("mqtt_site_last_message_timestamp_seconds", frozenset({("site", "site_a")}))]
    assert before - 1 <= ts <= after + 1, (before, ts, after)
    _, body = exp.health(verbose=True)
    assert body["sites"][0]["messages_received"] == 6
    assert before - 1 <= body["sites"][0]["last_message_at"] <= after + 1


# =========================================================================== secrets


def run_check_config(exp) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "check-config"], cwd=exp.dir,
                          env=exp.env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_secrets_never_leak(broker_factory, exporter_factory, tmp_path, log_format):
    secret = "S-" + secrets.token_urlsafe(24)
    wrong = "W-" + secrets.token_urlsafe(24)
    broker = broker_factory(users={"backend": secret})
    pw_file = tmp_path / "pw.txt"
    pw_file.write_text(secret + "\n")
    sites = [
        site("site_env", broker, username="backend", password_env="SITE_PW"),
        site("site_file", broker, username="backend", password_file=str(pw_file)),
        site("site_wrong", broker, username="backend", password_env="WRONG_PW"),
    ]
    env = {"SITE_PW": secret, "WRONG_PW": wrong, "LOG_LEVEL": "DEBUG", "LOG_FORMAT": log_format}
    exp = start(exporter_factory, sites, env=env)
    exp.wait_metric("mqtt_site_up", lambda v: v == 1.0, 15, site="site_env")
    exp.wait_metric("mqtt_site_up", lambda v: v == 1.0, 15, site="site_file")
    exp.wait_metric("mqtt_site_disconnects_total", lambda v: (v or 0) >= 2, 15,
                    site="site_wrong", reason="refused")
    assert broker.connects("site_env_itest") == 1 and broker.connects("site_file_itest") == 1
    assert broker.connects("site_wrong_itest") == 0
    assert exp.metric("mqtt_site_up", site="site_wrong") == 0.0
    assert exp.metric("mqtt_site_connects_total", site="site_wrong") == 0.0

    outputs = {
        "health": exp.http_get("/health?verbose=true")[2].decode(),
        "alias": exp.http_get("/api/v1/mqtt/health/?verbose=true")[2].decode(),
        "metrics": exp.metrics_text(),
        "index": exp.http_get("/")[2].decode(),
    }
    cc = run_check_config(exp)
    assert cc.returncode == 0, cc.stderr
    outputs["check-config"] = cc.stdout + cc.stderr
    assert "password=env:SITE_PW" in cc.stdout and f"password=file:{pw_file}" in cc.stdout

    # Shut down cleanly, so the shutdown's log lines are checked too.
    exp.terminate()
    assert exp.wait_exit(30) == 0
    log = exp.log_text()
    outputs["log"] = log
    assert "refused" in log and "site_wrong" in log  # the log does talk about the failure
    if log_format == "json":
        for line in log.splitlines():
            if line.strip():
                json.loads(line)
    for where, text in outputs.items():
        for value in (secret, wrong):
            assert value not in text, f"secret found in {where}"


# =========================================================================== exposition (#9)

#: What Prometheus 2.x sends.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_1_0 = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def get_metrics(exp, accept=None, gzip_ok=False):
    headers = {}
    if accept is not None:
        headers["Accept"] = accept
    if gzip_ok:
        headers["Accept-Encoding"] = "gzip"
    conn = http.client.HTTPConnection(HOST, exp.port, timeout=5)
    try:
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.getheader("Content-Encoding") == "gzip":
            import gzip
            body = gzip.decompress(body)
        return resp.status, resp.getheader("Content-Type"), body.decode()
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_metrics_content_type_says_0_0_4_and_openmetrics_is_negotiated(broker, exporter_factory):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    exp = start(exporter_factory, [site("site_a", broker), dead_site("dead")])
    exp.wait_metric("mqtt_site_up", lambda v: v == 1.0, 15, site="site_a")
    # Plain, text/plain and a refused OpenMetrics: the text format, labelled as 0.0.4.
    for accept in (None, "text/plain", "*/*", "application/openmetrics-text;q=0",
                   "application/openmetrics-text;version=9.9.9"):
        status, ctype, text = get_metrics(exp, accept)
        assert (status, ctype) == (200, TEXT_0_0_4), accept
        assert "# EOF" not in text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["mqtt_site_connects"].type == "counter"
    proc = subprocess.run(["/usr/bin/promtool", "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")

    # Prometheus's Accept: OpenMetrics 1.0, also gzipped.
    for gzip_ok in (False, True):
        status, ctype, om = get_metrics(exp, PROMETHEUS_ACCEPT, gzip_ok)
        assert (status, ctype) == (200, OPENMETRICS_1_0)
        assert om.endswith("\n# EOF\n") and om.count("# EOF") == 1
        fams = {f.name: f for f in om_parse(om)}
        # Counter families are named without _total; their samples carry it.
        connects = fams["mqtt_site_connects"]
        assert connects.type == "counter"
        assert {s.name for s in connects.samples} == {"mqtt_site_connects_total"}
        assert {s.labels["site"]: s.value for s in connects.samples} == {"site_a": 1.0,
                                                                       "dead": 0.0}
        assert "# TYPE mqtt_site_connects counter" in om
        assert "# TYPE mqtt_site_connects_total" not in om
        assert not [n for n in fams if n.endswith("_total")]
        assert fams["mqtt_site"].type == "info"  # mqtt_site_info
        assert fams["mqtt_exporter_shutdown_duration_seconds"].type == "histogram"
        assert not [s for f in fams.values() for s in f.samples if s.name.endswith("_created")]
    # Same series in both formats (names and labels).
    text_series = {(s.name, frozenset(s.labels.items())) for s in all_samples(text)
                   if s.name.startswith("mqtt_")}
    om_series = {(s.name, frozenset(s.labels.items())) for f in om_parse(om) for s in f.samples
                 if s.name.startswith("mqtt_")}
    assert om_series == text_series


@pytest.mark.timeout(60)
def test_prometheus_scrapes_the_openmetrics_exposition(broker, exporter_factory,
                                                       prometheus_factory):
    """A real Prometheus (which asks for OpenMetrics first) ingests the exposition."""
    exp = start(exporter_factory, [site("site_a", broker)])
    exp.wait_metric("mqtt_site_up", lambda v: v == 1.0, 15, site="site_a")
    prom = prometheus_factory([f"{HOST}:{exp.port}"])

    def scraped():
        targets = prom.api("targets")["activeTargets"]
        assert all(not t["lastError"] for t in targets), targets
        return prom.query('mqtt_site_connects_total{site="site_a"}')

    result = wait_until(scraped, 30, interval=0.2, message="prometheus scraped the exporter")
    assert result[0]["value"][1] == "1"
    assert prom.query('mqtt_site_info{site="site_a"}')
    assert prom.query("mqtt_exporter_shutdown_duration_seconds_bucket")
    assert prom.targets_up()


class View:
    """A small ServiceView in-process: site states in every state, no bridge."""

    def __init__(self, tmp_path, names=("a",)):
        from exporter.reload import ConfigStatus
        from exporter.state import ShutdownHistory, SystemClock
        from tests.support.fakes import site_state
        self.site_states = [site_state(n, state=SITE_STATES[i % len(SITE_STATES)])
                            for i, n in enumerate(names)]
        self.brokers = []
        self.bridge_store = None
        self.shutdown_history = ShutdownHistory.load(str(tmp_path))
        self.instance_id = 'in"st\\'
        self.running = True
        self.clock = SystemClock()
        self.config_status = ConfigStatus(loaded=True, at=0.0)


def test_openmetrics_is_what_prometheus_client_writes_for_the_same_families(tmp_path):
    """The OpenMetrics body is the text adapted (fast), byte for byte what
    prometheus_client's OpenMetrics writer makes of the same families."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    from exporter.metrics import (
        ServiceCollector,
        make_metrics_app,
        text_to_openmetrics,
    )

    view = View(tmp_path, names=[f"s{i}" for i in range(12)] + ['we"ird\\'])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(view))
    app = make_metrics_app(view, CollectorRegistry(auto_describe=False))
    got = {}
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics",
                         "HTTP_ACCEPT": PROMETHEUS_ACCEPT},
                        lambda s, h: got.update(status=s, headers=dict(h))))
    assert got["headers"]["Content-Type"] == OPENMETRICS_1_0
    assert body == openmetrics(registry)
    assert body.endswith(b"# EOF\n")
    # Quotes in HELP are escaped in OpenMetrics only; untyped becomes unknown.
    text = '# HELP x_total Say "hi".\n# TYPE x_total counter\nx_total 1.0\n# TYPE y untyped\ny 2.0\n'
    assert text_to_openmetrics(text) == ('# HELP x Say \\"hi\\".\n# TYPE x counter\nx_total 1.0\n'
                                         "# TYPE y unknown\ny 2.0\n# EOF\n")


def test_authorize_hook_answers_401_with_the_basic_realm(tmp_path):
    from exporter.http import make_app
    from exporter.metrics import process_registry

    seen = []

    def authorize(environ):
        seen.append(environ["PATH_INFO"])
        return environ.get("HTTP_AUTHORIZATION") == "Basic ok"

    app = make_app(View(tmp_path), process_registry(), authorize=authorize)
    for path in ("/metrics", "/health", "/", "/nope"):
        got = {}
        body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path},
                            lambda s, h, got=got: got.update(status=s, headers=dict(h))))
        assert got["status"] == "401 Unauthorized", path
        assert got["headers"]["WWW-Authenticate"] == 'Basic realm="mqtt-site-exporter"'
        assert b"a" not in body.replace(b"unauthorized", b"")  # nothing about the service
        got.clear()
        app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "HTTP_AUTHORIZATION": "Basic ok"},
            lambda s, h, got=got: got.update(status=s))
        assert got["status"] != "401 Unauthorized", path
    assert seen.count("/metrics") == 2


def test_site_connect_histogram_is_served_only_on_request(tmp_path):
    from exporter.http import make_app
    from exporter.metrics import process_registry

    view = View(tmp_path, names=["a", "b"])
    view.site_states[0].connect_duration.observe(0.02)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"}
    for on in (False, True):
        app = make_app(view, process_registry(), site_connect_histogram=on)
        text = b"".join(app(dict(environ), lambda s, h: None)).decode()
        assert ('mqtt_site_connect_duration_seconds_bucket{le="0.025",site="a"} 1.0\n'
                in text) is on
        assert 'mqtt_site_last_connect_duration_seconds{site="a"} 0.02\n' in text


def test_a_scrape_lets_the_event_loop_run_between_its_steps(tmp_path):
    """Timers (and sockets) are served while a scrape of many sites runs: the app yields to
    the event loop between steps (gevent.sleep(0) alone would hold them to the end)."""
    import gevent
    from prometheus_client import CollectorRegistry

    from exporter.http import make_app
    from exporter.metrics import SITES_PER_PAUSE

    view = View(tmp_path, names=[f"s{i:04d}" for i in range(8 * SITES_PER_PAUSE)])
    app = make_app(view, CollectorRegistry(auto_describe=False))
    ticks = []

    def ticker():
        while True:
            gevent.sleep(0.000_001)
            ticks.append(1)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"}
    for _ in range(2):  # the first scrape writes everything, the second reads only
        greenlet = gevent.spawn(ticker)
        gevent.sleep(0.000_001)
        ticks.clear()
        body = b"".join(app(dict(environ), lambda s, h: None))
        greenlet.kill()
        assert b's0000"} ' in body
        assert len(ticks) >= 7  # one per pause at least: 8 steps of reading


@pytest.mark.timeout(60)
def test_per_site_connect_histogram_only_on_request(broker, exporter_factory):
    """EXPORTER_SITE_CONNECT_HISTOGRAM=true brings mqtt_site_connect_duration_seconds back
    per site; by default only the per-broker histogram and the last duration are there."""
    plain = start(exporter_factory, [site("site_a", broker)])
    detailed = start(exporter_factory, [site("site_b", broker)],
                     env={"EXPORTER_SITE_CONNECT_HISTOGRAM": "true"})
    for exp in (plain, detailed):
        wait_until(lambda exp=exp: "mqtt_broker_connect_duration_seconds_count{" in
                   exp.metrics_text() and 'mqtt_site_up{site=' in exp.metrics_text(), 15)
    wait_until(lambda: 'mqtt_site_connect_duration_seconds_count{site="site_b"} 1.0'
               in detailed.metrics_text(), 15, message=detailed.metrics_text()[-2000:])
    text = plain.metrics_text()
    assert "mqtt_site_connect_duration_seconds" not in text
    assert 'mqtt_site_last_connect_duration_seconds{site="site_a"}' in text
