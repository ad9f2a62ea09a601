"""Prometheus exposition of the service's state, built fresh at every scrape.

Every family the service exports is one entry of :data:`FAMILIES`: its name, type, HELP,
labels and how its value is read from a :class:`~exporter.state.SiteState` (per-site
families, :class:`SiteFamily`), from a :class:`~exporter.brokers.BrokerView` (per broker
endpoint, :class:`BrokerFamily`) or from the service (process-wide families,
:class:`ServiceFamily`). The rest derives from that table:

- :func:`render_service_text`, the text ``/metrics`` serves (:func:`make_metrics_app`),
  written straight from the states because a scrape blocks every connection while it runs;
- :class:`ServiceCollector` and :func:`build_registry`, the same families as
  prometheus_client collectors (``get_sample_value`` in tests, embedding in other apps); a
  test keeps the two byte-identical;
- ``docs/metrics.md`` (``python -m exporter.metrics --write docs/metrics.md``).

Adding a metric is one entry in :data:`FAMILIES` (then regenerate the doc). State is only
read here, never written, so there is no second copy of it to keep in sync, and no global
registry.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric

from . import __version__
from .bridge import BridgeCollector
from .brokers import BrokerView
from .state import CONNECTED, COOLDOWN, DISCONNECT_REASONS, SITE_STATES, HistogramData, ServiceView, SiteState
from .textformat import escape_help, escape_label_value, format_value

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

GAUGE, COUNTER, INFO, HISTOGRAM = "gauge", "counter", "info", "histogram"
TYPES = (GAUGE, COUNTER, INFO, HISTOGRAM)
#: Prefixes of the families in :data:`FAMILIES` (``mqtt_bridge_*`` belongs to the bridge).
PREFIXES = ("mqtt_site_", "mqtt_exporter_", "mqtt_broker_")
#: The prefix of the per-broker families, and only of them.
BROKER_PREFIX = "mqtt_broker_"
_METRIC_CLASSES: dict[str, type[Metric]] = {
    GAUGE: GaugeMetricFamily, COUNTER: CounterMetricFamily, INFO: InfoMetricFamily,
    HISTOGRAM: HistogramMetricFamily}

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

#: ``read(site_state, now_monotonic)`` of a per-site family.
SiteRead = Callable[[SiteState, float], Any]
#: ``read(service)`` of a process-wide family.
ServiceRead = Callable[[ServiceView], Any]
#: ``read(broker_view)`` of a per-broker family.
BrokerRead = Callable[[BrokerView], Any]


@dataclass(frozen=True)
class Family:
    """One exported family: what ``/metrics`` says about it, and how its value is read.

    ``name`` is the name on ``/metrics``: counters end with ``_total``, info metrics with
    ``_info``. ``labels`` are the label names in the order ``read`` gives their values. With
    ``each``, the last label takes every one of these values (every one exported, from 0).

    What ``read`` returns, by ``type``:

    - gauge, counter: the number; with ``each``, one number per value of ``each``, in order;
    - info: the values of the labels (after ``site`` for a per-site family); the sample is 1;
    - histogram: a :class:`~exporter.state.HistogramData`.
    """

    name: str
    type: str
    help: str
    _: KW_ONLY
    labels: tuple[str, ...] = ()
    each: tuple[str, ...] = ()
    #: ``# HELP`` and ``# TYPE`` lines, as generate_latest writes them.
    header: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError(f"family {self.name}: " + "; ".join(problems))
        kind = GAUGE if self.type == INFO else self.type
        object.__setattr__(self, "header", f"# HELP {self.name} {escape_help(self.help)}\n"
                                           f"# TYPE {self.name} {kind}\n")

    @property
    def base_name(self) -> str:
        """The name prometheus_client's families take (without ``_total``/``_info``)."""
        if self.type == COUNTER:
            return self.name.removesuffix("_total")
        return self.name.removesuffix("_info") if self.type == INFO else self.name

    def new_metric(self) -> Metric:
        """An empty prometheus_client family of this type, name, HELP and labels."""
        cls: Any = _METRIC_CLASSES[self.type]
        metric: Metric = cls(self.base_name, self.help, labels=list(self.labels))
        return metric


@dataclass(frozen=True)
class SiteFamily(Family):
    """A family with one series (or one per ``each`` value) per site, labelled ``site``.

    ``read`` sees the site's :class:`~exporter.state.SiteState` attributes only (the
    scrape cache reads it again only for sites whose attributes changed, see
    :func:`site_key`); ``timed``: it also uses ``now``, so it is read for every site at
    every scrape.
    """

    _: KW_ONLY
    labels: tuple[str, ...] = ("site",)
    read: SiteRead
    timed: bool = False
    #: Gauge, counter: per sample of one site, the text before and after ``site="..."``
    #: (label names sorted, as generate_latest writes them) up to the value.
    parts: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)
    #: Info: the whole sample line as a ``str.format`` template; ``{0}`` is ``site="..."``,
    #: ``{i}`` the escaped value of ``labels[i]``.
    info_line: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.name
        parts = [(name + "{", "} ")]
        if self.each:
            label = self.labels[-1]
            if label < "site":
                parts = [(f'{name}{{{label}="{escape_label_value(v)}",', "} ")
                         for v in self.each]
            else:
                parts = [(name + "{", f',{label}="{escape_label_value(v)}"}} ')
                         for v in self.each]
        order = sorted(range(len(self.labels)), key=self.labels.__getitem__)
        fields = ",".join("{0}" if i == 0 else f'{self.labels[i]}="{{{i}}}"' for i in order)
        object.__setattr__(self, "parts", tuple(parts))
        object.__setattr__(self, "info_line", f"{name}{{{{{fields}}}}} 1.0\n")


@dataclass(frozen=True)
class BrokerFamily(Family):
    """A gauge, counter or histogram with one series per broker endpoint (``host:port``)
    that has an enabled site, labelled ``broker``, read from its
    :class:`~exporter.brokers.BrokerView`."""

    _: KW_ONLY
    labels: tuple[str, ...] = ("broker",)
    read: BrokerRead


@dataclass(frozen=True)
class ServiceFamily(Family):
    """A family of the process as a whole, read once per scrape from the service."""

    _: KW_ONLY
    read: ServiceRead


#: What :data:`FAMILIES` holds.
AnyFamily = SiteFamily | BrokerFamily | ServiceFamily


def _problems(fam: Family) -> list[str]:
    """What is wrong with an entry: the exposition rules every family follows."""
    out = []
    name, kind, labels = fam.name, fam.type, fam.labels
    if not _METRIC_NAME.fullmatch(name) or not all(map(_LABEL_NAME.fullmatch, labels)):
        out.append("names are [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]*")
    if kind not in TYPES:
        out.append(f"type {kind!r} is not one of {TYPES}")
    if not name.startswith(PREFIXES):
        out.append(f"name does not start with one of {PREFIXES}")
    if (kind == COUNTER) != name.endswith("_total"):
        out.append("counters, and only counters, end with _total")
    if (kind == INFO) != name.endswith("_info"):
        out.append("info metrics, and only info metrics, end with _info")
    if not fam.help or not fam.help.endswith("."):
        out.append("HELP is a sentence ending with a period")
    if len(set(labels)) != len(labels) or {"le", "quantile"} & set(labels):
        out.append("label names are unique and not le/quantile")
    per_site = isinstance(fam, SiteFamily)
    if per_site != ("site" in labels) or (per_site and labels[0] != "site"):
        out.append("per-site families, and only they, have the label site, first")
    per_broker = isinstance(fam, BrokerFamily)
    if per_broker != name.startswith(BROKER_PREFIX):
        out.append(f"per-broker families, and only they, start with {BROKER_PREFIX}")
    if per_broker and (labels != ("broker",) or fam.each or kind == INFO):
        out.append("a per-broker family is a gauge, counter or histogram with the one label "
                   "broker")
    if not per_broker and "broker" in labels and not per_site:
        out.append("only per-site and per-broker families have the label broker")
    own = per_site + per_broker  # the label that names the series' owner
    if fam.each and (kind not in (GAUGE, COUNTER) or len(labels) != 1 + own):
        out.append("each expands the one label after site of a gauge or counter")
    if not fam.each and kind in (GAUGE, COUNTER) and len(labels) != own:
        out.append("a gauge or counter has no label besides site but the one each expands")
    if kind == HISTOGRAM and len(labels) != own:
        out.append("a histogram has no label besides site or broker")
    return out


def _site_up(st: SiteState, now: float) -> float:
    return 1.0 if st.state == CONNECTED else 0.0


#: mqtt_site_state's values per state (one tuple per state, shared by every site).
_ONE_HOT = {state: tuple(1.0 if state == s else 0.0 for s in SITE_STATES)
            for state in SITE_STATES}


def _site_state(st: SiteState, now: float) -> tuple[float, ...]:
    return _ONE_HOT.get(st.state) or (0.0,) * len(SITE_STATES)


#: Every family of the service, in exposition order: per-site families, per-broker families,
#: then the process's.
FAMILIES: tuple[AnyFamily, ...] = (
    SiteFamily("mqtt_site_up", GAUGE, "1 while the site's MQTT connection is established.",
               read=_site_up),
    SiteFamily("mqtt_site_state", GAUGE,
               "Connection state of the site: 1 for the current state, 0 otherwise.",
               labels=("site", "state"), each=SITE_STATES, read=_site_state),
    SiteFamily("mqtt_site_info", INFO, "Static facts about the site's connection.",
               labels=("site", "client_id", "broker", "protocol"),
               read=lambda st, now: (st.client_id, st.broker, st.protocol)),
    SiteFamily("mqtt_site_connects_total", COUNTER, "Successful CONNACKs.",
               read=lambda st, now: st.connects),
    SiteFamily("mqtt_site_disconnects_total", COUNTER,
               "Connections ended, and connect attempts failed (reason=refused), by reason.",
               labels=("site", "reason"), each=DISCONNECT_REASONS,
               read=lambda st, now: map(st.disconnects.__getitem__, DISCONNECT_REASONS)),
    SiteFamily("mqtt_site_reconnect_attempts_total", COUNTER,
               "Connect attempts after the first.", read=lambda st, now: st.reconnect_attempts),
    SiteFamily("mqtt_site_cooldown_active", GAUGE,
               "1 while the site pauses reconnects after a takeover (duplicate client ID).",
               read=lambda st, now: 1.0 if st.state == COOLDOWN else 0.0),
    SiteFamily("mqtt_site_cooldown_remaining_seconds", GAUGE,
               "Seconds left in the current cooldown, 0 outside cooldown.",
               read=lambda st, now: st.cooldown_remaining(now), timed=True),
    SiteFamily("mqtt_site_cooldowns_total", COUNTER, "Cooldowns entered.",
               read=lambda st, now: st.cooldowns),
    SiteFamily("mqtt_site_messages_received_total", COUNTER,
               "Messages received on the site's topics.",
               read=lambda st, now: st.messages_received),
    SiteFamily("mqtt_site_last_message_timestamp_seconds", GAUGE,
               "Unix time of the last message on the site's topics, 0 before the first.",
               read=lambda st, now: st.last_message_at or 0.0),
    SiteFamily("mqtt_site_last_connect_duration_seconds", GAUGE,
               "Time from the start of the last successful connect attempt to its CONNACK, "
               "0 before the first (the distribution: mqtt_broker_connect_duration_seconds).",
               read=lambda st, now: st.connect_duration.last or 0.0),
    SiteFamily("mqtt_site_subscriptions_refused_total", COUNTER,
               "Subscriptions the broker refused (SUBACK failure code, e.g. an ACL denial).",
               read=lambda st, now: st.subscriptions_refused),
    SiteFamily("mqtt_exporter_internal_errors_total", COUNTER,
               "Exceptions caught in the exporter's own code for this site (a bug: "
               "see the log).",
               read=lambda st, now: st.internal_errors),
    SiteFamily("mqtt_site_duplicate_instance", GAUGE,
               "1 while another process using this site's client ID is identified by its "
               "presence record, or inferred from takeovers (unknown peer).",
               read=lambda st, now: 0.0 if st.duplicate is None else 1.0),
    SiteFamily("mqtt_site_duplicate_detections_total", COUNTER,
               "Duplicate-instance episodes started (one per other process seen, not per "
               "takeover).",
               read=lambda st, now: st.duplicate_detections),
    BrokerFamily("mqtt_broker_sites", GAUGE,
                 "Enabled sites whose broker is this endpoint (host:port).",
                 read=lambda view: view.sites),
    BrokerFamily("mqtt_broker_sites_connected", GAUGE,
                 "Sites of this broker endpoint connected now.",
                 read=lambda view: view.connected),
    BrokerFamily("mqtt_broker_connection_losses_total", COUNTER,
                 "Broker events: two or more sites of this endpoint lost their connections "
                 "within MQTT_BROKER_EVENT_WINDOW_SECONDS (restart, crash, network); one per "
                 "event, not per site, and no takeover.",
                 read=lambda view: view.connection_losses),
    BrokerFamily("mqtt_broker_connect_duration_seconds", HISTOGRAM,
                 "Time from the start of a connect attempt to a successful CONNACK, every "
                 "site of this endpoint (per site: EXPORTER_SITE_CONNECT_HISTOGRAM).",
                 read=lambda view: view.connect_duration),
    ServiceFamily("mqtt_exporter_shutdown_duration_seconds", HISTOGRAM,
                  "Duration of earlier shutdowns, signal to last connection closed "
                  "(persisted in the state dir, loaded at start).",
                  read=lambda svc: svc.shutdown_history.histogram),
    ServiceFamily("mqtt_exporter_last_shutdown_timed_out", GAUGE,
                  "1 if the last shutdown hit MQTT_SHUTDOWN_TIMEOUT.",
                  read=lambda svc: 1.0 if svc.shutdown_history.last_timed_out else 0.0),
    ServiceFamily("mqtt_exporter_build_info", INFO, "Version and instance of this exporter.",
                  labels=("version", "instance_id"),
                  read=lambda svc: (__version__, svc.instance_id)),
    ServiceFamily("mqtt_exporter_config_last_reload_successful", GAUGE,
                  "1 if the last load of the sites document (start, SIGHUP or a change seen "
                  "every MQTT_SITES_RELOAD_SECONDS) was applied, 0 if it was rejected or "
                  "could not be read (the sites of the last good one keep running).",
                  read=lambda svc: 1.0 if svc.config_status.successful else 0.0),
    ServiceFamily("mqtt_exporter_config_last_reload_success_timestamp_seconds", GAUGE,
                  "Unix time of the last successful load of the sites document (0: none yet, "
                  "MQTT_SITES_URL has not answered with a valid document).",
                  read=lambda svc: svc.config_status.success_at or 0.0),
    ServiceFamily("mqtt_exporter_config_reloads_total", COUNTER,
                  "Reloads that read a new sites document or failed to (unchanged ones are "
                  "not counted), successful or not.",
                  read=lambda svc: svc.config_status.reloads),
    ServiceFamily("mqtt_exporter_config_reload_failures_total", COUNTER,
                  "Reloads whose sites document was invalid or could not be read.",
                  read=lambda svc: svc.config_status.failures),
    ServiceFamily("mqtt_exporter_config_sites", GAUGE,
                  "Sites in the applied sites document, all shards together (each replica "
                  "holds its shard's share of them).",
                  read=lambda svc: svc.config_status.sites_total),
    ServiceFamily("mqtt_exporter_shard", GAUGE,
                  "This replica's shard index i of MQTT_SHARD=i/N or its StatefulSet ordinal "
                  "(0 without sharding).",
                  read=lambda svc: svc.config_status.shard.index
                  if svc.config_status.shard is not None else 0),
    ServiceFamily("mqtt_exporter_shards", GAUGE,
                  "Number of shards N the sites are spread over (1 without sharding).",
                  read=lambda svc: svc.config_status.shard.count
                  if svc.config_status.shard is not None else 1),
)


#: The per-site connect histogram, 14 series a site (a site has 25 series without it; at
#: 10 000 sites a scrape is 15.2 MB without it, 24.7 MB with it): exported only with
#: EXPORTER_SITE_CONNECT_HISTOGRAM=true (:func:`served_families`), after
#: ``mqtt_site_last_connect_duration_seconds``.
SITE_CONNECT_HISTOGRAM = SiteFamily(
    "mqtt_site_connect_duration_seconds", HISTOGRAM,
    "Time from the start of a connect attempt to a successful CONNACK (only with "
    "EXPORTER_SITE_CONNECT_HISTOGRAM=true).",
    read=lambda st, now: st.connect_duration)


def served_families(site_connect_histogram: bool = False) -> tuple[AnyFamily, ...]:
    """The families ``/metrics`` serves: :data:`FAMILIES`, plus the per-site connect
    histogram (:data:`SITE_CONNECT_HISTOGRAM`) when asked for."""
    if not site_connect_histogram:
        return FAMILIES
    at = 1 + [f.name for f in FAMILIES].index("mqtt_site_last_connect_duration_seconds")
    return FAMILIES[:at] + (SITE_CONNECT_HISTOGRAM,) + FAMILIES[at:]


# -- prometheus_client view ------------------------------------------------------------------

def collect_families(service: ServiceView,
                     families: Sequence[AnyFamily] = FAMILIES) -> list[Metric]:
    """Fresh prometheus_client families of ``service``, one per entry of ``families``."""
    states = service.site_states
    now = service.clock.monotonic()
    out = []
    for fam in families:
        metric: Any = fam.new_metric()
        if isinstance(fam, SiteFamily):
            read = fam.read
            for st in states:
                _add(metric, fam, [st.name], read(st, now))
        elif isinstance(fam, BrokerFamily):
            for view in service.brokers:
                _add(metric, fam, [view.broker], fam.read(view))
        else:
            _add(metric, fam, [], fam.read(service))
        out.append(metric)
    return out


def _add(metric: Any, fam: Family, labels: list[str], value: Any) -> None:
    """Add what ``fam.read`` returned to ``metric`` (a family of prometheus_client.core)."""
    if fam.type == HISTOGRAM:
        metric.add_metric(labels, value.cumulative(), value.sum)
    elif fam.type == INFO:
        metric.add_metric(labels + list(value), {})
    elif fam.each:
        for label, number in zip(fam.each, value):
            metric.add_metric(labels + [label], number)
    else:
        metric.add_metric(labels, value)


class ServiceCollector:
    """Collects the families of :data:`FAMILIES` (or of ``families``) of one service."""

    def __init__(self, service: ServiceView,
                 families: Sequence[AnyFamily] = FAMILIES) -> None:
        self.service = service
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(collect_families(self.service, self.families))


def build_registry(service: ServiceView) -> CollectorRegistry:
    """Every family of one service in a fresh prometheus_client registry: the service's
    collector, the bridge's (when a site has `bridge:`) and the process collector.

    ``/metrics`` serves the same text faster (:func:`make_metrics_app`); this registry is the
    prometheus_client view of it (``get_sample_value`` in tests, embedding in other apps).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    store = service.bridge_store
    if store is not None:  # only when a site has `bridge:`
        registry.register(BridgeCollector(store))
    ProcessCollector(registry=registry)
    return registry


def process_registry() -> CollectorRegistry:
    """A fresh registry with only the process collector: what ``/metrics`` adds to the
    families it renders itself."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    return registry


# -- text renderer ---------------------------------------------------------------------------

def render_service_text(service: ServiceView,
                        families: Sequence[AnyFamily] = FAMILIES) -> str:
    """The families of ``families`` in the text format 0.0.4, byte for byte what
    ``generate_latest`` makes of :class:`ServiceCollector`, written straight from the site
    states in one go (``/metrics`` serves the same text through :class:`ScrapeCache`)."""
    states = service.site_states
    now = service.clock.monotonic()
    sites = [f'site="{escape_label_value(st.name)}"' for st in states]
    out: list[str] = []
    for fam in families:
        out.append(fam.header)
        if isinstance(fam, SiteFamily):
            snap = _snapshot(fam)
            out.append(_site_samples(fam, sites, [snap(st, now) for st in states]))
        else:
            _render_family(out.append, fam, service)
    return "".join(out)


def _snapshot(fam: SiteFamily) -> SiteRead:
    """``fam.read`` as a value that compares equal exactly when the samples are the same (a
    number or a tuple); the samples are written from it (:func:`_site_samples`)."""
    read = fam.read
    if fam.type == HISTOGRAM:
        def histogram(st: SiteState, now: float) -> tuple[Any, ...]:
            data = read(st, now)
            return data.bounds, tuple(data.counts), data.sum, data.count
        return histogram
    if fam.type == INFO or fam.each:
        return lambda st, now: tuple(read(st, now))
    return read


def _site_samples(fam: SiteFamily, sites: Sequence[str], column: Sequence[Any]) -> str:
    """The sample lines of a per-site family: ``sites`` holds the ``site="..."`` labels,
    ``column`` the sites' snapshots (:func:`_snapshot`), in the same order."""
    out: list[str] = []
    add = out.append
    fmt = format_value
    if fam.type == HISTOGRAM:
        name = fam.name
        for site, (bounds, counts, total, count) in zip(sites, column):
            _render_histogram(add, name, site, bounds, counts, total, count)
    elif fam.type == INFO:
        template = fam.info_line
        for site, values in zip(sites, column):
            add(template.format(site, *map(escape_label_value, values)))
    elif fam.each:
        parts = fam.parts
        for site, numbers in zip(sites, column):
            for (head, tail), number in zip(parts, numbers):
                add(f"{head}{site}{tail}{fmt(number)}\n")
    else:
        ((head, tail),) = fam.parts
        for site, number in zip(sites, column):
            add(f"{head}{site}{tail}{fmt(number)}\n")
    return "".join(out)


def _render_family(add: Callable[[str], object], fam: BrokerFamily | ServiceFamily,
                   service: ServiceView) -> None:
    """The samples of a per-broker or process-wide family (a handful), read now."""
    if isinstance(fam, BrokerFamily):
        name, read = fam.name, fam.read
        for view in service.brokers:
            label = f'broker="{escape_label_value(view.broker)}"'
            value = read(view)
            if fam.type == HISTOGRAM:
                _render_histogram(add, name, label, value.bounds, value.counts, value.sum,
                                  value.count)
            else:
                add(f"{name}{{{label}}} {format_value(value)}\n")
        return
    value = fam.read(service)
    if fam.type == HISTOGRAM:
        _render_histogram(add, fam.name, "", value.bounds, value.counts, value.sum, value.count)
        return
    metric: Any = fam.new_metric()
    _add(metric, fam, [], value)
    for sample in metric.samples:
        labels = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sorted(sample.labels.items()))
        add(f"{sample.name}{{{labels}}} {format_value(sample.value)}\n" if labels
            else f"{sample.name} {format_value(sample.value)}\n")


def _render_histogram(add: Callable[[str], object], name: str, label: str,
                      bounds: tuple[float, ...], counts: Sequence[int], total: float,
                      count: int) -> None:
    """One histogram's samples; ``label`` is ``site="..."``, ``broker="..."`` or empty
    (labels in name order around ``le``, as generate_latest writes them)."""
    fmt = format_value
    running = 0
    if label < "le":  # broker="...": before le; empty: no label
        head = f"{name}_bucket{{{label}," if label else f"{name}_bucket{{"
        for le, n in zip(_bucket_les(bounds), counts):
            running += n
            add(f'{head}le="{le}"}} {fmt(running)}\n')
    else:
        tail = f",{label}}} "
        for head, n in zip(_bucket_heads(name, bounds), counts):
            running += n
            add(f"{head}{tail}{fmt(running)}\n")
    labels = f"{{{label}}}" if label else ""
    add(f"{name}_count{labels} {fmt(count)}\n{name}_sum{labels} {fmt(total)}\n")


@functools.lru_cache(maxsize=64)
def _bucket_les(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """Every bucket's ``le``, +Inf last, spelled as HistogramData does."""
    return tuple(le for le, _ in HistogramData(bounds).cumulative())


@functools.lru_cache(maxsize=64)
def _bucket_heads(name: str, bounds: tuple[float, ...]) -> tuple[str, ...]:
    """``name_bucket{le="..."`` per bucket, +Inf last."""
    return tuple(f'{name}_bucket{{le="{le}"' for le in _bucket_les(bounds))


# -- the cached, incremental render of /metrics -----------------------------------------------

#: Sites read (or written) between two pauses of a scrape: 1-3 ms of work.
SITES_PER_PAUSE = 250
#: Bytes deflated between two pauses of a gzipped scrape.
BYTES_PER_PAUSE = 256 * 1024


def _no_pause() -> None:
    pass


class Chunk:
    """A piece of the ``/metrics`` body, with its raw deflate segment (for a gzipped body)
    made on first need and kept as long as the chunk is."""

    __slots__ = ("data", "_deflated")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._deflated: bytes | None = None

    def deflated(self, level: int, pause: Callable[[], object]) -> bytes:
        """``data`` as raw deflate blocks ending on a byte boundary (a sync flush): segments
        of independent compressors concatenate into one valid deflate stream."""
        if self._deflated is None:
            compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
            data, pieces = memoryview(self.data), []
            for at in range(0, len(data), BYTES_PER_PAUSE):
                if at:
                    pause()
                pieces.append(compressor.compress(data[at:at + BYTES_PER_PAUSE]))
            pieces.append(compressor.flush(zlib.Z_SYNC_FLUSH))
            self._deflated = b"".join(pieces)
        return self._deflated


#: gzip member header (RFC 1952): deflate, no name, no mtime, unknown OS.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
#: An empty final deflate block: ends the stream after the chunks' sync-flushed segments.
_DEFLATE_END = b"\x03\x00"


def gzip_chunks(chunks: Sequence[Chunk], level: int = 1,
                pause: Callable[[], object] = _no_pause) -> list[bytes]:
    """One gzip member holding the chunks in order, from their (cached) deflate segments:
    only chunks made since the last scrape are compressed again."""
    out = [_GZIP_HEADER]
    crc = size = 0
    for chunk in chunks:
        out.append(chunk.deflated(level, pause))
        crc = zlib.crc32(chunk.data, crc)
        size += len(chunk.data)
        if len(chunk.data) >= BYTES_PER_PAUSE:
            pause()
    out.append(_DEFLATE_END + struct.pack("<II", crc, size & 0xFFFFFFFF))
    return out


#: SiteState attributes changed in place (not assigned): what of them a change shows in.
_IN_PLACE: dict[str, Callable[[Any], Any]] = {
    "disconnects": lambda counts: tuple(counts.values()),
    "connect_duration": operator.attrgetter("count"),
}


def _make_site_key() -> Callable[[SiteState], tuple[Any, ...]]:
    assigned = []
    for f in dataclasses.fields(SiteState):
        if f.default_factory is not dataclasses.MISSING and f.name not in _IN_PLACE:
            raise TypeError(f"SiteState.{f.name} may change in place: add it to _IN_PLACE")
        if f.name not in _IN_PLACE:
            assigned.append(f.name)
    plain = operator.attrgetter(*assigned)
    counts, durations = (_IN_PLACE[name] for name in ("disconnects", "connect_duration"))

    def site_key(st: SiteState) -> tuple[Any, ...]:
        return plain(st), counts(st.disconnects), durations(st.connect_duration)

    return site_key


#: ``site_key(state)``: every attribute of a SiteState, as a value that compares unequal
#: after any change; a site whose key is the last scrape's is not read again.
site_key = _make_site_key()

_UNREAD = object()  # a column's entry before the site is read


class _Scraped:
    """What one scrape leaves for the next: the sites, their keys, each per-site family's
    column of values (:func:`_snapshot`) and samples. Never changed once made."""

    __slots__ = ("names", "labels", "keys", "columns", "chunks")

    def __init__(self, names: list[str], labels: list[str], keys: list[Any],
                 columns: dict[str, list[Any]], chunks: dict[str, Chunk]) -> None:
        self.names, self.labels, self.keys = names, labels, keys
        self.columns, self.chunks = columns, chunks


class ScrapeCache:
    """The per-site families of ``/metrics``, kept between scrapes and rendered in steps.

    A scrape goes over the sites :data:`SITES_PER_PAUSE` at a time and calls ``pause``
    between two steps (:func:`exporter.http.yield_to_loop`: connections and ``/health``
    run meanwhile, so a scrape of 10 000 sites never holds the event loop for long). In a
    step, each site's :func:`site_key` is compared with the last scrape's; only the sites
    whose key changed are read (every family of one site in the same step, so a site's
    series agree with each other; two sites may be read a few milliseconds apart), and the
    ``timed`` families for every site. A family none of whose values changed is served
    from the bytes made at the last scrape (and their deflate segment); the others are
    written again, in steps too. The per-broker and process families, a handful of series,
    are written at every scrape.

    Concurrent scrapes are safe: each builds its own :class:`_Scraped` from the last one
    (copying a column before changing it) and replaces it when done.
    """

    def __init__(self, families: Sequence[AnyFamily] = FAMILIES, *,
                 pause: Callable[[], object] = _no_pause,
                 batch: int = SITES_PER_PAUSE) -> None:
        self.families = tuple(families)
        self.pause = pause
        self.batch = batch
        site_families = [f for f in self.families if isinstance(f, SiteFamily)]
        self._untimed = [(f.name, _snapshot(f)) for f in site_families if not f.timed]
        self._timed = [(f.name, _snapshot(f)) for f in site_families if f.timed]
        self._headers = {f.name: (Chunk(f.header.encode()),
                                  Chunk(_openmetrics_metadata(f).encode()))
                         for f in site_families}
        self._last: _Scraped | None = None
        #: Sites read, and sample lines written, at the last scrape.
        self.read = self.written = 0

    def render(self, service: ServiceView, openmetrics: bool = False) -> list[Chunk]:
        """The service's families, in the text format 0.0.4 (what
        :func:`render_service_text` writes) or with OpenMetrics metadata lines (no
        ``# EOF``)."""
        scraped = self._scrape(list(service.site_states), service.clock.monotonic())
        out: list[Chunk] = []
        rest: list[str] = []
        for fam in self.families:
            if not isinstance(fam, SiteFamily):
                rest.append(_openmetrics_metadata(fam) if openmetrics else fam.header)
                _render_family(rest.append, fam, service)
                continue
            if rest:
                out.append(Chunk("".join(rest).encode()))
                rest = []
            out.append(self._headers[fam.name][openmetrics])
            out.append(scraped.chunks[fam.name])
        if rest:
            out.append(Chunk("".join(rest).encode()))
        return out

    def _scrape(self, states: list[SiteState], now: float) -> _Scraped:
        last = self._last
        names = [st.name for st in states]
        afresh = last is None or names != last.names
        if last is None or afresh:  # other sites: every one is read, its label made in its step
            last = _Scraped(names, [], [None] * len(states),
                            {name: [_UNREAD] * len(states) for name, _ in self._untimed}, {})
        columns = dict(last.columns)
        copied: set[str] = set()
        timed: dict[str, list[Any]] = {name: [] for name, _ in self._timed}
        keys: list[Any] = []
        self.read = self.written = 0
        batch = self.batch
        for start in range(0, len(states), batch):
            if start:
                self.pause()
            part = states[start:start + batch]
            if afresh:
                last.labels += [f'site="{escape_label_value(st.name)}"' for st in part]
            fresh = list(map(site_key, part))
            changed = [i for i, new, old in zip(range(start, start + batch), fresh,
                                                last.keys[start:start + batch]) if new != old]
            keys += fresh
            self.read += len(changed)
            if len(changed) * 4 > len(part):  # many: a whole step reads faster
                end = start + len(part)
                for name, snap in self._untimed:
                    values = [snap(st, now) for st in part]
                    if values != columns[name][start:end]:
                        if name not in copied:
                            columns[name] = list(columns[name])
                            copied.add(name)
                        columns[name][start:end] = values
                changed = []
            for name, snap in self._untimed:
                column = columns[name]
                for i in changed:
                    value = snap(states[i], now)
                    if value != column[i]:
                        if name not in copied:
                            column = columns[name] = list(column)
                            copied.add(name)
                        column[i] = value
            for name, snap in self._timed:
                timed[name] += [snap(st, now) for st in part]
        for name, column in timed.items():
            if column != last.columns.get(name):
                columns[name] = column
                copied.add(name)
        chunks = dict(last.chunks)
        for fam in self.families:
            if isinstance(fam, SiteFamily) and (fam.name in copied or fam.name not in chunks):
                chunks[fam.name] = self._write(fam, last.labels, columns[fam.name])
        self._last = _Scraped(names, last.labels, keys, columns, chunks)
        return self._last

    def _write(self, fam: SiteFamily, labels: list[str], column: list[Any]) -> Chunk:
        """One family's samples, ``batch`` sites per step."""
        batch, parts = self.batch, []
        for start in range(0, len(column), batch):
            if start:
                self.pause()
            end = start + batch
            parts.append(_site_samples(fam, labels[start:end], column[start:end]))
        self.written += len(column) * (len(fam.each) or 1)
        return Chunk("".join(parts).encode())


# -- HTTP ------------------------------------------------------------------------------------

#: What the text renderer writes: the text format 0.0.4 (prometheus_client's
#: CONTENT_TYPE_LATEST now says version=1.0.0, which this body is not).
CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
#: OpenMetrics 1.0, served when the scraper asks for it in ``Accept``.
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def wants_openmetrics(accept: str) -> bool:
    """True when ``Accept`` offers OpenMetrics (1.0.0, or no version) with a non-zero
    quality, as Prometheus does (``application/openmetrics-text;version=1.0.0,...``)."""
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media.lower() != "application/openmetrics-text":
            continue
        options = dict(p.partition("=")[::2] for p in params)
        if options.get("version", "1.0.0").strip() not in ("1.0.0", "0.0.1"):
            continue
        try:
            if float(options.get("q", "1")) <= 0:
                continue
        except ValueError:
            continue
        return True
    return False


#: The info families of :data:`FAMILIES` (a gauge named ``*_info`` in the text format).
_INFO_NAMES = frozenset(f.name for f in FAMILIES if f.type == INFO)
#: A family's metadata in the text format: optional HELP, then TYPE.
_TEXT_HEADER = re.compile(r"^(?:# HELP (\S+) (.*)\n)?# TYPE (\S+) (\S+)$", re.M)


def _openmetrics_header(match: re.Match[str]) -> str:
    help_name, help_text, name, kind = match.groups()
    if kind == "counter" and name.endswith("_total"):
        name = name[:-6]  # the family; its samples keep _total
    elif kind == "gauge" and name in _INFO_NAMES:
        name, kind = name[:-5], "info"
    elif kind == "untyped":
        kind = "unknown"
    if help_name is None:
        return f"# TYPE {name} {kind}"
    # The text format escapes \ and newlines in HELP; OpenMetrics also escapes quotes.
    help_text = help_text.replace('"', '\\"')
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}"


def _openmetrics_metadata(fam: Family) -> str:
    """``fam.header`` as OpenMetrics 1.0 says it: counters named without ``_total``, info
    families typed ``info``, quotes escaped in HELP."""
    name = fam.base_name
    help_text = escape_help(fam.help).replace('"', '\\"')
    return f"# HELP {name} {help_text}\n# TYPE {name} {fam.type}\n"


def text_to_openmetrics(text: str) -> str:
    """The text format 0.0.4 as made by prometheus_client (or our renderers) in OpenMetrics
    1.0: counter families named without ``_total``, the service's info families typed
    ``info``, quotes escaped in HELP, ``# EOF`` last. Sample lines are the same in both
    formats, so only the metadata lines change (the service's own families get theirs from
    :func:`_openmetrics_metadata`; this is for the bridge's and the process collector's)."""
    return _TEXT_HEADER.sub(_openmetrics_header, text) + "# EOF\n"


#: Level of a gzipped ``/metrics`` (level 9 costs 6x more for 3 % less).
GZIP_LEVEL = 1


def make_metrics_app(service: ServiceView, registry: CollectorRegistry, *,
                     families: Sequence[AnyFamily] = FAMILIES,
                     pause: Callable[[], object] = _no_pause) -> WSGIApplication:
    """The WSGI app for ``/metrics``: ``families`` of the service (:class:`ScrapeCache`,
    which calls ``pause`` between its steps), the bridge's (``BridgeStore.render_text``)
    and whatever ``registry`` holds (the process collector) via ``generate_latest``; text
    format 0.0.4 (:data:`CONTENT_TYPE_TEXT`), or OpenMetrics 1.0 when the client's
    ``Accept`` asks for it (the same sample lines); gzipped (:data:`GZIP_LEVEL`) when the
    client accepts it, from the cached families' cached deflate segments
    (:func:`gzip_chunks`). The body is sent as the chunks, never joined.
    """
    store = service.bridge_store
    cache = ScrapeCache(families, pause=pause)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        openmetrics = wants_openmetrics(environ.get("HTTP_ACCEPT", ""))
        chunks = cache.render(service, openmetrics)
        rest = store.render_text() if store is not None else ""
        rest += generate_latest(registry).decode()
        chunks.append(Chunk((text_to_openmetrics(rest) if openmetrics else rest).encode()))
        headers = [("Content-Type", CONTENT_TYPE_OPENMETRICS if openmetrics else CONTENT_TYPE_TEXT),
                   ("Vary", "Accept, Accept-Encoding")]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip_chunks(chunks, GZIP_LEVEL, pause)
            headers.append(("Content-Encoding", "gzip"))
        else:
            body = [chunk.data for chunk in chunks]
        headers.append(("Content-Length", str(sum(map(len, body)))))
        start_response("200 OK", headers)
        return body

    return app


# -- reference (docs/metrics.md) -------------------------------------------------------------

#: docs/metrics.md is hand-written above this line and generated below it.
DOC_MARKER = ("<!-- Generated below this line from exporter/metrics.py by "
              "`python -m exporter.metrics --write docs/metrics.md`: do not edit by hand. -->")


def reference_markdown(families: tuple[AnyFamily, ...] = FAMILIES) -> str:
    """The family reference of ``docs/metrics.md`` (what follows :data:`DOC_MARKER`): the
    table's families, the bridge's own (a store with one bridged site) and the process
    collector's, each with type, labels and HELP."""
    from .bridge import BridgeStore
    from .config import BridgeConfig
    from .reload import ConfigStatus
    from .state import ShutdownHistory, SystemClock

    class _OneSite:
        clock = SystemClock()
        site_states = [SiteState(name="site", client_id="id", broker="host:1883",
                                 protocol="3.1.1", enabled=True)]
        shutdown_history = ShutdownHistory("unused")
        instance_id = "instance"
        running = True
        bridge_store = None
        brokers = [BrokerView("host:1883", states=site_states)]
        config_status = ConfigStatus(loaded=True, at=0.0)

    optional = (SITE_CONNECT_HISTOGRAM,)
    collected = dict(zip(families + optional,
                         collect_families(_OneSite(), families + optional)))
    store = BridgeStore(SystemClock())
    store.site("site", BridgeConfig())
    bounded = {fam.name: {fam.labels[-1]: fam.each} for fam in families if fam.each}
    out = [
        "## Per site",
        "",
        "One series (or one per value of `state`/`reason`) per configured site, disabled sites "
        "included, from the first scrape.",
        "",
        *_table([collected[f] for f in families if isinstance(f, SiteFamily)], bounded),
        "",
        "### Per site, on request",
        "",
        "Only with `EXPORTER_SITE_CONNECT_HISTOGRAM=true` (14 series a site).",
        "",
        *_table([collected[f] for f in optional], bounded),
        "",
        "## Per broker",
        "",
        "One series per broker endpoint (`host:port`, as in `mqtt_site_info`) with at least one "
        "enabled site, from the first scrape.",
        "",
        *_table([collected[f] for f in families if isinstance(f, BrokerFamily)], bounded),
        "",
        "## Per process",
        "",
        *_table([collected[f] for f in families if isinstance(f, ServiceFamily)], bounded),
        "",
        "## Bridge (`mqtt_bridge_*`)",
        "",
        "Only when at least one site has `bridge:`; one series (one per `reason`) per bridged "
        "site, from 0. The bridged series themselves (named by the site's `prefix`) are "
        "described in the README.",
        "",
        *_table(store.collect(), None),
        "",
        "## Process collector (`process_*`)",
        "",
        "prometheus_client's `ProcessCollector` (Linux).",
        "",
        *_table(process_registry().collect(), {}),
    ]
    return "\n".join(out) + "\n"


def _table(metrics: Iterable[Metric], bounded: dict[str, dict[str, tuple[str, ...]]] | None
           ) -> list[str]:
    """Markdown rows. Values are listed for ``le``, for the labels in ``bounded`` (by exposed
    name) and, when ``bounded`` is None, for every label but ``site``."""
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for metric in metrics:
        name = metric.name + {"counter": "_total", "info": "_info"}.get(metric.type, "")
        values: dict[str, list[str]] = {}
        for sample in metric.samples:
            for key, value in sample.labels.items():
                seen = values.setdefault(key, [])
                if value not in seen:
                    seen.append(value)
        cells = []
        for key, seen in values.items():
            listed = (seen if key == "le" or (bounded is None and key != "site")
                      else (bounded or {}).get(name, {}).get(key))
            cells.append(f"`{key}` ({', '.join(listed)})" if listed else f"`{key}`")
        kind = "info (gauge, value 1)" if metric.type == INFO else metric.type
        meaning = metric.documentation.replace("|", r"\|")
        rows.append(f"| `{name}` | {kind} | {', '.join(cells) or '-'} | {meaning} |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m exporter.metrics``: print the reference; ``--write FILE`` replaces what
    follows :data:`DOC_MARKER` in FILE with it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m exporter.metrics", description=main.__doc__)
    parser.add_argument("--write", metavar="FILE", help="update FILE (docs/metrics.md)")
    args = parser.parse_args(argv)
    reference = reference_markdown()
    if not args.write:
        print(reference, end="")
        return 0
    with open(args.write, encoding="utf-8") as fh:
        head, marker, _ = fh.read().partition(DOC_MARKER)
    if not marker:
        parser.error(f"{args.write} has no marker line {DOC_MARKER}")
    with open(args.write, "w", encoding="utf-8") as fh:
        fh.write(f"{head}{DOC_MARKER}\n\n{reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
