"""Command line: ``run`` (default), ``check-config``, ``status``.

Kept import-light: gevent's monkey patching must happen before paho and the HTTP
server are imported, so ``run`` patches first and imports the service afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .config import Settings

PROG = "mqtt-site-exporter"
EXIT_CONFIG = 2


def _load_settings_or_exit() -> Settings:
    from .config import ConfigError, load_settings
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"{PROG}: invalid configuration ({len(exc.errors)} problem(s)):", file=sys.stderr)
        for line in exc.errors:
            print(f"  - {line}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    from gevent import monkey
    monkey.patch_all()  # type: ignore[no-untyped-call]
    import logging
    import signal
    import time

    import gevent
    from gevent.event import Event

    log = logging.getLogger("exporter")
    stop_requested = Event()  # type: ignore[no-untyped-call]
    signal_at: list[float] = []

    def on_signal(signum: int) -> None:
        if signal_at:
            log.warning("Second %s during shutdown: exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        signal_at.append(time.monotonic())
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop_requested.set()  # type: ignore[no-untyped-call]

    # First thing: a SIGTERM during start-up must still mean a clean exit.
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, on_signal, signum)  # type: ignore[no-untyped-call]

    settings = _load_settings_or_exit()
    from .http import make_app, make_server
    from .logs import configure_logging
    from .metrics import process_registry
    from .supervisor import Service

    configure_logging(settings.log_level, settings.log_format)
    service = Service(settings)
    server = make_server(settings.listen_host, settings.listen_port,
                         make_app(service, process_registry()))
    try:
        server.start()  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.error("Cannot listen on %s:%d: %s", settings.listen_host, settings.listen_port, exc)
        return 1
    log.info("mqtt-site-exporter %s (instance %s): %d sites, listening on %s:%d",
             __version__, settings.instance_id, len(settings.sites),
             settings.listen_host, settings.listen_port)
    if not stop_requested.is_set():  # type: ignore[no-untyped-call]
        service.start()
        stop_requested.wait()  # type: ignore[no-untyped-call]
    service.shutdown(signal_at[0])
    server.stop(timeout=0)  # type: ignore[no-untyped-call]
    logging.shutdown()
    # Skip interpreter teardown: everything worth doing is done, and with a thousand
    # sites the teardown would dominate the time to exit.
    os._exit(0)


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import summarize_site
    settings = _load_settings_or_exit()
    for site in settings.sites:
        print(summarize_site(site, settings.instance_id))
    enabled = sum(1 for s in settings.sites if s.enabled)
    print(f"OK: {settings.sites_file}: {len(settings.sites)} sites ({enabled} enabled), "
          f"instance ID {settings.instance_id}")
    return 0


def _default_status_url() -> str:
    listen = os.environ.get("EXPORTER_LISTEN", "0.0.0.0:8000")
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port or 8000}"


def format_status_table(report: dict[str, Any]) -> str:
    """The verbose health report as a ``supervisorctl status``-like table."""
    conns = report.get("connections", {})
    lines = [f"{report.get('status', '?').upper()}  instance {report['service']['instance_id']}"
             f"  {conns.get('healthy', 0)}/{conns.get('enabled', 0)} enabled sites connected"]
    columns = ("SITE", "STATE", "CLIENT ID", "BROKER", "RECONNECTS", "COOLDOWN", "MESSAGES",
               "LAST DISCONNECT")
    rows = [columns]
    for site in report.get("sites", []):
        cooldown = site.get("cooldown_remaining_s") or 0
        rows.append((site["name"], site["state"], site["client_id"], site["broker"],
                     str(site.get("reconnects", 0)), f"{cooldown:.0f}s" if cooldown else "-",
                     str(site.get("messages_received", 0)),
                     site.get("last_disconnect_reason") or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from urllib.error import HTTPError, URLError
    from urllib.request import urlopen
    url = args.url.rstrip("/") + "/health?verbose=true"
    try:
        with urlopen(url, timeout=args.timeout) as resp:
            body = resp.read()
    except HTTPError as exc:  # 503 still carries the report
        body = exc.read()
    except (URLError, OSError) as exc:
        print(f"{PROG}: cannot reach {url}: {exc}", file=sys.stderr)
        return 3
    try:
        report = json.loads(body)
        table = format_status_table(report)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"{PROG}: {url} did not answer with a health report: {exc}", file=sys.stderr)
        return 3
    print(table)
    return 0 if report.get("status") == "healthy" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Keep one MQTT connection per site and expose it to Prometheus. "
        "Configured by MQTT_* environment variables and the sites file (see README).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,check-config,status}")
    sub.add_parser("run", help="run the service (default)",
                   description="Run the service until SIGTERM or SIGINT.")
    sub.add_parser("check-config", help="validate the configuration and print the sites",
                   description="Validate environment and sites file; exit 2 on any error.")
    status = sub.add_parser("status", help="print the verbose health of a running exporter",
                            description="Print /health?verbose=true of a running exporter as "
                            "a table. Exit 0 healthy, 1 degraded or critical, 3 unreachable.")
    status.add_argument("--url", default=_default_status_url(),
                        help="base URL of the exporter (default: from EXPORTER_LISTEN, %(default)s)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return parser


COMMANDS: dict[str | None, Callable[[argparse.Namespace], int]] = {
    None: cmd_run, "run": cmd_run, "check-config": cmd_check_config, "status": cmd_status}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
