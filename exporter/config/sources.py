"""Where the sites document comes from: a file (the default) or an HTTP(S) URL.

Both answer :meth:`read`: the document's text, or None when it has not changed since the last
read (a file's modification time, size and inode; a URL's ETag / Last-Modified, asked with a
conditional request like Prometheus' HTTP service discovery). ``force`` reads regardless
(SIGHUP). A failure to get the document raises :class:`SourceError`, whose message names the
origin but never a secret (a URL is shown without credentials or query).
"""

from __future__ import annotations

import base64
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Protocol

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
    """An HTTP(S) endpoint serving the sites document; polled with conditional requests."""

    def __init__(self, url: str, token_file: str = "", timeout: float = 10.0) -> None:
        self.url = url
        self.token_file = token_file
        self.timeout = timeout
        self._etag: str | None = None
        self._last_modified: str | None = None

    @property
    def origin(self) -> str:
        return shown_url(self.url)

    def _request(self, force: bool) -> urllib.request.Request:
        headers = {"Accept": ACCEPT, "User-Agent": USER_AGENT}
        if not force and self._etag:
            headers["If-None-Match"] = self._etag
        if not force and self._last_modified:
            headers["If-Modified-Since"] = self._last_modified
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    token = f.read(65536).strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise SourceError(f"cannot read the token file {self.token_file}: "
                                  f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
                                  ) from None
            headers["Authorization"] = f"Bearer {token}"
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
        request = self._request(force)
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                chunks, size = [], 0
                while size <= SITES_FILE_MAX_BYTES:
                    if time.monotonic() > deadline:
                        raise SourceError(f"no complete answer within {self.timeout:g} s")
                    chunk = response.read(min(1 << 16, SITES_FILE_MAX_BYTES + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
                charset = response.headers.get_content_charset() or "utf-8"
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                return None
            raise SourceError(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise SourceError(f"cannot fetch: {_reason(exc.reason)}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise SourceError(f"cannot fetch: {_reason(exc)}") from None
        if size > SITES_FILE_MAX_BYTES:
            raise SourceError(f"larger than {SITES_FILE_MAX_BYTES} bytes, the limit of a sites "
                              "document")
        try:
            text = b"".join(chunks).decode(charset)
        except (UnicodeDecodeError, LookupError):
            raise SourceError(f"not valid {charset} text") from None
        self._etag, self._last_modified = etag, modified
        return text


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    if isinstance(reason, TimeoutError | http.client.HTTPException):
        return type(reason).__name__ if not str(reason) else str(reason)
    return str(reason) or type(reason).__name__


def make_source(sites_file: str, sites_url: str, token_file: str = "",
                timeout: float = 10.0) -> SitesSource:
    """The URL when one is set, else the file."""
    if sites_url:
        return UrlSource(sites_url, token_file, timeout)
    return FileSource(sites_file)
