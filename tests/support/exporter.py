"""The exporter under test as a real subprocess (``python -m exporter run``)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .broker import Broker
from .net import HOST, REPO_ROOT, _read, _tail, free_port, kill_proc, wait_until

# --------------------------------------------------------------------------- exporter process


def site(name: str, broker: Broker, **extra: Any) -> dict:
    """A site dict for sites.yml: name, host 127.0.0.1, the broker's port, plus ``extra``."""
    d = {"name": name, "host": HOST, "port": broker.port}
    d.update(extra)
    return d


class ExporterProcess:
    """The service under test as a real subprocess: ``python -m exporter run``.

    cwd is its own directory; sites.yml, state/ (unless a shared ``state_dir`` is given) and
    exporter.log (stdout + stderr) live there. PYTHONPATH gets the repository root prepended,
    because the package is not installed in the venv.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        sites: list[dict],
        instance_id: str = "test",
        state_dir: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sites = sites
        self.instance_id = instance_id
        self.sites_file = self.dir / "sites.yml"
        self.state_dir = Path(state_dir or self.dir) / "state"
        self.log_path = self.dir / "exporter.log"
        self.port = free_port()
        self.command = command or [sys.executable, "-m", "exporter", "run"]
        self.write_sites(sites)
        self.env = os.environ.copy()
        pp = self.env.get("PYTHONPATH")
        self.env.update(
            {
                "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + pp if pp else ""),
                "MQTT_SITES_FILE": str(self.sites_file),
                "MQTT_INSTANCE_ID": instance_id,
                "MQTT_STATE_DIR": str(self.state_dir),
                "EXPORTER_LISTEN": f"{HOST}:{self.port}",
                "LOG_FORMAT": "text",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self._log_fh = None

    def write_sites(self, sites: list[dict]) -> None:
        """(Re)write sites.yml; takes effect at the next start (or reload, if the service has one)."""
        self.sites = sites
        self.sites_file.write_text(yaml.safe_dump({"sites": sites}, sort_keys=False))

    # -- lifecycle
    def start(self) -> ExporterProcess:
        if self.running:
            raise RuntimeError("exporter already running")
        if self._log_fh:
            self._log_fh.close()
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.running:
            self.proc.kill()

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"exporter pid {self.pid} still running after {timeout}s\n{self.log_tail()}"
            ) from None

    def cleanup(self) -> None:
        """Teardown: SIGCONT + SIGKILL + reap if running. Idempotent, never raises."""
        kill_proc(self.proc)
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    # -- logs
    def log_text(self) -> str:
        return _read(self.log_path)

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_text(), lines)

    def wait_log(self, regex: str, timeout: float) -> re.Match:
        pattern = re.compile(regex, re.M)

        def check():
            m = pattern.search(self.log_text())
            if not m and not self.running:
                m = pattern.search(self.log_text())  # final read after exit
                if not m:
                    raise AssertionError(
                        f"exporter exited (rc={self.returncode}) before /{regex}/\n{self.log_tail()}"
                    )
            return m

        return wait_until(check, timeout, message=f"exporter log /{regex}/\n{self.log_tail()}")

    # -- HTTP
    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
        """GET url+path; (status, headers, body). An HTTP error status is returned, not raised;
        a connection error (not listening yet, dead) raises OSError."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, dict(r.headers.items()), r.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            return e.code, dict(e.headers.items()), body

    def health(self, verbose: bool = False) -> tuple[int, dict]:
        """(status, parsed JSON) of /health (``/health?verbose=true`` when verbose). A body that is
        not JSON comes back as {"_raw": text}."""
        status, _, body = self.http_get("/health?verbose=true" if verbose else "/health")
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"_raw": body.decode("utf-8", "replace")}

    def wait_ready(self, timeout: float = 15.0) -> ExporterProcess:
        """Until /health answers anything at all. Fails at once if the process exits."""

        def answered():
            if not self.running:
                raise AssertionError(f"exporter exited (rc={self.returncode})\n{self.log_tail()}")
            try:
                self.http_get("/health", timeout=0.5)
                return True
            except (OSError, urllib.error.URLError):
                return False

        wait_until(answered, timeout, interval=0.05, message=f"exporter /health on {self.url}")
        return self

    def metrics_text(self) -> str:
        status, _, body = self.http_get("/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:500]!r}"
        return body.decode()

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics: {(sample name, frozenset(labels.items())): value}.

        Sample names, i.e. with _total/_bucket/_count/_sum/_created/_info suffixes.
        """
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` with exactly these labels, or None."""
        return self.metrics().get((name, frozenset(labels.items())))

    def wait_metric(self, name: str, predicate: Callable[[float | None], bool], timeout: float,
                    **labels: str) -> float | None:
        """Until ``predicate(metric(name, **labels))`` holds; returns that value."""
        last: list[float | None] = [None]

        def check():
            if not self.running:
                raise AssertionError(f"exporter exited (rc={self.returncode})\n{self.log_tail()}")
            last[0] = self.metric(name, **labels)
            return predicate(last[0])

        wait_until(check, timeout, interval=0.05,
                   message=f"{name}{labels} predicate (last value {last[0]!r})")
        return last[0]

    def __repr__(self) -> str:
        return f"<ExporterProcess {self.url} pid={self.pid} running={self.running}>"




def cli_env(tmp_path: Path, instance_id: str = "cli", **extra: str) -> dict[str, str]:
    """The environment for ``python -m exporter <command>`` in ``tmp_path``: the process
    environment without MQTT_*/EXPORTER_*/LOG_*, the repository on PYTHONPATH, sites.yml and
    state/ in ``tmp_path``, a free loopback port, then ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MQTT_", "EXPORTER_", "LOG_"))}
    pp = env.get("PYTHONPATH")
    env.update({
        "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + pp if pp else ""),
        "PYTHONUNBUFFERED": "1",
        "MQTT_SITES_FILE": str(tmp_path / "sites.yml"),
        "MQTT_INSTANCE_ID": instance_id,
        "MQTT_STATE_DIR": str(tmp_path / "state"),
        "EXPORTER_LISTEN": f"{HOST}:{free_port()}",
    })
    env.update(extra)
    return env
