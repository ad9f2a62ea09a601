"""The live proof: the alerts catch the production loop they were written for.

One real Mosquitto, two exporter processes with the SAME ``MQTT_INSTANCE_ID`` and the same
sites (the production accident: a second replica, or an old process still running), and a
real Prometheus (Debian 2.42, 1 s scrape and evaluation) scraping both and evaluating our rules.

Prometheus evaluates a *test copy* of ``alerts/mqtt-site-exporter.rules.yml``, transformed
programmatically: every ``for:`` and every ``[range]`` window is divided by ``TIME_SCALE``
(10m -> 30 s, 1m -> 3 s, ...). Nothing else changes: same expressions, thresholds, labels and
annotations. The real file stays what ``promtool test rules`` (tests/test_alerts.py) covers.

Why these numbers (measured): with MQTT_COOLDOWN_SECONDS=3 and MQTT_STABLE_SECONDS=2 the loser
of the two takes a takeover + cooldown about every 4 s; the winner only sees `connection_lost`.
So the scaled 30 s window holds ~7 takeovers (threshold: > 3) and the loop alert fires ~20 s
after start. After the winner is stopped the takeovers stop, and the alert resolves when they
have aged out of the 30 s window.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from tests.support import HOST, site, wait_until
from tests.support.prometheus import JOB

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "mqtt-site-exporter.rules.yml"
ALERT = "MqttSiteReconnectLoop"
TIME_SCALE = 20
INSTANCE_ID = "bfg_back"
ENV = {
    # Small cooldown/stable times make the loop visible in seconds; a small backoff cap keeps a
    # rare non-takeover close on the loser from pausing it for up to 60 s.
    "MQTT_COOLDOWN_SECONDS": "3",
    "MQTT_STABLE_SECONDS": "2",
    "MQTT_BACKOFF_MAX_SECONDS": "2",
    "MQTT_SHUTDOWN_TIMEOUT": "3",
}

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_RANGE = re.compile(r"\[((?:\d+(?:ms|s|m|h|d|w))+)(:[^\]]*)?\]")


def _seconds(duration: str) -> float:
    parts = _DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(int(n) * _UNITS[u] for n, u in parts)


def _scaled(duration: str, minimum: int) -> str:
    seconds = _seconds(duration)
    if seconds == 0:
        return "0s"
    return f"{max(minimum, round(seconds / TIME_SCALE))}s"


def scaled_rules(source: Path, target: Path) -> dict:
    """Write ``source`` with every ``for:`` and range window divided by TIME_SCALE; return it."""
    doc = yaml.safe_load(source.read_text())
    for group in doc["groups"]:
        assert "interval" not in group, "scale group intervals too"
        for rule in group["rules"]:
            rule["expr"] = _RANGE.sub(
                lambda m: f"[{_scaled(m[1], 2)}{m[2] or ''}]", rule["expr"])
            if "for" in rule:
                rule["for"] = _scaled(rule["for"], 1)
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return doc


def test_scaled_copy_only_shortens_time():
    """The transform itself: windows and for: shrink, nothing else changes."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        doc = scaled_rules(RULES, Path(d) / "r.yml")
    real = yaml.safe_load(RULES.read_text())
    for g_real, g_test in zip(real["groups"], doc["groups"]):
        for r_real, r_test in zip(g_real["rules"], g_test["rules"]):
            assert r_real.get("alert") == r_test.get("alert")
            assert r_real.get("labels") == r_test.get("labels")
            assert r_real.get("annotations") == r_test.get("annotations")
            assert _RANGE.sub("[]", r_real["expr"]) == _RANGE.sub("[]", r_test["expr"])
    loop = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == ALERT)
    assert loop["for"] == "3s"
    takeovers = next(r for g in doc["groups"] for r in g["rules"]
                     if r.get("record") == "site:mqtt_site_takeovers:increase10m")
    assert "[30s]" in takeovers["expr"]


def _loop_alerts(prom) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"].get("alertname") == ALERT]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_duplicate_instance_id_fires_reconnect_loop_and_resolves(
        broker, exporter_factory, prometheus_factory, tmp_path):
    t0 = time.monotonic()
    sites = [site("site_88", broker), site("site_89", broker)]
    a = exporter_factory(sites, instance_id=INSTANCE_ID, env=ENV)
    b = exporter_factory(sites, instance_id=INSTANCE_ID, env=ENV)
    a.wait_ready()
    b.wait_ready()
    targets = {f"{HOST}:{a.port}": a, f"{HOST}:{b.port}": b}

    rules = tmp_path / "rules-scaled.yml"
    doc = scaled_rules(RULES, rules)
    prom = prometheus_factory(list(targets), rule_files=[rules])

    # Prometheus loaded every rule of the real file, and none fails to evaluate.
    expected = {r.get("alert") or r.get("record") for g in doc["groups"] for r in g["rules"]}

    def rules_ok():
        loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        bad = [(r["name"], r.get("lastError")) for r in loaded if r.get("health") == "err"]
        assert not bad, f"rules failing on the live Prometheus: {bad}"
        return {r["name"] for r in loaded} == expected and all(
            r.get("health") == "ok" for r in loaded)

    wait_until(rules_ok, 20, interval=0.5, message="all rules loaded and evaluated")
    wait_until(prom.targets_up, 20, interval=0.5, message="both exporters scraped")

    # 1. The loop: the broker really sees two clients with one ID kicking each other.
    wait_until(lambda: broker.takeovers() >= 2, 30, interval=0.2,
               message="mosquitto logs takeovers between the two instances")

    # 2. The alert reaches `firing` in Prometheus.
    def firing():
        return [x for x in _loop_alerts(prom) if x["state"] == "firing"]

    fired = wait_until(firing, 60, interval=0.5,
                       message=f"{ALERT} firing; alerts: {prom.alerts()!r}")
    t_fired = time.monotonic()
    for alert in fired:
        labels = alert["labels"]
        assert labels["job"] == JOB and labels["instance"] in targets
        assert labels["site"] in {"site_88", "site_89"}
        assert labels["severity"] == "warning"
        assert alert["annotations"]["runbook_url"] == "docs/operations.md#mqttsitereconnectloop"
        assert f"Site {labels['site']} on {labels['instance']}" in \
            alert["annotations"]["description"]
        assert float(alert["value"]) > 3
    print(f"\n{ALERT} firing {t_fired - t0:.1f} s after start: "
          f"{[(x['labels']['instance'], x['labels']['site'], x['value']) for x in fired]}")

    # 3. Stop one instance with SIGTERM. Stop the one that is NOT the victim when there is one,
    #    so the alert on the survivor can only resolve because the takeovers really stopped
    #    (the stopped target's own series just go stale, which would prove less).
    victims = {x["labels"]["instance"] for x in fired}
    stop_target = next((t for t in targets if t not in victims), f"{HOST}:{b.port}")
    survivor_target = next(t for t in targets if t != stop_target)
    stopped, survivor = targets[stop_target], targets[survivor_target]
    stopped.terminate()
    assert stopped.wait_exit(10) == 0
    t_stopped = time.monotonic()

    # 4. The alert resolves: it disappears from /api/v1/alerts (scaled window: 30 s).
    wait_until(lambda: not _loop_alerts(prom), 60, interval=0.5,
               message=f"{ALERT} resolved after stopping {stop_target}; "
                       f"alerts: {_loop_alerts(prom)!r}")
    t_resolved = time.monotonic()
    print(f"stopped {stop_target}; {ALERT} resolved {t_resolved - t_stopped:.1f} s later; "
          f"total {t_resolved - t0:.1f} s")

    # ... because the survivor is connected on every site and no longer taken over.
    for name in ("site_88", "site_89"):
        assert survivor.wait_metric("mqtt_site_up", lambda v: v == 1.0, 10, site=name)
    before = {n: survivor.metric("mqtt_site_disconnects_total", site=n, reason="takeover")
              for n in ("site_88", "site_89")}
    result = prom.query(
        f'sum(increase(mqtt_site_disconnects_total{{reason="takeover",'
        f'instance="{survivor_target}"}}[10s]))')
    assert result and float(result[0]["value"][1]) == 0.0, result
    after = {n: survivor.metric("mqtt_site_disconnects_total", site=n, reason="takeover")
             for n in ("site_88", "site_89")}
    assert before == after
