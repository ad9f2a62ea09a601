"""Logging set-up: plain text or one JSON object per line (LOG_FORMAT=json); the SIGUSR1
dump (every site's state, every greenlet's stack) as log records."""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .state import SiteState

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and site when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        site = getattr(record, "site", None)
        if site is not None:
            entry["site"] = site
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class SiteTextFormatter(logging.Formatter):
    """Text lines, with ``[site]`` after the logger name when the record has a site."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        site = getattr(record, "site", None)
        if site is not None:
            line = line.replace(f"{record.name}: ", f"{record.name} [{site}]: ", 1)
        return line


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    # No thread name in our records: under gevent, asking for it makes a _DummyThread (with
    # its locks) for every greenlet that logs, kept as long as the greenlet lives: one per
    # site (10 000 objects at 10 000 sites; measured: 5 MB of RSS).
    logging.logThreads = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else SiteTextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("paho").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- SIGUSR1 dump


def _ago(wall: float | None, now: float) -> str:
    if wall is None:
        return "-"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
    return f"{stamp} ({max(0.0, now - wall):.0f}s ago)"


def site_line(state: SiteState, now_wall: float, now_monotonic: float) -> str:
    """One site in the SIGUSR1 dump: state, connected since, last disconnect, cooldown left,
    duplicate (what ``status`` shows, as one line)."""
    last = "-"
    if state.last_disconnect_reason is not None:
        last = f"{state.last_disconnect_reason} at {_ago(state.last_disconnect_at, now_wall)}"
    dup = "-"
    if state.duplicate is not None:
        peer = state.duplicate.peer
        dup = ("unknown peer" if peer is None else
               f"instance {peer.get('instance_id', '?')} host {peer.get('host', '?')} "
               f"pid {peer.get('pid', '?')}")
    return (f"Site state: state={state.state} enabled={str(state.enabled).lower()} "
            f"client_id={state.client_id} broker={state.broker} "
            f"connected_since={_ago(state.connected_since, now_wall)} "
            f"last_disconnect={last} reconnects={state.reconnect_attempts} "
            f"cooldown_left={state.cooldown_remaining(now_monotonic):.0f}s duplicate={dup}")


def greenlet_stacks() -> list[tuple[int, str, str]]:
    """Every live greenlet's stack, grouped: (how many, example name, formatted stack), the
    largest group first. A thousand site greenlets waiting on their sockets share one stack:
    stacks are grouped by their (code, line) chain and only one per group is formatted, so
    the dump stays short and fast (greenlets found with ``gc``, as gevent.util does)."""
    import gc
    import sys
    import traceback
    from types import FrameType

    from greenlet import getcurrent, greenlet  # type: ignore[import-untyped]

    current = getcurrent()
    groups: dict[tuple[tuple[object, int | None], ...], tuple[FrameType, list[str]]] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, greenlet) or obj.dead:
            continue
        frame: FrameType | None = sys._getframe(1) if obj is current else obj.gr_frame
        if frame is None:  # not started, or only compiled code on its stack
            continue
        key = []
        walk: FrameType | None = frame
        while walk is not None:
            key.append((walk.f_code, walk.f_lineno))
            walk = walk.f_back
        name = str(getattr(obj, "name", None) or type(obj).__name__)
        groups.setdefault(tuple(key), (frame, []))[1].append(name)
    ordered = sorted(groups.values(), key=lambda group: -len(group[1]))
    return [(len(names), names[0], "".join(traceback.format_stack(frame)))
            for frame, names in ordered]


def dump_state(states: Sequence[SiteState], log: logging.Logger,
               pause: Callable[[], object] | None = None, chunk: int = 200) -> None:
    """SIGUSR1: one record per site (with the site name), then the greenlet stacks.

    Logged at INFO, or WARNING when INFO is filtered out, so an operator always sees it.
    ``pause`` (gevent.sleep(0)) runs every ``chunk`` sites so a dump of a thousand sites does
    not hold the hub.
    """
    level = logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING
    now_wall, now_mono = time.time(), time.monotonic()
    log.log(level, "SIGUSR1 received: dumping the state of %d sites and the greenlet stacks",
            len(states))
    for i, state in enumerate(states, 1):
        log.log(level, "%s", site_line(state, now_wall, now_mono), extra={"site": state.name})
        if pause is not None and i % chunk == 0:
            pause()
    groups = greenlet_stacks()
    for count, name, stack in groups:
        log.log(level, "Greenlet stack (%d greenlet(s), e.g. %s):\n%s", count, name,
                stack.rstrip())
    log.log(level, "SIGUSR1 dump done: %d sites, %d greenlets in %d distinct stacks",
            len(states), sum(c for c, _, _ in groups), len(groups))
