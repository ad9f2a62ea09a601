"""Hostile inputs against the real command line (issue #9, finding 5): every one of them ends
``check-config`` and ``run`` with exit 2 and a message that names the file, site and key (or
the variable) and the limit, never a traceback, and ``run`` opens no connection to the live
broker the file points at (checked in Mosquitto's own log, with a sentinel client).

The largest allowed name and instance ID, on the other hand, run end to end: connect, and
say goodbye on SIGTERM (the seed died in the farewell packet with OverflowError).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter.config.sites import INSTANCE_ID_MAX_BYTES, SITE_NAME_MAX_BYTES, SITES_FILE_MAX_BYTES
from tests.support import HOST
from tests.support.broker import retained
from tests.support.exporter import cli_env

pytestmark = pytest.mark.timeout(60)

CLI_TIMEOUT = 30


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return cli_env(tmp_path, "inputs", **extra)


def _cli(command: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          stdin=subprocess.DEVNULL)




def _good(broker) -> dict:
    return {"name": "live", "host": HOST, "port": broker.port}


def _write(tmp_path: Path, sites: list[dict]) -> str:
    path = tmp_path / "sites.yml"
    path.write_text(yaml.safe_dump({"sites": sites}, sort_keys=False))
    return str(path)


# Each case: (prepare(tmp_path, broker) -> extra env, fragments of the one expected problem).
# A valid site on the live broker sits next to the hostile value wherever the file can hold
# one, so "no connection" means the whole configuration was refused.

def _long_name(tmp_path, broker):
    _write(tmp_path, [_good(broker), {"name": "n" * 70_000, "host": HOST, "port": broker.port}])
    return {}


def _deep_yaml(tmp_path, broker):
    (tmp_path / "sites.yml").write_text(
        f"sites:\n- {{name: live, host: '{HOST}', port: {broker.port}}}\n"
        "- " + "[" * 10_000 + "]" * 10_000 + "\n")
    return {}


def _deep_block_yaml(tmp_path, broker):
    (tmp_path / "sites.yml").write_text(
        "".join("  " * i + "k:\n" for i in range(1_500)) + "  " * 1_500 + "k: v\n")
    return {}


def _dev_zero(tmp_path, broker):
    return {"MQTT_SITES_FILE": "/dev/zero"}


def _directory(tmp_path, broker):
    (tmp_path / "sites.d").mkdir()
    return {"MQTT_SITES_FILE": str(tmp_path / "sites.d")}


def _fifo(tmp_path, broker):
    os.mkfifo(tmp_path / "sites.fifo")  # nobody writes: a plain open() would hang
    return {"MQTT_SITES_FILE": str(tmp_path / "sites.fifo")}


def _oversize(tmp_path, broker):
    path = tmp_path / "sites.yml"
    _write(tmp_path, [_good(broker)])
    with open(path, "r+b") as f:  # the valid file, then a sparse tail past the limit
        f.truncate(SITES_FILE_MAX_BYTES + 1)
    return {}


def _host_newline(tmp_path, broker):
    _write(tmp_path, [_good(broker), {"name": "nl", "host": f"{HOST}\nevil", "port": broker.port}])
    return {}


def _host_control(tmp_path, broker):
    _write(tmp_path, [_good(broker), {"name": "nul", "host": "a\x00b", "port": broker.port}])
    return {}


def _host_long_label(tmp_path, broker):
    _write(tmp_path, [_good(broker), {"name": "lbl", "host": "a" * 64 + ".example",
                                      "port": broker.port}])
    return {}


def _huge_int(tmp_path, broker):
    (tmp_path / "sites.yml").write_text(
        f"sites:\n- {{name: live, host: '{HOST}', port: {broker.port}}}\n"
        f"- {{name: big, host: h, port: {'9' * 5000}}}\n")
    return {}


def _instance_id_newline(tmp_path, broker):
    _write(tmp_path, [_good(broker)])
    return {"MQTT_INSTANCE_ID": "a\nb"}


def _instance_id_long(tmp_path, broker):
    _write(tmp_path, [_good(broker)])
    return {"MQTT_INSTANCE_ID": "i" * (INSTANCE_ID_MAX_BYTES + 1)}


CASES = {
    "name-70000": (_long_name, ["site #2: key 'name': 70000 characters long; at most 256"]),
    "yaml-depth-10000-flow": (_deep_yaml, ["invalid YAML at line 3", "nested deeper than 64"]),
    "yaml-depth-1500-block": (_deep_block_yaml, ["invalid YAML at line 65",
                                                 "nested deeper than 64"]),
    "dev-zero": (_dev_zero, ["/dev/zero: not a regular file (a character device)"]),
    "directory": (_directory, ["sites.d: not a regular file (a directory)"]),
    "fifo": (_fifo, ["sites.fifo: not a regular file (a FIFO)"]),
    "over-16-mib": (_oversize, ["larger than 16777216 bytes (16 MiB)"]),
    "host-newline": (_host_newline, ["site 'nl' (#2): key 'host': invalid host",
                                     "no whitespace or control characters"]),
    "host-nul": (_host_control, ["site 'nul' (#2): key 'host': invalid host 'a\\x00b'"]),
    "host-label-64": (_host_long_label, ["site 'lbl' (#2): key 'host'", "1-63 characters"]),
    "int-5000-digits": (_huge_int, ["invalid YAML at line 3", "cannot convert this int value"]),
    "instance-id-newline": (_instance_id_newline, [
        "environment: MQTT_INSTANCE_ID: invalid value 'a\\nb'"]),
    "instance-id-129-bytes": (_instance_id_long, [
        "environment: MQTT_INSTANCE_ID: 129 bytes long; at most 128"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_exits_2_without_traceback_before_any_connection(broker, tmp_path, case):
    prepare, fragments = CASES[case]
    env = _env(tmp_path, **prepare(tmp_path, broker))
    baseline = broker.sentinel()
    for command in ("check-config", "run"):
        r = _cli(command, tmp_path, env)
        output = r.stdout + r.stderr
        assert r.returncode == 2, (command, output[-2000:])
        assert "Traceback" not in output and "Error:" not in output, (command, output[-2000:])
        [problem] = [line for line in r.stderr.splitlines() if line.startswith("  - ")]
        for fragment in fragments:
            assert fragment in problem, (command, problem[:500])
        assert len(output) < 2000, (command, output[:500])  # no 70 000-character echo
    # Only the two sentinels ever connected: run refused before opening any connection.
    assert broker.sentinel() == baseline + 1, broker.log_text()
    ids = {cid for _, kind, cid in broker.events() if kind == "connect"}
    assert all(cid.startswith("sentinel-") for cid in ids), ids


def test_largest_allowed_name_and_instance_id_run_and_say_goodbye(broker, exporter_factory):
    name, instance = "n" * SITE_NAME_MAX_BYTES, "i" * INSTANCE_ID_MAX_BYTES
    exp = exporter_factory([{"name": name, "host": HOST, "port": broker.port}],
                           instance_id=instance).wait_ready()
    client_id = f"{name}_i{instance}"
    exp.wait_log(r"Connected to \S+ as n+_ii+", 15)
    assert broker.connects(client_id) == 1
    code, body = exp.health()
    assert (code, body["status"]) == (200, "healthy")
    assert retained(broker, f"{name}/backend/status") == "online"
    exp.signal(signal.SIGTERM)
    assert exp.wait_exit(15) == 0, exp.log_tail()
    log = exp.log_text()
    assert "All connections disconnected in" in log and "Traceback" not in log, exp.log_tail()
    assert "OverflowError" not in log
    assert retained(broker, f"{name}/backend/status") == "offline"
