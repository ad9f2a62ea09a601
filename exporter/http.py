"""The HTTP interface: ``/metrics``, ``/health`` (and its old alias) on one gevent server."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry

from .health import service_health
from .metrics import make_metrics_app
from .state import ServiceView

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/health", "/health/", "/api/v1/mqtt/health", "/api/v1/mqtt/health/"})
ALLOWED_METHODS = ("GET", "HEAD")
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
INDEX = b"""<html><head><title>mqtt-site-exporter</title></head><body>
<h1>mqtt-site-exporter</h1>
<p><a href="/metrics">/metrics</a> <a href="/health?verbose=true">/health?verbose=true</a></p>
</body></html>
"""


def _respond(start_response: StartResponse, status: str, body: bytes, content_type: str,
             extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))), *extra])
    return [body]


def make_app(service: ServiceView, registry: CollectorRegistry) -> WSGIApplication:
    """WSGI app serving the service's metrics and health; ``registry`` holds the collectors
    served after the service's own families (the process collector)."""
    metrics_app = make_metrics_app(service, registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        known = path in HEALTH_PATHS or path in ("/metrics", "/")
        if not known:
            return _respond(start_response, "404 Not Found", b"not found\n", "text/plain")
        if environ.get("REQUEST_METHOD") not in ALLOWED_METHODS:
            return _respond(start_response, "405 Method Not Allowed", b"method not allowed\n",
                            "text/plain", [("Allow", ", ".join(ALLOWED_METHODS))])
        if path == "/metrics":
            # prometheus_client answers only GET; pywsgi drops the body of a HEAD reply.
            return metrics_app(dict(environ, REQUEST_METHOD="GET"), start_response)
        if path == "/":
            return _respond(start_response, "200 OK", INDEX, "text/html; charset=utf-8")
        query = parse_qs(environ.get("QUERY_STRING", ""))
        verbose = query.get("verbose", ["false"])[-1].lower() in TRUE_VALUES
        code, body = service_health(service, verbose)
        text = "OK" if code == 200 else "Service Unavailable"
        return _respond(start_response, f"{code} {text}",
                        json.dumps(body, indent=1 if verbose else None).encode() + b"\n",
                        "application/json", [("Cache-Control", "no-store")])

    return app


def make_server(host: str, port: int, app: WSGIApplication) -> WSGIServer:
    """An unstarted gevent WSGI server; ``stop(timeout=0)`` returns at once."""
    server: WSGIServer = WSGIServer((host, port), app, log=None,  # type: ignore[no-untyped-call]
                                    error_log=log)
    return server
