"""Command line: ``run`` (default), ``check-config``, ``status``.

Kept import-light: gevent's monkey patching must happen before paho and the HTTP
server are imported, so ``run`` patches first and imports the service afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .config import Settings

PROG = "mqtt-site-exporter"
EXIT_CONFIG = 2


def _config_error_exit(errors: Sequence[str]) -> NoReturn:
    print(f"{PROG}: invalid configuration ({len(errors)} problem(s)):", file=sys.stderr)
    for line in errors:
        print(f"  - {line}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


def flag_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The configuration flags given on the command line, by environment variable name."""
    from .config.environment import ENV_VARS
    return {var.name: getattr(args, var.name) for var in ENV_VARS
            if var.flag is not None and hasattr(args, var.name)}


def _load_settings_or_exit(args: argparse.Namespace, fetch: bool = True) -> Settings:
    from .config import ConfigError, load_settings
    try:
        return load_settings(overrides=flag_overrides(args), fetch=fetch)
    except ConfigError as exc:
        _config_error_exit(exc.errors)


#: Signals that stop the service cleanly (farewell, shutdown record, exit 0).
SHUTDOWN_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT")


def _web_config_kwargs(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(make_server kwargs, make_app kwargs) for the web config (EXPORTER_WEB_CONFIG_FILE,
    --web.config.file; read and validated with the settings): TLS and basic auth. Exits 2
    naming the file when its TLS material cannot be loaded any more."""
    config = settings.web_config
    if config is None:
        return {}, {}
    try:
        return {"ssl_context": config.ssl_context()}, {"authorize": config.authorize}
    except (OSError, ValueError) as exc:
        _config_error_exit([f"web config: {settings.web_config_file}: {exc}"])


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
    running: list[Any] = []  # the Service, once built (for the SIGUSR1 dump)

    def on_stop(signum: int) -> None:
        if signal_at:
            log.warning("Second %s during shutdown: exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        signal_at.append(time.monotonic())
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop_requested.set()  # type: ignore[no-untyped-call]

    def on_hup(signum: int) -> None:
        if not running:
            log.warning("SIGHUP received during start-up: the sites are being loaded; ignored")
            return
        log.info("SIGHUP received: reloading the sites from %s", running[1].service.settings
                 .sites_origin)
        gevent.spawn(running[1].reload, True)  # type: ignore[no-untyped-call]

    def on_usr1(signum: int) -> None:
        from .logs import dump_state
        states = running[0].site_states if running else []
        from .http import yield_to_loop
        dump_state(states, log, pause=yield_to_loop)

    def on_usr2(signum: int) -> None:
        log.warning("SIGUSR2 received: not used by this exporter; ignored")

    # First thing: a SIGTERM during start-up must still mean a clean exit, and no signal an
    # operator commonly sends may kill the process by its default action.
    handlers: list[tuple[str, Callable[[int], None]]] = [
        *((name, on_stop) for name in SHUTDOWN_SIGNALS),
        ("SIGHUP", on_hup), ("SIGUSR1", on_usr1), ("SIGUSR2", on_usr2)]
    for name, handler in handlers:
        signum = getattr(signal, name)
        gevent.signal_handler(signum, handler, signum)  # type: ignore[no-untyped-call]

    # A sites URL is fetched below: an endpoint that is down delays the sites, not the start.
    settings = _load_settings_or_exit(args, fetch=False)
    from .config.environment import ensure_state_dir, source
    problem = ensure_state_dir(settings.state_dir)
    if problem is not None:
        _config_error_exit([f"{source('MQTT_STATE_DIR', flag_overrides(args))}: {problem}"])
    server_kw, app_kw = _web_config_kwargs(settings)
    from .http import make_app, make_server
    from .logs import configure_logging
    from .metrics import process_registry
    from .reload import Reloader
    from .supervisor import Service

    configure_logging(settings.log_level, settings.log_format)
    from .config.shard import instance_id_warning
    if (warning := instance_id_warning(settings.instance_id)) is not None:
        log.warning("%s", warning)
    service = Service(settings)
    reloader = Reloader(service, service.clock,
                        offload=gevent.get_hub().threadpool.apply)  # type: ignore[no-untyped-call]
    running.extend((service, reloader))
    from .supervisor import reserved_descriptors
    server = make_server(settings.listen_host, settings.listen_port,
                         make_app(service, process_registry(), **app_kw,
                                  site_connect_histogram=settings.site_connect_histogram),
                         **server_kw,
                         max_connections=settings.http_max_connections,
                         timeout=settings.http_timeout_seconds,
                         reserved_fds=reserved_descriptors(len(settings.sites)))

    def resize_reserve(applied: Settings) -> None:
        server.reserved_fds = reserved_descriptors(len(applied.sites))

    reloader.applied = resize_reserve
    try:
        server.start()  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.error("Cannot listen on %s:%d: %s", settings.listen_host, settings.listen_port, exc)
        return 1
    if not settings.sites_loaded:  # MQTT_SITES_URL: its first answer (HTTP is up meanwhile)
        reloader.reload(force=True)
    shard = f", shard {settings.shard}" if settings.shard is not None else ""
    log.info("mqtt-site-exporter %s (instance %s%s): %d sites from %s, listening on %s:%d",
             __version__, settings.instance_id, shard, len(service.connections),
             settings.sites_origin, settings.listen_host, settings.listen_port)
    if not stop_requested.is_set():  # type: ignore[no-untyped-call]
        service.start()
        if settings.sites_reload_seconds > 0:
            poller = gevent.spawn(reloader.run,  # type: ignore[no-untyped-call]
                                  settings.sites_reload_seconds, gevent.sleep)
        stop_requested.wait()  # type: ignore[no-untyped-call]
        if settings.sites_reload_seconds > 0:
            poller.kill(block=False)
    service.shutdown(signal_at[0])
    server.stop(timeout=0)  # type: ignore[no-untyped-call]
    logging.shutdown()
    # Skip interpreter teardown: everything worth doing is done, and with a thousand
    # sites the teardown would dominate the time to exit.
    os._exit(0)


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import summarize_site
    from .config.shard import instance_id_warning
    settings = _load_settings_or_exit(args)
    for site in settings.sites:
        print(summarize_site(site, settings.instance_id))
    warnings = [w for site in settings.sites for w in site.warnings]  # deprecated, insecure TLS
    warnings += filter(None, [instance_id_warning(settings.instance_id)])
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if args.spread:
        _print_spread(args, settings, args.spread)
    enabled = sum(1 for s in settings.sites if s.enabled)
    listen = (f"[{settings.listen_host}]" if ":" in settings.listen_host
              else settings.listen_host) + f":{settings.listen_port}"
    web = settings.web_config_file or "-"
    held = (f"shard {settings.shard}: {len(settings.sites)} of {settings.sites_total} sites"
            if settings.shard is not None else f"{len(settings.sites)} sites")
    print(f"OK: {settings.sites_origin}: {held} ({enabled} enabled), "
          f"instance ID {settings.instance_id}; listen {listen}, web config {web}, "
          f"log {settings.log_level} {settings.log_format}, state dir {settings.state_dir}")
    return 0


def _print_spread(args: argparse.Namespace, settings: Settings, count: int) -> None:
    """``check-config --spread N``: the sites each of N shards would hold and, when sharded
    now, how many sites going from the current shard count to N moves."""
    from .config import load_settings
    from .config.shard import owner, spread
    unsharded = {**flag_overrides(args), "MQTT_SHARD": "", "MQTT_SHARDS": "0"}
    names = [site.name for site in load_settings(overrides=unsharded).sites]
    for index, held in enumerate(spread(names, count)):
        print(f"spread: shard {index}/{count}: {held} sites")
    current = settings.shard.count if settings.shard is not None else 1
    moved = sum(1 for name in names if owner(name, current) != owner(name, count))
    share = f" ({100 * moved / len(names):.1f} %)" if names else ""
    print(f"spread: {current} -> {count} shards moves {moved} of {len(names)} sites{share}")


def _shard_count(value: str) -> int:
    from .config.shard import MAX_SHARDS
    if not value.isdigit() or not 1 <= int(value) <= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"must be a number of shards 1..{MAX_SHARDS}")
    return int(value)


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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The exporter-style flags (``--log.level``...), one per variable that declares one; each
    overrides its environment variable. Unset flags leave no attribute (SUPPRESS), so a flag
    given before the subcommand survives the subcommand's parser."""
    from .config.environment import ENV_VARS
    group = parser.add_argument_group(
        "configuration flags", "each overrides its environment variable (docs/configuration.md)")
    for var in ENV_VARS:
        if var.flag is not None:
            group.add_argument(var.flag, dest=var.name, default=argparse.SUPPRESS,
                               metavar=var.flag.lstrip("-").rsplit(".", 1)[-1]
                               .replace("-", "_").upper(),
                               help=f"overrides {var.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Keep one MQTT connection per site and expose it to Prometheus. "
        "Configured by MQTT_* environment variables (or the flags below) and the sites file "
        "(see README).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_config_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="{run,check-config,status}")
    run = sub.add_parser(
        "run", help="run the service (default)",
        description="Run the service until SIGTERM, SIGINT or SIGQUIT (each a clean shutdown). "
        "SIGHUP: reload the sites file (or MQTT_SITES_URL) now; a change is also picked up "
        "every MQTT_SITES_RELOAD_SECONDS. "
        "SIGUSR1: write every site's state and every greenlet's stack to the log.")
    add_config_flags(run)
    check = sub.add_parser("check-config", help="validate the configuration and print the sites",
                           description="Validate environment, flags and sites file; exit 2 on "
                           "any error. With a shard (--shard i/N, MQTT_SHARD or MQTT_SHARDS) it "
                           "prints only that shard's sites.")
    add_config_flags(check)
    check.add_argument("--spread", type=_shard_count, default=0, metavar="N",
                       help="also print how many sites each of N shards would hold, and how "
                       "many would move from the current number of shards to N")
    status = sub.add_parser("status", help="print the verbose health of a running exporter",
                            description="Print /health?verbose=true of a running exporter as "
                            "a table. Exit 0 healthy, 1 degraded or critical, 3 unreachable.")
    status.add_argument("--url", default=_default_status_url(),
                        help="base URL of the exporter (default: from EXPORTER_LISTEN, %(default)s)")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return parser


COMMANDS: dict[str | None, Callable[[argparse.Namespace], int]] = {
    None: cmd_run, "run": cmd_run, "check-config": cmd_check_config, "status": cmd_status}


def _is_run(argv: Sequence[str]) -> bool:
    return not any(word in ("check-config", "status") for word in argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _is_run(argv):
        # Building the parser imports the configuration module (the flags are declared
        # there), which imports ssl and socket: patch before, as run needs.
        from gevent import monkey
        monkey.patch_all()  # type: ignore[no-untyped-call]
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
