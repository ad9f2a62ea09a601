#!/usr/bin/env python3
"""Placeholder webhook receiver for Alertmanager in the demo stack.

Accepts POSTs on any path and prints one line per notification to stdout
(`docker compose logs -f alert-sink`): status, alert names, sites, then the raw
JSON body. Answers GET with 200 "ok" so it can be health-checked. Standard library
only; no secrets, nothing stored.

    python alert_sink.py [--listen 0.0.0.0:8080]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20  # Alertmanager payloads are small; refuse anything absurd.


def summarize(payload: dict) -> str:
    """`firing MqttSiteReconnectLoop site=site_88 (2 alerts)` from a webhook payload."""
    alerts = payload.get("alerts") or []
    names = sorted({a.get("labels", {}).get("alertname", "?") for a in alerts})
    sites = sorted({a.get("labels", {}).get("site") for a in alerts} - {None})
    parts = [str(payload.get("status", "?")), ",".join(names) or "-"]
    if sites:
        parts.append("site=" + ",".join(sites))
    parts.append(f"({len(alerts)} alert{'s' if len(alerts) != 1 else ''})")
    return " ".join(parts)


class Handler(BaseHTTPRequestHandler):
    server_version = "alert-sink/1"

    def _reply(self, code: int, body: bytes = b"ok\n") -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(200)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._reply(413 if length > MAX_BODY else 400, b"bad length\n")
            return
        raw = self.rfile.read(length)
        try:
            payload = json.loads(raw)
            line = summarize(payload) if isinstance(payload, dict) else "non-object JSON"
        except ValueError:
            line = "non-JSON body"
        print(f"alert-sink: {self.path} {line}", flush=True)
        print(raw.decode("utf-8", "replace"), flush=True)
        self._reply(200)

    def log_message(self, fmt: str, *args) -> None:  # quiet access log; POSTs are printed above
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="0.0.0.0:8080", help="host:port (default %(default)s)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), Handler)
    # PID 1 in its container: exit promptly on SIGTERM (docker compose stop).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"alert-sink: listening on {args.listen}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
