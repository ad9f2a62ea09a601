#!/usr/bin/env python3
"""Local demo: mosquitto on 127.0.0.1:18830, simulated sites, and the exporter.

    make demo                      # or: .venv/bin/python scripts/demo.py [--duration 20]

Starts Debian's mosquitto with a generated config in .demo/, scripts/simulate_sites.py for
the enabled sites of examples/sites.yml, and `python -m exporter run` listening on
DEMO_LISTEN (default 127.0.0.1:8000). Once /health answers it prints commands to try, then
streams the exporter's log until Ctrl-C, SIGTERM or --duration, and stops everything
(the exporter with SIGTERM, reporting its exit code and shutdown line).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
SITES_FILE = ROOT / "examples" / "sites.yml"
BROKER_HOST, BROKER_PORT = "127.0.0.1", 18830  # must match examples/sites.yml
START_TIMEOUT = 30.0  # seconds for mosquitto / the exporter to answer
# Seconds after SIGTERM before SIGKILL: the exporter's own MQTT_SHUTDOWN_TIMEOUT plus a margin.
STOP_GRACE = max(15.0, float(os.environ.get("MQTT_SHUTDOWN_TIMEOUT") or 0) + 10.0)
SHUTDOWN_MARKER = "All connections disconnected in"

stop = threading.Event()


def say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.access(p, os.X_OK)), None)


def write_broker_config() -> Path:
    conf = DEMO / "mosquitto.conf"
    lines = [
        f"listener {BROKER_PORT} {BROKER_HOST}",
        "allow_anonymous true",
        "persistence false",
        f"log_dest file {DEMO / 'mosquitto.log'}",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if os.geteuid() == 0:  # otherwise mosquitto drops to user 'mosquitto' and cannot write .demo/
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    return conf


def spawn(cmd: list[str], log: Path | None = None, **kw) -> subprocess.Popen:
    # A new session: Ctrl-C reaches only this script, which then stops the children in order.
    out = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, **kw)
    finally:
        if log:
            out.close()


def terminate(proc: subprocess.Popen | None, name: str) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop within {STOP_GRACE:g}s after SIGTERM; killing it")
        proc.kill()
        return proc.wait()


class LogPump(threading.Thread):
    """Copies the exporter's output to .demo/exporter.log; holds it back until release()."""

    def __init__(self, proc: subprocess.Popen, path: Path):
        super().__init__(daemon=True)
        self.proc, self.path = proc, path
        self.lock = threading.Lock()
        self.held: list[str] | None = []
        self.shutdown_line: str | None = None

    def run(self) -> None:
        with open(self.path, "w", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if SHUTDOWN_MARKER in line:
                    self.shutdown_line = line.strip()
                with self.lock:
                    if self.held is None:
                        sys.stdout.write(line)
                        sys.stdout.flush()
                    else:
                        self.held.append(line)

    def release(self) -> None:
        with self.lock:
            sys.stdout.writelines(self.held or [])
            sys.stdout.flush()
            self.held = None


def wait_until(check, deadline: float, proc: subprocess.Popen) -> bool:
    """Poll check() until it is true, the process exits, a stop is asked, or the deadline."""
    while time.monotonic() < deadline and not stop.is_set() and proc.poll() is None:
        if check():
            return True
        stop.wait(0.2)
    return False


def health_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:  # e.g. 503 while sites are still connecting: it answers
        return True
    except (OSError, ValueError):
        return False
    return True


def python_command() -> str:
    """This interpreter as a command that runs from the repository root: `.venv/bin/python`
    for the project's venv (a bare `mqtt-site-exporter` is not on the PATH unless the venv is
    activated), else the absolute path."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(ROOT))
    except ValueError:
        return str(exe)


def try_commands(base: str) -> list[str]:
    """The commands the banner suggests, each runnable as printed from the repository root."""
    return [
        f"curl -s {base}/health",
        f"curl -s '{base}/health?verbose=true'",
        f"curl -s {base}/metrics | grep ^mqtt_",
        f"{python_command()} -m exporter status --url {base}",
        f"mosquitto_sub -h {BROKER_HOST} -p {BROKER_PORT} -t '+/backend/status' -v",
    ]


def banner(base: str) -> str:
    commands = "\n".join(f"  {c}" for c in try_commands(base))
    return f"""
Exporter is up on {base} (instance 'demo', sites from examples/sites.yml).
Try, from the repository root ({ROOT}):

{commands}

Streaming the exporter's log; Ctrl-C stops the demo.
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=0,
                   help="stop by itself after this many seconds (max 3600; 0: until Ctrl-C)")
    args = p.parse_args()
    if not 0 <= args.duration <= 3600:
        p.error("--duration must be between 0 and 3600 seconds")

    listen = os.environ.get("DEMO_LISTEN", "127.0.0.1:8000")
    host, _, port_s = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port_s.isdigit():
        p.error(f"DEMO_LISTEN must be host:port, got {listen!r}")
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{f'[{url_host}]' if ':' in url_host else url_host}:{port_s}"

    mosquitto = find_mosquitto()
    if not mosquitto:
        say("mosquitto not found; run `make deps` (Debian package mosquitto)")
        return 1
    for h, port, what in ((BROKER_HOST, BROKER_PORT, "demo broker"), (host, int(port_s), "exporter")):
        if port_in_use(h, port) or can_connect(url_host if what == "exporter" else h, port):
            say(f"port {h}:{port} for the {what} is busy (another demo still running?); "
                f"stop whatever listens there{' or set DEMO_LISTEN' if what == 'exporter' else ''}")
            return 1

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    (DEMO / "state").mkdir(parents=True, exist_ok=True)

    broker = simulator = exporter = None
    exporter_rc = None
    try:
        broker = spawn([mosquitto, "-c", str(write_broker_config())], DEMO / "mosquitto.out")
        if not wait_until(lambda: can_connect(BROKER_HOST, BROKER_PORT),
                          time.monotonic() + START_TIMEOUT, broker):
            if not stop.is_set():
                say(f"mosquitto did not start; see {DEMO}/mosquitto.out and mosquitto.log")
            return 1
        say(f"mosquitto listening on {BROKER_HOST}:{BROKER_PORT} (log: .demo/mosquitto.log)")

        simulator = spawn([sys.executable, str(ROOT / "scripts" / "simulate_sites.py"),
                           "--host", BROKER_HOST, "--port", str(BROKER_PORT),
                           "--sites-file", str(SITES_FILE)], DEMO / "simulator.log")
        say("site simulator publishing (log: .demo/simulator.log)")

        env = dict(os.environ, MQTT_SITES_FILE=str(SITES_FILE), MQTT_INSTANCE_ID="demo",
                   MQTT_STATE_DIR=str(DEMO / "state"), EXPORTER_LISTEN=listen,
                   PYTHONUNBUFFERED="1")
        exporter = spawn([sys.executable, "-m", "exporter", "run"], env=env,
                         text=True, bufsize=1, errors="replace")
        pump = LogPump(exporter, DEMO / "exporter.log")
        pump.start()
        if not wait_until(lambda: health_answers(f"{base}/health"),
                          time.monotonic() + START_TIMEOUT, exporter):
            pump.release()
            if not stop.is_set():
                state = (f"exited with code {exporter.returncode}" if exporter.poll() is not None
                         else f"did not answer on {base}/health within {START_TIMEOUT:g}s")
                say(f"exporter {state}; its output is above (and in .demo/exporter.log)")
            return 1

        print(banner(base), flush=True)
        pump.release()

        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.is_set() and exporter.poll() is None:
            if deadline and time.monotonic() >= deadline:
                say(f"--duration {args.duration:g}s reached")
                break
            stop.wait(0.5)
        if exporter.poll() is not None:
            say(f"exporter exited by itself with code {exporter.returncode}")
            return 1

        say("stopping the exporter (SIGTERM)")
        exporter_rc = terminate(exporter, "exporter")
        pump.join(5)
        say(f"exporter exited with code {exporter_rc}")
        say(pump.shutdown_line or f"no '{SHUTDOWN_MARKER} ...' line in the exporter's log")
        return 0 if exporter_rc == 0 else 1
    finally:
        terminate(exporter, "exporter")
        terminate(simulator, "simulator")
        terminate(broker, "mosquitto")
        say("demo stopped")


if __name__ == "__main__":
    sys.exit(main())
