"""A real Debian Prometheus for tests: loopback only, 1 s scrape and evaluation intervals.

``Prometheus(directory, targets=[...], rule_files=[...]).start()`` scrapes the given
``host:port`` targets (job ``mqtt-site-exporter``) and evaluates the given rule files;
``query()``/``query_range()`` and ``alerts()`` read its HTTP API.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from .net import HOST, _tail, free_port, kill_proc, port_accepts, wait_until

PROMETHEUS_MISSING = ("prometheus not found: run `make test` (installs Debian's prometheus) "
                      "or apt-get install prometheus")
JOB = "mqtt-site-exporter"


def find_prometheus() -> str | None:
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)


class Prometheus:
    """One Prometheus server process with its own config, data dir and port."""

    def __init__(self, directory: Path, targets: list[str], rule_files: list[Path] = (),
                 interval: str = "1s"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.targets = list(targets)
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.interval = interval
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def write_config(self) -> Path:
        config = {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                       "scrape_timeout": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": self.targets}]}],
        }
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, timeout: float = 20.0) -> Prometheus:
        binary = find_prometheus()
        if not binary:
            raise AssertionError(PROMETHEUS_MISSING)
        config = self.write_config()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={HOST}:{self.port}", "--web.enable-lifecycle",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._ready(), timeout, interval=0.1,
                   message=f"prometheus ready on {self.url}\n{self.log_tail()}")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited rc={self.proc.returncode}\n{self.log_tail()}")
        if not port_accepts(HOST, self.port):
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except OSError:
            return ""

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; returns ``data`` or raises AssertionError with the error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"prometheus {path} {params}: {body.get('errorType')}: "
                                 f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, seconds: float = 60, step: str = "1s") -> list[dict]:
        end = time.time()
        return self.api("query_range", query=expr, start=end - seconds, end=end,
                        step=step)["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def cleanup(self) -> None:
        kill_proc(self.proc)
        if getattr(self, "_log", None):
            self._log.close()
