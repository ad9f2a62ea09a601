"""/metrics with 100 k bridged series: our WSGI app vs prometheus_client, side by side.

In-process: one :class:`exporter.bridge.BridgeStore` filled through ``SiteBridge.ingest``
with the issue's JSON payload on distinct topics (10 sites x 3 334 topics x 3 fields ~
100 k series), the registry ``build_registry`` makes for a service with those sites, and the
``/metrics`` WSGI app ``exporter.http.make_app`` serves. Each run times one full response
(with and without gzip) and, on the same registry, prometheus_client's ``generate_latest``
with the bridge collector enabled (what serving it the stock way would cost).
"""
from __future__ import annotations

import statistics
import time
import types

from exporter.bridge import BridgeStore
from exporter.config import BridgeConfig
from exporter.metrics import build_registry, make_metrics_app
from exporter.state import ShutdownHistory, SystemClock
from prometheus_client import generate_latest

from .common import BenchContext, BenchResult, Row

SITES = 10
TOPICS_PER_SITE = 3334
TARGET_SECONDS = 1.0
PAYLOAD = b'{"temperature":%d.5,"humidity":%d,"battery":{"level":%d}}'

METHOD = f"""\
In-process (no network): a `BridgeStore` with {SITES} bridged sites, each fed
{TOPICS_PER_SITE} distinct topics `site/sensors/devNNNN` carrying
`{{"temperature":21.5,"humidity":40,"battery":{{"level":88}}}}` through `SiteBridge.ingest`
(~{SITES * TOPICS_PER_SITE * 3 // 1000} k series), wrapped in the registry `build_registry`
makes for a service with those sites (site collector, bridge collector, process collector).
Per run: one `GET /metrics` through the exporter's WSGI app (`make_metrics_app`: the stock
exposition of the small families plus `BridgeStore.render_text`) without and with
`Accept-Encoding: gzip`, and prometheus_client's `generate_latest` over the same registry with
the bridge collector enabled. time.perf_counter around each; median; target: `/metrics` < 1 s."""


def _service():
    clock = SystemClock()
    store = BridgeStore(clock, max_series=SITES * TOPICS_PER_SITE * 3)
    for s in range(SITES):
        bridge = store.site(f"site{s:02d}", BridgeConfig(max_series=TOPICS_PER_SITE * 3))
        for t in range(TOPICS_PER_SITE):
            bridge.ingest(f"site{s:02d}/sensors/dev{t:04d}", PAYLOAD % (t % 30, t % 90, t % 100))
    return types.SimpleNamespace(clock=clock, site_states=[], instance_id="bench",
                                 shutdown_history=ShutdownHistory("/nonexistent/none"),
                                 bridge_store=store)


def _get(app, gzip: bool) -> tuple[float, int]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    if gzip:
        environ["HTTP_ACCEPT_ENCODING"] = "gzip"
    t0 = time.perf_counter()
    body = b"".join(app(environ, lambda status, headers: None))
    return time.perf_counter() - t0, len(body)


def run(ctx: BenchContext) -> BenchResult:
    runs = ctx.n_runs(default=7, quick=3)
    service = _service()
    series = service.bridge_store.total
    registry = build_registry(service)
    app = make_metrics_app(registry)
    raw = []
    for r in range(runs):
        plain, size = _get(app, gzip=False)
        zipped, zsize = _get(app, gzip=True)
        t0 = time.perf_counter()
        stock = len(generate_latest(registry))
        stock_s = time.perf_counter() - t0
        raw.append({"run": r + 1, "series": series, "ours_ms": plain * 1000,
                    "ours_gzip_ms": zipped * 1000, "stock_ms": stock_s * 1000,
                    "bytes": size, "gzip_bytes": zsize, "stock_bytes": stock})
        ctx.log(f"scrape run {r + 1}: ours {plain * 1000:.0f} ms, gzip {zipped * 1000:.0f} ms, "
                f"generate_latest {stock_s * 1000:.0f} ms ({series} series)")
    case = f"{series // 1000} k bridged series"
    ratio = [r["stock_ms"] / r["ours_ms"] for r in raw]
    rows = [
        Row(case, "GET /metrics", "ms", [r["ours_ms"] for r in raw], target=TARGET_SECONDS * 1000),
        Row(case, "GET /metrics, gzip", "ms", [r["ours_gzip_ms"] for r in raw],
            target=TARGET_SECONDS * 1000),
        Row(case, "generate_latest (stock)", "ms", [r["stock_ms"] for r in raw]),
        Row(case, "ratio stock/ours", "x", ratio),
    ]
    notes = [f"Body {statistics.median(r['bytes'] for r in raw) / 1e6:.1f} MB, gzip "
             f"{statistics.median(r['gzip_bytes'] for r in raw) / 1e6:.1f} MB."]
    return BenchResult("scrape", "/metrics render time with 100 k bridged series", METHOD,
                       rows, raw, notes=notes)
