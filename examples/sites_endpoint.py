#!/usr/bin/env python3
"""A minimal sites endpoint for MQTT_SITES_URL: the sites document from a database table.

Standard library only (sqlite3, http.server). Each GET reads the table ``mqtt_connection``
(examples/sites.sql: one row per site) and answers the sites document as JSON, with an ETag
(a hash of the body) and ``304 Not Modified`` when the exporter's If-None-Match still
matches, so a poll of an unchanged table costs one query and a few bytes. With
``--token-file`` a request must carry ``Authorization: Bearer <that token>`` (the exporter's
MQTT_SITES_URL_TOKEN_FILE). Binds 127.0.0.1 by default.

    python3 examples/sites_endpoint.py --db sites.db --init examples/sites.sql
    MQTT_SITES_URL=http://127.0.0.1:8080/sites python -m exporter check-config

To serve your application's own table, change ``QUERY`` (and ``site_from_row``): the
document needs ``name`` and ``host`` per site; every other key is optional
(docs/configuration.md). docs/sites-source.md has the rest.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import socket
import sqlite3
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: The site columns, in document order; NULL leaves the key out (the exporter's default).
COLUMNS = ("name", "host", "port", "protocol", "username", "password_env", "password_file",
           "topics", "keepalive", "tls", "enabled")
QUERY = f"SELECT {', '.join(COLUMNS)} FROM mqtt_connection ORDER BY name"
PATH = "/sites"


def site_from_row(row: sqlite3.Row) -> dict[str, Any]:
    """One site of the document from one row."""
    site: dict[str, Any] = {}
    for column in COLUMNS:
        value = row[column]
        if value is None:
            continue
        if column == "topics":
            value = json.loads(value)
        elif column in ("tls", "enabled"):
            value = bool(value)
        site[column] = value
    return site


def sites_document(database: str) -> bytes:
    """The sites document of the table, as JSON bytes (the same rows give the same bytes)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        sites = [site_from_row(row) for row in db.execute(QUERY)]
    return json.dumps({"sites": sites}, indent=1, sort_keys=False).encode() + b"\n"


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def make_handler(database: str, token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sites-endpoint/1"

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != PATH:
                return self.answer(404, b"not found\n")
            if token is not None and not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()):
                return self.answer(401, b"unauthorized\n", {"WWW-Authenticate": "Bearer"})
            try:
                body = sites_document(database)
            except (sqlite3.Error, ValueError) as exc:  # ValueError: bad JSON in topics
                self.log_error("cannot read the sites table: %s", exc)
                return self.answer(500, b"cannot read the sites table\n")
            etag = etag_of(body)
            tags = {t.strip() for t in self.headers.get("If-None-Match", "").split(",")}
            if etag in tags or f"W/{etag}" in tags:
                return self.answer(304, b"", {"ETag": etag})
            self.answer(200, body, {"ETag": etag,
                                    "Content-Type": "application/json; charset=utf-8"})

        def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Cache-Control", "no-cache")
            if status != 304:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            # One line per request on stderr: no query string, no Authorization header.
            path = self.path.split("?", 1)[0]
            sys.stderr.write(f"{self.address_string()} {self.command} {path} {code}\n")

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="SQLite database with mqtt_connection")
    parser.add_argument("--init", metavar="SQL_FILE",
                        help="run this SQL file first (examples/sites.sql: table and two rows)")
    parser.add_argument("--listen", default="127.0.0.1:8080",
                        help="host:port to bind (default %(default)s: this machine only)")
    parser.add_argument("--token-file", help="require 'Authorization: Bearer <its content>'")
    args = parser.parse_args(argv)
    if args.init:
        with open(args.init, encoding="utf-8") as f, sqlite3.connect(args.db) as db:
            db.executescript(f.read())
    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            parser.error(f"{args.token_file} is empty")
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    server_class = type("Server", (ThreadingHTTPServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
        "daemon_threads": True})
    server = server_class((host, int(port)), make_handler(args.db, token))
    print(f"Serving the sites of {args.db} on http://{args.listen}{PATH}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
