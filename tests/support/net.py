"""Basics of the test support: loopback only, free ports, waiting on conditions, processes.

Nothing here sleeps as synchronisation: waits are ``wait_until`` on a condition with a
deadline. Every process a support class starts has a ``cleanup()`` that SIGCONTs it (in
case it is frozen) and SIGKILLs it; the fixtures in tests/conftest.py call it.
"""
from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_MISSING = (
    "mosquitto not found: run `make test` (installs Debian's mosquitto) "
    "or apt-get install mosquitto"
)


# --------------------------------------------------------------------------- basics


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = map(int, fh.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free on 127.0.0.1 a moment ago, outside the kernel's ephemeral range.

    An ephemeral port (what binding to port 0 gives) can be taken as the local port of
    any outgoing connection before our server binds it; on a busy machine with thousands
    of short test connections that happens. Ports below the range are only taken by
    explicit binds.
    """
    low, high = _ephemeral_range()
    candidates = range(20000, low) if low > 21000 else range(high + 1, 65535)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.02,
    message: str = "",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError (with ``message`` and the last value seen) after ``timeout`` s.
    An exception raised by the predicate propagates at once.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.2f}s: {message or getattr(predicate, '__name__', '')}"
                f" (last value: {last!r})"
            )
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_mosquitto() -> str | None:
    if os.access("/usr/sbin/mosquitto", os.X_OK):
        return "/usr/sbin/mosquitto"
    return shutil.which("mosquitto")


def find_tool(name: str) -> str | None:
    for d in ("/usr/bin", "/usr/sbin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)


def _raise_nofile() -> None:
    """preexec_fn: raise RLIMIT_NOFILE to 65536, or to the hard limit if that is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def kill_proc(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGCONT (a frozen process cannot die of SIGTERM) then SIGKILL and reap. Idempotent."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            break
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - kernel did not reap in time
        pass


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def mqtt_client(
    broker: Any = None,
    client_id: str = "",
    protocol: int = mqtt.MQTTv311,
    **kwargs: Any,
) -> mqtt.Client:
    """A paho 2.2 client (callback API VERSION2), with the broker's credentials if it has users
    (``broker``: a :class:`~tests.support.broker.Broker` or None)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
    if broker is not None and broker.credentials:
        c.username_pw_set(*broker.credentials)
    return c

