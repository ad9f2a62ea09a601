"""The Kustomize base in deploy/kubernetes/, checked offline (there is no cluster here).

- The kustomization is resolved here (resources and the sites ConfigMap generator): every
  listed file exists and every file of the directory is listed; when ``kubectl`` is
  installed, ``kubectl kustomize`` builds exactly the same objects.
- The core kinds validate with kubernetes-validate in strict mode (unknown fields rejected)
  against the oldest and the newest Kubernetes the base is meant for. The Prometheus Operator
  kinds have no schema there: they are checked by structure.
- Consistency: selectors match the pod labels, probes and Services hit named ports that exist,
  the grace period exceeds MQTT_SHUTDOWN_TIMEOUT, the security context is locked down, every
  environment variable is one the exporter reads, replicas equal MQTT_SHARDS, mounts agree
  with the paths in the environment and the sites file, and the sites file loads with the
  Secret's passwords in place.
- The PrometheusRule is what scripts/kubernetes.py makes from alerts/, and the overlay of
  docs/kubernetes.md builds and keeps replicas and MQTT_SHARDS equal.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import exporter
from exporter.config import load_settings
from exporter.config.environment import ENV_VARS
from exporter.config.schema import SCHEMA_PATH
from exporter.http import HEALTH_PATHS
from tests.support import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

BASE = REPO_ROOT / "deploy" / "kubernetes"
DOCS = REPO_ROOT / "docs" / "kubernetes.md"


def _load_generator():
    """scripts/kubernetes.py under its own name (``kubernetes`` is also a PyPI package)."""
    spec = importlib.util.spec_from_file_location("scripts_kubernetes",
                                                  REPO_ROOT / "scripts" / "kubernetes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = _load_generator()

#: The Kubernetes versions the base must validate against: the oldest it supports (the PDB's
#: unhealthyPodEvictionPolicy and the StatefulSet's PVC retention policy are beta, on by
#: default, from 1.27) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
CORE_KINDS = {"StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}
LIVENESS_PATH = "/-/healthy"   # 200 whenever the HTTP server answers (Prometheus' semantics)
SHUTDOWN_TIMEOUT_DEFAULT = next(v.default for v in ENV_VARS if v.name == "MQTT_SHUTDOWN_TIMEOUT")
KUBECTL = shutil.which("kubectl")


# --------------------------------------------------------------------------- resolving


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))


def generated_config_maps(kust: dict[str, Any]) -> list[dict[str, Any]]:
    """The ConfigMaps of ``configMapGenerator``, as kustomize makes them (only the features
    the base uses: plain ``files``, no name hash, labels)."""
    out = []
    for gen in kust.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files", "options"}, gen
        options = gen.get("options", {})
        assert set(options) <= {"disableNameSuffixHash", "labels"}, options
        assert options.get("disableNameSuffixHash") is True, (
            f"{gen['name']}: a hashed name changes the pod template on every edit (a restart "
            "of every replica instead of a hot reload)")
        assert all("=" not in f for f in gen["files"]), gen["files"]
        metadata: dict[str, Any] = {"name": gen["name"]}
        if options.get("labels"):
            metadata["labels"] = options["labels"]
        data = {Path(f).name: (BASE / f).read_text(encoding="utf-8") for f in gen["files"]}
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return out


def build_base() -> list[dict[str, Any]]:
    """Every object of the base, resolved from kustomization.yaml without kubectl."""
    kust = kustomization()
    assert set(kust) <= {"apiVersion", "kind", "resources", "configMapGenerator"}, (
        f"kustomization.yaml uses fields this test does not resolve: {sorted(kust)}")
    objects = []
    for rel in kust["resources"]:
        objects += load_yaml_documents(BASE / rel)
    return objects + generated_config_maps(kust)


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return build_base()


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objects):
    return one(objects, "StatefulSet")["spec"]["template"]["spec"]


def container(objects) -> dict[str, Any]:
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1
    return containers[0]


def env(objects) -> dict[str, str]:
    items = container(objects).get("env", [])
    assert all(set(e) == {"name", "value"} for e in items), "only literal values"
    return {e["name"]: e["value"] for e in items}


def mounts(objects) -> dict[str, str]:
    """{volume name: mount path} of the container."""
    return {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "matchLabels only"
    return selector["matchLabels"].items() <= labels.items()


def kubectl_kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind_and_name(objects):
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def validate_strict(obj: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: "
                        f"{path}: {exc.message}")


# --------------------------------------------------------------------------- kustomization


def test_every_file_is_listed_and_every_listed_file_exists():
    kust = kustomization()
    listed = set(kust["resources"])
    listed |= {f for gen in kust.get("configMapGenerator", []) for f in gen["files"]}
    assert all((BASE / rel).is_file() for rel in listed), sorted(listed)
    present = {p.name for p in BASE.iterdir()} - {"kustomization.yaml"}
    assert present == listed, (f"not listed: {sorted(present - listed)}; "
                               f"missing: {sorted(listed - present)}")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_same_objects(objects):
    assert by_kind_and_name(kubectl_kustomize(BASE)) == by_kind_and_name(objects)


def test_kinds(objects):
    assert sorted(o["kind"] for o in objects) == sorted(CORE_KINDS | OPERATOR_KINDS)
    assert all(o["metadata"]["labels"]["app.kubernetes.io/name"] == "mqtt-site-exporter"
               for o in objects)


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("kind", sorted(CORE_KINDS))
def test_core_kinds_validate_strictly(objects, kind):
    validate_strict(one(objects, kind))


def test_strict_validation_rejects_an_unknown_field(objects):
    """Proof that the schemas are strict: a typo in the container fails."""
    sts = json.loads(json.dumps(one(objects, "StatefulSet")))
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(sts, KUBERNETES_VERSIONS[0], strict=True)


def test_pod_monitor_structure(objects):
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector"}
    pod_labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert matches(spec["selector"], pod_labels)
    assert spec["jobLabel"] in pod_labels
    ports = {p["name"] for p in container(objects)["ports"]}
    endpoints = spec["podMetricsEndpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
        for relabel in endpoint.get("relabelings", []):
            assert set(relabel) <= {"sourceLabels", "targetLabel", "action", "regex",
                                    "replacement", "separator"}
    # instance = the pod name, stable across restarts (series continuity of the persisted
    # shutdown histogram, which MqttExporterSlowShutdown's increase() needs).
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance",
            "action": "replace"} in endpoints[0]["relabelings"]


def test_prometheus_rule_structure(objects):
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        assert set(group) <= {"name", "interval", "rules", "limit", "query_offset"}, group
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r), r
            # The fields of the CRD's Rule (keep_firing_for: Prometheus Operator >= 0.66).
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                              "annotations"}, r
            assert isinstance(r["expr"], str) and r["expr"].strip()


def test_prometheus_rule_is_generated_from_alerts():
    committed = (BASE / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == generator.render_prometheus_rule(), (
        "deploy/kubernetes/prometheusrule.yaml is not current: python scripts/kubernetes.py")
    groups = [g for path in generator.rule_files()
              for g in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]]
    assert yaml.safe_load(committed)["spec"]["groups"] == groups


# --------------------------------------------------------------------------- consistency


def test_selectors_and_service(objects):
    sts = one(objects, "StatefulSet")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert matches(sts["spec"]["selector"], pod_labels)
    assert matches(one(objects, "PodDisruptionBudget")["spec"]["selector"], pod_labels)
    service = one(objects, "Service")
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None", "headless"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 8000, "http")]
    assert ports == {"http": 8000}
    assert sts["spec"]["podManagementPolicy"] == "Parallel"


def test_probes(objects):
    c = container(objects)
    ports = {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(p["port"] in ports for p in probes.values()), probes
    assert probes["readinessProbe"]["path"] in HEALTH_PATHS
    # A broker outage makes /health critical (503): liveness must not depend on it.
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == LIVENESS_PATH


def test_shutdown_grace_period(objects):
    timeout = float(env(objects).get("MQTT_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_DEFAULT))
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > timeout


def test_security_context(objects):
    spec = pod_spec(objects)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (10001, 10001, 10001)
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC",
                                         "setHostnameAsFQDN", "hostname"))
    ctx = container(objects)["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M), "the image's user changed"


def test_environment(objects):
    variables = env(objects)
    known = {v.name for v in ENV_VARS}
    assert set(variables) <= known, sorted(set(variables) - known)
    # The default instance ID is the host name = the pod name: stable, one per replica.
    assert "MQTT_INSTANCE_ID" not in variables
    assert int(variables["MQTT_SHARDS"]) == one(objects, "StatefulSet")["spec"]["replicas"]
    host, _, port = variables["EXPORTER_LISTEN"].rpartition(":")
    assert host == "0.0.0.0" and int(port) in {p["containerPort"] for p in
                                                container(objects)["ports"]}


def test_image_tag_is_the_package_version(objects):
    name, _, tag = container(objects)["image"].rpartition(":")
    assert (name, tag) == ("mqtt-site-exporter", exporter.__version__)


def test_mounts_agree_with_the_environment(objects):
    variables, mounted = env(objects), mounts(objects)
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {t["metadata"]["name"] for t in
              one(objects, "StatefulSet")["spec"]["volumeClaimTemplates"]}
    assert set(mounted) == set(volumes) | claims
    # Sites: the whole ConfigMap as a directory (a subPath mount is never updated).
    assert not any("subPath" in m for m in container(objects)["volumeMounts"])
    sites_dir, sites_name = os.path.split(variables["MQTT_SITES_FILE"])
    config_map = one(objects, "ConfigMap")
    assert mounted["sites"] == sites_dir
    assert volumes["sites"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert sites_name in config_map["data"]
    # State: a persistent volume per replica, writable (the only writable mount).
    assert mounted["state"] == variables["MQTT_STATE_DIR"] and "state" in claims
    writable = {m["name"] for m in container(objects)["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"state"}
    assert volumes["passwords"]["secret"]["secretName"] == \
        one(objects, "Secret")["metadata"]["name"]


def secret_values(secret: dict[str, Any]) -> dict[str, str]:
    import base64
    values = dict(secret.get("stringData", {}))
    values.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    return values


def test_sites_load_with_the_secret(objects, tmp_path):
    config_map, secret = one(objects, "ConfigMap"), one(objects, "Secret")
    variables, mounted = env(objects), mounts(objects)
    text = config_map["data"][os.path.basename(variables["MQTT_SITES_FILE"])]
    document = yaml.safe_load(text)
    schema = json.loads(Path(SCHEMA_PATH).read_text(encoding="utf-8"))
    jsonschema.Draft7Validator(schema).validate(document)
    # Every password_file is a key of the mounted Secret.
    passwords = secret_values(secret)
    secret_dir = mounted["passwords"]
    files = [s["password_file"] for s in document["sites"] if "password_file" in s]
    assert files, "the example shows password_file"
    for path in files:
        directory, key = os.path.split(path)
        assert directory == secret_dir and key in passwords, path
    assert not any("password_env" in s for s in document["sites"]), (
        "environment variables are fixed at start: a site added by a reload could not use one")
    # load_settings with the Secret's files in place and the StatefulSet's environment.
    (tmp_path / "secrets").mkdir()
    for key, value in passwords.items():
        (tmp_path / "secrets" / key).write_text(value)
    sites_file = tmp_path / "sites.yml"
    sites_file.write_text(text.replace(secret_dir + "/", str(tmp_path / "secrets") + "/"))
    # As each replica loads it (HOSTNAME = the pod name gives the shard): together they
    # cover every site.
    sts = one(objects, "StatefulSet")
    loaded: set[str] = set()
    for ordinal in range(sts["spec"]["replicas"]):
        environ = dict(variables, MQTT_SITES_FILE=str(sites_file),
                       MQTT_STATE_DIR=str(tmp_path / "state"),
                       HOSTNAME=f"{sts['metadata']['name']}-{ordinal}")
        loaded |= {s.name for s in load_settings(environ=environ, cwd=str(tmp_path)).sites}
    assert loaded == {s["name"] for s in document["sites"]}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (``100m``, ``96Mi``, ``1``) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert m and (m[2] == "" or m[2] in units), value
    return float(m[1]) * units.get(m[2], 1)


def test_resources_follow_the_measured_footprint(objects):
    resources = container(objects)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert set(requests) == set(limits) == {"cpu", "memory"}
    assert quantity(limits["cpu"]) >= 1 > quantity(requests["cpu"])
    sites = generator.SIZED_FOR_SITES
    assert requests["memory"] == generator.memory_request(sites)
    assert limits["memory"] == generator.memory_limit(sites)
    assert quantity(limits["memory"]) > quantity(requests["memory"])


# --------------------------------------------------------------------------- the docs' overlay


def docs_overlay() -> str:
    """The overlay of docs/kubernetes.md: the yaml block that starts with its path comment."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOCS.read_text(encoding="utf-8"), re.M | re.S)
    found = [b for b in blocks if b.startswith("# overlays/production/kustomization.yaml")]
    assert len(found) == 1, "docs/kubernetes.md: one overlay example"
    return found[0]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_docs_overlay_builds_and_keeps_replicas_and_shards_equal(tmp_path):
    text = docs_overlay()
    overlay = tmp_path / "overlays" / "production"
    overlay.mkdir(parents=True)
    relative = os.path.relpath(BASE, overlay)
    text, count = re.subn(r"^(\s*- )\S*deploy/kubernetes\S*", rf"\g<1>{relative}", text,
                          flags=re.M)
    assert count == 1, "the overlay lists the base once"
    (overlay / "kustomization.yaml").write_text(text)
    kust = yaml.safe_load(text)
    for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        for rel in gen.get("files", []):
            target = overlay / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            source = BASE / Path(rel).name
            target.write_text(source.read_text() if source.is_file() else "secret\n")
    built = kubectl_kustomize(overlay)
    sts = one(built, "StatefulSet")
    assert sts["spec"]["replicas"] == kust["replicas"][0]["count"] != 2
    assert int(env(built)["MQTT_SHARDS"]) == sts["spec"]["replicas"]
    assert {o["metadata"].get("namespace") for o in built} == {kust["namespace"]}
    assert container(built)["image"] != container(build_base())["image"]
    for obj in built:
        if obj["kind"] in CORE_KINDS:
            validate_strict(obj)
