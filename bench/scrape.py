"""/metrics: render time in-process, and what a scrape of 1000 / 10 000 sites costs the hub.

In-process cases: (1) 100 k bridged series: one :class:`exporter.bridge.BridgeStore` filled
through ``SiteBridge.ingest`` with the issue's JSON payload on distinct topics (10 sites x
3 334 topics x 3 fields); (2) 1000 supervised sites without a bridge. Each run times one
full response of the ``/metrics`` app (with and without gzip) and ``generate_latest`` over
``build_registry`` of the same service (what serving it the stock prometheus_client way
costs).

Hub cases: a stand-in service of 1000 or 10 000 connected sites (this file run as a script,
``python bench/scrape.py serve``) served by the exporter's own HTTP app and server
(``exporter.http.make_app``/``make_server``) on loopback, with a greenlet that wakes every
1 ms and records the longest gap (a hub stall); the benchmark scrapes it over HTTP while a
thread polls ``/health``. The stand-in uses only what every commit's exporter has, so
``python -m bench.scrape --compare OLD_TREE [NEW_TREE]`` runs the same measurement against
two trees side by side (alternating rounds, fresh server per round).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .common import BenchContext, BenchResult, Row

SITES = 10
TOPICS_PER_SITE = 3334
SUPERVISED_SITES = 1000
TARGET_SECONDS = 1.0
PAYLOAD = b'{"temperature":%d.5,"humidity":%d,"battery":{"level":%d}}'

#: Sites of the hub cases, and the targets of issue 10 at 10 000 sites.
HUB_SITES = (1000, 10_000)
TARGET_SCRAPE_MS = 100.0
TARGET_STALL_MS = 20.0
#: Scrapes per kind and server start; broker endpoints of the stand-in's sites.
SCRAPES = 5
BROKERS = 4
#: Pace of the /health poller: far more often than any readiness probe, and a /health of
#: 10 000 sites costs the stand-in several ms itself.
PROBE_INTERVAL = 0.01
#: How long the "no scrape" kind waits: the machine's own noise in the stall figure.
QUIET_SECONDS = 0.1
HOST = "127.0.0.1"
THIS_FILE = Path(__file__).resolve()

METHOD = f"""\
In-process (no network). Case 1: a `BridgeStore` with {SITES} bridged sites, each fed
{TOPICS_PER_SITE} distinct topics `site/sensors/devNNNN` carrying
`{{"temperature":21.5,"humidity":40,"battery":{{"level":88}}}}` through `SiteBridge.ingest`
(~{SITES * TOPICS_PER_SITE * 3 // 1000} k series). Case 2: {SUPERVISED_SITES} supervised sites
(no bridge). Per run and case: one `GET /metrics` through the exporter's WSGI app
(`make_metrics_app`) without and with `Accept-Encoding: gzip`, and prometheus_client's
`generate_latest` over `build_registry` of the same service. time.perf_counter around each;
median; target: `/metrics` < 1 s with 100 k bridged series.

Hub cases ({' and '.join(map(str, HUB_SITES))} sites): a stand-in service (`python
bench/scrape.py serve`: connected sites on {BROKERS} broker endpoints, no MQTT) served by the
exporter's HTTP app and bounded server on loopback, in its own process, with a greenlet that
sleeps 1 ms in a loop and records the longest gap between two wake-ups beyond that 1 ms
(**hub stall**: nothing else in the process ran meanwhile). The benchmark scrapes it with
urllib: the first scrape after start (**cold**, every family written), {SCRAPES} scrapes
with no change in between (**idle**), {SCRAPES} after every site received a message
(**busy**: the message counter and timestamp of every site change), {SCRAPES} idle ones
with `Accept-Encoding: gzip` (what Prometheus sends). Time = request sent to body read.
Then the same scrapes again while a thread polls `/health` every
{PROBE_INTERVAL * 1000:.0f} ms (**/health max**: its slowest answer during the scrape; a
`/health` of 10 000 sites costs the server ~10 ms itself, so time and stall come from the
scrapes without the poller). The server's RSS before the first scrape and after the last.
**No scrape**: the same figures over {QUIET_SECONDS * 1000:.0f} ms without a scrape (the
machine's own noise, and what `/health` costs anyway).
Targets at 10 000 sites, on every kind but cold (see the notes): `/metrics` within
{TARGET_SCRAPE_MS:.0f} ms, median stall under {TARGET_STALL_MS:.0f} ms."""


# -- in-process render -----------------------------------------------------------------------

def _service(bridged: bool):
    from exporter.bridge import BridgeStore
    from exporter.config import BridgeConfig
    from exporter.state import ShutdownHistory, SiteState, SystemClock

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
                                 **_config_status())


def _config_status() -> dict[str, Any]:
    """The stand-in's ``config_status`` (a tree older than hot reload has none to read)."""
    try:
        from exporter.reload import ConfigStatus
    except ImportError:  # an older tree, measured by --compare
        return {}
    return {"config_status": ConfigStatus(loaded=True, at=0.0)}


def _get(app, gzip: bool) -> tuple[float, int]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}
    if gzip:
        environ["HTTP_ACCEPT_ENCODING"] = "gzip"
    t0 = time.perf_counter()
    body = b"".join(app(environ, lambda status, headers: None))
    return time.perf_counter() - t0, len(body)


def _case(ctx: BenchContext, label: str, service, runs: int, target: float | None):
    from prometheus_client import generate_latest

    from exporter.metrics import build_registry, make_metrics_app, process_registry

    from .common import Row

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


# -- the stand-in server (this file run as a script, in the tree under test) ----------------

def serve(sites: int) -> None:
    """Serve a stand-in service of ``sites`` connected sites on a free loopback port (printed
    as ``READY <port>``), with the hub-stall ticker and two bench-only paths:
    ``/bench/stall`` (the longest gap since the last call, in seconds, then reset) and
    ``/bench/churn`` (every site receives one message)."""
    from gevent import monkey

    monkey.patch_all()
    import gevent

    from exporter.brokers import BrokerView
    from exporter.http import make_app, make_server
    from exporter.metrics import process_registry
    from exporter.state import ShutdownHistory, SiteState, SystemClock

    clock = SystemClock()
    states, views = [], []
    for b in range(BROKERS):
        broker = f"10.0.0.{b + 1}:1883"
        part = [SiteState(name=f"site{i:05d}", client_id=f"site{i:05d}_ibench", broker=broker,
                          protocol="3.1.1", enabled=True)
                for i in range(b, sites, BROKERS)]
        views.append(BrokerView(broker, 1.0, clock, part))
        states += part
    states.sort(key=lambda st: st.name)
    wall = clock.time()
    for i, st in enumerate(states):  # what a fleet looks like after a while
        st.state, st.connects = "connected", 1 + i % 3
        st.connect_duration.observe(0.002 + (i % 97) / 1000)
        st.messages_received, st.last_message_at = 10 * i, wall - i % 600
        st.disconnects["connection_lost"] = i % 3
    service = types.SimpleNamespace(
        clock=clock, site_states=states, instance_id="bench", running=True,
        shutdown_history=ShutdownHistory("/nonexistent/none"), bridge_store=None,
        brokers=views, **_config_status())
    app = make_app(service, process_registry())
    longest = [0.0]

    def ticker() -> None:
        last = time.perf_counter()
        while True:
            gevent.sleep(0.001)
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last - 0.001)
            last = now

    def bench_app(environ, start_response):
        path = environ.get("PATH_INFO")
        if path == "/bench/stall":
            body, longest[0] = json.dumps({"stall": longest[0]}).encode(), 0.0
        elif path == "/bench/churn":
            now = clock.time()
            for st in states:
                st.messages_received += 1
                st.last_message_at = now
            body = b"{}"
        else:
            return app(environ, start_response)
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    server = make_server(HOST, 0, bench_app)
    server.start()
    gevent.spawn(ticker)
    print(f"READY {server.server_port}", flush=True)
    gevent.wait()


class _HealthProbe(threading.Thread):
    """Polls ``/health`` every :data:`PROBE_INTERVAL` (pacing, not synchronisation) and keeps
    the slowest answer since the last :meth:`take`."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.stop, self.slowest = base, threading.Event(), 0.0
        self.active = threading.Event()  # polls only while set
        self.asking = threading.Lock()  # held during a request

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.active.wait(0.05):
                continue
            with self.asking:
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"{self.base}/health", timeout=10) as resp:
                    resp.read()
                self.slowest = max(self.slowest, time.perf_counter() - t0)
            self.stop.wait(PROBE_INTERVAL)

    def take(self) -> float:
        """The slowest answer since the last call, the request under way included."""
        with self.asking:
            slowest, self.slowest = self.slowest, 0.0
        return slowest


def _fetch(url: str, gzip: bool = False) -> bytes:
    headers = {"Accept-Encoding": "gzip"} if gzip else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
        return resp.read()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kb / 1024


def hub_round(tree: Path, sites: int) -> dict[str, Any]:
    """One server start of ``tree``'s exporter with ``sites`` sites: every scrape kind, as
    ``{kind: {"ms": [...], "stall": [...], "health": [...]}, "bytes": ..., ...}``: time and
    stall of scrapes with the /health poller off, the poller's slowest answer during as many
    scrapes with it on."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen([sys.executable, str(THIS_FILE), "serve", str(sites)], cwd=tree,
                            env=env, stdout=subprocess.PIPE, text=True)
    probe: _HealthProbe | None = None
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("READY "):
            raise RuntimeError(f"stand-in server of {tree} did not start: {line!r}")
        base = f"http://{HOST}:{int(line.split()[1])}"
        probe = _HealthProbe(base)
        probe.start()
        out: dict[str, Any] = {}

        def scrape(kind: str, polled: bool, gzip: bool = False, churn: bool = False) -> bytes:
            if churn:
                _fetch(f"{base}/bench/churn")
            _fetch(f"{base}/bench/stall")
            if polled:
                probe.active.set()
            probe.take()
            t0 = time.perf_counter()
            if kind == "no scrape":
                time.sleep(QUIET_SECONDS)  # an observation window, not a wait for something
                body = b""
            else:
                body = _fetch(f"{base}/metrics", gzip)
            ms = (time.perf_counter() - t0) * 1000
            probe.active.clear()
            health = probe.take() * 1000
            stall = json.loads(_fetch(f"{base}/bench/stall"))["stall"] * 1000
            got = out.setdefault(kind, {"ms": [], "stall": [], "health": []})
            if polled:
                got["health"].append(health)
            else:
                got["ms"].append(ms)
                got["stall"].append(stall)
            return body

        for polled in (False, True):
            for _ in range(SCRAPES):
                scrape("no scrape", polled)
        rss_before = _rss_mb(proc.pid)
        body = scrape("cold", polled=False)
        for polled in (False, True):
            for _ in range(SCRAPES):
                scrape("idle", polled)
            for _ in range(SCRAPES):
                scrape("busy", polled, churn=True)
            for _ in range(SCRAPES):
                zipped = scrape("idle, gzip", polled, gzip=True)
        out["bytes"], out["gzip_bytes"] = len(body), len(zipped)
        out["rss_before"], out["rss_after"] = rss_before, _rss_mb(proc.pid)
        out["series_per_site"] = body.count(b'site="site00000"')
        return out
    finally:
        if probe is not None:
            probe.stop.set()
            probe.join(timeout=10)
        proc.kill()
        proc.wait(timeout=10)


#: Why the first scrape has no target (it is over both, and said so in the notes).
COLD_NOTE = ("the first scrape after a start, or after the list of sites changed, writes every "
             "family once (later ones only what changed); at 10 000 sites it also sets off a "
             "full garbage collection of the process (~18 ms in one go, measured in-process), "
             "most of its longest stall")


def _hub_rows(label: str, rounds: list[dict[str, Any]], targets: bool) -> list[Row]:
    """Medians per kind over every scrape of every round: time, stall, /health max."""
    from .common import Row

    rows = []
    big = targets and label.startswith(f"{HUB_SITES[-1]} ")
    for kind in ("no scrape", "cold", "idle", "busy", "idle, gzip"):
        got = {key: [v for r in rounds for v in r[kind][key]] for key in ("ms", "stall", "health")}
        steady = big and kind not in ("no scrape", "cold")  # cold: see COLD_NOTE
        if kind != "no scrape":
            rows.append(Row(label, f"GET /metrics, {kind}", "ms", got["ms"],
                            target=TARGET_SCRAPE_MS if steady else None))
        rows.append(Row(label, f"hub stall, {kind}", "ms", got["stall"],
                        target=TARGET_STALL_MS if steady else None,
                        extra={"max": max(got["stall"])}))
        if got["health"]:
            rows.append(Row(label, f"/health max, {kind}", "ms", got["health"]))
    rows += [Row(label, "body", "MB", [r["bytes"] / 1e6 for r in rounds]),
             Row(label, "body, gzip", "MB", [r["gzip_bytes"] / 1e6 for r in rounds]),
             Row(label, "series per site", "", [r["series_per_site"] for r in rounds]),
             Row(label, "RSS before the first scrape", "MB", [r["rss_before"] for r in rounds]),
             Row(label, "RSS after the scrapes", "MB", [r["rss_after"] for r in rounds])]
    return rows


def run(ctx: BenchContext) -> BenchResult:
    from .common import REPO_ROOT, BenchResult

    runs = ctx.n_runs(default=7, quick=3)
    bridged = _service(bridged=True)
    rows, raw, note = _case(ctx, f"{bridged.bridge_store.total // 1000} k bridged series",
                            bridged, runs, TARGET_SECONDS * 1000)
    rows2, raw2, note2 = _case(ctx, f"{SUPERVISED_SITES} sites, no bridge",
                               _service(bridged=False), runs, None)
    rows += rows2
    raw += raw2
    notes = [note, note2]
    for sites in HUB_SITES:
        rounds = []
        for r in range(ctx.n_runs(default=3, quick=1)):
            rounds.append(hub_round(REPO_ROOT, sites))
            ctx.log(f"scrape {sites} sites round {r + 1}: idle "
                    f"{statistics.median(rounds[-1]['idle']['ms']):.0f} ms")
        rows += _hub_rows(f"{sites} sites over HTTP", rounds, targets=True)
        raw += [{"case": f"{sites} sites over HTTP", "round": i + 1, **r}
                for i, r in enumerate(rounds)]
        cold = [v for r in rounds for v in r["cold"]["ms"]]
        stall = [v for r in rounds for v in r["cold"]["stall"]]
        notes.append(f"{sites} sites, cold: {statistics.median(cold):.0f} ms, longest stall "
                     f"{max(stall):.0f} ms, no target: {COLD_NOTE}.")
    return BenchResult("scrape", "/metrics render time and hub stalls", METHOD, rows, raw,
                       notes=notes)


# -- side by side ----------------------------------------------------------------------------

def compare(old: Path, new: Path, rounds: int) -> str:
    """The hub cases of two trees, alternating rounds; a markdown table of medians."""
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for sites in HUB_SITES:
            for name, tree in (("old", old), ("new", new)):
                print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{rounds}: {sites} sites, "
                      f"{name} ({tree})", file=sys.stderr, flush=True)
                results.setdefault((sites, name), []).append(hub_round(tree, sites))
    lines = [f"Medians over {rounds} alternating rounds x {SCRAPES} scrapes per kind (cold: one "
             f"per round); old = `{old}`, new = `{new}`.", "",
             "| sites | metric | old | new | new/old |", "|---|---|---|---|---|"]
    for sites in HUB_SITES:
        old_rows = _hub_rows(str(sites), results[(sites, "old")], targets=False)
        new_rows = _hub_rows(str(sites), results[(sites, "new")], targets=False)
        for o, n in zip(old_rows, new_rows):
            metric = f"{o.metric} ({o.unit})" if o.unit else o.metric
            ratio = f"{n.median / o.median:.2f}" if o.median else ""
            lines.append(f"| {sites} | {metric} | {o.median:.2f} | {n.median:.2f} | {ratio} |")
            if "max" in o.extra:
                lines.append(f"| {sites} | {o.metric}, worst ({o.unit}) | {o.extra['max']:.2f} | "
                             f"{n.extra['max']:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__)
    parser.add_argument("--compare", metavar="OLD_TREE", type=Path, required=True,
                        help="a checkout of the commit to compare with (git worktree)")
    parser.add_argument("new", nargs="?", type=Path, default=THIS_FILE.parent.parent,
                        help="the tree to measure (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(compare(args.compare.resolve(), args.new.resolve(), args.rounds))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]))
    else:
        sys.exit(main())
