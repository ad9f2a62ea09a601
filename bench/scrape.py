"""/metrics render time: our WSGI app vs prometheus_client's generate_latest, side by side.

In-process, two cases: (1) 100 k bridged series: one :class:`exporter.bridge.BridgeStore`
filled through ``SiteBridge.ingest`` with the issue's JSON payload on distinct topics
(10 sites x 3 334 topics x 3 fields); (2) 1000 supervised sites without a bridge (34 series
each). Each run times one full response of the ``/metrics`` app ``exporter.http.make_app``
serves (with and without gzip) and ``generate_latest`` over ``build_registry`` of the same
service (what serving it the stock prometheus_client way costs).
"""
from __future__ import annotations

import statistics
import time
import types

from prometheus_client import generate_latest

from exporter.bridge import BridgeStore
from exporter.config import BridgeConfig
from exporter.metrics import build_registry, make_metrics_app, process_registry
from exporter.reload import ConfigStatus
from exporter.state import ShutdownHistory, SiteState, SystemClock

from .common import BenchContext, BenchResult, Row

SITES = 10
TOPICS_PER_SITE = 3334
SUPERVISED_SITES = 1000
TARGET_SECONDS = 1.0
PAYLOAD = b'{"temperature":%d.5,"humidity":%d,"battery":{"level":%d}}'

METHOD = f"""\
In-process (no network). Case 1: a `BridgeStore` with {SITES} bridged sites, each fed
{TOPICS_PER_SITE} distinct topics `site/sensors/devNNNN` carrying
`{{"temperature":21.5,"humidity":40,"battery":{{"level":88}}}}` through `SiteBridge.ingest`
(~{SITES * TOPICS_PER_SITE * 3 // 1000} k series). Case 2: {SUPERVISED_SITES} supervised sites
(no bridge), each with its 34 series. Per run and case: one `GET /metrics` through the
exporter's WSGI app (`make_metrics_app`: the service's and the bridge's families rendered
straight from their state, then the process collector) without and with
`Accept-Encoding: gzip`, and prometheus_client's `generate_latest` over `build_registry` of
the same service. time.perf_counter around each; median; target: `/metrics` < 1 s with
100 k bridged series."""


def _service(bridged: bool):
    clock = SystemClock()
    store, states = None, []
    if bridged:
        store = BridgeStore(clock, max_series=SITES * TOPICS_PER_SITE * 3)
        for s in range(SITES):
            bridge = store.site(f"site{s:02d}", BridgeConfig(max_series=TOPICS_PER_SITE * 3))
            for t in range(TOPICS_PER_SITE):
                bridge.ingest(f"site{s:02d}/sensors/dev{t:04d}",
                              PAYLOAD % (t % 30, t % 90, t % 100))
    else:
        states = [SiteState(name=f"site{i:04d}", client_id=f"site{i:04d}_ibench",
                            broker="127.0.0.1:1883", protocol="3.1.1", enabled=True,
                            state="connected") for i in range(SUPERVISED_SITES)]
        for st in states:
            st.connect_duration.observe(0.004)
    return types.SimpleNamespace(clock=clock, site_states=states, instance_id="bench",
                                 shutdown_history=ShutdownHistory("/nonexistent/none"),
                                 bridge_store=store, brokers=[], running=True,
                                 config_status=ConfigStatus(loaded=True, at=0.0))


def _get(app, gzip: bool) -> tuple[float, int]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    if gzip:
        environ["HTTP_ACCEPT_ENCODING"] = "gzip"
    t0 = time.perf_counter()
    body = b"".join(app(environ, lambda status, headers: None))
    return time.perf_counter() - t0, len(body)


def _case(ctx: BenchContext, label: str, service, runs: int, target: float | None):
    registry = build_registry(service)
    app = make_metrics_app(service, process_registry())
    raw = []
    for r in range(runs):
        plain, size = _get(app, gzip=False)
        zipped, zsize = _get(app, gzip=True)
        t0 = time.perf_counter()
        stock = len(generate_latest(registry))
        stock_s = time.perf_counter() - t0
        raw.append({"case": label, "run": r + 1, "ours_ms": plain * 1000,
                    "ours_gzip_ms": zipped * 1000, "stock_ms": stock_s * 1000,
                    "bytes": size, "gzip_bytes": zsize, "stock_bytes": stock})
        ctx.log(f"scrape {label} run {r + 1}: ours {plain * 1000:.0f} ms, gzip "
                f"{zipped * 1000:.0f} ms, generate_latest {stock_s * 1000:.0f} ms")
    rows = [
        Row(label, "GET /metrics", "ms", [r["ours_ms"] for r in raw], target=target),
        Row(label, "GET /metrics, gzip", "ms", [r["ours_gzip_ms"] for r in raw], target=target),
        Row(label, "generate_latest (stock)", "ms", [r["stock_ms"] for r in raw]),
        Row(label, "ratio stock/ours", "x", [r["stock_ms"] / r["ours_ms"] for r in raw]),
    ]
    note = (f"{label}: body {statistics.median(r['bytes'] for r in raw) / 1e6:.1f} MB, gzip "
            f"{statistics.median(r['gzip_bytes'] for r in raw) / 1e6:.2f} MB.")
    return rows, raw, note


def run(ctx: BenchContext) -> BenchResult:
    runs = ctx.n_runs(default=7, quick=3)
    bridged = _service(bridged=True)
    rows, raw, note = _case(ctx, f"{bridged.bridge_store.total // 1000} k bridged series",
                            bridged, runs, TARGET_SECONDS * 1000)
    rows2, raw2, note2 = _case(ctx, f"{SUPERVISED_SITES} sites, no bridge",
                               _service(bridged=False), runs, None)
    return BenchResult("scrape", "/metrics render time", METHOD, rows + rows2, raw + raw2,
                       notes=[note, note2])
