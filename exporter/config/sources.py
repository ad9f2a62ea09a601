"""Where the sites document comes from: a file (the default) or an HTTP(S) URL.

Both answer :meth:`read`: the document's text, or None when it has not changed since the last
read (a file's modification time, size and inode; a URL's ETag / Last-Modified, asked with a
conditional request like Prometheus' HTTP service discovery). ``force`` reads regardless
(SIGHUP). A failure to get the document raises :class:`SourceError`, whose message names the
origin but never a secret (a URL is shown without credentials or query).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import IO, Protocol

from .. import __version__
from .sites import SITES_FILE_MAX_BYTES, read_sites_text

#: What a URL source asks for; the parser takes YAML, and JSON as its subset.
ACCEPT = "application/json, application/yaml;q=0.9, text/yaml;q=0.9, text/plain;q=0.5, */*;q=0.1"
USER_AGENT = f"mqtt-site-exporter/{__version__}"


class SourceError(Exception):
    """The document could not be read (as opposed to: it was read and is invalid)."""


class SitesSource(Protocol):
    """A sites document's origin: ``origin`` names it in messages (no secrets)."""

    @property
    def origin(self) -> str: ...

    def read(self, force: bool = False) -> str | None: ...


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be MQTT_SITES_URL, or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL with a host, got {shown_url(url)!r}"
    return None


def shown_url(url: str) -> str:
    """``url`` without user info, query or fragment: what messages, logs and /health show."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    return urllib.parse.urlunsplit((parts.scheme, host + port, parts.path, "", ""))


class FileSource:
    """The sites file; changed = another (device, inode, size, mtime_ns) than at the last read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: object = None

    @property
    def origin(self) -> str:
        return self.path

    def _stat(self) -> object:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return exc.errno
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self, force: bool = False) -> str | None:
        stamp = self._stat()
        if not force and self._stamp is not None and stamp == self._stamp:
            return None
        self._stamp = stamp
        text, problem = read_sites_text(self.path)
        if text is None:
            raise SourceError(problem or "cannot read file")
        return text


class UrlSource:
    """An HTTP(S) endpoint serving the sites document; polled with conditional requests.

    One read takes at most ``timeout`` seconds in all (connect, headers, body, redirects): at
    the deadline its sockets are shut down. An unchanged body (same bytes as the last read)
    counts as unchanged even from a server that ignores the validators. After a failure the
    validators are forgotten, so the next answer is a whole document again (the reload status
    then recovers even when the document did not change meanwhile).
    """

    def __init__(self, url: str, token_file: str = "", timeout: float = 10.0) -> None:
        self.url = url
        self.token_file = token_file
        self.timeout = timeout
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._digest: bytes | None = None
        self._watchdog = _Watchdog(timeout)
        self._opener = _opener(lambda: self._watchdog)

    @property
    def origin(self) -> str:
        return shown_url(self.url)

    def _token(self) -> str:
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read(MAX_TOKEN_BYTES + 1).strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read the token file {self.token_file}: "
                              f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
                              ) from None
        if not token:
            raise SourceError(f"the token file {self.token_file} is empty")
        if len(token) > MAX_TOKEN_BYTES or not _TOKEN_RE.fullmatch(token):
            raise SourceError(f"the token file {self.token_file} does not hold one token "
                              f"(at most {MAX_TOKEN_BYTES} printable characters, no spaces)")
        return token

    def _request(self, force: bool) -> urllib.request.Request:
        headers = {"Accept": ACCEPT, "User-Agent": USER_AGENT}
        if not force and self._etag:
            headers["If-None-Match"] = self._etag
        if not force and self._last_modified:
            headers["If-Modified-Since"] = self._last_modified
        if self.token_file:
            headers["Authorization"] = f"Bearer {self._token()}"
        url = self.url
        parts = urllib.parse.urlsplit(url)
        if parts.username is not None:  # user:password@ in the URL: basic auth
            credentials = f"{urllib.parse.unquote(parts.username)}:" \
                          f"{urllib.parse.unquote(parts.password or '')}"
            headers.setdefault("Authorization",
                               "Basic " + base64.b64encode(credentials.encode()).decode())
            url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        return urllib.request.Request(url, headers=headers)

    def read(self, force: bool = False) -> str | None:
        try:
            return self._read(force)
        except SourceError:
            self._etag = self._last_modified = self._digest = None
            raise

    def _read(self, force: bool) -> str | None:
        request = self._request(force)
        conditional = request.has_header("If-none-match") or \
            request.has_header("If-modified-since")
        watchdog = self._watchdog = _Watchdog(self.timeout)
        late = f"no complete answer within {self.timeout:g} s"
        try:
            with watchdog, self._opener.open(request, timeout=self.timeout) as response:
                chunks, size = [], 0
                while size <= SITES_FILE_MAX_BYTES:
                    chunk = response.read1(min(1 << 16, SITES_FILE_MAX_BYTES + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                missing = response.length if size <= SITES_FILE_MAX_BYTES else None
                etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
                charset = response.headers.get_content_charset() or "utf-8"
        except urllib.error.HTTPError as exc:
            exc.close()
            if watchdog.expired:
                raise SourceError(late) from None
            if exc.code == 304 and conditional:
                return None
            raise SourceError(f"HTTP {exc.code} {_shown(exc.reason)}") from None
        except urllib.error.URLError as exc:
            raise SourceError(late if watchdog.over()
                              else f"cannot fetch: {_reason(exc.reason)}") from None
        except Exception as exc:  # socket, TLS, HTTP protocol, or what a shut socket raised
            raise SourceError(late if watchdog.over()
                              else f"cannot fetch: {_reason(exc)}") from None
        if watchdog.expired:
            raise SourceError(late)
        if size > SITES_FILE_MAX_BYTES:
            raise SourceError(f"larger than {SITES_FILE_MAX_BYTES} bytes, the limit of a sites "
                              "document")
        if missing:  # read1 does not raise IncompleteRead: a cut document must not apply
            raise SourceError(f"the answer ended after {size} of {size + missing} bytes")
        body = b"".join(chunks)
        try:
            text = body.decode(charset)
        except (UnicodeDecodeError, LookupError):
            raise SourceError(f"not valid {_shown(charset)} text") from None
        digest = hashlib.sha256(body).digest()
        unchanged = not force and digest == self._digest
        self._etag, self._last_modified, self._digest = etag, modified, digest
        return None if unchanged else text


#: The longest bearer token read from MQTT_SITES_URL_TOKEN_FILE.
MAX_TOKEN_BYTES = 16384
#: What a token may hold (RFC 6750 b64token, and the printable rest): no spaces, no controls.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


class _Watchdog:
    """Shuts down the sockets of one read when its deadline passes (a server that never
    answers, or dribbles, cannot hold the reload longer than the timeout)."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def over(self) -> bool:
        """The deadline passed (the watchdog fired, or a socket timeout got there first)."""
        return self.expired or time.monotonic() >= self.deadline - 0.01

    def remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        self._sockets.append(sock)
        if self.expired:
            self._expire()

    def _expire(self) -> None:
        self.expired = True
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _opener(watchdog: Callable[[], _Watchdog]) -> urllib.request.OpenerDirector:
    """urllib with the current read's watchdog on every connection and credentials kept to
    the URL's origin."""

    class Watched(http.client.HTTPConnection):
        def connect(self) -> None:
            self.timeout = watchdog().remaining()
            super().connect()
            watchdog().watch(self.sock)

    class WatchedTLS(http.client.HTTPSConnection):
        def connect(self) -> None:
            self.timeout = watchdog().remaining()
            super().connect()
            watchdog().watch(self.sock)

    class Plain(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(Watched, req)

    class Secure(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(WatchedTLS, req)

    return urllib.request.build_opener(Plain(), Secure(), _SameOriginRedirects())


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but sends Authorization only to the URL's own scheme, host and port
    (as browsers and Go's client do): a redirect elsewhere never gets the token."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
            new.remove_header("Cookie")
        return new


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = -1
    return parts.scheme, (parts.hostname or ""), port


def _shown(text: object, limit: int = 80) -> str:
    """Server-chosen text (a reason phrase, a charset) made fit for one log line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "..."


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    if isinstance(reason, http.client.InvalidURL | ValueError):
        # http.client quotes the URL (with its query) in these: never show it
        return "invalid URL or header (control characters or spaces)"
    if isinstance(reason, TimeoutError | http.client.HTTPException):
        return type(reason).__name__ if not str(reason) else _shown(reason)
    return _shown(reason) or type(reason).__name__


def make_source(sites_file: str, sites_url: str, token_file: str = "",
                timeout: float = 10.0) -> SitesSource:
    """The URL when one is set, else the file."""
    if sites_url:
        return UrlSource(sites_url, token_file, timeout)
    return FileSource(sites_file)
