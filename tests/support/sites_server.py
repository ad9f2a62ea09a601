"""A real HTTP server on 127.0.0.1 that serves a sites document (MQTT_SITES_URL's tests).

It answers like a well-behaved application endpoint (ETag from the body, Last-Modified, 304
on If-None-Match / If-Modified-Since) and can misbehave on demand: a forced status, a
redirect, an answer that never comes, a body dribbled byte by byte, a wrong Content-Length,
a declared charset. It records every request (headers included), so tests can count 304s and
check what was sent. It can be stopped and started again on the same port (an endpoint that
goes down and comes back).
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .net import HOST, free_port

#: The longest a handler waits for anything (a stalled answer, a dribble step) before giving up.
MAX_STALL_SECONDS = 30.0


@dataclass(frozen=True)
class Request:
    """One request as the server saw it, and the status it answered."""

    path: str
    headers: dict[str, str]
    status: int

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


class SitesServer:
    """``ThreadingHTTPServer`` on 127.0.0.1:<port> serving :attr:`body` at any path.

    Knobs (plain attributes, read per request): ``status`` (answer this instead of the
    document), ``redirects`` (path -> URL: a 302 there), ``stall`` (accept, read the request, never
    answer), ``dribble`` (seconds between body bytes), ``length_extra`` (Content-Length claims
    that many more bytes than are sent), ``validators`` (which of ETag and Last-Modified to
    send and honour in conditional requests), ``token`` / ``basic`` (required credentials; 401 otherwise),
    ``charset`` (declared in Content-Type).
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.body = b""
        self.content_type = "application/json"
        self.charset: str | None = None
        self.status: int | None = None
        self.redirects: dict[str, str] = {}
        self.stall = False
        self.dribble: float | None = None
        self.length_extra = 0
        self.validators: tuple[str, ...] = ("ETag", "Last-Modified")
        self.token: str | None = None
        self.basic: tuple[str, str] | None = None
        self.last_modified = time.time()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- the document
    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'

    def set_body(self, body: bytes | str) -> None:
        """Serve ``body`` from now on (a new ETag, and a later Last-Modified, one second on:
        HTTP dates have whole seconds)."""
        self.body = body.encode() if isinstance(body, str) else body
        self.last_modified = max(time.time(), self.last_modified + 1)

    def set_sites(self, sites: list[dict[str, Any]]) -> None:
        """Serve ``{"sites": sites}`` as JSON."""
        self.set_body(json.dumps({"sites": sites}))

    # -- what was asked
    def count(self, status: int) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.status == status)

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/sites"

    def url_with(self, userinfo: str = "", query: str = "") -> str:
        """:attr:`url` with ``user:password@`` and ``?query`` added."""
        at = f"{userinfo}@" if userinfo else ""
        return f"http://{at}{HOST}:{self.port}/sites" + (f"?{query}" if query else "")

    # -- lifecycle
    def start(self) -> SitesServer:
        handler = type("Handler", (_Handler,), {"owner": self})
        self._release.clear()
        self._server = ThreadingHTTPServer((HOST, self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (connections are then refused) and release stalled answers."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> SitesServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- answering (called by the handler threads)
    def _authorized(self, headers: dict[str, str]) -> bool:
        given = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        if self.token is not None and given != f"Bearer {self.token}":
            return False
        if self.basic is not None:
            import base64
            expected = base64.b64encode(":".join(self.basic).encode()).decode()
            return given == f"Basic {expected}"
        return True

    def _not_modified(self, headers: dict[str, str]) -> bool:
        lower = {k.lower(): v for k, v in headers.items()}
        if "if-none-match" in lower and "ETag" in self.validators:
            tags = {t.strip().removeprefix("W/") for t in lower["if-none-match"].split(",")}
            return self.etag in tags or "*" in tags
        if "if-modified-since" in lower and "Last-Modified" in self.validators:
            try:
                since = email.utils.parsedate_to_datetime(lower["if-modified-since"]).timestamp()
            except (TypeError, ValueError):
                return False
            return int(self.last_modified) <= since
        return False

    def _record(self, path: str, headers: dict[str, str], status: int) -> None:
        with self._lock:
            self.requests.append(Request(path, headers, status))


class _Handler(BaseHTTPRequestHandler):
    owner: SitesServer
    server_version = "sites-server/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner, headers = self.owner, dict(self.headers.items())
        if owner.stall:
            owner._record(self.path, headers, 0)
            owner._release.wait(MAX_STALL_SECONDS)
            return
        if self.path in owner.redirects:
            return self._answer(302, b"", {"Location": owner.redirects[self.path]})
        if owner.status is not None:
            return self._answer(owner.status, b"forced status\n")
        if not owner._authorized(headers):
            return self._answer(401, b"unauthorized\n", {"WWW-Authenticate": "Bearer"})
        if owner._not_modified(headers):
            return self._answer(304, b"", self._validators())
        content_type = owner.content_type + (f"; charset={owner.charset}" if owner.charset
                                             else "")
        self._answer(200, owner.body, {"Content-Type": content_type, **self._validators()})

    def _validators(self) -> dict[str, str]:
        owner = self.owner
        values = {"ETag": owner.etag,
                  "Last-Modified": email.utils.formatdate(int(owner.last_modified), usegmt=True)}
        return {name: value for name, value in values.items() if name in owner.validators}

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        owner = self.owner
        owner._record(self.path, dict(self.headers.items()), status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 304:
            self.send_header("Content-Length", str(len(body) + owner.length_extra))
        self.end_headers()
        if status == 304:
            return
        try:
            if owner.dribble is None:
                self.wfile.write(body)
                return
            for i in range(len(body)):
                if owner._release.wait(owner.dribble):
                    return
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
        except OSError:  # the client gave up: what a dribble test expects
            pass
