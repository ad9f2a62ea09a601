"""A real amqtt 0.12.1 broker (PyPI) for tests: a broker that never kicks a duplicate client ID.

amqtt lives in its own venv, ``.venv-amqtt`` at the repository root (``make test`` creates it:
``python3 -m venv .venv-amqtt && .venv-amqtt/bin/pip install amqtt==0.12.1``), so that its
dependencies never touch the project venv. ``AMQTT_BIN`` in the environment overrides the path.

What amqtt 0.12.1 does with two clients with one client ID (measured, and read in
``amqtt/broker.py``; ``tests/test_support.py`` holds the proof):

- MQTT 3.1.1 only (an MQTT 5 CONNECT gets no CONNACK).
- Clean session (our default): the second CONNECT deletes the first connection's *session*
  (its subscriptions and queues) but **keeps its socket open**: both clients stay connected,
  PINGREQs are answered, both can publish, and only the newest one receives messages. The
  old one is silently deaf. Nothing is logged at INFO level.
- Persistent session (clean session 0): the second CONNECT reuses the session and *does* take
  over: "Client <id> is already connected, performing take-over." and the old socket is
  closed.

Log (``amqtt.log``, stderr of ``amqtt -c conf.yaml``, ``[asctime] :: LEVEL - message``):
"Listener 'default' bind to 127.0.0.1:<port> ..." at start, "Connection from 127.0.0.1:<p>
on listener 'default'" per TCP accept. SIGTERM kills it at once (the script handles only
SIGINT, which shuts it down gracefully).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from .net import HOST, REPO_ROOT, _raise_nofile, _read, _tail, free_port, kill_proc, port_accepts, wait_until

AMQTT_VERSION = "0.12.1"
AMQTT_MISSING = (
    f"amqtt {AMQTT_VERSION} not found: run `make test` (creates .venv-amqtt) or "
    f"`python3 -m venv .venv-amqtt && .venv-amqtt/bin/pip install amqtt=={AMQTT_VERSION}`"
)


def find_amqtt() -> str | None:
    """Path of the ``amqtt`` script of .venv-amqtt (or $AMQTT_BIN), None when absent."""
    env = os.environ.get("AMQTT_BIN")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT / ".venv-amqtt" / "bin" / "amqtt")
    for path in candidates:
        if os.access(path, os.X_OK):
            return str(path)
    return None


_RE_TAKEOVER = re.compile(r"Client (?P<id>.*) is already connected, performing take-over\.$", re.M)
_RE_ACCEPT = re.compile(r"Connection from \S+ on listener 'default'$", re.M)


class AmqttBroker:
    """amqtt on 127.0.0.1:<free port> in its own directory (conf.yaml, amqtt.log).

    The same surface as :class:`~tests.support.broker.Broker` where it makes sense: ``start``,
    ``stop``, ``kill``, ``restart``, ``cleanup``, ``host``, ``port``, ``url``, ``log_text``,
    ``diagnostics``, ``wait_log``, ``takeovers``. No users (``credentials`` is None).
    """

    host = HOST
    credentials = None

    def __init__(self, directory: str | os.PathLike, port: int | None = None):
        binary = find_amqtt()
        if binary is None:
            raise RuntimeError(AMQTT_MISSING)
        self.binary = binary
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.conf_path = self.dir / "conf.yaml"
        self.log_path = self.dir / "amqtt.log"
        self.proc: subprocess.Popen | None = None
        self._log_fh = None

    def _write_conf(self) -> None:
        self.conf_path.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: {HOST}:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.logging_amqtt.EventLoggerPlugin:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def start(self, timeout: float = 20.0) -> AmqttBroker:
        """Start amqtt and wait until its port accepts a TCP connection (about 1 s: Python
        start-up and imports). A lost race for a port we chose is retried on a new one."""
        if self.running:
            raise RuntimeError("amqtt already running")
        attempts = 1 if (self._fixed_port or self.proc is not None) else 3
        for attempt in range(attempts):
            self._write_conf()
            if self._log_fh:
                self._log_fh.close()
            self._log_fh = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile,
            )
            try:
                wait_until(
                    lambda: self.proc.poll() is not None or port_accepts(HOST, self.port),
                    timeout,
                    interval=0.02,
                    message=f"amqtt accepting on {HOST}:{self.port}",
                )
            except AssertionError:
                self.cleanup()
                raise AssertionError(f"amqtt did not start:\n{self.diagnostics()}") from None
            if self.proc.poll() is None:
                return self
            if attempt + 1 < attempts:
                self.port = free_port()
        raise AssertionError(f"amqtt exited at start (rc={self.proc.returncode}):\n{self.diagnostics()}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (amqtt's graceful shutdown; SIGCONT first in case it is frozen) and wait;
        SIGKILL if it is still running after ``timeout``. Returns the exit status."""
        if not self.running:
            return self.proc.returncode if self.proc else 0
        os.kill(self.proc.pid, signal.SIGCONT)
        os.kill(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            raise AssertionError(f"amqtt ignored SIGINT for {timeout}s") from None

    def kill(self) -> int:
        """SIGKILL and reap."""
        if not self.running:
            return self.proc.returncode if self.proc else 0
        self.proc.kill()
        return self.proc.wait(timeout=10)

    def restart(self, timeout: float = 20.0) -> AmqttBroker:
        self.stop()
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Teardown: SIGCONT + SIGKILL + reap if running. Idempotent, never raises."""
        kill_proc(self.proc)
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    # -- logs
    def log_text(self) -> str:
        return _read(self.log_path)

    def diagnostics(self, lines: int = 40) -> str:
        return (f"--- {self.conf_path}\n{_read(self.conf_path)}"
                f"--- {self.log_path} (tail)\n{_tail(self.log_text(), lines)}")

    def wait_log(self, regex: str, timeout: float) -> re.Match:
        pattern = re.compile(regex, re.M)
        return wait_until(lambda: pattern.search(self.log_text()), timeout, message=f"amqtt log /{regex}/")

    def accepts(self) -> int:
        """TCP connections accepted so far (all runs), by the log."""
        return len(_RE_ACCEPT.findall(self.log_text()))

    def takeovers(self, client_id: str | None = None) -> int:
        """Take-overs amqtt logged (persistent sessions only; clean sessions never log one)."""
        return sum(1 for m in _RE_TAKEOVER.finditer(self.log_text())
                   if client_id in (None, m["id"]))

    def __repr__(self) -> str:
        return f"<AmqttBroker {HOST}:{self.port} pid={self.pid} running={self.running}>"
