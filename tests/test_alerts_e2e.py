"""The live proof: the duplicate alert catches the production accident it was written for.

One real Mosquitto, two exporter processes with the SAME ``MQTT_INSTANCE_ID`` and the same
sites (the production accident: a second replica, or an old process still running), and a
real Prometheus (Debian 2.42, 1 s scrape and evaluation) scraping both and evaluating our rules.

Prometheus evaluates a *test copy* of ``alerts/mqtt-site-exporter.rules.yml``, transformed
programmatically: every ``for:``, ``keep_firing_for:`` and ``[range]`` window is divided by
``TIME_SCALE`` (10m -> 30 s, 2m -> 6 s, 1m -> 3 s, ...). Nothing else changes: same
expressions, thresholds, labels and annotations. The real file stays what ``promtool test
rules`` (tests/test_alerts.py) covers.

What happens (docs/duplicates.md): each exporter publishes a retained presence record per site
and reads the other's, so both identify the duplicate (``mqtt_site_duplicate_instance`` 1,
verbose /health names the other's host, pid and boot ID) within the first reconnects; from then
on the cooldown doubles at each takeover. ``MqttSiteDuplicateClientId`` fires from the gauge
(scaled ``for: 1m`` = 3 s), whatever the takeover count. When one exporter stops with SIGTERM,
its tombstone clears the survivor's flag at once, and the alert resolves after the scaled
``keep_firing_for`` (6 s).
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
ALERT = "MqttSiteDuplicateClientId"
TIME_SCALE = 20
INSTANCE_ID = "bfg_back"
SITES = ("site_88", "site_89")
ENV = {
    # Small cooldown/stable times make the clash visible in seconds; a small backoff cap keeps
    # a rare non-takeover close from pausing a site for up to 60 s; a small cooldown ceiling
    # keeps the survivor's last cooldown short after the other one stops.
    "MQTT_COOLDOWN_SECONDS": "3",
    "MQTT_DUPLICATE_COOLDOWN_MAX_SECONDS": "12",
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
    """Write ``source`` with every ``for:``, ``keep_firing_for:`` and range window divided by
    TIME_SCALE; return it."""
    doc = yaml.safe_load(source.read_text())
    for group in doc["groups"]:
        assert "interval" not in group, "scale group intervals too"
        for rule in group["rules"]:
            rule["expr"] = _RANGE.sub(
                lambda m: f"[{_scaled(m[1], 2)}{m[2] or ''}]", rule["expr"])
            for key in ("for", "keep_firing_for"):
                if key in rule:
                    rule[key] = _scaled(rule[key], 1)
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
            assert set(r_real) == set(r_test)
    dup = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == ALERT)
    assert dup["for"] == "3s" and dup["keep_firing_for"] == "6s"
    takeovers = next(r for g in doc["groups"] for r in g["rules"]
                     if r.get("record") == "site:mqtt_site_takeovers:increase10m")
    assert "[30s]" in takeovers["expr"]


def _dup_alerts(prom) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"].get("alertname") == ALERT]


def _duplicates(exporter) -> dict[str, dict | None]:
    """{site: its verbose /health ``duplicate`` entry}."""
    _, body = exporter.health(verbose=True)
    return {s["name"]: s.get("duplicate") for s in body.get("sites", [])}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_duplicate_instance_id_fires_duplicate_alert_and_resolves(
        broker, exporter_factory, prometheus_factory, tmp_path):
    t0 = time.monotonic()
    sites = [site(name, broker) for name in SITES]
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

    # 1. Both exporters identify the other process: the gauge is 1 on every site of both, and
    #    verbose /health names the other one (pid, boot ID), not a guess.
    def identified():
        return all(x.metric("mqtt_site_duplicate_instance", site=n) == 1.0
                   for x in (a, b) for n in SITES)

    wait_until(identified, 30, interval=0.2,
               message=f"mqtt_site_duplicate_instance 1 on both exporters; a: {_duplicates(a)}, "
                       f"b: {_duplicates(b)}")
    t_identified = time.monotonic()
    for me, other in ((a, b), (b, a)):
        for name, dup in _duplicates(me).items():
            assert dup and dup.get("pid") == other.pid, (name, dup)
            assert dup.get("instance_id") == INSTANCE_ID and dup.get("boot_id"), dup
        assert me.metric("mqtt_site_duplicate_detections_total", site=SITES[0]) >= 1
        _, body = me.health()
        assert body["status"] in ("degraded", "critical"), body

    # 2. The alert reaches `firing` in Prometheus, on both instances and both sites, within the
    #    scaled 2 minutes (6 s) plus scrape and evaluation slack.
    def firing():
        got = [x for x in _dup_alerts(prom) if x["state"] == "firing"]
        return got if len(got) == len(targets) * len(SITES) else None

    fired = wait_until(firing, 30, interval=0.25,
                       message=f"{ALERT} firing for 2 instances x 2 sites; alerts: "
                               f"{prom.alerts()!r}")
    t_fired = time.monotonic()
    for alert in fired:
        labels = alert["labels"]
        assert labels["job"] == JOB and labels["instance"] in targets
        assert labels["site"] in SITES
        assert labels["severity"] == "critical"
        assert alert["annotations"]["runbook_url"].startswith("https://")
        assert alert["annotations"]["runbook_url"].endswith(
            "/docs/operations.md#mqttsiteduplicateclientid")
        assert f"Site {labels['site']} on {labels['instance']}" in \
            alert["annotations"]["description"]
    assert t_fired - t_identified < 15, t_fired - t_identified
    takeovers = {(t, n): x.metric("mqtt_site_disconnects_total", site=n, reason="takeover")
                 for t, x in targets.items() for n in SITES}
    print(f"\nidentified {t_identified - t0:.1f} s after start, {ALERT} firing "
          f"{t_fired - t_identified:.1f} s later; takeovers so far {takeovers}; broker "
          f"takeovers {broker.takeovers()}; other alerts "
          f"{sorted({x['labels']['alertname'] for x in prom.alerts()} - {ALERT})}")

    # 3. Stop one instance with SIGTERM, at a moment when it holds the connection of every
    #    site: its farewell tombstone (state "offline") is then what the broker retains, and
    #    the survivor sees it live or at its next connect (docs/duplicates.md: "flag clears at
    #    once"). Stopped while in a cooldown, it could not publish one, and the survivor would
    #    wait for the record to expire (90 s).
    def holder():
        return next((t for t, x in targets.items()
                     if all(x.metric("mqtt_site_up", site=n) == 1.0 for n in SITES)), None)

    stop_target = wait_until(holder, 30, interval=0.1,
                             message="one exporter connected on every site")
    survivor_target = next(t for t in targets if t != stop_target)
    stopped, survivor = targets[stop_target], targets[survivor_target]
    stopped.terminate()
    assert stopped.wait_exit(10) == 0
    t_stopped = time.monotonic()

    # The survivor is in a cooldown on those sites (<= 12 s): it reads the tombstone at once or
    # as the retained record at its next connect.
    for name in SITES:
        survivor.wait_metric("mqtt_site_duplicate_instance", lambda v: v == 0.0, 20, site=name)
    t_cleared = time.monotonic()
    assert all(d is None for d in _duplicates(survivor).values()), _duplicates(survivor)

    # 4. The alert resolves: it disappears from /api/v1/alerts (scaled keep_firing_for: 6 s).
    wait_until(lambda: not _dup_alerts(prom), 30, interval=0.25,
               message=f"{ALERT} resolved after stopping {stop_target}; "
                       f"alerts: {_dup_alerts(prom)!r}")
    t_resolved = time.monotonic()
    print(f"stopped {stop_target}; survivor's flag cleared {t_cleared - t_stopped:.1f} s "
          f"later, {ALERT} resolved {t_resolved - t_stopped:.1f} s after the stop; "
          f"total {t_resolved - t0:.1f} s")

    # ... and the survivor is connected on every site (at most one cooldown later, <= 12 s)
    #     and no longer taken over.
    for name in SITES:
        survivor.wait_metric("mqtt_site_up", lambda v: v == 1.0, 20, site=name)
    before = {n: survivor.metric("mqtt_site_disconnects_total", site=n, reason="takeover")
              for n in SITES}
    time.sleep(3)  # an observation window (nothing may happen in it), not a synchronisation
    after = {n: survivor.metric("mqtt_site_disconnects_total", site=n, reason="takeover")
             for n in SITES}
    assert before == after
    assert survivor.health()[1]["status"] == "healthy"
