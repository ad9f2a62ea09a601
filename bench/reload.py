"""Reload: SIGHUP that turns a 1-site process into a 10 000-site one, and what the hub feels.

The sites are disabled (``enabled: false``): this measures the reload itself (read, parse and
validate the document in gevent's thread pool, build the connections) apart from connecting,
which bench/scale.py measures. While it runs a thread in the bench polls ``/health`` back to
back; its slowest answer is how long the hub was held.
"""
from __future__ import annotations

import os
import signal
import statistics
import threading
import time
import urllib.request

import yaml

from .common import BenchContext, BenchError, BenchResult, ExporterProcess, Row

SITES = 10_000
TARGET_STALL_SECONDS = 0.25

METHOD = f"""\
A fresh exporter process per run with one disabled site and `MQTT_SITES_RELOAD_SECONDS=0`.
The sites file is replaced atomically (write + rename) by one with {SITES} disabled sites on
127.0.0.1 (nothing connects: this is the cost of the reload itself, not of connecting), then
SIGHUP. **reload** = SIGHUP to the log line `Sites reloaded ... {SITES} added` (time of the
line, read back by polling the log). Meanwhile a thread in the bench sends `GET /health`
back to back on fresh connections: **/health max** is its slowest answer during the reload
(the longest the hub was held), **/health median** its median. Target: /health max <=
{TARGET_STALL_SECONDS * 1000:.0f} ms median over runs."""


def _replace(path, sites) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"sites": sites}, sort_keys=False))
    os.replace(tmp, path)


def _one_run(ctx: BenchContext, run: int) -> dict:
    one = [{"name": "only", "host": "127.0.0.1", "port": 1, "enabled": False}]
    many = [{"name": f"r{i:05d}", "host": "127.0.0.1", "port": 1, "enabled": False}
            for i in range(SITES)]
    exp = ExporterProcess(ctx.workdir / f"exporter-{run:02d}", one, instance_id="benchreload",
                          env={"MQTT_SITES_RELOAD_SECONDS": "0"})
    exp.start()
    try:
        exp.wait_ready(15)
        _replace(exp.sites_file, many)
        latencies: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                t = time.perf_counter()
                with urllib.request.urlopen(f"{exp.url}/health", timeout=30) as resp:
                    resp.read()
                latencies.append(time.perf_counter() - t)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.monotonic()
        exp.signal(signal.SIGHUP)
        exp.wait_log(rf"Sites reloaded from .*: {SITES} added", 60)
        reload_s = time.monotonic() - t0
        done.set()
        poller.join(30)
        if not latencies:
            raise BenchError("no /health answer during the reload")
        return {"reload_s": reload_s, "health_max_s": max(latencies),
                "health_median_s": statistics.median(latencies), "requests": len(latencies)}
    finally:
        exp.cleanup()


def run(ctx: BenchContext) -> BenchResult:
    runs = ctx.n_runs(default=3, quick=1)
    raw = []
    for i in range(runs):
        raw.append(_one_run(ctx, i))
        ctx.log(f"reload run {i}: {raw[-1]}")
    rows = [
        Row(f"SIGHUP 1 -> {SITES} sites", "reload", "s", [r["reload_s"] for r in raw]),
        Row(f"SIGHUP 1 -> {SITES} sites", "/health max", "s",
            [r["health_max_s"] for r in raw], target=TARGET_STALL_SECONDS),
        Row(f"SIGHUP 1 -> {SITES} sites", "/health median", "s",
            [r["health_median_s"] for r in raw]),
    ]
    return BenchResult("reload", "Reload of 10 000 sites", METHOD, rows, raw)
