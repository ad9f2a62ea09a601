"""The service: one :class:`~exporter.connection.SiteConnection` per site, started together
and stopped together, in parallel, within one deadline.
"""
from __future__ import annotations

import gc
import logging
import os
import random
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gevent
from gevent.lock import BoundedSemaphore

from .bridge import BridgeStore
from .bridge import build as build_bridges
from .brokers import BrokerView
from .connection import Drains, SiteConnection
from .gcpause import collector_paused
from .presence import Identity
from .reload import ConfigStatus
from .state import Clock, ShutdownHistory, SiteState, SystemClock

if TYPE_CHECKING:
    from .bridge import SiteBridge
    from .config import Settings, SiteConfig

log = logging.getLogger(__name__)

#: Descriptors kept free beyond one per site and the HTTP connections: logs, the state file,
#: the listener, DNS lookups, a presence tombstone's extra connection.
FD_HEADROOM = 256
#: A reload that builds many connections lets the hub run after this many.
YIELD_EVERY = 32
#: Descriptors the HTTP server leaves to the rest of the process beyond one per site (the
#: descriptor budget's reserve; the HTTP cap comes out of FD_HEADROOM's remainder).
FD_RESERVE = 64
#: Attempts of one broker endpoint between TCP connect and CONNACK at once. Without a bound,
#: at 10 000 sites every greenlet opens its socket and writes CONNECT before the hub reads
#: the first CONNACK (measured: first site connected 8.6 s after the start, the listen
#: queue overflowing); with it, sites connect from the first 0.4 s on, in a steady stream.
CONNECTS_IN_FLIGHT = 64
#: From this many sites on, :meth:`Service.start` moves every object that exists then out of
#: the garbage collector's generations (``gc.freeze``): a process-wide step, for the service
#: process, not for the small services the tests build in theirs.
FREEZE_GC_SITES = 1000


@dataclass(frozen=True)
class SiteChanges:
    """What a reload did, by site name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (f"{len(self.added)} added, {len(self.removed)} removed, "
                f"{len(self.changed)} changed")

    def names(self, limit: int = 20) -> str:
        """The sites by kind for a log line, at most ``limit`` names in all: ``" (added: a, b;
        removed: c ...)"``; empty when nothing changed."""
        parts, left = [], limit
        for kind, names in (("added", self.added), ("removed", self.removed),
                            ("changed", self.changed)):
            if names:
                shown = ", ".join(names[:max(left, 0)])
                more = f" and {len(names) - max(left, 0)} more" if len(names) > left else ""
                parts.append(f"{kind}: {shown}{more}" if shown else f"{kind}: {len(names)} sites")
                left -= len(names)
        return f" ({'; '.join(parts)})" if parts else ""


@dataclass(frozen=True)
class ShutdownResult:
    duration: float
    timed_out: bool
    closed_cleanly: int
    closed_abruptly: int


def open_descriptors() -> int:
    """Descriptors this process has open now (Linux: /proc/self/fd; elsewhere a guess)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 32


def reserved_descriptors(sites: int) -> int:
    """Descriptors HTTP must leave to everything else: those open now (stdio, logs, the
    hub), one per site (its broker socket; an attempt's socket is closed before the next
    starts) and :data:`FD_RESERVE`. HTTP gets the soft RLIMIT_NOFILE minus this."""
    return open_descriptors() + sites + FD_RESERVE


def raise_fd_limit(needed: int, http_connections: int = 0) -> None:
    """Lift the soft RLIMIT_NOFILE towards the hard limit when many sites (``needed``
    sockets) and ``http_connections`` HTTP connections need descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + http_connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("Only %d file descriptors allowed for %d sites and %d HTTP connections",
                        new, needed, http_connections)


class Service:
    """Owns the site connections. Metrics, health and the HTTP app read it through
    :class:`exporter.state.ServiceView`, which it satisfies."""

    @collector_paused
    def __init__(self, settings: Settings, clock: Clock | None = None,
                 rng: random.Random | None = None, identity: Identity | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        #: This process in presence records: a new boot ID at every start.
        self.identity = identity or Identity.new(settings.instance_id, self.clock.time())
        # One store for every bridged site (None when no site has `bridge:`); a site without
        # `bridge:` gets bridge=None.
        self.bridge_store: BridgeStore | None
        self.bridge_store, bridges = build_bridges(settings, self.clock)
        #: Backoff jitter for every site (one generator: seeding one costs 11 us a site).
        self._rng = rng or random.Random()
        # One view per broker endpoint (host:port), shared by its sites: what tells a broker
        # event (several sites lose their connections at once) from a takeover.
        self._views: dict[str, BrokerView] = {}
        #: Per endpoint, like the views: its attempts in flight (CONNECTS_IN_FLIGHT).
        self._connect_slots: dict[str, BoundedSemaphore] = {}
        self.connections = []
        for site in settings.sites:
            self.connections.append(self._connection(site, bridges.get(site.name)))
        #: The broker endpoints with at least one enabled site, in the order of the sites
        #: file (an endpoint of disabled sites only has no connection to watch).
        self.brokers: list[BrokerView] = [v for v in self._views.values() if v.sites]
        self.shutdown_history = ShutdownHistory.load(settings.state_dir)
        #: The configuration's reload history (read by metrics and health).
        self.config_status = ConfigStatus(loaded=settings.sites_loaded, at=self.clock.time(),
                                          sites_total=settings.sites_total,
                                          shard=settings.shard)
        self.running = False

    def _connection(self, site: SiteConfig, bridge: SiteBridge | None) -> SiteConnection:
        view = self._views.get(site.broker)
        if view is None:
            view = self._views[site.broker] = BrokerView(
                site.broker, self.settings.broker_event_window_seconds, self.clock)
            self._connect_slots[site.broker] = BoundedSemaphore(  # type: ignore[no-untyped-call]
                CONNECTS_IN_FLIGHT)
        conn = SiteConnection(site, self.settings, self.clock, self._rng, bridge=bridge,
                              identity=self.identity, broker=view,
                              connect_slots=self._connect_slots[site.broker])
        view.add_site(conn.state)
        return conn

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id

    @property
    def site_states(self) -> list[SiteState]:
        return [conn.state for conn in self.connections]

    def start(self) -> None:
        raise_fd_limit(len(self.connections), self.settings.http_max_connections)
        if len(self.connections) >= FREEZE_GC_SITES:
            # What the service holds lives as long as the process: out of the collector's
            # sight, every full collection skips it (at 10 000 sites about 640 000 objects,
            # 0.3 s per collection, a quarter of the CPU of connecting every site).
            gc.freeze()
        for conn in self.connections:
            conn.start()
        self.running = True

    def apply(self, settings: Settings) -> SiteChanges:
        """Run ``settings`` (a reload: same environment, new sites) without a restart.

        Removed sites say goodbye (offline, DISCONNECT) and go; changed sites do the same and
        then connect with their new configuration; added sites connect; untouched sites keep
        their broker connection. Goodbyes run in parallel, bounded by the shutdown timeout.
        """
        new_sites = {site.name: site for site in settings.sites}
        old = {conn.site.name: conn for conn in self.connections}
        changes = SiteChanges(
            added=tuple(n for n in new_sites if n not in old),
            removed=tuple(n for n in old if n not in new_sites),
            changed=tuple(n for n, c in old.items() if n in new_sites and new_sites[n] != c.site),
        )
        self.settings = settings
        leaving = [old[name] for name in changes.removed + changes.changed]
        for conn in leaving:
            conn.stop()
        # Drop them from what metrics and health read at once; then say goodbye.
        gone = {id(conn) for conn in leaving}
        self.connections = [c for c in self.connections if id(c) not in gone]
        by_view: dict[int, tuple[BrokerView, list[SiteState]]] = {}
        for conn in leaving:
            if conn.broker is not None:
                by_view.setdefault(id(conn.broker), (conn.broker, []))[1].append(conn.state)
        for view, states in by_view.values():
            view.remove_sites(states)
        if self.bridge_store is not None:
            self.bridge_store.drop_sites(conn.site.name for conn in leaving)
        if leaving:
            self._goodbye(leaving, self.clock.monotonic() + self.settings.shutdown_timeout)
        staying = {c.site.name: c for c in self.connections}
        if self.running:
            raise_fd_limit(len(settings.sites), settings.http_max_connections)
        connections: list[SiteConnection] = []
        built = 0
        for site in settings.sites:
            kept = staying.get(site.name)
            if kept is None:
                kept = self._connection(site, self._bridge_for(site))
                if self.running:
                    kept.start()
                built += 1
                if built % YIELD_EVERY == 0:
                    # A timer, not sleep(0), which runs only greenlets already made ready:
                    # the hub polls sockets and runs timers (exporter.http.yield_to_loop).
                    gevent.sleep(0.000_001)  # type: ignore[no-untyped-call]
            connections.append(kept)
        self.connections = connections
        self.brokers = [v for v in self._views.values() if v.sites]
        return changes

    def _bridge_for(self, site: SiteConfig) -> SiteBridge | None:
        if site.bridge is None:
            return None
        if self.bridge_store is None:
            self.bridge_store = BridgeStore(self.clock, self.settings.bridge_max_series)
        return self.bridge_store.site(site.name, site.bridge, site.status_topic)

    def _goodbye(self, leaving: list[SiteConnection], deadline: float) -> tuple[int, int]:
        """The farewell of every stopped connection in ``leaving`` at once, then wait until
        the broker closed each or ``deadline`` (monotonic). Returns (connections said goodbye
        to, those closed without the broker's confirmation)."""
        drains = Drains([s for s in (c.send_farewell() for c in leaving) if s is not None])
        # Sites an identified duplicate holds: our tombstone must reach it another way.
        tombstones = [gevent.spawn(c.send_tombstone_elsewhere,  # type: ignore[no-untyped-call]
                                   deadline)
                      for c in leaving if c.needs_tombstone_elsewhere()]
        drains.wait(max(0.0, deadline - self.clock.monotonic()))
        gevent.joinall(tombstones,  # type: ignore[no-untyped-call]
                       timeout=max(0.0, deadline - self.clock.monotonic()))
        pending = [t for t in tombstones if not t.dead]
        # In-process their sockets close now; the CLI exits right after anyway.
        abandoned = drains.abandon() + len(pending)
        gevent.killall(pending, block=False)  # type: ignore[no-untyped-call]
        return drains.total + len(tombstones), abandoned

    # A full collection triggered meanwhile costs 20-150 ms and frees nothing.
    @collector_paused
    def _stop_all(self, deadline: float) -> tuple[int, int]:
        """Stop every connection and say goodbye on all; (goodbyes, abandoned)."""
        for conn in self.connections:
            conn.stop()
        return self._goodbye(self.connections, deadline)

    def shutdown(self, started_at: float | None = None) -> ShutdownResult:
        """Close every connection at once, bounded by ``settings.shutdown_timeout``.

        ``started_at`` (monotonic) is when the stop was requested, e.g. the signal's
        arrival; the deadline and the recorded duration count from it.
        """
        clock = self.clock
        started_at = clock.monotonic() if started_at is None else started_at
        deadline = started_at + self.settings.shutdown_timeout
        self.running = False
        total, abandoned = self._stop_all(deadline)
        duration = clock.monotonic() - started_at
        timed_out = bool(abandoned)
        result = ShutdownResult(duration, timed_out, total - abandoned, abandoned)
        if timed_out:
            log.warning("Shutdown hit the %.1f s timeout: %d of %d connections closed without "
                        "the broker's confirmation", self.settings.shutdown_timeout,
                        result.closed_abruptly, total)
        log.info("All connections disconnected in %.2f s", duration)
        try:
            self.shutdown_history.record(duration, timed_out)
        except OSError as exc:
            log.error("Cannot record the shutdown duration in %s: %s",
                      self.settings.state_dir, exc)
        return result
