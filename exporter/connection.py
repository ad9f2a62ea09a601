"""One site's MQTT connection: a paho client driven by one greenlet.

The greenlet waits on the client's socket with gevent watchers (never ``select.select``,
which breaks above fd 1024) and calls paho's ``loop_read``/``loop_write``/``loop_misc``.
Reconnects are ours, not paho's (see :mod:`exporter.reconnect`). The state it keeps in
:class:`~exporter.state.SiteState` is what metrics and health read.

Presence (docs/duplicates.md): on every connect the site subscribes to its presence topic
and publishes our retained record; records arriving there go to the site's
:class:`~exporter.presence.DuplicateTracker` (never counted as site traffic), which tells
when to reply or refresh. While a duplicate is identified the reconnect policy grows the
cooldown; a takeover without one opens an unknown-peer episode.

Graceful close is split for a parallel shutdown: :meth:`SiteConnection.send_farewell`
writes the presence tombstone, the final ``offline`` status and DISCONNECT as one
non-blocking send and half-closes the socket; :func:`drain_until_closed` then waits for
the broker's close.

Everything that touches paho's internals is in :mod:`exporter.client`, every byte layout
in :mod:`exporter.wire`.
"""
from __future__ import annotations

import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, cast

import gevent
import gevent.event
import gevent.socket
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .client import (
    ErrorReporter,
    InboundReader,
    build_client,
    detach_socket,
    drop_socket,
    write_queued,
)
from .presence import DuplicateTracker, Identity, RecordTemplate
from .reconnect import KEEP_ALIVE_TIMEOUT, SESSION_TAKEN_OVER, ConnectionEnd, ReconnectPolicy
from .state import (
    BACKOFF,
    CONNECTED,
    CONNECTING,
    COOLDOWN,
    DISABLED,
    KEEPALIVE_TIMEOUT,
    NORMAL,
    STOPPING,
    TAKEOVER,
    SiteState,
)
from .wire import FAREWELL_PRESENCE_ID, farewell_packets, publish

if TYPE_CHECKING:
    from .bridge import SiteBridge
    from .brokers import BrokerView
    from .config import Settings, SiteConfig

log = logging.getLogger(__name__)

# gevent ships no type information: typed views of the few calls used here.
_get_hub: Callable[[], Any] = gevent.get_hub
_sleep: Callable[[float], None] = gevent.sleep
_spawn: Callable[..., gevent.Greenlet] = gevent.spawn
_wait: Callable[..., None] = gevent.socket.wait  # type: ignore[attr-defined]

ONLINE, OFFLINE = b"online", b"offline"
#: Session expiry asked for on MQTT 5 when clean sessions are turned off.
PERSISTENT_SESSION_EXPIRY = 86400
#: Longest sleep of the I/O loop between keepalive checks.
MAX_IDLE_WAIT = 5.0
#: Shortest interval between two of paho's keepalive checks (``loop_misc``) on a busy socket.
MISC_INTERVAL = 0.25
_READ, _WRITE = 1, 2


#: OpenSSL alerts of a server that does not accept our client certificate.
_CERT_REJECTED = ("ALERT_BAD_CERTIFICATE", "ALERT_UNKNOWN_CA", "ALERT_CERTIFICATE_UNKNOWN",
                  "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_REVOKED",
                  "ALERT_UNSUPPORTED_CERTIFICATE", "ALERT_ACCESS_DENIED", "ALERT_DECRYPT_ERROR")
#: OpenSSL reasons for a peer that does not speak TLS.
_NOT_TLS = ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "UNEXPECTED_RECORD")
#: X509 verify codes: the issuer is not trusted (no local issuer, self-signed, chain).
_UNKNOWN_CA_CODES = (2, 18, 19, 20, 21)
#: X509 verify codes: the certificate is not for this host name / IP address.
_NAME_MISMATCH_CODES = (62, 64)
#: Longest ``last_error``.
MAX_ERROR_CHARS = 120
_CLOSED = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError,
           ssl.SSLZeroReturnError)


def _short(exc: BaseException) -> str:
    """A short, fixed-vocabulary cause: OpenSSL's reason code or the errno text, never the
    exception's full message (which may quote a path or a peer's bytes)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, ssl.SSLEOFError):
        return "EOF in violation of the TLS protocol"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def describe_failure(exc: BaseException | None, site: SiteConfig, *, handshake: bool) -> str:
    """Why an attempt failed before a CONNACK, as ``SiteState.last_error`` says it: short,
    with a fixed prefix (``tls:``, ``dns:``, ``refused:``...), never a secret.

    ``exc`` is what failed (None: the broker closed the connection cleanly);
    ``handshake`` is True when it came out of ``connect()`` (TCP connect and TLS handshake)
    and False when it came later (writing CONNECT, waiting for CONNACK).

    Measured with Mosquitto 2.0.11 and OpenSSL 3: a listener with ``require_certificate``
    completes the TLS 1.3 handshake and then closes without an alert when the client sent no
    certificate, with a ``certificate required`` alert that may or may not be read before
    the EOF (writing CONNECT can fail first), and ``unknown ca`` (same race) for a certificate
    it does not trust; a plain CONNECT to a TLS port gets a reset; a TLS
    ClientHello to a plain port gets a reset during the handshake.
    """
    tls = site.tls
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _NAME_MISMATCH_CODES:
            expected = (tls.server_name if tls is not None else None) or site.host
            return f"tls: certificate name mismatch (expected {expected})"
        if exc.verify_code in _UNKNOWN_CA_CODES:
            return "tls: unknown CA"
        return f"tls: certificate verify failed ({str(exc.verify_message).lower()})"
    if isinstance(exc, ssl.CertificateError):  # paho's own match_hostname
        return f"tls: certificate name mismatch (expected {site.host})"
    if tls is not None and isinstance(exc, (ssl.SSLError, *_CLOSED)):
        reason = str(getattr(exc, "reason", None) or "")
        if reason.endswith("CERTIFICATE_REQUIRED"):
            return "tls: client certificate required"
        if reason.endswith(_CERT_REJECTED):
            return ("tls: client certificate rejected" if tls.cert_file
                    else "tls: client certificate required")
        if reason.endswith(_NOT_TLS) or (handshake and isinstance(exc, _CLOSED)):
            return "tls: TLS client on a plain port?"
        if isinstance(exc, _CLOSED):
            # Closed right after a good handshake, before CONNACK: the broker checked our
            # certificate. Whether its alert or the EOF reaches us first is a race (writing
            # CONNECT may hit the closed socket before the alert is read), so both say the same.
            return ("tls: client certificate rejected" if tls.cert_file
                    else "tls: client certificate required")
        return f"tls: {_short(exc)}"
    if exc is None:
        return "closed by the broker before CONNACK"
    if tls is None and not handshake and isinstance(exc, ConnectionResetError):
        return "tls: plain MQTT on a TLS port?"
    if isinstance(exc, socket.gaierror):
        return "dns: cannot resolve host"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timeout connecting" if handshake else "timeout waiting for CONNACK"
    if isinstance(exc, OSError):
        return f"{'connect failed' if handshake else 'connection lost'}: {_short(exc)}"[
            :MAX_ERROR_CHARS]
    return f"connect failed: {type(exc).__name__}"


def describe_refusal(reason_code: Any) -> str:
    """A CONNACK failure code as ``last_error`` says it (v3.1.1 codes arrive as v5 ones)."""
    value = getattr(reason_code, "value", None)
    if value in (5, 0x87):
        return "refused: not authorised"
    if value in (4, 0x86):
        return "refused: bad user name or password"
    return f"refused: {str(reason_code).lower()}"[:MAX_ERROR_CHARS]


def describe_end(reason: str, end: ConnectionEnd, error: BaseException | None) -> str:
    """How an established connection (or an attempt that left no cause) ended."""
    if end.deaf:
        return "takeover: our presence record stopped coming back"
    if reason == TAKEOVER:
        return "takeover: another client uses this client ID"
    if reason == KEEPALIVE_TIMEOUT:
        return "keepalive timeout"
    if end.from_server:
        return f"disconnected by the broker (reason code {end.reason_code})"
    if reason == NORMAL:
        return "disconnected"
    if not end.connected:
        return "connect failed"
    if error is not None:
        return f"connection lost: {_short(error)}"[:MAX_ERROR_CHARS]
    return "connection lost: closed by the broker"


class ConnectSlots(Protocol):
    """A semaphore (``gevent.lock.BoundedSemaphore``): attempts of one endpoint in flight."""

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool: ...

    def release(self) -> object: ...


class _SlotClaim:
    """One site's claim on its endpoint's connect slots: the shared semaphore, and whether
    the site holds one of them now (a separate object: see the attribute count note in
    :class:`SiteConnection`)."""

    __slots__ = ("slots", "held")

    def __init__(self, slots: ConnectSlots) -> None:
        self.slots = slots
        self.held = False

    def release(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()


class Clock(Protocol):
    """What a connection needs of :class:`exporter.state.SystemClock`."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SiteConnection:
    """Keeps one site connected, with our backoff and the takeover cooldown."""

    def __init__(self, site: SiteConfig, settings: Settings, clock: Clock,
                 rng: random.Random | None = None, bridge: SiteBridge | None = None, *,
                 identity: Identity | None = None, broker: BrokerView | None = None,
                 connect_slots: ConnectSlots | None = None) -> None:
        self.site = site
        self.bridge = bridge  # exporter.bridge.SiteBridge or None: ingest(topic, payload)
        self.settings = settings
        self.clock = clock
        self.client_id = site.client_id(settings.instance_id)
        self.state = SiteState(name=site.name, client_id=self.client_id, broker=site.broker,
                               protocol=site.protocol, enabled=site.enabled,
                               state=CONNECTING if site.enabled else DISABLED)
        self.policy = ReconnectPolicy(settings.backoff_min_seconds, settings.backoff_max_seconds,
                                      settings.stable_seconds, settings.cooldown_seconds, rng,
                                      cooldown_max=settings.duplicate_cooldown_max_seconds)
        self.log = logging.LoggerAdapter(log, {"site": site.name})
        #: The broker endpoint's view (shared with its other sites): tells a broker event
        #: from a takeover. None: the site cannot tell (the evidence rule alone).
        self.broker = broker
        #: Presence records need our identity; without one (or MQTT_PRESENCE_ENABLED=false)
        #: only unknown-peer episodes are tracked, from takeover evidence.
        self.presence = identity is not None and settings.presence_enabled
        # Not kept as an attribute: with at most 29 of them, instances share their dict's
        # keys (CPython 3.11: 300 bytes a site instead of 1.6 KB; mind it when adding one).
        identity = identity or Identity.new(settings.instance_id, clock.time())
        self.tracker = DuplicateTracker(identity, self.client_id, self.state, clock,
                                        self.log,
                                        echo_interval=settings.presence_interval_seconds)
        self._record = RecordTemplate(identity, self.client_id)
        self._presence_topic = site.presence_topic
        self._presence_mid: int | None = None
        #: Our current takeover cooldown, as our record announces it.
        self._cooldown = settings.cooldown_seconds
        self._status_topic = site.status_topic
        self._farewell = farewell_packets(site.status_topic, site.protocol,
                                          settings.lwt_enabled, OFFLINE)
        self._greenlet: gevent.Greenlet | None = None
        self._watchers: tuple[Any, ...] = ()
        self._stopping = False
        #: Exceptions in our callbacks and in the fast path: logged, counted, survived.
        self.errors = ErrorReporter(self.state, self.log, clock)
        self._client = build_client(
            site, self.client_id, clean_session=settings.clean_session,
            connect_timeout=settings.connect_timeout,
            will=(site.status_topic, OFFLINE) if settings.lwt_enabled else None,
            errors=self.errors, on_connect=self._on_connect,
            on_disconnect=self._on_disconnect, on_message=self._on_message,
            on_subscribe=self._on_subscribe)
        self._end: ConnectionEnd | None = None
        self._farewell_sent = False
        self._connack_ok = False
        self._attempt_started = 0.0
        #: Why the current attempt failed (describe_failure), None while nothing is known.
        self._attempt_error: str | None = None
        #: The last error logged: the same one again is logged at DEBUG only.
        self._logged_error: str | None = None
        #: Our claim on the endpoint's connect slots (shared by its sites), if it has any.
        self._slot = _SlotClaim(connect_slots) if connect_slots is not None else None

    def start(self) -> None:
        """Spawn the connection's greenlet (enabled sites only)."""
        if self.site.enabled:
            for warning in self.site.warnings:  # deprecated keys, insecure_skip_verify
                self.log.warning("%s", warning)
            self.log.info("Using client ID %s", self.client_id)
            self._greenlet = _spawn(self._run)

    # -- paho callbacks (run inside loop_read, never block) -----------------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: Any,
                    reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._attempt_error = describe_refusal(reason_code)
            return
        self._release_slot()
        st, now = self.state, self.clock.monotonic()
        self._connack_ok = True
        st.state = CONNECTED
        st.connects += 1
        st.refused_now = 0  # a new connection subscribes afresh
        st.connected_since = self.clock.time()
        st.connected_at_monotonic = now
        st.cooldown_until_monotonic = None
        st.connect_duration.observe(now - self._attempt_started)
        if self.settings.lwt_enabled:
            client.publish(self.site.status_topic, ONLINE, qos=1, retain=True)
        # Our status topic, to answer another holder's 'offline' (below, _deliver), unless
        # the site's own filters cover it; refused, it only costs that answer.
        status = [] if not self.settings.lwt_enabled or any(
            mqtt.topic_matches_sub(f, self._status_topic) for f in self.site.topics
        ) else [(self._status_topic, 0)]
        if self.presence:
            # Subscribe first: the broker then delivers the previous holder's retained
            # record before ours replaces it.
            self._presence_mid = client.subscribe([(self._presence_topic, 1), *status])[1]
            self.tracker.connection_started()
            self._publish_record(client)
        elif status:
            self._presence_mid = client.subscribe(status)[1]
        client.subscribe([(topic, 0) for topic in self.site.topics])
        # Logged by the hub, not here: this runs deep in the site's greenlet (inside paho's
        # packet handling), and logging's frames on top made every site's greenlet keep
        # about 4 KB more for its whole life (measured at 10 000 sites: 39 MB of RSS; a
        # greenlet keeps what its deepest call needed).
        _get_hub().loop.run_callback(self.log.info, "Connected to %s as %s", self.site.broker,
                                     self.client_id)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: Any,
                       reason_code: Any, properties: Any) -> None:
        if self._end is not None:  # paho may report one loss twice (paho.mqtt.python#870)
            return
        self._end = self._ended_now(reason_code.value, flags.is_disconnect_packet_from_server)

    def _ended_now(self, reason_code: int | None = None,
                   from_server: bool = False) -> ConnectionEnd:
        uptime = 0.0
        if self._connack_ok and self.state.connected_at_monotonic is not None:
            uptime = self.clock.monotonic() - self.state.connected_at_monotonic
        return ConnectionEnd(connected=self._connack_ok, uptime=uptime,
                             reason_code=reason_code, from_server=from_server)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: list[Any], properties: Any) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused and mid == self._presence_mid:
            self.log.warning("Broker %s refused the subscription to %s (%s): duplicate "
                             "instances can only be inferred (MQTT_PRESENCE_ENABLED=false "
                             "silences this), and another holder's 'offline' on %s is not "
                             "answered", self.site.broker, self._presence_topic, refused[0],
                             self._status_topic)
        elif refused:  # e.g. an ACL: connected, but nothing will ever arrive
            self.state.subscriptions_refused += len(refused)
            self.state.refused_now += len(refused)
            self.log.warning("Broker %s refused %d of the subscriptions %s: %s",
                             self.site.broker, len(refused), list(self.site.topics),
                             ", ".join(refused))

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        self._deliver(message.topic, cast(bytes, message.payload))  # paho sets bytes

    def _deliver(self, topic: str, payload: bytes) -> None:
        """Every message on the site's topics: from paho, or from the inbound fast path."""
        if topic == self._status_topic:  # not traffic from the site
            if (payload == OFFLINE and self._connack_ok and self._end is None
                    and not self._stopping and self.settings.lwt_enabled):
                # Another holder's goodbye or will (the site moved to this replica, or a
                # process that held it before ended): the site is online through us.
                self._client.publish(self._status_topic, ONLINE, qos=1, retain=True)
                self.log.info("'offline' from another holder on %s: 'online' published "
                              "again (this connection is up)", self._status_topic)
            return
        if topic == self._presence_topic:
            if self.presence and payload:  # an empty retained payload clears, says nothing
                self.tracker.on_payload(payload)
            return  # presence records are not traffic from the site either
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
                self.state.internal_errors += 1
                self._close_socket()
                end = self._end or self._ended_now()
            if self._stopping:
                return
            waited = 0.0
            if (self.broker is not None and self.broker.sites > 1 and end.connected
                    and not end.deaf and not self.tracker.identified
                    and end.reason_code not in (KEEP_ALIVE_TIMEOUT, SESSION_TAKEN_OVER)):
                # Did other sites of this broker lose theirs at the same time? Ask once they
                # have had the window to report; the wait counts towards the next delay.
                lost_at = self.clock.monotonic()
                self.broker.record_loss(self.site.name, lost_at)
                self.state.state = BACKOFF
                waited = self.settings.broker_event_window_seconds
                self._wait(waited)
                if self._stopping:
                    return
                end = replace(end, broker_event=self.broker.is_event(lost_at))
            self.tracker.tick(self._cooldown)
            identified = self.tracker.identified
            decision = self.policy.next(replace(end, duplicate=identified))
            self._record_end(decision.reason)
            self._note_error(self._attempt_error or describe_end(
                decision.reason, end, self.errors.socket_error),
                warn=decision.reason != TAKEOVER)  # takeovers have their own log lines
            if decision.reason == TAKEOVER:
                self.tracker.on_takeover()  # an unknown peer, unless one is identified
            if decision.cooldown:
                self._cooldown = decision.delay if identified else self.settings.cooldown_seconds
                self._enter_cooldown(decision.delay, identified)
            else:
                if not identified:
                    self._cooldown = self.settings.cooldown_seconds
                self.state.state = BACKOFF
                self.log.info("Reconnecting to %s in %.1f s (%s)", self.site.broker,
                              decision.delay, decision.reason)
            self._wait(max(0.0, decision.delay - waited))

    def _wait(self, seconds: float) -> None:
        """Sleep between attempts, waking every few seconds to expire duplicate episodes."""
        left = seconds
        while left > 0 and not self._stopping:
            step = min(left, MAX_IDLE_WAIT)
            _sleep(step)
            left -= step
            self.tracker.tick(self._cooldown)

    def _take_slot(self) -> bool:
        """Wait for a connect slot of the endpoint; False when stopped meanwhile."""
        claim = self._slot
        while claim is not None and not claim.held:
            if self._stopping:
                return False
            claim.held = bool(claim.slots.acquire(timeout=MAX_IDLE_WAIT))
        return not self._stopping

    def _release_slot(self) -> None:
        if self._slot is not None:
            self._slot.release()

    def _attempt(self) -> ConnectionEnd:
        """Connect, then serve the connection until it ends. Returns how it ended.

        From the TCP connect to the CONNACK the attempt holds one of the endpoint's connect
        slots (:data:`exporter.supervisor.CONNECTS_IN_FLIGHT`): 10 000 sites connecting at
        once would all write CONNECT before the first CONNACK is read."""
        try:
            if not self._take_slot():
                return ConnectionEnd(connected=False)
            return self._attempt_in_slot()
        finally:
            self._release_slot()

    def _attempt_in_slot(self) -> ConnectionEnd:
        client, site = self._client, self.site
        self._end, self._connack_ok = None, False
        self._attempt_error = None
        self.errors.socket_error = None
        self.state.state = CONNECTING
        self._attempt_started = self.clock.monotonic()
        try:
            if site.protocol == "5":
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = (
                    0 if self.settings.clean_session else PERSISTENT_SESSION_EXPIRY)
                client.connect(site.host, site.port, site.keepalive,
                               clean_start=self.settings.clean_session, properties=props)
            else:
                client.connect(site.host, site.port, site.keepalive)
        except (OSError, ValueError) as exc:  # TCP connect and TLS handshake
            self._attempt_error = describe_failure(exc, site, handshake=True)
            self._close_socket()
            return ConnectionEnd(connected=False)
        sock = client.socket()
        if sock is None:  # paho lost it while writing CONNECT (no exception, only its log)
            error = self.errors.socket_error
            self._attempt_error = (describe_failure(error, site, handshake=False)
                                   if error is not None
                                   else "connection lost before CONNECT was sent")
            return ConnectionEnd(connected=False)
        self._serve(client, sock.fileno())
        self._close_socket()
        if not self._connack_ok and self._attempt_error is None and not self._stopping:
            self._attempt_error = describe_failure(self.errors.socket_error, site,
                                                   handshake=False)
        return self._end or self._ended_now()

    def _note_error(self, text: str, warn: bool = True) -> None:
        """Record why the last attempt or connection ended; log it when it changed."""
        st = self.state
        st.last_error = text
        st.last_error_at = self.clock.time()
        if text != self._logged_error:
            self._logged_error = text
            self.log.log(logging.WARNING if warn else logging.INFO,
                         "Connection to %s failed: %s", self.site.broker, text)
        else:
            self.log.debug("Connection to %s failed again: %s", self.site.broker, text)

    def _fast_path_enabled(self) -> bool:
        return self._connack_ok

    def _fast_path_error(self, exc: Exception) -> None:
        self.errors.report("on_message", exc)

    def _serve(self, client: mqtt.Client, fd: int) -> None:
        reader = InboundReader(client, self._deliver, self.site.protocol == "5",
                               self._fast_path_enabled, self._fast_path_error)
        hub = _get_hub()
        read_watcher = hub.loop.io(fd, _READ)
        rw_watcher = hub.loop.io(fd, _READ | _WRITE)
        self._watchers = (read_watcher, rw_watcher)
        connack_deadline = self._attempt_started + self.settings.connect_timeout
        idle_wait = min(MAX_IDLE_WAIT, max(0.5, self.site.keepalive / 4))
        next_misc = 0.0
        try:
            while not self._stopping and self._end is None and client.socket() is not None:
                if self._connack_ok:
                    timeout = idle_wait
                    if self.presence:  # wake for the next record or echo deadline
                        timeout = min(timeout, self.tracker.seconds_to_next() + 0.01)
                else:
                    timeout = connack_deadline - self.clock.monotonic()
                    if timeout <= 0:
                        self._attempt_error = "timeout waiting for CONNACK"
                        return
                watcher = rw_watcher if client.want_write() else read_watcher
                ready = True
                try:
                    _wait(watcher, timeout=timeout)
                except TimeoutError:
                    ready = False  # nothing to read: no recv() that only says EAGAIN
                if self._stopping:
                    return
                if ((ready and reader.read())
                        or (client.want_write() and write_queued(client))):
                    return
                if self.tracker.reply_due and self.presence and self._connack_ok:
                    self._publish_record(client)  # the reply, right after the identification
                now = self.clock.monotonic()
                if now >= next_misc:  # keepalive bookkeeping: seconds matter, not wake-ups
                    next_misc = now + MISC_INTERVAL
                    if client.loop_misc():
                        return
                    self._presence_tick(client, now)
        finally:
            self._watchers = ()
            read_watcher.close()
            rw_watcher.close()

    def _presence_tick(self, client: mqtt.Client, now: float) -> None:
        """Duplicate bookkeeping while connected: expiry, a stable connection, reply/refresh."""
        tracker = self.tracker
        tracker.tick(self._cooldown)
        since = self.state.connected_at_monotonic
        if (self._connack_ok and since is not None
                and now - since >= self.settings.stable_seconds):
            tracker.on_stable()
        if not tracker.identified and self.state.state == CONNECTED:
            self._cooldown = self.settings.cooldown_seconds
        if not (self.presence and self._connack_ok and self._end is None):
            return
        if tracker.deaf():
            # Per takeover when the peer is known (its episode was logged once), else a warning.
            level = logging.INFO if tracker.identified else logging.WARNING
            self.log.log(level, "Our presence record did not come back within %g s: another "
                         "client holds client ID %s on %s, which kept our connection open; "
                         "reconnecting", tracker.echo_timeout, self.client_id, self.site.broker)
            self._end = replace(self._ended_now(), deaf=True)
            return
        if tracker.publish_due():
            self._publish_record(client, retain=tracker.reply_due)

    def _publish_record(self, client: mqtt.Client, retain: bool = True) -> None:
        """Our presence record, QoS 1, with our current cooldown.

        Retained on connect and as a reply; the periodic refresh and echo check are not
        retained: on a broker that keeps a deaf connection open (amqtt), the deaf side's
        publishes would otherwise overwrite what the active side left, its tombstone too.
        """
        now = self.clock.time()
        payload = self._record.render(True, self._cooldown, now)
        client.publish(self._presence_topic, payload, qos=1, retain=retain)
        self.tracker.published(now)

    def _close_socket(self) -> None:
        drop_socket(self._client)

    def _record_end(self, reason: str) -> None:
        st = self.state
        st.disconnects[reason] += 1
        st.last_disconnect_reason = reason
        st.last_disconnect_at = self.clock.time()
        st.connected_since = None
        st.connected_at_monotonic = None

    def _enter_cooldown(self, seconds: float, identified: bool = False) -> None:
        st = self.state
        st.cooldowns += 1
        st.state = COOLDOWN
        st.cooldown_until_monotonic = self.clock.monotonic() + seconds
        if identified:  # the episode was logged once, with the peer: no warning per takeover
            peer = self.tracker.peer() or {}
            self.log.info("Taken over by duplicate instance (host %s, pid %s, boot ID %s): "
                          "cooldown %ss", peer.get("host"), peer.get("pid"),
                          peer.get("boot_id"), f"{seconds:g}")
            return
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

    def send_farewell(self) -> socket.socket | None:
        """Write tombstone + offline + DISCONNECT in one non-blocking send and half-close.

        Returns the socket to drain, or None when there was nothing to say goodbye on.
        Call after :meth:`stop`.
        """
        client = self._client
        sock = client.socket()
        if sock is None:
            return None
        sock = cast(socket.socket, sock)  # paho's SocketLike: a socket or an SSLSocket
        if not self._connack_ok or self._end is not None:
            self._close_socket()
            return None
        try:
            if client.want_write():
                client.loop_write()
            if client.want_write():
                raise BlockingIOError("paho output pending")
            farewell = self._farewell
            if self.presence:  # same bytes as farewell_packets(..., presence=...), cheaper
                tombstone = self._record.render(False, self._cooldown, self.clock.time())
                farewell = publish(self._presence_topic, tombstone, qos=1, retain=True,
                                   packet_id=FAREWELL_PRESENCE_ID,
                                   v5=self.site.protocol == "5") + farewell
            sent = sock.send(farewell)
            if sent != len(farewell):
                raise BlockingIOError("partial write")
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # A half-written stream cannot carry a clean goodbye; an abrupt close still
            # makes the broker publish the will.
            self.log.warning("Closing %s abruptly: %s", self.site.broker, exc)
            self._close_socket()
            return None
        self._record_end("normal")
        self._farewell_sent = True
        detach_socket(client)  # the socket is ours now: drain_until_closed closes it
        return sock


    def needs_tombstone_elsewhere(self) -> bool:
        """After :meth:`send_farewell` found no connection: an identified duplicate holds the
        site now, and it only learns that we left from our tombstone."""
        return (self.presence and self.site.enabled and self.tracker.identified
                and not self._farewell_sent)

    def send_tombstone_elsewhere(self, deadline: float) -> bool:
        """Publish our tombstone through a short connection of its own, under the client ID
        ``<client_id>_bye`` (ours would kick the other process), and wait for the PUBACK
        until ``deadline`` (monotonic). Run in its own greenlet at shutdown."""
        done: dict[str, bool] = {"connected": False}

        def on_connect(client: mqtt.Client, userdata: object, flags: Any,
                       reason_code: Any, properties: Any) -> None:
            done["connected"] = not reason_code.is_failure

        def ignore(*args: Any) -> None:
            return None

        bye = build_client(self.site, f"{self.client_id}_bye", clean_session=True,
                           connect_timeout=self.settings.connect_timeout, will=None,
                           errors=self.errors, on_connect=on_connect, on_disconnect=ignore,
                           on_message=ignore, on_subscribe=ignore)
        info: mqtt.MQTTMessageInfo | None = None
        watcher = None
        try:
            bye.connect(self.site.host, self.site.port, 10)
            sock = bye.socket()
            if sock is None:
                return False
            watcher = _get_hub().loop.io(sock.fileno(), _READ)
            while self.clock.monotonic() < deadline:
                if done["connected"] and info is None:
                    tombstone = self._record.render(False, self._cooldown, self.clock.time())
                    info = bye.publish(self._presence_topic, tombstone, qos=1, retain=True)
                if info is not None and info.is_published():
                    bye.disconnect()
                    if bye.want_write():
                        bye.loop_write()
                    self.log.info("Tombstone published under %s_bye: the other process "
                                  "holds this site", self.client_id)
                    return True
                if bye.want_write() and bye.loop_write():
                    return False
                try:
                    _wait(watcher, timeout=min(0.2, max(0.0, deadline - self.clock.monotonic())))
                except TimeoutError:
                    pass
                if bye.loop_read():
                    return False
            return False
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.log.info("Cannot publish the tombstone under %s_bye: %s", self.client_id, exc)
            return False
        finally:
            if watcher is not None:
                watcher.close()
            drop_socket(bye)


class Drains:
    """:func:`drain_until_closed` for many sockets at once, without a greenlet each.

    One read watcher per socket whose callback (run by the hub) reads and discards until the
    broker's EOF, then closes the socket: a greenlet, its switch and its waiter per site were
    a third of the exporter's CPU at shutdown. :meth:`wait` blocks until every socket is
    closed or the timeout; :meth:`abandon` then closes the rest.
    """

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.total = self.pending = len(sockets)
        self._done = gevent.event.Event()  # type: ignore[no-untyped-call]
        self._open: dict[int, tuple[Any, socket.socket]] = {}
        loop = _get_hub().loop
        for sock in sockets:
            watcher = loop.io(sock.fileno(), _READ)
            self._open[id(watcher)] = (watcher, sock)
            watcher.start(self._readable, watcher, sock)
        if not self.pending:
            self._done.set()  # type: ignore[no-untyped-call]

    def _readable(self, watcher: Any, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return  # whatever the broker still sends: discarded
        except BlockingIOError:
            return
        except OSError:
            pass  # reset: closed all the same
        self._close(watcher, sock)
        self.pending -= 1
        if not self.pending:
            self._done.set()  # type: ignore[no-untyped-call]

    def _close(self, watcher: Any, sock: socket.socket) -> None:
        del self._open[id(watcher)]
        watcher.close()
        sock.close()

    def wait(self, timeout: float) -> bool:
        """Until every socket is closed (True) or ``timeout`` seconds passed (False)."""
        return bool(self._done.wait(timeout))  # type: ignore[no-untyped-call]

    def abandon(self) -> int:
        """Close the sockets whose broker has not closed yet; how many there were."""
        left = list(self._open.values())
        for watcher, sock in left:
            self._close(watcher, sock)
        return len(left)


def drain_until_closed(sock: socket.socket) -> bool:
    """Read until the broker closes the socket (it has processed our goodbye), then close.

    No timeout of its own: the caller bounds all drains with one deadline and kills the
    ones still waiting (a timer per socket costs ~10 us each at shutdown).
    """
    watcher = _get_hub().loop.io(sock.fileno(), _READ)
    try:
        while True:
            _wait(watcher)
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
