"""What every broker process of the test support shares: a binary started with a config file
in its own directory on 127.0.0.1:<free port>, waited for until its port accepts, stopped,
killed, frozen, cleaned up. :class:`~tests.support.broker.Broker` (Mosquitto) and
:class:`~tests.support.amqtt.AmqttBroker` add their configuration and log accounting.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import IO, Any

from .net import HOST, _raise_nofile, _read, _tail, free_port, kill_proc, port_accepts, wait_until


class BrokerProcess:
    """One broker process. Subclasses set ``name``, ``stop_signal``, ``conf_path``,
    ``output_path`` (stdout + stderr) and ``log_path``, and write the config in ``_write_conf``."""

    host = HOST
    name = "broker"
    stop_signal = signal.SIGTERM
    conf_path: Path
    output_path: Path
    log_path: Path

    def __init__(self, binary: str, directory: str | os.PathLike, port: int | None) -> None:
        self.binary = binary
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen | None = None
        self._output_fh: IO[bytes] | None = None

    def _write_conf(self) -> None:
        raise NotImplementedError

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

    def start(self, timeout: float = 10.0) -> Any:
        """Start and wait until the port accepts a TCP connection.

        On a first start with a port we chose, a lost race for the port is retried on a new
        one; a restart keeps the port.
        """
        if self.running:
            raise RuntimeError(f"{self.name} already running")
        attempts = 1 if (self._fixed_port or self.proc is not None) else 3
        for attempt in range(attempts):
            self._write_conf()
            if self._output_fh:
                self._output_fh.close()
            self._output_fh = open(self.output_path, "ab")
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)], cwd=self.dir,
                stdin=subprocess.DEVNULL, stdout=self._output_fh, stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile)
            try:
                wait_until(lambda proc=self.proc: (proc.poll() is not None
                                                   or port_accepts(HOST, self.port)),
                           timeout, interval=0.01,
                           message=f"{self.name} accepting on {HOST}:{self.port}")
            except AssertionError:
                self.cleanup()
                raise AssertionError(f"{self.name} did not start:\n{self.diagnostics()}") from None
            if self.proc.poll() is None:
                return self
            if attempt + 1 < attempts:
                self.port = free_port()
        raise AssertionError(f"{self.name} exited at start (rc={self.proc.returncode}):\n"
                             f"{self.diagnostics()}")

    def stop(self, timeout: float = 10.0) -> int:
        """``stop_signal`` (after SIGCONT, in case it is frozen) and wait; the exit status."""
        if self.proc is None or not self.running:
            return self.proc.returncode if self.proc else 0
        os.kill(self.proc.pid, signal.SIGCONT)
        os.kill(self.proc.pid, self.stop_signal)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            raise AssertionError(f"{self.name} ignored {self.stop_signal.name} for "
                                 f"{timeout}s") from None

    def kill(self) -> int:
        """SIGKILL and reap."""
        if self.proc is None or not self.running:
            return self.proc.returncode if self.proc else 0
        self.proc.kill()
        return self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the kernel still completes TCP handshakes (listen backlog), nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> Any:
        """Stop and start again on the same port."""
        self.stop()
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Teardown: SIGCONT + SIGKILL + reap if running. Idempotent, never raises."""
        kill_proc(self.proc)
        if self._output_fh:
            self._output_fh.close()
            self._output_fh = None

    # -- logs
    def log_text(self) -> str:
        return _read(self.log_path)

    def diagnostics(self, lines: int = 40) -> str:
        out = (f"--- {self.conf_path}\n{_read(self.conf_path)}"
               f"--- {self.output_path} (tail)\n{_tail(_read(self.output_path), lines)}\n")
        if self.log_path != self.output_path:
            out += f"--- {self.log_path} (tail)\n{_tail(self.log_text(), lines)}"
        return out

    def wait_log(self, regex: str, timeout: float) -> re.Match:
        pattern = re.compile(regex, re.M)
        return wait_until(lambda: pattern.search(self.log_text()), timeout,
                          message=f"{self.name} log /{regex}/")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {HOST}:{self.port} pid={self.pid} running={self.running}>"
