"""The HTTP interface: ``/metrics``, ``/health`` (and its old alias) on one gevent server.

The server is bounded so that HTTP clients can never starve the MQTT side
(:class:`BoundedWSGIServer`):

- **Connections.** At most ``max_connections`` at once, and never more than the descriptor
  budget leaves (``soft RLIMIT_NOFILE - reserved``; the reserve is the sites' sockets plus
  headroom, :func:`exporter.supervisor.reserved_descriptors`). When the cap is reached, a new
  connection takes the place of the connection that has waited longest (at least
  :data:`EVICT_AFTER_SECONDS`) for its request (idle, slow, or half-open): idle clients cannot
  keep Prometheus or a health probe out. Otherwise the server stops accepting (the kernel's
  listen backlog holds the rest, which costs the process no descriptor) until a connection
  ends or becomes evictable.
- **Time.** The request line and headers (and a TLS handshake) must arrive within
  ``timeout`` seconds; every read and write on a connection times out after ``timeout``
  seconds without progress (idle keep-alive connections included).
- **Size.** The request line is at most 8 KB (414, gevent's limit), the header section at
  most :data:`MAX_HEADER_BYTES` (431) and 100 lines (400, http.client's limit).
- **Logs.** Malformed requests and timeouts are client problems: DEBUG, never the raw line
  above DEBUG.
"""
from __future__ import annotations

import json
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CollectorRegistry

from .health import service_health
from .metrics import make_metrics_app, served_families
from .state import ServiceView

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/health", "/health/", "/api/v1/mqtt/health", "/api/v1/mqtt/health/"})
#: Liveness, as Prometheus names it: 200 whenever the process serves HTTP, whatever the
#: brokers do (a liveness probe must not restart the exporter because a broker is down).
LIVENESS_PATH = "/-/healthy"
ALLOWED_METHODS = ("GET", "HEAD")
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
INDEX = b"""<html><head><title>mqtt-site-exporter</title></head><body>
<h1>mqtt-site-exporter</h1>
<p><a href="/metrics">/metrics</a> <a href="/health?verbose=true">/health?verbose=true</a>
<a href="/-/healthy">/-/healthy</a></p>
</body></html>
"""
REALM = "mqtt-site-exporter"

#: Defaults of EXPORTER_HTTP_MAX_CONNECTIONS and EXPORTER_HTTP_TIMEOUT_SECONDS.
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_TIMEOUT_SECONDS = 10.0
#: Connections accepted per wake-up of the listener; also how far the open connections may
#: exceed the cap for a moment while evicted ones close.
ACCEPT_BATCH = 16
#: At the cap, a connection that has waited this long for its request may be closed for a
#: new one (a client that has just connected may still be sending).
EVICT_AFTER_SECONDS = 0.1
#: Listen backlog: connections waiting here cost the process no descriptor.
BACKLOG = 1024
#: Most query fields parsed (the request line is capped at 8 KB anyway).
MAX_QUERY_FIELDS = 64
#: Cap on the request's header section (all lines together): 431 beyond.
MAX_HEADER_BYTES = 32 * 1024
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
              b"Content-Length: 0\r\n\r\n")
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def _respond(start_response: StartResponse, status: str, body: bytes, content_type: str,
             extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))), *extra])
    return [body]


def _verbose(query_string: str) -> bool:
    try:
        query = parse_qs(query_string, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:  # too many fields
        return False
    return query.get("verbose", ["false"])[-1].strip().lower() in TRUE_VALUES


def yield_to_loop() -> None:
    """Let the event loop poll the sockets and run its timers once, then carry on.

    ``gevent.sleep(0)`` is not enough: it only runs greenlets already made ready. Measured
    with a greenlet that wakes every 1 ms, a 10 000-site scrape that paused with it held
    timers and sockets for its whole duration (70-200 ms); with a timer this short, the
    longest gap is one step of the scrape.
    """
    gevent.sleep(0.000_001)  # type: ignore[no-untyped-call]


def make_app(service: ServiceView, registry: CollectorRegistry, *,
             authorize: Callable[[dict[str, Any]], bool] | None = None,
             site_connect_histogram: bool = False) -> WSGIApplication:
    """WSGI app serving the service's metrics and health; ``registry`` holds the collectors
    served after the service's own families (the process collector).

    ``authorize(environ)`` (optional) decides each request; False answers 401 with
    ``WWW-Authenticate: Basic realm="mqtt-site-exporter"``. ``site_connect_histogram``:
    also serve the per-site connect histogram (EXPORTER_SITE_CONNECT_HISTOGRAM).
    A scrape yields to the event loop between its steps (:func:`yield_to_loop`), so
    connections and ``/health`` are served while it runs.
    """
    metrics_app = make_metrics_app(service, registry,
                                   families=served_families(site_connect_histogram),
                                   pause=yield_to_loop)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if authorize is not None and not authorize(dict(environ)):
            return _respond(start_response, "401 Unauthorized", b"unauthorized\n", "text/plain",
                            [("WWW-Authenticate", f'Basic realm="{REALM}"')])
        path = environ.get("PATH_INFO") or "/"
        known = path in HEALTH_PATHS or path in ("/metrics", "/", LIVENESS_PATH)
        if not known:
            return _respond(start_response, "404 Not Found", b"not found\n", "text/plain")
        if environ.get("REQUEST_METHOD") not in ALLOWED_METHODS:
            return _respond(start_response, "405 Method Not Allowed", b"method not allowed\n",
                            "text/plain", [("Allow", ", ".join(ALLOWED_METHODS))])
        if path == "/metrics":
            # pywsgi drops the body of a HEAD reply.
            return metrics_app(environ, start_response)
        if path == "/":
            return _respond(start_response, "200 OK", INDEX, "text/html; charset=utf-8")
        if path == LIVENESS_PATH:
            return _respond(start_response, "200 OK", b"OK\n", "text/plain; charset=utf-8",
                            [("Cache-Control", "no-store")])
        verbose = _verbose(environ.get("QUERY_STRING", ""))
        code, body = service_health(service, verbose)
        text = "OK" if code == 200 else "Service Unavailable"
        return _respond(start_response, f"{code} {text}",
                        json.dumps(body, indent=1 if verbose else None).encode() + b"\n",
                        "application/json", [("Cache-Control", "no-store")])

    return app


class _Conn:
    """One accepted connection, as the server's cap sees it."""

    __slots__ = ("sock", "evicted")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.evicted = False


class HeadersTooLargeError(ValueError):
    """The header section exceeds :data:`MAX_HEADER_BYTES`."""


class _LimitedReader:
    """What http.client.parse_headers reads the header lines through: at most ``limit``
    bytes in all."""

    def __init__(self, rfile: Any, limit: int) -> None:
        self.rfile = rfile
        self.left = limit

    def readline(self, size: int = -1) -> bytes:
        want = self.left + 1 if size < 0 else min(size, self.left + 1)
        line: bytes = self.rfile.readline(want)
        self.left -= len(line)
        if self.left < 0:
            raise HeadersTooLargeError(f"header section over {MAX_HEADER_BYTES} bytes")
        return line


class _DebugLog:
    """pywsgi's error_log: what it reports is about clients (bad requests), so DEBUG."""

    def write(self, message: str) -> None:
        log.debug("HTTP: %s", message.rstrip()[:300])

    def flush(self) -> None:
        pass


class BoundedHandler(WSGIHandler):
    """pywsgi's handler with a deadline on the request line and headers, marking itself
    evictable while it waits for them."""

    server: BoundedWSGIServer
    conn: _Conn

    def handle(self) -> None:
        try:
            super().handle()  # type: ignore[no-untyped-call]
        except gevent.Timeout:
            log.debug("HTTP: request from %s not received within %.1f s: closed",
                      self.client_address, self.server.timeout)
        finally:
            self.server._waiting.pop(self.conn, None)

    def read_requestline(self) -> str:
        # Waiting for a request: evictable until its headers are in, and bounded in time.
        self.server._enter_waiting(self.conn)
        self._deadline = gevent.Timeout.start_new(self.server.timeout)  # type: ignore[no-untyped-call]
        line: str = super().read_requestline()  # type: ignore[no-untyped-call]
        return line

    def read_request(self, raw_requestline: str) -> bool:
        try:
            ok: bool = super().read_request(raw_requestline)  # type: ignore[no-untyped-call]
        finally:
            self._stop_deadline()
        return ok

    def handle_one_request(self) -> Any:
        try:
            return super().handle_one_request()  # type: ignore[no-untyped-call]
        finally:
            self._stop_deadline()

    def _stop_deadline(self) -> None:
        self.server._waiting.pop(self.conn, None)
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.close()
            self._deadline = None

    def MessageClass(self, rfile: Any, *args: Any) -> Any:  # noqa: N802 (pywsgi's name)
        return super().MessageClass(  # type: ignore[no-untyped-call]
            _LimitedReader(rfile, MAX_HEADER_BYTES), *args)

    def _handle_client_error(self, ex: BaseException) -> Any:
        # pywsgi prints a traceback for anything but ValueError; a client's timeout or reset
        # is not a server problem.
        log.debug("HTTP: invalid request from %s: %s", self.client_address,
                  str(ex)[:200] or type(ex).__name__)
        if isinstance(ex, HeadersTooLargeError):
            return ("431", _TOO_LARGE)
        return ("400", _BAD_REQUEST)

    def log_error(self, msg: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            try:
                text = msg % args if args else msg
            except (TypeError, ValueError):
                text = f"{msg!r} {args!r}"
            log.debug("HTTP: %s", text[:300])


class BoundedWSGIServer(WSGIServer):
    """A pywsgi server with a connection cap, a descriptor budget and timeouts (see the
    module docstring)."""

    handler_class = BoundedHandler
    max_accept = ACCEPT_BATCH

    def __init__(self, listener: tuple[str, int], application: WSGIApplication, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS,
                 reserved_fds: int = 0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        ssl_args: dict[str, Any] = {} if ssl_context is None else {"ssl_context": ssl_context}
        super().__init__(listener, application, backlog=BACKLOG,  # type: ignore[no-untyped-call]
                         log=None, error_log=_DebugLog(), **ssl_args)
        self.max_connections = max_connections
        self.timeout = timeout
        self.reserved_fds = reserved_fds
        self._open: set[_Conn] = set()
        #: Connections waiting for a request (since when), the longest-waiting first.
        self._waiting: dict[_Conn, float] = {}
        self._resume_timer: Any = None
        self._evicted_open = 0
        self.evictions = 0
        self._warned_budget = False

    # -- the cap

    def capacity(self) -> int:
        """How many connections HTTP may hold now: the configured cap, or less when the
        descriptor budget (soft RLIMIT_NOFILE - reserved - one accept batch) is smaller;
        at least 1."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        budget = soft - self.reserved_fds - ACCEPT_BATCH
        if budget < self.max_connections and not self._warned_budget:
            self._warned_budget = True
            log.warning("HTTP connections limited to %d by the descriptor limit (%d, of which "
                        "%d are reserved for the sites)", max(1, budget), soft,
                        self.reserved_fds)
        return max(1, min(self.max_connections, budget))

    def full(self) -> bool:
        capacity = self.capacity()
        live = len(self._open) - self._evicted_open
        if live < capacity:
            return False
        if len(self._open) >= capacity + ACCEPT_BATCH:
            return True  # evicted ones have not closed yet
        victim, since = next(iter(self._waiting.items()), (None, 0.0))
        if victim is None:
            # Every connection is busy with a request: stop accepting until one ends
            # (``_release`` resumes).
            return True
        wait = since + EVICT_AFTER_SECONDS - time.monotonic()
        if wait > 0:
            # A client that connected a moment ago may still be sending its request: try
            # again when the longest waiter has waited long enough.
            self._schedule_resume(wait)
            return True
        self._evict(victim)
        return False

    def _schedule_resume(self, seconds: float) -> None:
        if self._resume_timer is not None:
            self._resume_timer.close()
        self._resume_timer = self.loop.timer(seconds)
        self._resume_timer.start(self._resume)

    def _evict(self, conn: _Conn) -> None:
        del self._waiting[conn]
        conn.evicted = True
        self._evicted_open += 1
        self.evictions += 1
        log.debug("HTTP: connection cap reached: closing the connection waiting longest")
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _enter_waiting(self, conn: _Conn) -> None:
        self._waiting.pop(conn, None)
        self._waiting[conn] = time.monotonic()
        if self._watcher is None and not (self._resume_timer and self._resume_timer.active):
            # Not accepting (at the cap): this one becomes evictable shortly.
            self._schedule_resume(EVICT_AFTER_SECONDS)

    def _resume(self) -> None:
        if self._watcher is None and self.started and getattr(self, "socket", None) is not None:
            self.start_accepting()  # type: ignore[no-untyped-call]

    def _release(self, conn: _Conn) -> None:
        if conn in self._open:
            self._open.discard(conn)
            if conn.evicted:
                self._evicted_open -= 1
        self._waiting.pop(conn, None)
        self._resume()

    # -- connections

    def do_handle(self, sock: socket.socket, address: Any) -> None:
        # Every read and write on the connection times out (idle keep-alive included).
        sock.settimeout(self.timeout)
        conn = _Conn(sock)
        self._open.add(conn)
        try:
            super().do_handle(sock, address, conn)  # type: ignore[no-untyped-call]
        except BaseException:
            self._release(conn)
            raise

    def do_close(self, sock: socket.socket, address: Any = None, conn: _Conn | None = None) -> None:
        try:
            sock.close()
        finally:
            if conn is not None:
                self._release(conn)

    def wrap_socket_and_handle(self, client_socket: socket.socket, address: Any,
                               conn: _Conn | None = None) -> Any:
        # The TLS handshake is bounded by the same deadline as the request headers.
        conn = conn if conn is not None else _Conn(client_socket)
        self._enter_waiting(conn)
        try:
            with gevent.Timeout(self.timeout):  # type: ignore[no-untyped-call]
                ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (gevent.Timeout, OSError) as exc:
            self._waiting.pop(conn, None)
            log.debug("HTTP: TLS handshake with %s failed: %s", address,
                      "timeout" if isinstance(exc, gevent.Timeout) else exc)
            return None
        self._waiting.pop(conn, None)
        conn.sock = ssl_socket
        try:
            return self.handle(ssl_socket, address, conn)
        finally:
            ssl_socket.close()

    def handle(self, sock: socket.socket, address: Any, conn: _Conn | None = None) -> None:
        handler = self.handler_class(sock, address, self)  # type: ignore[no-untyped-call]
        handler.conn = conn if conn is not None else _Conn(sock)
        handler.handle()


def make_server(host: str, port: int, app: WSGIApplication, *,
                ssl_context: ssl.SSLContext | None = None,
                max_connections: int = DEFAULT_MAX_CONNECTIONS,
                timeout: float = DEFAULT_TIMEOUT_SECONDS,
                reserved_fds: int = 0) -> BoundedWSGIServer:
    """An unstarted, bounded gevent WSGI server; ``stop(timeout=0)`` returns at once.

    ``reserved_fds``: descriptors HTTP must leave to the rest of the process (the sites'
    sockets plus headroom, :func:`exporter.supervisor.reserved_descriptors`).
    ``ssl_context``: serve HTTPS (the handshake has the same deadline as a request).
    """
    return BoundedWSGIServer((host, port), app, max_connections=max_connections,
                             timeout=timeout, reserved_fds=reserved_fds,
                             ssl_context=ssl_context)
