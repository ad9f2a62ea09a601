"""The broker's own view: one :class:`BrokerView` per broker endpoint (``host:port``).

A broker that restarts, crashes or loses its network closes the connections of all its
sites at once; a duplicate client ID kicks one site. On v3.1.1 both reach each site as the
same close (paho's reason 128), so no site can tell them apart alone. The sites of one
endpoint share a :class:`BrokerView` and tell it about their losses
(:meth:`BrokerView.record_loss`); after ``window`` seconds a site asks whether its loss was
part of a broker event (:meth:`BrokerView.is_event`), and if so it is no takeover
(exporter/reconnect.py, ``ConnectionEnd.broker_event``). A site alone on its endpoint
cannot tell: it keeps the evidence rule.

Losses are grouped into **clusters**: a loss within ``window`` of a cluster joins it, so a
cluster is a run of losses each at most ``window`` after the one before (a broker restart
with 10 000 sites whose losses take the hub more than ``window`` to notice is still one
cluster). A cluster with two or more distinct sites is a **broker event**, counted once in
:attr:`BrokerView.connection_losses` when its second site joins.

Pure logic, no I/O, an injected clock (times are monotonic seconds). Every call is O(1):
only the last few clusters are kept (clusters are more than ``window`` apart, so a site
asking ``window`` after its loss finds its cluster among the last three).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .state import CONNECT_DURATION_BUCKETS, CONNECTED, Clock, HistogramData, SiteState, SystemClock

#: Clusters kept; the oldest goes when a new one starts.
MAX_CLUSTERS = 8


class _Cluster:
    """Losses of one endpoint close together in time."""

    __slots__ = ("start", "end", "sites", "counted")

    def __init__(self, site: str, at: float) -> None:
        self.start = self.end = at
        self.sites = {site}
        self.counted = False


class BrokerView:
    """One broker endpoint as its sites see it: who is on it, who is connected, and whether
    their losses come together (a broker event) or alone.

    Shared by the sites of the endpoint (:meth:`add_site` at construction); written by their
    connections (:meth:`record_loss`), read by them (:meth:`is_event`) and by the metrics
    (:attr:`sites`, :attr:`connected`, :attr:`connection_losses`).
    """

    def __init__(self, broker: str, window: float = 1.0, clock: Clock | None = None,
                 states: Iterable[SiteState] = ()) -> None:
        self.broker = broker                      # "host:port", as SiteConfig.broker
        self.window = window                      # seconds: MQTT_BROKER_EVENT_WINDOW_SECONDS
        self.clock: Clock = clock or SystemClock()
        self.states: list[SiteState] = []         # every site of the endpoint, disabled too
        self.sites = 0                            # enabled sites (enabled never changes)
        #: Broker events: clusters of losses of two or more sites (one per event, not per site).
        self.connection_losses = 0
        #: Monotonic time of the first loss of the last broker event, None before the first.
        self.last_event_at: float | None = None
        #: Connect durations of every site of the endpoint (each site's observations count here).
        self.connect_duration = HistogramData(CONNECT_DURATION_BUCKETS)
        self._clusters: deque[_Cluster] = deque(maxlen=MAX_CLUSTERS)
        for state in states:
            self.add_site(state)

    def add_site(self, state: SiteState) -> None:
        """A site of this endpoint (its connection's state, read for :attr:`connected`); its
        connect durations count in :attr:`connect_duration` from now on."""
        self.states.append(state)
        state.connect_duration.shared = self.connect_duration
        if state.enabled:
            self.sites += 1

    def remove_sites(self, states: Iterable[SiteState]) -> None:
        """Sites of this endpoint went away (a reload removed or changed them)."""
        gone = {id(state) for state in states}
        self.states = [st for st in self.states if id(st) not in gone]
        self.sites = sum(1 for st in self.states if st.enabled)

    @property
    def connected(self) -> int:
        """Sites of the endpoint connected now."""
        return sum(1 for st in self.states if st.state == CONNECTED)

    def record_loss(self, site: str, at: float | None = None) -> None:
        """The established connection of ``site`` was closed by the broker side at ``at``
        (monotonic; now when None). Not for refused attempts, keepalive timeouts or our own
        stop."""
        at = self.clock.monotonic() if at is None else at
        cluster = self._cluster_of(at)
        if cluster is None:
            self._clusters.append(_Cluster(site, at))
            return
        cluster.start, cluster.end = min(cluster.start, at), max(cluster.end, at)
        cluster.sites.add(site)
        if not cluster.counted and len(cluster.sites) >= 2 and self.sites >= 2:
            cluster.counted = True
            self.connection_losses += 1
            self.last_event_at = cluster.start

    def is_event(self, at: float | None = None) -> bool:
        """Whether the loss at ``at`` (the caller's own :meth:`record_loss` time; now when
        None) is part of a broker event: two or more distinct sites of this endpoint lost
        their connections within ``window`` of it, or in the cluster it belongs to. Ask
        ``window`` seconds after the loss, so the other sites have had time to report.
        Always False when the endpoint has fewer than two enabled sites."""
        if self.sites < 2:
            return False
        at = self.clock.monotonic() if at is None else at
        window = self.window
        seen: set[str] = set()
        for cluster in reversed(self._clusters):
            if cluster.end + window < at:
                break  # this one and every older one ended more than window before
            if cluster.start - window <= at:
                if len(cluster.sites) >= 2:
                    return True
                seen |= cluster.sites
                if len(seen) >= 2:
                    return True
        return False

    def _cluster_of(self, at: float) -> _Cluster | None:
        """The recent cluster a loss at ``at`` joins (within ``window`` of it), if any."""
        window = self.window
        for cluster in reversed(self._clusters):
            if cluster.end + window < at:
                return None
            if cluster.start - window <= at:
                return cluster
        return None

    def __repr__(self) -> str:
        return (f"<BrokerView {self.broker} sites={self.sites} connected={self.connected} "
                f"events={self.connection_losses}>")
