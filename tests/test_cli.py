"""The command line as a user runs it: ``python -m exporter ...`` in a subprocess with a cwd
and environment we control (and the ``mqtt-site-exporter`` console script when installed).

Config errors must stop ``run`` with exit 2 before any connection: checked against a live
broker's log (a sentinel client connects after the run; no other connection may appear).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import exporter
from exporter.cli import format_status_table
from exporter.health import health_report
from tests.support import HOST, REPO_ROOT, free_port, site, wait_until
from tests.support.exporter import cli_env
from tests.support.fakes import site_state as st

RUN_TIMEOUT = 60


def start_exporter(exporter_factory, sites, env=None, **kw):
    """exporter_factory(...) started and answering /health."""
    return exporter_factory(sites, env=env, **kw).wait_ready()


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return cli_env(tmp_path, "cli", **extra)


def cli(args, tmp_path, env=None, timeout=RUN_TIMEOUT, command=None):
    return subprocess.run((command or [sys.executable, "-m", "exporter"]) + list(args),
                          cwd=tmp_path, env=env or base_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def write_sites(tmp_path: Path, sites) -> Path:
    path = tmp_path / "sites.yml"
    path.write_text(yaml.safe_dump({"sites": sites}, sort_keys=False))
    return path


# =========================================================================== help / version


@pytest.mark.timeout(60)
def test_version(tmp_path):
    r = cli(["--version"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"mqtt-site-exporter {exporter.__version__}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, expect", [
    (["--help"], ["run", "check-config", "status"]),
    (["run", "--help"], ["SIGTERM"]),
    (["check-config", "--help"], ["exit 2"]),
    (["status", "--help"], ["--url", "--timeout"]),
], ids=["top", "run", "check-config", "status"])
def test_help(tmp_path, args, expect):
    r = cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: mqtt-site-exporter"), r.stdout
    for word in expect:
        assert word in r.stdout, (word, r.stdout)
    assert r.stderr == ""


def console_script() -> Path | None:
    for candidate in (Path(sys.executable).parent / "mqtt-site-exporter",
                      REPO_ROOT / ".venv" / "bin" / "mqtt-site-exporter"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.timeout(60)
def test_console_script(tmp_path):
    script = console_script()
    if script is None:
        pytest.skip("console script mqtt-site-exporter not installed in the venv "
                    "(pip install -e . creates it)")
    r = cli(["--version"], tmp_path, command=[str(script)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"mqtt-site-exporter {exporter.__version__}"
    r = cli(["status", "--help"], tmp_path, command=[str(script)])
    assert r.returncode == 0 and "--url" in r.stdout


# =========================================================================== config errors


LITERAL = "lit-" + secrets.token_hex(8)


def bad_sites_cases(tmp_path: Path, broker) -> dict:
    """case id -> (file content as text, [fragments stderr must contain])."""
    good = site("good", broker)
    f = str(tmp_path / "sites.yml")

    def doc(*sites):
        return yaml.safe_dump({"sites": [good, *sites]}, sort_keys=False)

    pw_dir = tmp_path / "pw-is-a-directory"
    pw_dir.mkdir(exist_ok=True)
    return {
        "unknown-key": (doc(site("s1", broker, usernme="x")),
                        [f, "site 's1'", "key 'usernme'", "did you mean 'username'"]),
        "bad-type": (doc(site("s1", broker, enabled="yes")),
                     [f, "site 's1'", "key 'enabled'", "expected boolean"]),
        "port-as-string": (doc({"name": "s1", "host": HOST, "port": "1883"}),
                           [f, "site 's1'", "key 'port'", "expected integer"]),
        "duplicate-name": (doc(site("good", broker)),
                           [f, "site 'good' (#2)", "key 'name'", "duplicate name"]),
        "missing-host": (doc({"name": "s1", "port": broker.port}),
                         [f, "site 's1'", "key 'host'", "required"]),
        "bad-port": (doc({"name": "s1", "host": HOST, "port": 70000}),
                     [f, "site 's1'", "key 'port'", "1..65535"]),
        "literal-password": (doc(site("s1", broker, username="u", password=LITERAL)),
                             [f, "site 's1'", "key 'password'", "literal passwords"]),
        "unset-password-env": (doc(site("s1", broker, username="u",
                                        password_env="CLI_TEST_UNSET_PW")),
                               [f, "site 's1'", "key 'password_env'", "CLI_TEST_UNSET_PW",
                                "not set"]),
        "unreadable-password-file": (doc(site("s1", broker, username="u",
                                              password_file=str(pw_dir))),
                                     [f, "site 's1'", "key 'password_file'", str(pw_dir),
                                      "cannot read password file"]),
        "bad-protocol": (doc(site("s1", broker, protocol="4")),
                         [f, "site 's1'", "key 'protocol'", "'3.1.1' or '5'"]),
        "bad-keepalive": (doc(site("s1", broker, keepalive=2)),
                          [f, "site 's1'", "key 'keepalive'", "5..65535"]),
        "bad-yaml": (f"sites:\n  - name: good\n    host: {HOST}\n    port: {broker.port}\n"
                     "  - name: [unclosed\n",
                     [f, "invalid YAML", "line"]),
        "missing-file": (None, [f, "file not found"]),
    }


CASE_IDS = [
    "unknown-key", "bad-type", "port-as-string", "duplicate-name", "missing-host", "bad-port",
    "literal-password", "unset-password-env", "unreadable-password-file", "bad-protocol",
    "bad-keepalive", "bad-yaml", "missing-file"]




def assert_no_connection_since(broker, baseline: int) -> None:
    """``baseline`` from broker.sentinel() before the run: the next sentinel must be the
    only new connection, and only sentinels ever sent a CONNECT."""
    after = broker.sentinel()
    assert after == baseline + 1, broker.log_text()
    ids = {cid for _, kind, cid in broker.events() if kind == "connect"}
    assert all(cid.startswith("sentinel-") for cid in ids), ids


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CASE_IDS)
def test_run_with_a_bad_sites_file_exits_2_before_connecting(broker, tmp_path, case):
    content, fragments = bad_sites_cases(tmp_path, broker)[case]
    if content is not None:
        (tmp_path / "sites.yml").write_text(content)
    baseline = broker.sentinel()
    r = cli(["run"], tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "invalid configuration" in r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, (fragment, r.stderr)
    assert LITERAL not in r.stderr + r.stdout
    # check-config agrees, with the same message.
    cc = cli(["check-config"], tmp_path)
    assert cc.returncode == 2 and cc.stderr == r.stderr
    assert_no_connection_since(broker, baseline)


@pytest.mark.timeout(90)
def test_run_default_command_is_run_and_also_validates(broker, tmp_path):
    (tmp_path / "sites.yml").write_text("sites: [")
    baseline = broker.sentinel()
    r = cli([], tmp_path)
    assert r.returncode == 2 and "invalid YAML" in r.stderr
    assert_no_connection_since(broker, baseline)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("var, value", [
    ("MQTT_KEEP_ALIVE", "abc"),
    ("MQTT_SHUTDOWN_TIMEOUT", "-1"),
    ("EXPORTER_LISTEN", "nohostport"),
    ("LOG_LEVEL", "LOUD"),
])
def test_run_with_a_bad_env_value_exits_2_naming_the_variable(broker, tmp_path, var, value):
    write_sites(tmp_path, [site("good", broker)])
    baseline = broker.sentinel()
    r = cli(["run"], tmp_path, env=base_env(tmp_path, **{var: value}))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"environment: {var}:" in r.stderr, r.stderr
    assert_no_connection_since(broker, baseline)


@pytest.mark.timeout(60)
def test_check_config_prints_one_line_per_site_and_never_the_password(tmp_path):
    secret = "P-" + secrets.token_urlsafe(18)
    pw_file = tmp_path / "pw"
    pw_file.write_text(secret + "\n")
    write_sites(tmp_path, [
        {"name": "alpha", "host": HOST, "port": 1883, "username": "u", "password_env": "CC_PW"},
        {"name": "beta", "host": "broker.example.org", "port": 8883, "tls": True,
         "protocol": "5", "username": "u", "password_file": str(pw_file)},
        {"name": "gamma", "host": HOST, "enabled": False, "topics": ["x/#", "y/+"]},
    ])
    r = cli(["check-config"], tmp_path, env=base_env(tmp_path, CC_PW=secret))
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4, lines
    assert [line.split(":")[0] for line in lines[:3]] == ["alpha", "beta", "gamma"]
    alpha, beta, gamma, ok = lines
    assert f"{HOST}:1883" in alpha and "client_id=alpha_icli" in alpha
    assert "password=env:CC_PW" in alpha and alpha.endswith("enabled")
    assert "mqtts 5" in beta and f"password=file:{pw_file}" in beta
    assert "topics=x/#,y/+" in gamma and gamma.endswith("disabled")
    assert ok.startswith("OK:") and "3 sites (2 enabled)" in ok and "instance ID cli" in ok
    # Nothing was written or started: no state dir.
    assert not (tmp_path / "state").exists()


# =========================================================================== status


def status_cmd(url: str, tmp_path: Path):
    return cli(["status", "--url", url, "--timeout", "5"], tmp_path)


def table_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("SITE"))
    return {line.split()[0]: line.split() for line in lines[header + 1:] if line.strip()}


@pytest.mark.timeout(90)
def test_status_healthy_exit_0(broker, exporter_factory, tmp_path):
    exp = start_exporter(exporter_factory, [site("site_a", broker), site("site_b", broker),
                                            site("off", broker, enabled=False)])
    wait_until(lambda: exp.health()[1].get("connections", {}).get("healthy") == 2, 15,
               message="two sites connected")
    r = status_cmd(exp.url, tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[0].startswith("HEALTHY")
    rows = table_rows(r.stdout)
    assert set(rows) == {"site_a", "site_b", "off"}
    assert rows["site_a"][1] == rows["site_b"][1] == "connected"
    assert rows["off"][1] == "disabled"
    assert rows["site_a"][2] == "site_a_itest" and rows["site_a"][3] == f"{HOST}:{broker.port}"


@pytest.mark.timeout(90)
def test_status_degraded_exit_1(broker, exporter_factory, tmp_path):
    exp = start_exporter(exporter_factory, [site("site_a", broker),
                                            {"name": "dead", "host": HOST, "port": free_port()}],
                         env={"MQTT_BACKOFF_MIN_SECONDS": "0.2"})
    wait_until(lambda: exp.health()[1].get("connections", {}).get("healthy") == 1, 15,
               message="site_a connected")
    r = status_cmd(exp.url + "/", tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[0].startswith("DEGRADED")
    rows = table_rows(r.stdout)
    assert set(rows) == {"site_a", "dead"}
    assert rows["site_a"][1] == "connected"
    assert rows["dead"][1] in ("connecting", "backoff")


@pytest.mark.timeout(90)
def test_status_critical_exit_1(exporter_factory, tmp_path):
    exp = start_exporter(exporter_factory, [{"name": "dead", "host": HOST, "port": free_port()}])
    wait_until(lambda: exp.health()[0] == 503, 15, message="critical")
    r = status_cmd(exp.url, tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout.splitlines()[0].startswith("CRITICAL") and "dead" in table_rows(r.stdout)


@pytest.mark.timeout(60)
def test_status_unreachable_exit_3(tmp_path):
    url = f"http://{HOST}:{free_port()}"
    r = status_cmd(url, tmp_path)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "cannot reach" in r.stderr and url in r.stderr
    assert r.stdout == ""


@pytest.mark.timeout(60)
def test_status_default_url_comes_from_exporter_listen(broker, exporter_factory, tmp_path):
    exp = start_exporter(exporter_factory, [site("site_a", broker)])
    wait_until(lambda: exp.health()[0] == 200 and exp.health()[1]["status"] == "healthy", 15,
               message="healthy")
    r = cli(["status"], tmp_path, env=base_env(tmp_path, EXPORTER_LISTEN=f"0.0.0.0:{exp.port}"))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "site_a" in table_rows(r.stdout)


def test_format_status_table_lists_every_site_and_state():
    states = [st("alpha"), st("beta", "cooldown", cooldown_until_monotonic=1010.0),
              st("gamma", enabled=False)]
    _, body = health_report(True, "inst", states, 1000.0, verbose=True)
    table = format_status_table(body)
    lines = table.splitlines()
    assert lines[0].startswith("DEGRADED") and "inst" in lines[0]
    assert lines[1].split()[:2] == ["SITE", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["alpha"][1] == "connected"
    assert rows["beta"][1] == "cooldown" and "10s" in rows["beta"]
    assert rows["gamma"][1] == "disabled"


# =========================================================================== state



# =========================================================================== flags (#9)


def ok_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("OK: "))


@pytest.mark.timeout(60)
def test_flags_override_the_environment_and_dotenv_for_check_config(tmp_path):
    """Each flag wins over its variable (and over .env); before or after the subcommand."""
    env_sites = write_sites(tmp_path, [{"name": "from_env", "host": HOST}])
    flag_dir = tmp_path / "flagged"
    flag_dir.mkdir()
    flag_sites = flag_dir / "sites.yml"
    flag_sites.write_text(yaml.safe_dump({"sites": [{"name": "from_flag", "host": HOST}]}))
    (tmp_path / ".env").write_text("LOG_FORMAT=text\n")
    env = base_env(tmp_path, MQTT_SITES_FILE=str(env_sites), LOG_LEVEL="INFO",
                   EXPORTER_LISTEN="127.0.0.1:9001")
    r = cli(["check-config"], tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("from_env:")
    assert "listen 127.0.0.1:9001" in ok_line(r.stdout) and "log INFO text" in r.stdout
    flags = [f"--sites.file={flag_sites}", "--web.listen-address=[::1]:9002",
             "--log.level=debug", "--log.format=JSON", f"--state.dir={tmp_path / 'st2'}"]
    for args in (["check-config", *flags], [*flags, "check-config"],
                 [*flags[:2], "check-config", *flags[2:]]):
        r = cli(args, tmp_path, env=env)
        assert r.returncode == 0, (args, r.stderr)
        ok = ok_line(r.stdout)
        assert r.stdout.startswith("from_flag:") and f"OK: {flag_sites}: 1 sites" in ok, args
        assert "listen [::1]:9002" in ok and "log DEBUG json" in ok, ok
        assert f"state dir {tmp_path / 'st2'}" in ok, ok
    # check-config creates nothing.
    assert not (tmp_path / "st2").exists()


@pytest.mark.timeout(60)
def test_a_bad_flag_value_exits_2_naming_flag_and_variable(tmp_path):
    write_sites(tmp_path, [{"name": "a", "host": HOST}])
    r = cli(["check-config", "--log.level=LOUD", "--web.listen-address=nohostport"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "flag --log.level (LOG_LEVEL): must be one of" in r.stderr, r.stderr
    assert "flag --web.listen-address (EXPORTER_LISTEN): expected host:port" in r.stderr
    assert "Traceback" not in r.stderr
    # An unknown flag is a usage error, not a traceback.
    r = cli(["run", "--web.listen-adress=127.0.0.1:1"], tmp_path)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(60)
def test_help_lists_the_flags_with_their_variables(tmp_path):
    from exporter.config.environment import ENV_VARS
    flagged = {v.flag: v.name for v in ENV_VARS if v.flag}
    assert {"--web.listen-address", "--web.config.file", "--log.level", "--log.format",
            "--sites.file"} <= set(flagged)
    for args in (["--help"], ["run", "--help"], ["check-config", "--help"]):
        r = cli(args, tmp_path)
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())
        for flag, var in flagged.items():
            assert flag in text and f"overrides {var}" in text, (args, flag)
    r = cli(["run", "--help"], tmp_path)
    assert "SIGQUIT" in r.stdout and "SIGHUP" in r.stdout and "SIGUSR1" in r.stdout


@pytest.mark.timeout(60)
def test_run_takes_the_flags(broker, exporter_factory):
    """run with flags before and after the subcommand: it listens where --web.listen-address
    says (not EXPORTER_LISTEN), logs only from --log.level up, in --log.format."""
    port = free_port()
    exp = exporter_factory([site("flagged", broker)], env={"LOG_LEVEL": "DEBUG"}, command=[
        sys.executable, "-m", "exporter", "--log.level=warning", "run",
        f"--web.listen-address={HOST}:{port}", "--log.format=json"])
    exp.port = port  # the factory's EXPORTER_LISTEN port stays unused
    exp.wait_ready(15)
    wait_until(lambda: exp.health()[1].get("status") == "healthy", 15, message=exp.log_tail())
    exp.signal(signal.SIGUSR2)  # a WARNING record
    exp.wait_log(r"SIGUSR2 received", 10)
    records = [json.loads(line) for line in exp.log_text().splitlines() if line.strip()]
    assert records and all(r["level"] in ("WARNING", "ERROR") for r in records), records


# =========================================================================== state dir (#9)


def under_a_file(tmp_path: Path) -> Path:
    """A state dir that can never be created: its parent is a regular file (as root, a
    chmod 0500 directory would still be writable)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory\n")
    return blocker / "state"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["env", "flag", "is-a-file"])
def test_unwritable_state_dir_exits_2_for_check_config_and_run_before_connecting(
        broker, tmp_path, how):
    write_sites(tmp_path, [site("good", broker)])
    env = base_env(tmp_path)
    args: list[str] = []
    if how == "env":
        env["MQTT_STATE_DIR"] = str(under_a_file(tmp_path))
        named, why = "environment: MQTT_STATE_DIR:", "is not a directory"
    elif how == "flag":
        args = [f"--state.dir={under_a_file(tmp_path)}"]
        named, why = "flag --state.dir (MQTT_STATE_DIR):", "is not a directory"
    else:
        env["MQTT_STATE_DIR"] = str(tmp_path / "state-file")
        (tmp_path / "state-file").write_text("x")
        named, why = "environment: MQTT_STATE_DIR:", "not a directory"
    baseline = broker.sentinel()
    for command in (["check-config"], ["run"]):
        r = cli(command + args, tmp_path, env=env)
        assert r.returncode == 2, (command, r.returncode, r.stdout, r.stderr)
        assert "invalid configuration" in r.stderr and named in r.stderr, r.stderr
        assert why in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert_no_connection_since(broker, baseline)


@pytest.mark.timeout(60)
def test_run_creates_a_missing_state_dir(broker, exporter_factory, tmp_path):
    deep = tmp_path / "new" / "deeper"
    exp = exporter_factory([site("s", broker)], env={"MQTT_STATE_DIR": str(deep / "state")})
    exp.wait_ready(15)
    assert (deep / "state").is_dir()
    assert [p.name for p in (deep / "state").iterdir()] == []  # the write probe is gone


# =========================================================================== shards (#10)


def shard_sites(tmp_path: Path, count: int = 30) -> list[str]:
    names = [f"site-{i:03d}" for i in range(count)]
    write_sites(tmp_path, [{"name": name, "host": HOST} for name in names])
    return names


def listed_sites(stdout: str) -> list[str]:
    return [line.split(":")[0] for line in stdout.splitlines()
            if not line.startswith(("OK: ", "spread: "))]


@pytest.mark.timeout(60)
def test_check_config_lists_one_shards_sites_from_the_flag_or_the_pod_name(tmp_path):
    from exporter.config.shard import owner
    names = shard_sites(tmp_path)
    mine = [name for name in names if owner(name, 3) == 1]
    # The flag; it wins over MQTT_SHARDS of the environment (a check inside a sharded pod).
    for env in (base_env(tmp_path), base_env(tmp_path, MQTT_SHARDS="3", HOSTNAME="mse-2")):
        r = cli(["check-config", "--shard", "1/3"], tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        assert listed_sites(r.stdout) == mine
        assert f"OK: {tmp_path / 'sites.yml'}: shard 1/3: {len(mine)} of 30 sites" in r.stdout
    # A StatefulSet pod: MQTT_SHARDS and the ordinal of its host name.
    r = cli(["check-config"], tmp_path, env=base_env(tmp_path, MQTT_SHARDS="3", HOSTNAME="mse-1"))
    assert r.returncode == 0 and listed_sites(r.stdout) == mine, r.stderr
    r = cli(["check-config", "--shard", "3/3"], tmp_path)
    assert r.returncode == 2 and "flag --shard (MQTT_SHARD): i must be below N" in r.stderr


@pytest.mark.timeout(60)
def test_check_config_spread_shows_each_shards_share_and_what_moves(tmp_path):
    from exporter.config.shard import owner, spread
    names = shard_sites(tmp_path, 200)
    r = cli(["check-config", "--shard", "0/3", "--spread", "4"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("spread: ")]
    assert lines[:4] == [f"spread: shard {i}/4: {n} sites"
                         for i, n in enumerate(spread(names, 4))]  # all sites, not shard 0's
    moved = sum(1 for name in names if owner(name, 3) != owner(name, 4))
    assert lines[4] == f"spread: 3 -> 4 shards moves {moved} of 200 sites " \
                       f"({100 * moved / 200:.1f} %)"
    r = cli(["check-config", "--spread", "0"], tmp_path)
    assert r.returncode == 2 and "must be a number of shards" in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_check_config_warns_when_the_instance_id_is_a_deployment_pod_name(tmp_path):
    shard_sites(tmp_path, 2)
    r = cli(["check-config"], tmp_path, env=base_env(tmp_path, MQTT_INSTANCE_ID="mse-7d9f8b6c5d-x2k9q"))
    assert r.returncode == 0, r.stderr
    assert "WARNING: the instance ID 'mse-7d9f8b6c5d-x2k9q' looks like a Deployment pod name" \
        in r.stderr
    r = cli(["check-config"], tmp_path, env=base_env(tmp_path, MQTT_INSTANCE_ID="mse-0"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
