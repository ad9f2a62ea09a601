"""The paho boundary: the one module that touches paho's private attributes.

paho's public surface for an external loop is ``socket()``, ``loop_read()``,
``loop_write()``, ``loop_misc()`` and ``want_write()``. The exporter needs three things
beyond it, all confined here and pinned by tests/test_client.py, which drives the real
paho client through this module (the gate for moving the ``paho-mqtt<2.3`` pin):

- :class:`InboundReader` replaces ``_sock_recv`` to feed paho from a 64 KB buffer, and
  refreshes ``_last_bytes_received`` for every chunk it takes from the socket: paho counts
  every received byte as keepalive traffic, including the bytes of the QoS 0 PUBLISH
  packets it never sees (a large message on a slow link must not time out while arriving);
- :func:`drop_socket` (``_sock_close``) and :func:`detach_socket` (``_sock = None``);
- :func:`build_client` replaces ``_create_socket_connection`` with :func:`open_tcp`: paho's
  binds every socket to ``('', 0)`` before connecting (the kernel then searches the whole
  port range for a port no socket holds: 18 % of the start-up CPU at 10 000 sites) and
  resolves even an IP address through gevent's thread pool.

It also builds the client (:func:`build_client`) so that no exception vanishes: our
callbacks are wrapped by an :class:`ErrorReporter` (logged with traceback, rate-limited per
site, counted in ``SiteState.internal_errors``), paho's own log goes to the ``exporter.paho``
logger with the site, and ``suppress_exceptions`` stays on as a second net.
"""
from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .wire import Deliver, walk

if TYPE_CHECKING:
    from .config import SiteConfig
    from .config.tls import TlsConfig
    from .state import SiteState

RECV_SIZE = 65536
#: Shortest interval between two logged internal errors of one site; the ones in between
#: are counted and the count is logged with the next one.
ERROR_LOG_INTERVAL = 60.0
#: paho's own log records (warnings and errors) go here, with the site in ``extra``.
PAHO_LOG = logging.getLogger("exporter.paho")
_NOT_READY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

Callback = Callable[..., None]


class MonotonicClock(Protocol):
    def monotonic(self) -> float: ...


class ErrorReporter:
    """Exceptions caught in one site's own code: counted, logged with a traceback.

    Every one increments ``state.internal_errors``. The first is logged at once; after
    that at most one per ``interval`` seconds (monotonic time of the injected clock) is
    logged, with the number of those suppressed in between.
    """

    def __init__(self, state: SiteState, log: logging.LoggerAdapter[logging.Logger],
                 clock: MonotonicClock, interval: float = ERROR_LOG_INTERVAL) -> None:
        self.state = state
        self.log = log
        self.clock = clock
        self.interval = interval
        self._next_log_at: float | None = None
        self._suppressed = 0
        #: The last socket error paho reported in its log (it returns a code, not the
        #: exception): the cause of a connection lost inside paho, e.g. a TLS alert while
        #: writing CONNECT. The connection clears it before each attempt.
        self.socket_error: OSError | None = None

    def report(self, where: str, exc: BaseException) -> None:
        """Count ``exc`` (raised in ``where``) and log it unless the site logged one lately."""
        self.state.internal_errors += 1
        now = self.clock.monotonic()
        if self._next_log_at is not None and now < self._next_log_at:
            self._suppressed += 1
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._next_log_at = now + self.interval
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        self.log.error("Internal error in %s, dropped and counted%s: %r", where, more, exc,
                       exc_info=(type(exc), exc, exc.__traceback__))

    def guard(self, fn: Callback, where: str) -> Callback:
        """``fn`` with every Exception it raises reported instead of raised."""
        return _Guarded(fn, where, self)


class _Guarded:
    """A callback whose exceptions an :class:`ErrorReporter` reports (a slotted object:
    four per site, 200 bytes less each than a closure)."""

    __slots__ = ("fn", "where", "errors", "__name__")

    def __init__(self, fn: Callback, where: str, errors: ErrorReporter) -> None:
        self.fn = fn
        self.where = where
        self.errors = errors
        self.__name__ = getattr(fn, "__name__", where)

    def __call__(self, *args: Any) -> None:
        try:
            self.fn(*args)
        except Exception as exc:  # a bug costs one callback, not the link
            self.errors.report(self.where, exc)


class _PahoLog(logging.LoggerAdapter[logging.Logger]):
    """paho's ``_easy_log`` target: warnings and errors only (its debug lines are per packet).

    An exception paho caught in a callback (``suppress_exceptions``) is also counted: our
    callbacks are guarded, so that would be one that slipped past the guard.
    """

    def __init__(self, site: str, errors: ErrorReporter | None) -> None:
        super().__init__(PAHO_LOG, {"site": site})
        self.errors = errors

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level < logging.WARNING:
            return
        error = next((a for a in args if isinstance(a, OSError)), None)
        if error is not None and self.errors is not None:
            # "failed to receive on socket" (paho says so for sends too): the connection
            # classifies it (exporter.connection.describe_failure) into last_error.
            self.errors.socket_error = error
        if (self.errors is not None and level >= logging.ERROR
                and str(msg).startswith("Caught exception")):
            self.errors.state.internal_errors += 1
        super().log(level, msg, *args, **kwargs)


def build_client(site: SiteConfig, client_id: str, *, clean_session: bool,
                 connect_timeout: float, will: tuple[str, bytes] | None,
                 errors: ErrorReporter, on_connect: Callback, on_disconnect: Callback,
                 on_message: Callback, on_subscribe: Callback) -> mqtt.Client:
    """A paho client (callback API 2, paho's reconnect off) for ``site``.

    ``will`` is ``(topic, payload)`` sent QoS 1 retained. Every callback is guarded by
    ``errors``; paho's log goes to ``exporter.paho`` with the site.
    """
    if site.protocol == "5":
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             reconnect_on_failure=False, protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             reconnect_on_failure=False, protocol=mqtt.MQTTv311,
                             clean_session=clean_session)
    one_thread(client)
    client.connect_timeout = connect_timeout
    client.max_queued_messages_set(16)
    client.suppress_exceptions = True  # second net: a callback error drops one message
    client.enable_logger(cast(logging.Logger, _PahoLog(site.name, errors)))
    if site.username:
        client.username_pw_set(site.username,
                               site.password.reveal() if site.password else None)
    if site.tls is not None:
        client.tls_set_context(tls_context(site.tls))
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    client.on_connect = errors.guard(on_connect, "on_connect")
    client.on_disconnect = errors.guard(on_disconnect, "on_disconnect")
    client.on_message = errors.guard(on_message, "on_message")
    client.on_subscribe = errors.guard(on_subscribe, "on_subscribe")
    paho_connection = client._create_socket_connection

    def create_socket_connection() -> socket.socket:
        if client._get_proxy() is not None:  # PySocks and a proxy configured: paho's way
            return paho_connection()
        return open_tcp(client._host, client._port, client._connect_timeout)

    client._create_socket_connection = create_socket_connection  # type: ignore[method-assign]
    return client


class _OneThreadLock:
    """paho's mutexes for a client used by one thread only (the gevent hub's): a counter.

    Under gevent, each of paho's seven locks is a Python-level lock (creating them took a
    third of a client's construction; taking them, 25 times per connect). A non-reentrant one
    still answers a non-blocking ``acquire`` with False while it is held: paho asks its
    ``_in_callback_mutex`` that way whether it runs inside a callback.
    """

    __slots__ = ("_held", "_reentrant")

    def __init__(self, reentrant: bool) -> None:
        self._held = 0
        self._reentrant = reentrant

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._held and not self._reentrant:
            if not blocking:
                return False
            raise RuntimeError("lock already held by this thread: a deadlock")
        self._held += 1
        return True

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of an unheld lock")
        self._held -= 1

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


#: paho's locks: name -> reentrant (``threading.RLock``) or not (``threading.Lock``).
_PAHO_LOCKS = {"_in_callback_mutex": False, "_callback_mutex": True, "_msgtime_mutex": False,
               "_out_message_mutex": True, "_in_message_mutex": False,
               "_reconnect_delay_mutex": False, "_mid_generate_mutex": False}


def one_thread(client: mqtt.Client) -> None:
    """Give ``client`` :class:`_OneThreadLock` mutexes and a log call that drops paho's
    per-packet debug lines before formatting anything. Only for a client that one thread
    (the hub's) drives, as the service does: no ``loop_start()``."""
    for name, reentrant in _PAHO_LOCKS.items():
        setattr(client, name, _OneThreadLock(reentrant))
    paho_log = client._easy_log

    def easy_log(level: Any, fmt: str, *args: Any) -> None:
        if level in _PAHO_LOGGED or client.on_log is not None:
            paho_log(level, fmt, *args)

    client._easy_log = easy_log  # type: ignore[method-assign]


#: paho log levels that reach :class:`_PahoLog` (which drops everything below WARNING).
_PAHO_LOGGED = frozenset((mqtt.MQTT_LOG_WARNING, mqtt.MQTT_LOG_ERR))


_CORK = getattr(socket, "TCP_CORK", None)  # Linux


def write_queued(client: mqtt.Client) -> int:
    """``client.loop_write()``; several queued packets (a connect's status, subscriptions and
    presence record) leave as one TCP segment instead of one each (TCP_CORK around the
    writes): each loopback segment costs both sides a wake-up."""
    sock = cast(socket.socket, client.socket())  # paho's SocketLike: a socket or SSLSocket
    if _CORK is None or sock is None or len(client._out_packet) < 2:
        return int(client.loop_write())
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
    except OSError:
        return int(client.loop_write())
    try:
        return int(client.loop_write())
    finally:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)
        except OSError:
            pass  # paho closed it: nothing left to send


def ip_family(host: str) -> int | None:
    """``AF_INET`` or ``AF_INET6`` when ``host`` is an IP address, None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return family
    return None


def open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``host:port``, as ``socket.create_connection`` opens it but without
    binding first (the ephemeral port comes with ``connect()``) and, for an IP address,
    without a resolver call. A host name is resolved as before (every address in turn)."""
    family = ip_family(host)
    if family is None:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _SiteContext(ssl.SSLContext):
    """An SSLContext that verifies (and sends as SNI) ``server_name`` instead of the host
    paho connects to: paho 2.2 always passes its host as ``server_hostname``.

    Defined at import, so in the service (gevent-patched before this module is imported)
    its base is gevent's cooperative SSLContext.
    """

    server_name: str | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side, do_handshake_on_connect,
                                   suppress_ragged_eofs, self.server_name or server_hostname,
                                   session)


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client context for a site's ``tls:``: the system CAs or ``ca_file``, the client
    certificate for mutual TLS, ``server_name``, or no verification at all."""
    context = _SiteContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname, CERT_REQUIRED
    context.server_name = tls.server_name
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca_file:
        context.load_verify_locations(cafile=tls.ca_file)
    else:
        context.load_default_certs()
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def drop_socket(client: mqtt.Client) -> None:
    """Close the client's socket without any packet or callback (paho has no public call)."""
    if client.socket() is not None:
        client._sock_close()


def detach_socket(client: mqtt.Client) -> None:
    """Make paho forget its socket, which the caller now owns (and closes)."""
    client._sock = None


class InboundReader:
    """Buffered inbound reads for one connection: the ingest hot path.

    paho reads every packet with three or more ``recv()`` calls and builds a message
    object per PUBLISH. This reader takes what the socket has in one ``recv()`` of up to
    64 KB and walks the packets with :func:`exporter.wire.walk`: QoS 0 PUBLISH packets go
    straight to ``deliver(topic, payload)`` once ``fast_path_enabled()`` (CONNACK seen);
    every other packet is fed whole to paho through its ``_sock_recv`` hook, so paho's state
    machine stays whole. Each :meth:`read` handles one chunk, so the hub runs in between.
    """

    def __init__(self, client: mqtt.Client, deliver: Deliver, v5: bool,
                 fast_path_enabled: Callable[[], bool],
                 on_error: Callable[[Exception], object]) -> None:
        sock = client.socket()
        if sock is None:
            raise ValueError("the client has no socket")
        self.client = client
        self.sock = sock
        self.deliver = deliver
        self.v5 = v5
        self.fast_path_enabled = fast_path_enabled
        self.on_error = on_error
        self.buf = bytearray()
        self._paho_pos = 0     # paho's read cursor in buf ...
        self._paho_limit = 0   # ... and the end of the packet it may read
        self._end: bytes | OSError | None = None   # b"" on EOF, the error on a failed recv
        client._sock_recv = self._paho_recv  # type: ignore[method-assign]

    def _paho_recv(self, bufsize: int) -> bytes:
        pos = self._paho_pos
        n = min(bufsize, self._paho_limit - pos)
        if n <= 0:
            if self._end is None:
                raise BlockingIOError
            if isinstance(self._end, OSError):
                raise self._end
            return b""
        self._paho_pos = pos + n
        return bytes(self.buf[pos:pos + n])

    def _hand_over(self, start: int, end: int) -> bool:
        self._paho_pos, self._paho_limit = start, end
        return bool(self.client.loop_read())

    def read(self) -> bool:
        """Read what the socket has and handle every complete packet.

        Returns True when the connection ended (paho has called on_disconnect).
        """
        sock = self.sock
        data: bytes | OSError
        try:
            data = sock.recv(RECV_SIZE)
            pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes
            while data and pending is not None and pending():
                data += sock.recv(RECV_SIZE)
        except _NOT_READY:
            return False
        except OSError as exc:
            data = exc
        if isinstance(data, bytes) and data:
            # Bytes received are keepalive traffic for paho, whoever parses them.
            self.client._last_bytes_received = mqtt.time_func()
            self.buf += data
            return self.dispatch()
        if self.dispatch():
            return True
        # Let paho see the end of the stream the way it would have seen it on its own.
        self._end = data
        self._paho_pos = self._paho_limit = len(self.buf)
        self.client.loop_read()
        return True

    def dispatch(self) -> bool:
        """Handle the complete packets in the buffer; keep a trailing partial one."""
        try:
            return walk(self.buf, self.v5, self.fast_path_enabled, self.deliver,
                        self.on_error, self._hand_over)
        finally:
            self._paho_pos = self._paho_limit = 0
