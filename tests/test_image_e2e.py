"""The container image, proven as the seed proves it (issue #9, finding 11).

The Dockerfile is built with podman (no Docker engine or registry here: the base image is a
stand-in made from Debian packages by scripts/build-base-image.sh), the image runs against a
real Mosquitto with a three-site sites file, and the seed's own check is repeated:

- ``podman restart``: the container's logs show ``All connections disconnected in 0.XX s``, the
  first run ended with exit code 0 (no SIGKILL: that would be 137 after the grace period), the
  broker saw a clean DISCONNECT from every site, and the same client IDs connect again, never two
  at once (no takeover);
- ``podman stop -t 10`` returns within a couple of seconds and the container's exit code is 0.

Slow (a podman build) and it needs root, podman, runc and the base image: it runs only when
MQTT_IMAGE_TEST=1, which ``make test-image`` sets after installing all of that (CI runs it).
The timings of each phase are printed (``-rP`` shows them).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml

from tests.support import HOST, REPO_ROOT, free_port, wait_until

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.environ.get("MQTT_IMAGE_TEST") != "1",
                       reason="container image test: run `make test-image` (sets MQTT_IMAGE_TEST=1)"),
]

# The flags this machine needs (docs: /work/shared/GUIDE.md "Containers"): runc (crun fails on
# the cgroup layout), cgroupfs (no systemd), explicit ulimits (else "error setting rlimit").
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
IMAGE = "localhost/mqtt-site-exporter:image-e2e"
INSTANCE = "imge2e"
SITES = ("north", "south", "west")
GRACE = 10  # podman's -t: seconds between SIGTERM and SIGKILL
DISCONNECTED = re.compile(r"All connections disconnected in (\d+\.\d\d) s")


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {shlex.join(args)} -> rc {proc.returncode}\n"
                             f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def base_image() -> str:
    """docker.io/library/python:<tag> of the Dockerfile's FROM lines (all must agree)."""
    tags = set(re.findall(r"^FROM\s+(?:docker\.io/library/)?python:(\S+)", (REPO_ROOT / "Dockerfile")
                          .read_text(), re.M))
    assert len(tags) == 1, f"expected one python base tag in the Dockerfile, got {tags}"
    return f"docker.io/library/python:{tags.pop()}"


def health(port: int) -> tuple[int, dict] | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=1) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (OSError, ValueError):
        return None


def container_state(name: str) -> dict:
    out = podman("inspect", "--format", "{{json .State}}", name).stdout
    return json.loads(out)


def logs(name: str) -> str:
    proc = podman("logs", name)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def image() -> str:
    """The Dockerfile built with podman; ``--pull=never``: the base must be there already."""
    if shutil.which("podman") is None:
        pytest.fail("podman not found: run `make test-image` (installs podman, runc, debootstrap)",
                    pytrace=False)
    base = base_image()
    if podman("image", "exists", base, check=False).returncode != 0:
        pytest.fail(f"base image {base} missing: run scripts/build-base-image.sh "
                    "(or `make test-image`)", pytrace=False)
    # --format docker: the OCI image format has no HEALTHCHECK (podman drops it with a warning).
    _, took = timed(podman, "build", "--pull=never", "--format", "docker", "--network", "host",
                    *ULIMITS,
                    "-t", IMAGE, "-f", "Dockerfile", str(REPO_ROOT), timeout=200)
    print(f"podman build: {took:.1f} s")
    return IMAGE


@pytest.fixture
def container(image, tmp_path):
    """make(broker) -> (name, http port): the image running with three sites on ``broker``."""
    names: list[str] = []

    def make(broker) -> tuple[str, int]:
        sites = [{"name": s, "host": HOST, "port": broker.port} for s in SITES]
        sites_file = tmp_path / "sites.yml"
        sites_file.write_text(yaml.safe_dump({"sites": sites}, sort_keys=False))
        sites_file.chmod(0o644)  # read by uid 10001 inside the container
        port = free_port()
        name = f"mse-e2e-{uuid.uuid4().hex[:8]}"
        names.append(name)
        podman("run", "-d", "--name", name, "--network", "host", *ULIMITS,
               "-v", f"{sites_file}:/etc/mqtt-site-exporter/sites.yml:ro",
               "-e", f"MQTT_INSTANCE_ID={INSTANCE}",
               "-e", f"EXPORTER_LISTEN={HOST}:{port}",
               "-e", "LOG_FORMAT=text",
               image)
        return name, port

    yield make
    for name in names:
        text = podman("logs", name, check=False)
        print(f"\n===== container {name} logs =====\n{text.stdout}{text.stderr}")
        podman("rm", "-f", "-v", "-t", "0", name, check=False)


def wait_healthy(name: str, port: int, timeout: float = 30) -> None:
    def healthy():
        state = container_state(name)
        if not state.get("Running"):
            raise AssertionError(f"container {name} not running: {state}\n{logs(name)[-3000:]}")
        got = health(port)
        return got is not None and got[0] == 200 and got[1].get("status") == "healthy"

    wait_until(healthy, timeout, interval=0.1, message=f"{name}: /health healthy on port {port}")


def clean_disconnects(broker, client_id: str) -> int:
    """The broker's "Client <id> disconnected." lines: a DISCONNECT packet was received (a
    SIGKILLed process would give "closed its connection." instead)."""
    rx = re.compile(rf"^\d+(?:\.\d+)?: Client {re.escape(client_id)}(?: \[[^\]]*\])? disconnected\.$")
    return sum(1 for line in broker.log_text().splitlines() if rx.match(line))


def died_exit_codes(name: str) -> list[int]:
    """Exit codes of the container's "died" events, oldest first."""
    out = podman("events", "--stream=false", "--filter", f"container={name}",
                 "--filter", "event=died", "--format", "{{.ContainerExitCode}}").stdout
    return [int(x) for x in out.split()]


def test_image_restart_and_stop_are_clean(broker, container):
    """Finding 11: the image restarts and stops cleanly, as the seed's own check demands."""
    started = time.monotonic()
    ids = [f"{s}_i{INSTANCE}" for s in SITES]

    name, port = container(broker)
    _, first_up = timed(wait_healthy, name, port)
    wait_until(lambda: all(broker.connects(i) == 1 for i in ids), 10,
               message=f"first connects of {ids}")
    assert "All connections disconnected" not in logs(name)
    # The image's own HEALTHCHECK (python -c + urllib, no curl) passes against the live exporter.
    check = podman("healthcheck", "run", name, check=False)
    assert check.returncode == 0, f"HEALTHCHECK failed: {check.stdout}{check.stderr}"

    # -- podman restart: SIGTERM, the exporter's bounded shutdown, exit 0, start again.
    restart, restart_s = timed(podman, "restart", "-t", str(GRACE), name, timeout=GRACE + 30)
    # podman itself warns "StopSignal SIGTERM failed to stop container ... resorting to SIGKILL".
    assert "SIGKILL" not in restart.stderr, restart.stderr
    assert restart_s < GRACE / 2, f"podman restart took {restart_s:.2f} s: the grace period ran out?"
    _, second_up = timed(wait_healthy, name, port)
    wait_until(lambda: all(broker.connects(i) == 2 for i in ids), 10,
               message=f"the same client IDs connect again: {ids}")

    text = logs(name)
    durations = [float(d) for d in DISCONNECTED.findall(text)]
    assert len(durations) == 1 and durations[0] < 1.0, \
        f"expected one 'All connections disconnected in 0.XX s', got {durations}\n{text[-3000:]}"
    assert "SIGKILL" not in text and "Killed" not in text
    assert died_exit_codes(name) == [0], "the first run must exit 0 (137 would be SIGKILL)"
    for i in ids:
        assert clean_disconnects(broker, i) == 1, f"{i}: no clean DISCONNECT before the restart"
        assert broker.max_concurrent(i) == 1, f"{i}: two connections at once"
    assert broker.takeovers() == 0
    connected = {cid for _, kind, cid in broker.events() if kind == "connect"}
    assert connected == set(ids), f"client IDs seen by the broker: {connected}"

    # -- podman stop: well inside the grace period, exit code 0.
    stop, stop_s = timed(podman, "stop", "-t", str(GRACE), name, timeout=GRACE + 30)
    assert "SIGKILL" not in stop.stderr, stop.stderr
    state = container_state(name)
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    assert stop_s < 2.0, f"podman stop took {stop_s:.2f} s"
    durations = [float(d) for d in DISCONNECTED.findall(logs(name))]
    assert len(durations) == 2 and max(durations) < 1.0, durations
    assert died_exit_codes(name) == [0, 0]
    for i in ids:
        assert clean_disconnects(broker, i) == 2, f"{i}: no clean DISCONNECT at stop"
        assert broker.live(i) == 0

    total = time.monotonic() - started
    print(f"first start to healthy: {first_up:.2f} s; podman restart: {restart_s:.2f} s; "
          f"restart to healthy: {second_up:.2f} s; podman stop: {stop_s:.2f} s; "
          f"shutdown durations logged: {durations}; test body: {total:.1f} s")
