"""Runtime state that connections write and that metrics and health only read.

Also holds the clock (injected everywhere so tests control time) and the shutdown
history, the one piece of state that must survive a restart.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from time import monotonic as _monotonic
from time import time as _wall_time
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .bridge import BridgeStore
    from .brokers import BrokerView
    from .reload import ConfigStatus

log = logging.getLogger(__name__)

#: Site states, in the order they are exposed by ``mqtt_site_state``.
CONNECTING, CONNECTED, BACKOFF, COOLDOWN, DISABLED, STOPPING = (
    "connecting", "connected", "backoff", "cooldown", "disabled", "stopping")
SITE_STATES = (CONNECTING, CONNECTED, BACKOFF, COOLDOWN, DISABLED, STOPPING)

#: Why a connection ended (or an attempt failed); every one is exported from 0.
TAKEOVER, CONNECTION_LOST, KEEPALIVE_TIMEOUT, REFUSED, NORMAL = (
    "takeover", "connection_lost", "keepalive_timeout", "refused", "normal")
DISCONNECT_REASONS = (TAKEOVER, CONNECTION_LOST, KEEPALIVE_TIMEOUT, REFUSED, NORMAL)

CONNECT_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SHUTDOWN_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class Clock(Protocol):
    """What the service needs of a clock (:class:`SystemClock`, a fake in tests)."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """Wall time for timestamps, monotonic time for durations."""

    time = staticmethod(_wall_time)
    monotonic = staticmethod(_monotonic)


class HistogramData:
    """Plain bucket counts (non-cumulative, last slot is +Inf) with sum and count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Iterable[float], counts: Iterable[int] | None = None,
                 total: float = 0.0, count: int = 0) -> None:
        self.bounds = tuple(bounds)
        self.counts: list[int] = list(counts) if counts else [0] * (len(self.bounds) + 1)
        self.sum = float(total)
        self.count = int(count)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative_count), ...]`` ending with ``+Inf``, as exposition wants."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class ConnectDurations(HistogramData):
    """One site's connect durations (attempt start to CONNACK): its own buckets, the
    last duration, and the histogram of its broker endpoint (``shared``, linked by
    :meth:`exporter.brokers.BrokerView.add_site`), which every observation also counts in."""

    __slots__ = ("last", "shared")

    def __init__(self) -> None:
        super().__init__(CONNECT_DURATION_BUCKETS)
        self.last: float | None = None
        self.shared: HistogramData | None = None

    def observe(self, value: float) -> None:
        super().observe(value)
        self.last = value
        if self.shared is not None:
            self.shared.observe(value)


@dataclass
class Duplicate:
    """Another process that uses this site's client ID (one episode, see exporter/presence.py).

    ``peer`` is its presence record (client_id, instance_id, boot_id, host, pid, version,
    started_at, ...), or None for an unknown peer: a client that publishes no presence record
    (the old service, a ``mosquitto_sub -i``), inferred from takeover evidence.
    """

    peer: dict[str, Any] | None
    first_seen: float        # wall clock
    last_seen: float         # wall clock

    def report(self) -> dict[str, Any]:
        """What verbose /health shows."""
        base = dict(self.peer) if self.peer is not None else {"peer": "unknown"}
        return {**base, "first_seen": self.first_seen, "last_seen": self.last_seen}


@dataclass
class SiteState:
    """What one site's connection reports about itself. Written only by its connection."""

    name: str
    client_id: str
    broker: str
    protocol: str
    enabled: bool
    state: str = CONNECTING
    connected_since: float | None = None          # wall clock, while connected
    connected_at_monotonic: float | None = None
    last_disconnect_reason: str | None = None
    last_disconnect_at: float | None = None
    #: Why the last attempt or connection failed: short, sanitised, never a secret
    #: ("tls: unknown CA", "refused: not authorised", "connection refused", ...).
    last_error: str | None = None
    last_error_at: float | None = None             # wall clock
    connects: int = 0
    disconnects: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISCONNECT_REASONS, 0))
    reconnect_attempts: int = 0
    cooldowns: int = 0
    cooldown_until_monotonic: float | None = None
    subscriptions_refused: int = 0                 # SUBACK failure codes seen (all time)
    refused_now: int = 0                           # ... on the current connection
    internal_errors: int = 0                       # exceptions caught in our own code (bugs)
    duplicate: Duplicate | None = None             # another process using our client ID
    duplicate_detections: int = 0                  # duplicate episodes started
    messages_received: int = 0
    last_message_at: float | None = None
    connect_duration: ConnectDurations = field(default_factory=ConnectDurations)

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    def cooldown_remaining(self, now_monotonic: float) -> float:
        if self.state != COOLDOWN or self.cooldown_until_monotonic is None:
            return 0.0
        return max(0.0, self.cooldown_until_monotonic - now_monotonic)


class ShutdownHistory:
    """Shutdown durations of every earlier run, persisted atomically in the state dir.

    A process cannot be scraped after it exits, so each shutdown is recorded here and
    re-exposed by the next run: the histogram's ``_count`` grows by one per restart.
    """

    FILENAME = "shutdown-history.json"

    def __init__(self, path: str, histogram: HistogramData | None = None,
                 last_timed_out: bool = False, last_duration: float | None = None) -> None:
        self.path = path
        self.histogram = histogram or HistogramData(SHUTDOWN_DURATION_BUCKETS)
        self.last_timed_out = last_timed_out
        self.last_duration = last_duration

    @classmethod
    def load(cls, state_dir: str) -> ShutdownHistory:
        path = os.path.join(state_dir, cls.FILENAME)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            counts, total, count = data["counts"], data["sum"], data["count"]
            if tuple(data["bounds"]) != SHUTDOWN_DURATION_BUCKETS:
                raise ValueError("bucket bounds changed")
            if (len(counts) != len(SHUTDOWN_DURATION_BUCKETS) + 1
                    or not all(type(n) is int and n >= 0 for n in counts)
                    or type(count) is not int or sum(counts) != count
                    or not isinstance(total, (int, float)) or isinstance(total, bool)):
                raise ValueError("inconsistent counts")
            hist = HistogramData(SHUTDOWN_DURATION_BUCKETS, counts, total, count)
            return cls(path, hist, data["last_timed_out"] is True, data.get("last_duration_seconds"))
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Ignoring unreadable shutdown history %s: %s", path, exc)
            return cls(path)

    def record(self, duration: float, timed_out: bool) -> None:
        """Add one shutdown and write the file atomically (temp file, fsync, rename)."""
        self.histogram.observe(duration)
        self.last_timed_out = timed_out
        self.last_duration = duration
        data = {"bounds": list(SHUTDOWN_DURATION_BUCKETS), "counts": self.histogram.counts,
                "sum": self.histogram.sum, "count": self.histogram.count,
                "last_timed_out": timed_out, "last_duration_seconds": duration,
                "recorded_at": _wall_time()}
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".shutdown-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


class ServiceView(Protocol):
    """What ``/metrics``, ``/health`` and the HTTP app read from the service, and all they
    read: :class:`exporter.supervisor.Service` satisfies it, and so does any stand-in with
    these attributes (tests, benchmarks). Read-only: nothing here is written by a reader."""

    @property
    def clock(self) -> Clock: ...

    @property
    def site_states(self) -> Sequence[SiteState]: ...

    @property
    def shutdown_history(self) -> ShutdownHistory: ...

    @property
    def instance_id(self) -> str: ...

    @property
    def running(self) -> bool: ...

    @property
    def bridge_store(self) -> BridgeStore | None:
        """The bridged series of every site with ``bridge:``; None when no site has one."""
        ...

    @property
    def config_status(self) -> ConfigStatus:
        """The sites document: last load and reload, shard (exporter/reload.py)."""
        ...

    @property
    def brokers(self) -> Sequence[BrokerView]:
        """One view per broker endpoint with at least one enabled site (exporter/brokers.py)."""
        ...
