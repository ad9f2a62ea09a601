"""One site's MQTT connection: a paho client driven by one greenlet.

The greenlet waits on the client's socket with gevent watchers (never ``select.select``,
which breaks above fd 1024) and calls paho's ``loop_read``/``loop_write``/``loop_misc``.
Reconnects are ours, not paho's (see :mod:`exporter.reconnect`). The state it keeps in
:class:`~exporter.state.SiteState` is what metrics and health read.

Graceful close is split for a parallel shutdown: :meth:`SiteConnection.send_farewell`
writes the final ``offline`` status and DISCONNECT as one non-blocking send and
half-closes the socket; :func:`drain_until_closed` then waits for the broker's close.
"""
from __future__ import annotations

import logging
import socket
import ssl

import gevent
import gevent.socket
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .inbound import InboundReader
from .reconnect import ConnectionEnd, ReconnectPolicy
from .state import (BACKOFF, CONNECTED, CONNECTING, COOLDOWN, DISABLED, STOPPING,
                    SiteState)

log = logging.getLogger(__name__)

ONLINE, OFFLINE = b"online", b"offline"
#: Session expiry asked for on MQTT 5 when clean sessions are turned off.
PERSISTENT_SESSION_EXPIRY = 86400
#: Longest sleep of the I/O loop between keepalive checks.
MAX_IDLE_WAIT = 5.0
#: Shortest interval between two of paho's keepalive checks (``loop_misc``) on a busy socket.
MISC_INTERVAL = 0.25
_READ, _WRITE = 1, 2


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def farewell_packets(status_topic: str, protocol: str, lwt_enabled: bool) -> bytes:
    """The bytes of a graceful goodbye, sent as one write.

    v5 with a will: DISCONNECT reason 0x04 "Disconnect with Will Message" (the broker
    publishes our ``offline`` will). v3.1.1 with a will: PUBLISH ``offline`` (QoS 1,
    retained) then DISCONNECT. Without a will: DISCONNECT only.
    """
    v5 = protocol == "5"
    if not lwt_enabled:
        return b"\xe0\x01\x00" if v5 else b"\xe0\x00"
    if v5:
        return b"\xe0\x01\x04"
    topic = status_topic.encode()
    body = len(topic).to_bytes(2, "big") + topic + b"\xff\xff" + OFFLINE
    return b"\x33" + _remaining_length(len(body)) + body + b"\xe0\x00"


class SiteConnection:
    """Keeps one site connected, with our backoff and the takeover cooldown."""

    def __init__(self, site, settings, clock, rng=None, bridge=None):
        self.site = site
        self.bridge = bridge  # exporter.bridge.SiteBridge or None: ingest(topic, payload)
        self.settings = settings
        self.clock = clock
        self.client_id = site.client_id(settings.instance_id)
        self.state = SiteState(name=site.name, client_id=self.client_id, broker=site.broker,
                               protocol=site.protocol, enabled=site.enabled,
                               state=CONNECTING if site.enabled else DISABLED)
        self.policy = ReconnectPolicy(settings.backoff_min_seconds, settings.backoff_max_seconds,
                                      settings.stable_seconds, settings.cooldown_seconds, rng)
        self.log = logging.LoggerAdapter(log, {"site": site.name})
        self._status_topic = site.status_topic
        self._farewell = farewell_packets(site.status_topic, site.protocol, settings.lwt_enabled)
        self._greenlet: gevent.Greenlet | None = None
        self._watchers = ()
        self._stopping = False
        self._client = self._build_client()
        self._end: ConnectionEnd | None = None
        self._connack_ok = False
        self._attempt_started = 0.0

    # -- set-up -------------------------------------------------------------------------
    def _build_client(self) -> mqtt.Client:
        site, settings = self.site, self.settings
        v5 = site.protocol == "5"
        kwargs = {"protocol": mqtt.MQTTv5} if v5 else {
            "protocol": mqtt.MQTTv311, "clean_session": settings.clean_session}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             reconnect_on_failure=False, **kwargs)
        client.connect_timeout = settings.connect_timeout
        client.max_queued_messages_set(16)
        client.suppress_exceptions = True  # a callback error drops one message, not the link
        if site.username:
            client.username_pw_set(site.username,
                                   site.password.reveal() if site.password else None)
        if site.tls:
            client.tls_set(ca_certs=site.ca_file)
        if settings.lwt_enabled:
            client.will_set(site.status_topic, OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        if self.site.enabled:
            self.log.info("Using client ID %s", self.client_id)
            self._greenlet = gevent.spawn(self._run)

    # -- paho callbacks (run inside loop_read, never block) -----------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.log.warning("Broker %s refused the connection: %s", self.site.broker, reason_code)
            return
        st, now = self.state, self.clock.monotonic()
        self._connack_ok = True
        st.state = CONNECTED
        st.connects += 1
        st.connected_since = self.clock.time()
        st.connected_at_monotonic = now
        st.cooldown_until_monotonic = None
        st.connect_duration.observe(now - self._attempt_started)
        if self.settings.lwt_enabled:
            client.publish(self.site.status_topic, ONLINE, qos=1, retain=True)
        client.subscribe([(topic, 0) for topic in self.site.topics])
        self.log.info("Connected to %s as %s", self.site.broker, self.client_id)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self._end is not None:  # paho may report one loss twice (paho.mqtt.python#870)
            return
        self._end = self._ended_now(reason_code.value, flags.is_disconnect_packet_from_server)

    def _ended_now(self, reason_code: int | None = None, from_server: bool = False):
        uptime = 0.0
        if self._connack_ok and self.state.connected_at_monotonic is not None:
            uptime = self.clock.monotonic() - self.state.connected_at_monotonic
        return ConnectionEnd(connected=self._connack_ok, uptime=uptime,
                             reason_code=reason_code, from_server=from_server)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:  # e.g. an ACL: connected, but nothing will ever arrive
            self.state.subscriptions_refused += len(refused)
            self.log.warning("Broker %s refused %d of the subscriptions %s: %s",
                             self.site.broker, len(refused), list(self.site.topics),
                             ", ".join(refused))

    def _on_message(self, client, userdata, message):
        self._deliver(message.topic, message.payload)

    def _deliver(self, topic: str, payload: bytes) -> None:
        """Every message on the site's topics: from paho, or from the inbound fast path."""
        if topic == self._status_topic:
            return  # our own online/offline echo is not traffic from the site
        self.state.messages_received += 1
        self.state.last_message_at = self.clock.time()
        if self.bridge is not None:
            self.bridge.ingest(topic, payload)

    # -- the connection's greenlet ------------------------------------------------------
    def _run(self) -> None:
        first = True
        while not self._stopping:
            if not first:
                self.state.reconnect_attempts += 1
            first = False
            try:
                end = self._attempt()
            except Exception:  # a bug must cost one connection, never the site's loop
                self.log.exception("Unexpected error on the connection to %s", self.site.broker)
                self._close_socket()
                end = self._end or self._ended_now()
            if self._stopping:
                return
            decision = self.policy.next(end)
            self._record_end(decision.reason)
            if decision.cooldown:
                self._enter_cooldown(decision.delay)
            else:
                self.state.state = BACKOFF
                self.log.info("Reconnecting to %s in %.1f s (%s)", self.site.broker,
                              decision.delay, decision.reason)
            gevent.sleep(decision.delay)

    def _attempt(self) -> ConnectionEnd:
        """Connect, then serve the connection until it ends. Returns how it ended."""
        client, site = self._client, self.site
        self._end, self._connack_ok = None, False
        self.state.state = CONNECTING
        self._attempt_started = self.clock.monotonic()
        try:
            if site.protocol == "5":
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = (
                    0 if self.settings.clean_session else PERSISTENT_SESSION_EXPIRY)
                client.connect(site.host, site.port, site.keepalive,
                               clean_start=self.settings.clean_session, properties=props)
            else:
                client.connect(site.host, site.port, site.keepalive)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.log.warning("Cannot connect to %s: %s", site.broker, exc)
            self._close_socket()
            return ConnectionEnd(connected=False)
        if client.socket() is None:  # paho lost it while writing CONNECT (no exception)
            self.log.warning("Connection to %s lost before CONNECT was sent", site.broker)
            return ConnectionEnd(connected=False)
        self._serve(client)
        self._close_socket()
        return self._end or self._ended_now()

    def _serve(self, client: mqtt.Client) -> None:
        sock = client.socket()
        reader = InboundReader(client, sock, self._deliver, self.site.protocol == "5",
                               lambda: self._connack_ok)
        hub = gevent.get_hub()
        read_watcher = hub.loop.io(sock.fileno(), _READ)
        rw_watcher = hub.loop.io(sock.fileno(), _READ | _WRITE)
        self._watchers = (read_watcher, rw_watcher)
        connack_deadline = self._attempt_started + self.settings.connect_timeout
        idle_wait = min(MAX_IDLE_WAIT, max(0.5, self.site.keepalive / 4))
        next_misc = 0.0
        try:
            while not self._stopping and self._end is None and client.socket() is not None:
                if self._connack_ok:
                    timeout = idle_wait
                else:
                    timeout = connack_deadline - self.clock.monotonic()
                    if timeout <= 0:
                        self.log.warning("No CONNACK from %s within %.1f s", self.site.broker,
                                         self.settings.connect_timeout)
                        return
                watcher = rw_watcher if client.want_write() else read_watcher
                try:
                    gevent.socket.wait(watcher, timeout=timeout)
                except socket.timeout:
                    pass
                if self._stopping:
                    return
                if reader.read() or (client.want_write() and client.loop_write()):
                    return
                now = self.clock.monotonic()
                if now >= next_misc:  # keepalive bookkeeping: seconds matter, not wake-ups
                    next_misc = now + MISC_INTERVAL
                    if client.loop_misc():
                        return
        finally:
            self._watchers = ()
            read_watcher.close()
            rw_watcher.close()

    def _close_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            self._client._sock_close()  # paho has no public "drop the socket" call

    def _record_end(self, reason: str) -> None:
        st = self.state
        st.disconnects[reason] += 1
        st.last_disconnect_reason = reason
        st.last_disconnect_at = self.clock.time()
        st.connected_since = None
        st.connected_at_monotonic = None

    def _enter_cooldown(self, seconds: float) -> None:
        st = self.state
        st.cooldowns += 1
        st.state = COOLDOWN
        st.cooldown_until_monotonic = self.clock.monotonic() + seconds
        self.log.warning(
            "Broker closed connection (code 7) - likely duplicate client ID. "
            "Setting %ss cooldown to prevent reconnect loop.", f"{seconds:g}")

    # -- shutdown ---------------------------------------------------------------------
    def stop(self) -> None:
        """Stop reconnecting and detach the greenlet from the socket.

        The greenlet is not killed (that costs ~50 us each, serially, at shutdown): its
        socket watchers are stopped, so it wakes only at its next timeout, sees the flag
        and returns without touching the socket.
        """
        self._stopping = True
        self.state.state = STOPPING if self.site.enabled else DISABLED
        for watcher in self._watchers:
            watcher.stop()

    def send_farewell(self):
        """Write offline + DISCONNECT in one non-blocking send and half-close.

        Returns the socket to drain, or None when there was nothing to say goodbye on.
        Call after :meth:`stop`.
        """
        client = self._client
        sock = client.socket()
        if sock is None:
            return None
        if not self._connack_ok or self._end is not None:
            self._close_socket()
            return None
        try:
            if client.want_write():
                client.loop_write()
            if client.want_write():
                raise BlockingIOError("paho output pending")
            sent = sock.send(self._farewell)
            if sent != len(self._farewell):
                raise BlockingIOError("partial write")
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # A half-written stream cannot carry a clean goodbye; an abrupt close still
            # makes the broker publish the will.
            self.log.warning("Closing %s abruptly: %s", self.site.broker, exc)
            self._close_socket()
            return None
        self._record_end("normal")
        self._client._sock = None  # the socket is ours now: drain_until_closed closes it
        return sock


def drain_until_closed(sock) -> bool:
    """Read until the broker closes the socket (it has processed our goodbye), then close.

    No timeout of its own: the caller bounds all drains with one deadline and kills the
    ones still waiting (a timer per socket costs ~10 us each at shutdown).
    """
    watcher = gevent.get_hub().loop.io(sock.fileno(), _READ)
    try:
        while True:
            gevent.socket.wait(watcher)
            try:
                if not sock.recv(65536):
                    return True
            except BlockingIOError:
                continue
            except OSError:
                return True
    finally:
        watcher.close()
        sock.close()
