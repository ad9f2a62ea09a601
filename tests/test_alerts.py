"""The alert rules: promtool check/test, and the conventions checked in Python.

- ``promtool check rules alerts/*.rules.yml`` is clean (no error, no warning).
- ``promtool test rules alerts/tests/*.yml`` passes.
- Every alert: prefix MqttSite/MqttExporter/MqttBroker in CamelCase, ``for:``, ``severity`` in
  critical/warning/info, ``summary`` (static, ends with a period), ``description`` (templated),
  ``runbook_url`` = docs/operations.md#<lowercase name> whose heading exists.
- Every alert has at least one promtool case where it fires (with exact labels and
  annotations) and one where it must not.
- Recording rules are named level:metric:operation.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import find_tool

REPO = Path(__file__).resolve().parent.parent
ALERTS_DIR = REPO / "alerts"
RULE_FILES = sorted(ALERTS_DIR.glob("*.rules.yml"))
TEST_FILES = sorted((ALERTS_DIR / "tests").glob("*.yml"))
RUNBOOK = REPO / "docs" / "operations.md"
SEVERITIES = {"critical", "warning", "info"}
NAME = re.compile(r"^Mqtt(Site|Exporter|Broker)(?:[A-Z][a-z0-9]*)+$")
RECORD = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w))+$")
REQUIRED_ALERTS = {
    "MqttSiteReconnectLoop", "MqttSiteDuplicateClientId", "MqttSiteDown",
    "MqttExporterAllSitesDown", "MqttSiteCooldownFlapping", "MqttSiteSilent",
    "MqttExporterSlowShutdown", "MqttExporterDown", "MqttBrokerFlapping",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_tool("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make test` (installs Debian's prometheus) "
                    "or apt-get install prometheus", pytrace=False)
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)


def _rules() -> list[dict]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _anchors(markdown: str) -> set[str]:
    """GitHub-style anchors of the markdown headings (lowercase, spaces to '-', no punctuation)."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m[1].strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_files_exist():
    assert RULE_FILES == [ALERTS_DIR / "mqtt-site-exporter.rules.yml"]
    assert TEST_FILES, "no promtool test files in alerts/tests/"
    assert RUNBOOK.exists()


def test_promtool_check_rules_clean(promtool):
    proc = _run([promtool, "check", "rules", *map(str, RULE_FILES)])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "SUCCESS" in output, output
    assert not re.search(r"warn|error", output, re.IGNORECASE), output


def test_promtool_test_rules(promtool):
    proc = _run([promtool, "test", "rules", *map(str, TEST_FILES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout + proc.stderr


def test_required_alerts_present():
    assert set(_alerts()) >= REQUIRED_ALERTS


def test_rule_names_unique():
    names = [r.get("alert") or r.get("record") for r in _rules()]
    assert len(names) == len(set(names))


def test_recording_rule_names():
    for rule in _rules():
        if "record" in rule:
            assert RECORD.match(rule["record"]), f"{rule['record']}: not level:metric:operation"


@pytest.mark.parametrize("name", sorted(_alerts()))
def test_alert_conventions(name):
    rule = _alerts()[name]
    assert NAME.match(name), f"{name}: CamelCase with prefix MqttSite, MqttExporter or MqttBroker"
    assert "for" in rule and DURATION.match(str(rule["for"])), f"{name}: needs an explicit for:"
    labels = rule.get("labels", {})
    assert labels.get("severity") in SEVERITIES, f"{name}: severity {labels.get('severity')!r}"
    ann = rule.get("annotations", {})
    assert set(ann) >= {"summary", "description", "runbook_url"}, f"{name}: {sorted(ann)}"
    summary = ann["summary"]
    assert summary.endswith(".") and "{{" not in summary, f"{name}: static summary with a period"
    description = ann["description"]
    assert "{{" in description and "$labels.instance" in description, \
        f"{name}: description must be templated and name the instance"
    if name.startswith("MqttSite"):
        assert "{{ $labels.site }}" in description, f"{name}: description must name the site"
    if name.startswith("MqttBroker"):
        assert "{{ $labels.broker }}" in description, f"{name}: description must name the broker"
    assert ann["runbook_url"] == f"docs/operations.md#{name.lower()}", f"{name}: runbook_url"


def test_runbook_has_every_anchor():
    anchors = _anchors(RUNBOOK.read_text())
    for name, rule in _alerts().items():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert (REPO / path).resolve() == RUNBOOK.resolve(), f"{name}: {url}"
        assert anchor in anchors, f"{name}: no heading for #{anchor} in docs/operations.md"


def test_every_alert_has_firing_and_silent_cases():
    firing: dict[str, int] = {}
    silent: dict[str, int] = {}
    for path in TEST_FILES:
        doc = yaml.safe_load(path.read_text())
        rule_files = {(path.parent / f).resolve() for f in doc["rule_files"]}
        assert rule_files == {p.resolve() for p in RULE_FILES}, f"{path}: rule_files"
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                name = case["alertname"]
                assert name in _alerts(), f"{path}: unknown alert {name}"
                exp = case.get("exp_alerts") or []
                if not exp:
                    silent[name] = silent.get(name, 0) + 1
                    continue
                firing[name] = firing.get(name, 0) + 1
                for alert in exp:
                    labels = alert.get("exp_labels", {})
                    ann = alert.get("exp_annotations", {})
                    assert labels.get("severity") == _alerts()[name]["labels"]["severity"], \
                        f"{path} {name}: exp_labels must include the severity"
                    assert set(ann) == set(_alerts()[name]["annotations"]), \
                        f"{path} {name}: exp_annotations must list every annotation"
    missing_fire = sorted(set(_alerts()) - set(firing))
    missing_silent = sorted(set(_alerts()) - set(silent))
    assert not missing_fire, f"alerts without a firing test case: {missing_fire}"
    assert not missing_silent, f"alerts without a must-not-fire test case: {missing_silent}"


def test_duplicate_alert_reads_the_gauge():
    """The duplicate alert is the exporter's verdict (presence records or inferred unknown
    peer), not a guess from takeover counts: a crash-looping broker gives no takeovers and a
    broker that never kicks gives no takeovers either."""
    expr = _alerts()["MqttSiteDuplicateClientId"]["expr"]
    assert "mqtt_site_duplicate_instance" in expr
    assert "takeover" not in expr and "cooldown" not in expr
    assert "mqtt_broker_connection_losses_total" in _alerts()["MqttBrokerFlapping"]["expr"]


def test_recording_rules_evaluated_before_their_alerts():
    """An alert that reads a recording rule must follow it in the same group: across groups the
    evaluation order is undefined and the alert would sometimes see the previous value."""
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            seen: set[str] = set()
            for rule in group["rules"]:
                if "record" in rule:
                    seen.add(rule["record"])
                    continue
                used = set(re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", rule["expr"]))
                assert used <= seen, f"{rule['alert']}: {sorted(used - seen)} not recorded " \
                                     f"earlier in group {group['name']}"
