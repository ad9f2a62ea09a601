"""A real Mosquitto for tests, its log accounting, and watchers of the status topics.

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

import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from .net import (
    HOST,
    MOSQUITTO_MISSING,
    find_mosquitto,
    find_tool,
    mqtt_client,
    wait_until,
)
from .process import BrokerProcess

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


class Broker(BrokerProcess):
    """A real Debian mosquitto on 127.0.0.1:<free port>, in its own directory.

    Accounting (``events``/``connects``/``takeovers``/``max_concurrent``) is parsed from the
    broker's own log; the formats are documented at the top of this module.
    """

    name = "mosquitto"

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
        super().__init__(binary, directory, port)
        self.users = dict(users or {})
        self.extra_conf = extra_conf
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.output_path = self.stderr_path = self.dir / "mosquitto.stderr"
        self.passwd_path = self.dir / "passwd"
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

    # -- accounting
    def accepted(self) -> int:
        """TCP connections the broker accepted so far ("New connection" lines)."""
        return len(re.findall(r"^\d+: New connection from ", self.log_text(), re.M))

    def sentinel(self) -> int:
        """Connect a sentinel client and wait until the broker logged it. Mosquitto logs
        connections in accept order, so every earlier connection is in the log by then.
        Returns :meth:`accepted` at that point (the sentinel included)."""
        client_id = f"sentinel-{uuid.uuid4().hex[:8]}"
        c = mqtt_client(self, client_id=client_id)
        c.connect(self.host, self.port, keepalive=10)
        c.loop_start()
        try:
            self.wait_log(rf"^\d+: New client connected from \S+ as {client_id} ", 10)
        finally:
            c.disconnect()
            c.loop_stop()
        return self.accepted()

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




def kick(broker: Any, client_id: str) -> None:
    """A plain client connects with ``client_id`` (the broker closes the holder's connection:
    without a word on v3.1.1, DISCONNECT 0x8E on v5 with a newer Mosquitto), then leaves
    cleanly. ``broker``: a :class:`Broker` or any broker process of the support."""
    connected = threading.Event()
    intruder = mqtt_client(broker, client_id=client_id, reconnect_on_failure=False)
    intruder.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    intruder.connect(broker.host, broker.port, keepalive=30)
    intruder.loop_start()
    try:
        wait_until(connected.is_set, 10, message="intruder connected")
    finally:
        intruder.disconnect()
        intruder.loop_stop()
