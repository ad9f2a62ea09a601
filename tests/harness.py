"""Test harness: real brokers, real processes, real sockets. No mocks.

Plain helpers, importable from tests (``from harness import Broker, ...``; conftest.py puts
this directory on sys.path, pytest's rootdir-relative import does too).

Everything listens on 127.0.0.1 only. Nothing here sleeps as synchronisation: waits are
``wait_until`` on a condition with a deadline. Every process started here has a ``cleanup()``
that SIGCONTs it (in case it is frozen) and SIGKILLs it; the fixtures in conftest.py call it.

Mosquitto 2.0.11 (Debian) log lines, measured (see ``Broker`` for the accounting):

    <ts>: mosquitto version 2.0.11 starting
    <ts>: Opening ipv4 listen socket on port <port>.
    <ts>: mosquitto version 2.0.11 running
    <ts>: New connection from 127.0.0.1:<cport> on port <port>.       TCP accept (no id yet)
    <ts>: New client connected from 127.0.0.1:<cport> as <id> (p2, c1, k60).
    <ts>: New client connected from 127.0.0.1:<cport> as <id> (p5, c1, k60, u'<user>').
          p = protocol level (2 = MQTT 3.1.1 in mosquitto's numbering, 5 = MQTT 5),
          c = clean session/start, k = keepalive, u = username when one was given
    <ts>: Client <id> disconnected.                       clean DISCONNECT packet
    <ts>: Client <id> closed its connection.              socket closed without DISCONNECT,
                                                          including a SIGKILLed client process
    <ts>: Client <id> already connected, closing old connection.
          takeover: written BEFORE the "New client connected" line of the new connection, and
          the old connection gets NO disconnect line of its own. Same on v3.1.1 and v5.
    <ts>: Client <id> has exceeded timeout, disconnecting.   keepalive expiry (1.5 x k, late)
    <ts>: Client <id> disconnected, not authorised.       bad credentials (no connect line
                                                          before it)
    <ts>: mosquitto version 2.0.11 terminating            SIGTERM; no per-client lines then

Surprises: 2.0.11 has no "[addr]" in disconnect lines (later 2.0.x write
"Client <id> [127.0.0.1:port] disconnected."; both are parsed). ``log_timestamp_format`` is
plain strftime: ``%N`` is written literally ("1795793861.%N"), so timestamps are whole epoch
seconds; events keep file order, which is the real order. Mosquitto started as root drops
to the ``mosquitto`` user and then cannot open a log file in a root-owned 0700 pytest tmp
dir (it silently falls back to stderr for a few lines), hence ``user root`` when we are root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import paho.mqtt.client as mqtt
import yaml

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
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


def _kill_proc(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
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
    broker: "Broker | None" = None,
    client_id: str = "",
    protocol: int = mqtt.MQTTv311,
    **kwargs: Any,
) -> mqtt.Client:
    """A paho 2.2 client (callback API VERSION2), with the broker's credentials if it has users."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
    if broker is not None and broker.credentials:
        c.username_pw_set(*broker.credentials)
    return c


# --------------------------------------------------------------------------- Broker

_TS = r"(?P<ts>\d+(?:\.\d+)?): "
_RE_CONNECT = re.compile(
    _TS + r"New client connected from (?P<addr>\S+) as (?P<id>.*) "
    r"\(p(?P<proto>\d+), c(?P<clean>\d), k(?P<keepalive>\d+)(?:, u'(?P<user>.*)')?\)\.$"
)
_RE_TAKEOVER = re.compile(_TS + r"Client (?P<id>.*) already connected, closing old connection\.$")
_RE_DISCONNECT = re.compile(
    _TS + r"Client (?P<id>.*?)(?: \[[^\]]*\])? (?:"
    r"disconnected(?:\.|: .*\.|, not authorised\.| due to .*\.)"
    r"|closed its connection\."
    r"|has exceeded timeout, disconnecting\."
    r"|been disconnected by administrative action\."
    r")$"
)
_RE_LIFECYCLE = re.compile(_TS + r"mosquitto version \S+ (?P<what>starting|terminating)$")


class Broker:
    """A real Debian mosquitto on 127.0.0.1:<free port>, in its own directory.

    Accounting (``events``/``connects``/``takeovers``/``max_concurrent``) is parsed from the
    broker's own log; the formats are documented at the top of this module.
    """

    host = HOST

    def __init__(
        self,
        directory: str | os.PathLike,
        users: dict[str, str] | None = None,
        port: int | None = None,
        extra_conf: str = "",
    ):
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError(MOSQUITTO_MISSING)
        self.binary = binary
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.extra_conf = extra_conf
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.stderr_path = self.dir / "mosquitto.stderr"
        self.passwd_path = self.dir / "passwd"
        self.proc: subprocess.Popen | None = None
        self._stderr_fh = None
        if self.users:
            self._write_passwords()

    # -- config
    @property
    def credentials(self) -> tuple[str, str] | None:
        """(username, password) of the first configured user, or None for an anonymous broker."""
        return next(iter(self.users.items()), None)

    def _write_passwords(self) -> None:
        tool = find_tool("mosquitto_passwd")
        if tool is None:
            raise RuntimeError("mosquitto_passwd not found (Debian package mosquitto)")
        self.passwd_path.unlink(missing_ok=True)
        for i, (user, password) in enumerate(self.users.items()):
            args = [tool] + (["-c"] if i == 0 else []) + ["-b", str(self.passwd_path), user, password]
            subprocess.run(args, check=True, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)

    def _write_conf(self) -> None:
        lines = [
            f"listener {self.port} {HOST}",
            "persistence false",
            "connection_messages true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # %N is not supported by 2.0.11 (plain strftime): epoch seconds.
            "log_timestamp_format %s",
            "max_connections -1",
        ]
        if self.users:
            lines += ["allow_anonymous false", f"password_file {self.passwd_path}"]
        else:
            lines += ["allow_anonymous true"]
        if os.geteuid() == 0:
            # Otherwise mosquitto drops to user "mosquitto" and cannot write into pytest's
            # root-owned 0700 tmp dir (log file, password file).
            lines.append("user root")
        if self.extra_conf:
            lines.append(self.extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")

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

    def start(self, timeout: float = 10.0) -> "Broker":
        """Start mosquitto and wait until its port accepts a TCP connection.

        On a first start with a port we chose, a lost race for the port is retried on a new one;
        a restart keeps the port (mosquitto sets SO_REUSEADDR, so TIME_WAIT does not block it).
        """
        if self.running:
            raise RuntimeError("broker already running")
        attempts = 1 if (self._fixed_port or self.proc is not None) else 3
        for attempt in range(attempts):
            self._write_conf()
            if self._stderr_fh:
                self._stderr_fh.close()
            self._stderr_fh = open(self.stderr_path, "ab")
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr_fh,
                stderr=subprocess.STDOUT,
                preexec_fn=_raise_nofile,
            )
            try:
                wait_until(
                    lambda: self.proc.poll() is not None or port_accepts(HOST, self.port),
                    timeout,
                    interval=0.01,
                    message=f"mosquitto accepting on {HOST}:{self.port}",
                )
            except AssertionError:
                self.cleanup()
                raise AssertionError(f"mosquitto did not start:\n{self.diagnostics()}") from None
            if self.proc.poll() is None:
                return self
            if attempt + 1 < attempts:
                self.port = free_port()
        raise AssertionError(f"mosquitto exited at start (rc={self.proc.returncode}):\n{self.diagnostics()}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (after SIGCONT, in case it is frozen) and wait. Returns the exit status."""
        if not self.running:
            return self.proc.returncode if self.proc else 0
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            raise AssertionError(f"mosquitto ignored SIGTERM for {timeout}s")

    def kill(self) -> int:
        """SIGKILL and reap."""
        if not self.running:
            return self.proc.returncode if self.proc else 0
        self.proc.kill()
        return self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the kernel still completes TCP handshakes (listen backlog), nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> "Broker":
        """Stop (SIGTERM) and start again on the same port."""
        self.stop()
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Teardown: SIGCONT + SIGKILL + reap if running. Idempotent, never raises."""
        _kill_proc(self.proc)
        if self._stderr_fh:
            self._stderr_fh.close()
            self._stderr_fh = None

    # -- logs
    def log_text(self) -> str:
        return _read(self.log_path)

    def diagnostics(self, lines: int = 40) -> str:
        return (
            f"--- {self.conf_path}\n{_read(self.conf_path)}"
            f"--- {self.stderr_path} (tail)\n{_tail(_read(self.stderr_path), lines)}\n"
            f"--- {self.log_path} (tail)\n{_tail(self.log_text(), lines)}"
        )

    def wait_log(self, regex: str, timeout: float) -> re.Match:
        pattern = re.compile(regex, re.M)
        return wait_until(lambda: pattern.search(self.log_text()), timeout, message=f"broker log /{regex}/")

    # -- accounting
    def events(self) -> list[tuple[float, str, str]]:
        """[(epoch timestamp, kind, client_id)] in log order; kind: connect|disconnect|takeover.

        Timestamps are whole epoch seconds (2.0.11 has no sub-second format); the list order
        is the real order. Lines with client id "<unknown>" (a TCP connection that sent no
        CONNECT, e.g. start()'s port probe) are kept; they match no real client id.
        """
        return list(self._events(with_lifecycle=False))

    def _events(self, with_lifecycle: bool) -> Iterable[tuple[float, str, str]]:
        for line in self.log_text().splitlines():
            for kind, rx in (
                ("connect", _RE_CONNECT),
                ("takeover", _RE_TAKEOVER),
                ("disconnect", _RE_DISCONNECT),
            ):
                m = rx.match(line)
                if m:
                    yield (float(m["ts"]), kind, m["id"])
                    break
            else:
                if with_lifecycle:
                    m = _RE_LIFECYCLE.match(line)
                    if m:
                        yield (float(m["ts"]), "reset", "")

    def connects(self, client_id: str) -> int:
        """Successful MQTT connects (CONNACK given) with this client id, over all broker runs."""
        return sum(1 for _, kind, cid in self.events() if kind == "connect" and cid == client_id)

    def disconnects(self, client_id: str) -> int:
        return sum(1 for _, kind, cid in self.events() if kind == "disconnect" and cid == client_id)

    def takeovers(self, client_id: str | None = None) -> int:
        return sum(
            1 for _, kind, cid in self.events() if kind == "takeover" and client_id in (None, cid)
        )

    def live(self, client_id: str) -> int:
        """How many connections with this id the broker holds now, by the log (0 or 1)."""
        return self._replay(client_id)[0]

    def max_concurrent(self, client_id: str) -> int:
        """Most connections with this id that were live at once, replaying the log.

        connect: live += 1. disconnect: live -= 1 (never below 0: "not authorised" and the like
        have no connect line). takeover: the new connection is up while the old one is still
        open, so that instant counts as live + 1 (>= 2), then the old one is gone: live -= 1
        (the new one's "New client connected" line follows). Broker start/stop lines reset
        live to 0 (SIGTERM writes no per-client lines).
        """
        return self._replay(client_id)[1]

    def _replay(self, client_id: str) -> tuple[int, int]:
        live = peak = 0
        for _, kind, cid in self._events(with_lifecycle=True):
            if kind == "reset":
                live = 0
                continue
            if cid != client_id:
                continue
            if kind == "connect":
                live += 1
                peak = max(peak, live)
            elif kind == "disconnect":
                live = max(0, live - 1)
            elif kind == "takeover":
                peak = max(peak, live + 1, 2)
                live = max(0, live - 1)
        return live, peak

    def __repr__(self) -> str:
        return f"<Broker {HOST}:{self.port} pid={self.pid} running={self.running}>"


# --------------------------------------------------------------------------- status watching


class StatusWatcher:
    """A plain paho client subscribed to ``topic_filter``; records every message it receives.

    ``messages`` holds (time.monotonic() at receipt, topic, payload str, retain flag).
    Subscribed (SUBACK received) when the constructor returns; resubscribes on reconnect.
    """

    def __init__(self, broker: Broker, topic_filter: str = "+/backend/status", qos: int = 1,
                 timeout: float = 5.0):
        self.broker = broker
        self.topic_filter = topic_filter
        self.qos = qos
        self.messages: list[tuple[float, str, str, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt_client(broker, client_id=f"harness-watch-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()
        try:
            wait_until(self._subscribed.is_set, timeout, message=f"watcher subscribed to {topic_filter}")
        except AssertionError:
            self.close()
            raise

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe(self.topic_filter, qos=self.qos)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._subscribed.set()

    def _on_message(self, client, userdata, msg):
        rec = (time.monotonic(), msg.topic, msg.payload.decode("utf-8", "replace"), bool(msg.retain))
        with self._lock:
            self.messages.append(rec)

    def snapshot(self) -> list[tuple[float, str, str, bool]]:
        with self._lock:
            return list(self.messages)

    def payloads(self, topic: str) -> list[str]:
        return [p for _, t, p, _ in self.snapshot() if t == topic]

    def find(self, topic: str, payload: str | Callable[[str], bool] | None = None,
             after: float | None = None) -> tuple[float, str, str, bool] | None:
        """First recorded message on ``topic`` (received strictly after ``after``) whose payload
        equals ``payload`` (or satisfies it, when callable; any payload when None)."""
        for rec in self.snapshot():
            t, tp, p, _ = rec
            if tp != topic or (after is not None and t <= after):
                continue
            if payload is None or (payload(p) if callable(payload) else p == payload):
                return rec
        return None

    def wait_for(self, topic: str, payload: str | Callable[[str], bool] | None, timeout: float,
                 after: float | None = None) -> float:
        """Monotonic receive time of the first matching message after ``after``; raise if none."""
        rec = wait_until(
            lambda: self.find(topic, payload, after),
            timeout,
            interval=0.005,
            message=f"{payload!r} on {topic} after {after}; got {self.payloads(topic)!r}",
        )
        return rec[0]

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()


def retained_all(broker: Broker, topic_filter: str, timeout: float = 2.0) -> dict[str, str]:
    """``{topic: payload}`` of every retained message matching ``topic_filter``, read by a
    fresh client.

    Mosquitto queues retained messages right after the SUBACK of the SUBSCRIBE that matched
    them; a second SUBSCRIBE's SUBACK comes after them on the same connection, so when it
    arrives every retained message has been seen.
    """
    got: dict[str, str] = {}
    acks: list[int] = []
    marker = f"harness/{uuid.uuid4().hex}"
    c = mqtt_client(broker, client_id=f"harness-ret-{uuid.uuid4().hex[:8]}")

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(topic_filter, qos=0)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        acks.append(mid)
        if len(acks) == 1:
            client.subscribe(marker, qos=0)

    def on_message(client, userdata, msg):
        if msg.retain:
            got[msg.topic] = msg.payload.decode("utf-8", "replace")

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(broker.host, broker.port, keepalive=10)
    c.loop_start()
    try:
        wait_until(lambda: len(acks) >= 2, timeout, message=f"retained read of {topic_filter}")
    finally:
        c.disconnect()
        c.loop_stop()
    return got


def retained(broker: Broker, topic: str, timeout: float = 2.0) -> str | None:
    """The retained payload of ``topic`` (None if nothing is retained)."""
    return retained_all(broker, topic, timeout).get(topic)


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
    def start(self) -> "ExporterProcess":
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
        _kill_proc(self.proc)
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

    def wait_ready(self, timeout: float = 15.0) -> "ExporterProcess":
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


# --------------------------------------------------------------------------- fake MQTT 5 peer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    mult, val = 1, 0
    for _ in range(4):
        b = buf[i]
        i += 1
        val += (b & 0x7F) * mult
        if not b & 0x80:
            return val, i
        mult *= 128
    raise ValueError("malformed variable byte integer")


def _read_str(buf: bytes, i: int) -> tuple[bytes, int]:
    n = int.from_bytes(buf[i:i + 2], "big")
    return buf[i + 2:i + 2 + n], i + 2 + n


@dataclasses.dataclass
class ConnectInfo:
    time: float
    client_id: str
    protocol_level: int
    clean_start: bool
    keepalive: int
    will_flag: bool = False
    will_qos: int = 0
    will_retain: bool = False
    will_topic: str | None = None
    will_payload: bytes | None = None
    username: str | None = None


def parse_connect(body: bytes, now: float | None = None) -> ConnectInfo:
    """Parse the variable header + payload of a CONNECT (v3.1.1 or v5)."""
    _, i = _read_str(body, 0)  # protocol name "MQTT"
    level, flags = body[i], body[i + 1]
    keepalive = int.from_bytes(body[i + 2:i + 4], "big")
    i += 4
    if level == 5:
        plen, i = _read_varint(body, i)
        i += plen
    cid, i = _read_str(body, i)
    info = ConnectInfo(
        time=time.monotonic() if now is None else now,
        client_id=cid.decode("utf-8", "replace"),
        protocol_level=level,
        clean_start=bool(flags & 0x02),
        keepalive=keepalive,
        will_flag=bool(flags & 0x04),
        will_qos=(flags >> 3) & 3,
        will_retain=bool(flags & 0x20),
    )
    if info.will_flag:
        if level == 5:
            plen, i = _read_varint(body, i)
            i += plen
        topic, i = _read_str(body, i)
        info.will_topic = topic.decode("utf-8", "replace")
        info.will_payload, i = _read_str(body, i)
    if flags & 0x80:
        user, i = _read_str(body, i)
        info.username = user.decode("utf-8", "replace")
    return info


class FakeV5Broker:
    """A minimal scripted MQTT peer on a raw socket at 127.0.0.1:<free port>.

    Answers CONNECT with CONNACK success (v5: ``20 03 00 00 00``, v3.1.1: ``20 02 00 00``),
    PINGREQ with PINGRESP, SUBSCRIBE with SUBACK (QoS min(requested, 1)), UNSUBSCRIBE with
    UNSUBACK, PUBLISH QoS 1 with PUBACK and QoS 2 with PUBREC/PUBCOMP. With ``kick_after``
    seconds, every connection then gets DISCONNECT ``kick_reason`` (default 0x8E "Session taken
    over": ``E0 02 8E 00``, v5 only) and is closed. Records ``connections`` [(monotonic, client
    id)], ``connects`` [ConnectInfo], ``published`` [(monotonic, topic, payload, qos, retain)],
    ``kicks`` [(monotonic, client id)], ``pubacks`` [packet id] sent by the client.
    ``suback_code`` overrides every SUBACK return code (0x80: refused, as an ACL would),
    ``after_suback`` is written right after each SUBACK (scripted traffic for the client),
    and ``reset_on_accept`` resets every connection as soon as the kernel accepted it (a
    broker dying right after accept), counting them in ``accepted``.
    """

    host = HOST

    def __init__(self, kick_after: float | None = None, kick_reason: int = 0x8E,
                 suback_code: int | None = None, after_suback: bytes = b"",
                 reset_on_accept: bool = False):
        self.kick_after = kick_after
        self.kick_reason = kick_reason
        self.suback_code = suback_code
        self.after_suback = after_suback
        self.reset_on_accept = reset_on_accept
        self.accepted = 0
        self.pubacks: list[bytes] = []
        self.connections: list[tuple[float, str]] = []
        self.connects: list[ConnectInfo] = []
        self.published: list[tuple[float, str, bytes, int, bool]] = []
        self.kicks: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind((HOST, 0))
        self._srv.listen(64)
        self._srv.settimeout(0.2)
        self.port = self._srv.getsockname()[1]
        self._spawn(self._accept_loop)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"fakev5-{self.port}")
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.reset_on_accept:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            conn.settimeout(0.2)
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn)

    def _recv_exact(self, conn: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            if self._closed.is_set():
                return None
            try:
                chunk = conn.recv(n - len(buf))
            except socket.timeout:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _read_packet(self, conn: socket.socket) -> tuple[int, bytes] | None:
        head = self._recv_exact(conn, 1)
        if head is None:
            return None
        length, mult = 0, 1
        for _ in range(4):
            b = self._recv_exact(conn, 1)
            if b is None:
                return None
            length += (b[0] & 0x7F) * mult
            if not b[0] & 0x80:
                break
            mult *= 128
        body = self._recv_exact(conn, length) if length else b""
        if body is None:
            return None
        return head[0], body

    def _serve(self, conn: socket.socket) -> None:
        wlock = threading.Lock()
        state = {"level": 4, "cid": None, "gone": False}

        def send(data: bytes) -> None:
            with wlock:
                if not state["gone"]:
                    try:
                        conn.sendall(data)
                    except OSError:
                        state["gone"] = True

        def kick() -> None:
            if self._closed.wait(self.kick_after) or state["gone"]:
                return
            with self._lock:
                self.kicks.append((time.monotonic(), state["cid"]))
            send(bytes([0xE0, 0x02, self.kick_reason, 0x00]))
            with wlock:
                state["gone"] = True
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        try:
            while not self._closed.is_set():
                pkt = self._read_packet(conn)
                if pkt is None:
                    return
                first, body = pkt
                ptype = first >> 4
                v5 = state["level"] == 5
                if ptype == 1:  # CONNECT
                    info = parse_connect(body)
                    state["level"], state["cid"] = info.protocol_level, info.client_id
                    with self._lock:
                        self.connects.append(info)
                        self.connections.append((info.time, info.client_id))
                    send(b"\x20\x03\x00\x00\x00" if info.protocol_level == 5 else b"\x20\x02\x00\x00")
                    if self.kick_after is not None:
                        self._spawn(kick)
                elif ptype == 12:  # PINGREQ
                    send(b"\xd0\x00")
                elif ptype == 8:  # SUBSCRIBE
                    pid, i = body[:2], 2
                    if v5:
                        plen, i = _read_varint(body, i)
                        i += plen
                    codes = bytearray()
                    while i < len(body):
                        _, i = _read_str(body, i)
                        codes.append(min(body[i] & 0x03, 1) if self.suback_code is None
                                     else self.suback_code)
                        i += 1
                    payload = pid + (b"\x00" if v5 else b"") + bytes(codes)
                    send(b"\x90" + _varint(len(payload)) + payload + self.after_suback)
                elif ptype == 10:  # UNSUBSCRIBE
                    pid, i = body[:2], 2
                    if v5:
                        plen, i = _read_varint(body, i)
                        i += plen
                    n = 0
                    while i < len(body):
                        _, i = _read_str(body, i)
                        n += 1
                    payload = pid + (b"\x00" + b"\x00" * n if v5 else b"")
                    send(b"\xb0" + _varint(len(payload)) + payload)
                elif ptype == 3:  # PUBLISH
                    qos, retain = (first >> 1) & 3, bool(first & 1)
                    topic, i = _read_str(body, 0)
                    pid = b""
                    if qos:
                        pid, i = body[i:i + 2], i + 2
                    if v5:
                        plen, i = _read_varint(body, i)
                        i += plen
                    with self._lock:
                        self.published.append(
                            (time.monotonic(), topic.decode("utf-8", "replace"), body[i:], qos, retain))
                    if qos == 1:
                        send(b"\x40\x02" + pid)
                    elif qos == 2:
                        send(b"\x50\x02" + pid)
                elif ptype == 4:  # PUBACK from the client
                    with self._lock:
                        self.pubacks.append(body[:2])
                elif ptype == 6:  # PUBREL
                    send(b"\x70\x02" + body[:2])
                elif ptype == 14:  # DISCONNECT
                    return
        except (IndexError, ValueError):
            return  # malformed: drop the connection
        finally:
            with wlock:
                state["gone"] = True
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def client_ids(self) -> list[str]:
        with self._lock:
            return [cid for _, cid in self.connections]

    def close(self) -> None:
        self._closed.set()
        try:
            self._srv.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)

    cleanup = close

    def __repr__(self) -> str:
        return f"<FakeV5Broker {HOST}:{self.port} connections={len(self.connections)}>"
