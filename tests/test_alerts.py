"""The alert rules: promtool check/test, and the conventions checked in Python.

- ``promtool check rules alerts/*.rules.yml`` is clean (no error, no warning).
- ``promtool test rules alerts/tests/*.yml`` passes.
- Every alert: prefix MqttSite/MqttExporter/MqttBroker in CamelCase, ``for:``, ``severity`` in
  critical/warning/info, ``summary`` (static, ends with a period), ``description`` (templated),
  ``runbook_url`` = <base URL>#<lowercase name>, absolute, whose heading exists in
  docs/operations.md. The base URL is set once (scripts/alerts.py DEFAULT_BASE_URL), documented
  in docs/operations.md, and the files are what the script writes.
- Every alert has at least one promtool case where it fires (with exact labels and
  annotations) and one where it must not.
- Portable: no rule selects a ``job``, and every promtool test passes again with the job
  renamed (two other names), so every alert fires and stays silent under any job name.
- Recording rules are named level:metric:operation.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
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
    "MqttSiteSubscriptionRefused",
}
ALERTS_SCRIPT = REPO / "scripts" / "alerts.py"
# The job name the committed promtool tests use (the bundled stack's), and two others the
# tests are run again under: a Prometheus Operator Service name, and the Operator's older
# serviceMonitor/<namespace>/<name>/<port> form.
TEST_JOB = "mqtt-site-exporter"
OTHER_JOBS = ("mqtt", "serviceMonitor/monitoring/mqtt-site-exporter/0")


def _alerts_script():
    spec = importlib.util.spec_from_file_location("alerts_script", ALERTS_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BASE_URL: str = _alerts_script().DEFAULT_BASE_URL


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
    assert ann["runbook_url"] == f"{BASE_URL}#{name.lower()}", f"{name}: runbook_url"


def test_runbook_has_every_anchor():
    anchors = _anchors(RUNBOOK.read_text())
    for name, rule in _alerts().items():
        url = rule["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == BASE_URL, f"{name}: {url}"
        assert anchor in anchors, f"{name}: no heading for #{anchor} in docs/operations.md"


def test_runbook_urls_absolute_from_one_base():
    """Finding 8: a repository-relative runbook_url opens nothing from Alertmanager or Grafana.
    Every runbook_url (rules and promtool tests) is absolute and starts with the one base URL,
    which docs/operations.md documents, and the files are exactly what scripts/alerts.py
    writes (nobody edited a URL by hand)."""
    assert re.match(r"^https://\S+/docs/operations\.md$", BASE_URL), BASE_URL
    for path in [*RULE_FILES, *TEST_FILES]:
        for url in re.findall(r"runbook_url:\s*(\S+)", path.read_text()):
            assert url.startswith(BASE_URL + "#"), f"{path.name}: {url}"
    assert f"`{BASE_URL}`" in RUNBOOK.read_text(), "docs/operations.md must name the base URL"
    proc = _run([sys.executable, str(ALERTS_SCRIPT), "--check"])
    assert proc.returncode == 0, proc.stderr


def test_runbook_base_url_can_be_changed(promtool, tmp_path):
    """How a user points the runbooks at their own copy: ``scripts/alerts.py --base-url``.
    The rewritten copy has every URL on the new base, and its promtool tests still pass."""
    base = "https://git.example.com/ops/mqtt/-/blob/main/docs/operations.md"
    proc = _run([sys.executable, str(ALERTS_SCRIPT), "--base-url", base, "--out-dir",
                 str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    rules = tmp_path / RULE_FILES[0].name
    for name in _alerts():
        assert f"runbook_url: {base}#{name.lower()}\n" in rules.read_text(), name
    assert BASE_URL not in "".join(p.read_text() for p in tmp_path.rglob("*.yml"))
    proc = _run([promtool, "test", "rules", *map(str, sorted(tmp_path.glob("tests/*.yml")))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = _run([sys.executable, str(ALERTS_SCRIPT), "--base-url", "docs/operations.md",
                "--check"])
    assert bad.returncode == 2 and "absolute" in bad.stderr


def test_no_rule_selects_a_job():
    """Finding 8: MqttExporterDown hard-coded job="mqtt-site-exporter" and paged under any other
    job name. No rule may select a job (matching *on* job is fine)."""
    for rule in _rules():
        assert not re.search(r"\bjob\s*(=|!=|=~|!~)", rule["expr"]), \
            f"{rule.get('alert') or rule.get('record')}: selects a job"


def _renamed_tests(job: str, target: Path) -> list[Path]:
    """The promtool test files with the job label ``TEST_JOB`` renamed to ``job``."""
    out = []
    for path in TEST_FILES:
        text = path.read_text()
        text = text.replace(f'job="{TEST_JOB}"', f'job="{job}"')
        text = re.sub(rf"^(\s*)job: {re.escape(TEST_JOB)}$", rf"\g<1>job: '{job}'", text,
                      flags=re.M)
        text = text.replace(f"of job {TEST_JOB} ", f"of job {job} ")
        text = text.replace(f"of job {TEST_JOB}:", f"of job {job}:")
        doc = yaml.safe_load(text)
        for test in doc["tests"]:
            for series in test.get("input_series", []):
                assert f'job="{TEST_JOB}"' not in series["series"]
            for case in test.get("alert_rule_test", []):
                for alert in case.get("exp_alerts") or []:
                    assert alert["exp_labels"].get("job") != TEST_JOB, path
        doc["rule_files"] = [str((path.parent / f).resolve()) for f in doc["rule_files"]]
        out.append(target / path.name)
        out[-1].write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@pytest.mark.parametrize("job", OTHER_JOBS)
def test_promtool_tests_pass_under_another_job_name(promtool, tmp_path, job):
    """Finding 8: every alert fires and stays silent as tested, whatever the scrape job is
    called (the committed tests use job mqtt-site-exporter, and MqttExporterDown and
    MqttSiteSubscriptionRefused are also tested there under mqtt-exporter)."""
    files = _renamed_tests(job, tmp_path)
    proc = _run([promtool, "test", "rules", *map(str, files)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_exporter_down_recognises_exporters_by_their_series():
    """MqttExporterDown cannot use absent() (it needs a job): it joins `up` with the recorded
    memory of targets that exported mqtt_exporter_build_info."""
    rules = {r.get("record") or r.get("alert"): r for r in _rules()}
    seen = rules["job_instance:mqtt_exporter_target:seen"]["expr"]
    assert "mqtt_exporter_build_info" in seen and "job_instance:mqtt_exporter_target:seen" in seen
    down = rules["MqttExporterDown"]["expr"]
    assert "absent(" not in down and "job_instance:mqtt_exporter_target:seen" in down


def test_subscription_refused_alert():
    """Finding 6: an alert on mqtt_site_subscriptions_refused_total (promtool cases in
    alerts/tests/subscriptions.test.yml, both ways and under two job names)."""
    rule = _alerts()["MqttSiteSubscriptionRefused"]
    assert "mqtt_site_subscriptions_refused_total" in rule["expr"]
    assert rule["labels"]["severity"] == "warning"


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
