"""SIGKILL-to-offline: how long until subscribers see the Last Will of a killed exporter.

A fresh exporter per run with 10 sites on one Mosquitto; a StatusWatcher subscribed to
``+/backend/status``. Latency = first live ``offline`` receive time - ``time.monotonic()``
taken right before ``os.kill(pid, SIGKILL)``; also the time until all 10 have arrived.
"""
from __future__ import annotations

import os
import time

from .common import (
    STATUS_FILTER,
    BenchContext,
    BenchError,
    BenchResult,
    Broker,
    ExporterProcess,
    Row,
    StatusWatcher,
    cpu_pressure,
    exporter_env,
    fresh_listen_port,
    retained_snapshot,
    signal_and_reap,
    site,
    status_topics,
    wait_cpu_quiet,
    wait_healthy,
    wait_live_statuses,
)

SITES = 10
TARGET_SECONDS = 0.020

METHOD = f"""\
One Mosquitto on 127.0.0.1 (via `tests.support.Broker`), {SITES} sites on it, and a
`StatusWatcher` (paho network thread in the bench process) subscribed to `{STATUS_FILTER}`
QoS 1 for the whole benchmark. Each run starts a **fresh** exporter process, polls `/health`
until all {SITES} are connected, waits for the live `online` of every site and for the exporter
and broker to go CPU-quiet (same settle rule as the shutdown benchmark), then takes
`t0 = time.monotonic()` right before `os.kill(pid, SIGKILL)` and reaps the process.
**first offline** = receive time (time.monotonic() in the watcher's on_message) of the first
live (retain=0) `offline` after t0 - t0; **all offline** = the same for the last of the {SITES}
sites. Both include the kernel closing the dead process's sockets, Mosquitto noticing and
publishing the wills, and paho's thread in the bench delivering the message. Checks per run:
exit status -9, an `offline` for every site, every retained status `offline` afterwards.
Statistics: median, p90 (nearest rank), max; target: first offline <= {TARGET_SECONDS * 1000:.0f} ms
median."""


def _one_run(ctx: BenchContext, broker: Broker, watcher: StatusWatcher, run: int) -> dict:
    names = [f"k{i:02d}" for i in range(SITES)]
    topics = status_topics(names)
    exp = ExporterProcess(ctx.workdir / f"exporter-{run:02d}", [site(n, broker) for n in names],
                          instance_id="benchkill", env=exporter_env())
    t_start = time.monotonic()
    fresh_listen_port(exp)
    exp.start()
    try:
        wait_healthy(exp, SITES, timeout=30.0)
        wait_live_statuses(watcher, topics, "online", after=t_start, timeout=10.0)
        wait_cpu_quiet([exp.pid, broker.pid], timeout=15.0)
        load1, psi = os.getloadavg()[0], cpu_pressure()
        reaped = signal_and_reap(exp.proc, 9, timeout=10.0)
    finally:
        exp.cleanup()
    if reaped.returncode != -9:
        raise BenchError(f"run {run}: exit status {reaped.returncode}, expected -9")
    offline = wait_live_statuses(watcher, topics, "offline", after=reaped.mono_at_kill,
                                 timeout=10.0)
    retained = retained_snapshot(broker)
    bad = [t for t in topics if retained.get(t) != "offline"]
    if bad:
        raise BenchError(f"run {run}: retained status not 'offline' for {bad}")
    t0 = reaped.mono_at_kill
    rec = {
        "run": run,
        "first_offline_ms": round((min(offline.values()) - t0) * 1000, 3),
        "all_offline_ms": round((max(offline.values()) - t0) * 1000, 3),
        "kill_to_reaped_ms": round(reaped.seconds * 1000, 3),
        "exit_status": reaped.returncode,
        "load1": round(load1, 2),
        "cpu_psi10": psi,
    }
    ctx.log(f"kill_offline run {run}: first offline {rec['first_offline_ms']:.2f} ms, "
            f"all {SITES} {rec['all_offline_ms']:.2f} ms")
    return rec


def run(ctx: BenchContext) -> BenchResult:
    runs = ctx.n_runs(default=20, quick=5)
    raw: list[dict] = []
    errors: list[str] = []
    broker = Broker(ctx.workdir / "broker")
    watcher = None
    try:
        broker.start()
        watcher = StatusWatcher(broker, STATUS_FILTER)
        for r in range(1, runs + 1):
            try:
                raw.append(_one_run(ctx, broker, watcher, r))
            except BenchError as exc:
                errors.append(str(exc))
                ctx.log(f"kill_offline run {r} FAILED: {exc}")
    finally:
        if watcher is not None:
            watcher.close()
        broker.cleanup()
    rows = []
    if raw:
        ok = f"{len(raw)}/{runs}"
        rows = [
            Row(f"{SITES} sites", "SIGKILL->first offline", "ms",
                [r["first_offline_ms"] for r in raw], target=TARGET_SECONDS * 1000,
                extra={"runs ok": ok}),
            Row(f"{SITES} sites", f"SIGKILL->all {SITES} offline", "ms",
                [r["all_offline_ms"] for r in raw], extra={"runs ok": ok}),
            Row(f"{SITES} sites", "SIGKILL->reaped", "ms",
                [r["kill_to_reaped_ms"] for r in raw], extra={"runs ok": ok}),
        ]
    return BenchResult("kill_offline", "SIGKILL to Last Will offline", METHOD, rows, raw,
                       errors=errors)
