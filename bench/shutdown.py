"""SIGTERM-to-exit of the whole exporter process at 1, 100 and 1000 sites.

All sites live on one Mosquitto on 127.0.0.1 (a fresh broker per site count, RLIMIT_NOFILE
raised by the harness). For every run: start ``python -m exporter run``, wait until /health
reports all N connected, let it settle, then time ``os.kill(pid, SIGTERM)`` -> ``waitpid``
returning. Each run must exit 0, publish a live ``offline`` for every site and leave every
site's retained status ``offline``.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import time

from .common import (
    CLK_TCK,
    SHUTDOWN_LINE,
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

SITE_COUNTS = (1, 100, 1000)
TARGET_SECONDS = 0.150          # the target, at 1000 sites
TARGET_SITES = 1000
SHUTDOWN_TIMEOUT = 5.0          # MQTT_SHUTDOWN_TIMEOUT given to the exporter (its default)
_RE_LOGGED = re.compile(re.escape(SHUTDOWN_LINE) + r" (\d+(?:\.\d+)?) s")

METHOD = f"""\
For N in {", ".join(map(str, SITE_COUNTS))}: one fresh Mosquitto on 127.0.0.1 (started by the
bench through `tests.support.Broker`, RLIMIT_NOFILE raised to 65536 or the hard limit), N
sites `sNNNN` on it, one exporter process (`python -m exporter run` via
`tests.support.ExporterProcess`: LOG_FORMAT=text, LOG_LEVEL=INFO,
MQTT_SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT:g}, MQTT v3.1.1, LWT on, state dir on the local disk).
A `StatusWatcher` subscribed to `{STATUS_FILTER}` (QoS 1) runs for the whole case.

Each run: start the exporter; poll `/health` every 50 ms until `connections.healthy == N`;
then **settle** without a blind sleep: (1) wait until the watcher has received the live
(retain=0) `online` of every site, i.e. the broker has processed every online PUBLISH, and
(2) wait until both the exporter and the broker used at most 1 CPU tick
(1/{CLK_TCK} s) in each of two consecutive 100 ms windows (`/proc/<pid>/stat`), i.e. the
CONNACK/SUBACK/PUBACK handling is over. Then `perf_counter()`, `os.kill(pid, SIGTERM)`,
block on a pidfd (readable the instant the process exits, no polling granularity),
`waitpid`, `perf_counter()`: that is **SIGTERM->exit**. The exporter's own figure is read from
its log line `{SHUTDOWN_LINE} X.XX s` (2 decimals) and, precisely, from
`last_duration_seconds` in its state file `shutdown-history.json` (signal arrival -> all
sockets closed by the broker; written *after* that interval, with an fsync).
Checks per run (a failed check fails the run): exit code 0, no "Shutdown hit the ... timeout"
warning, a live `offline` received for every site after the signal, and a fresh subscriber
to `{STATUS_FILTER}` finds every site's retained status `offline`.
Statistics: median, min, max over the runs; the target (<= {TARGET_SECONDS * 1000:.0f} ms
median) applies to N = {TARGET_SITES}. The ratio of the {TARGET_SITES}-site median to the
1-site median separates the per-connection cost from the fixed per-process exit cost
(signal, history fsync, HTTP stop, kernel teardown; process start is outside the interval)."""


def _one_run(ctx: BenchContext, broker: Broker, watcher: StatusWatcher, exp: ExporterProcess,
             names: list[str], run: int) -> dict:
    n = len(names)
    topics = status_topics(names)
    log_offset = len(exp.log_text())
    t_start = time.monotonic()
    fresh_listen_port(exp)
    exp.start()
    try:
        connect_s = wait_healthy(exp, n, timeout=30.0 + 0.02 * n)
        wait_live_statuses(watcher, topics, "online", after=t_start, timeout=10.0)
        settle_s = wait_cpu_quiet([exp.pid, broker.pid], timeout=15.0)
        load1, psi = os.getloadavg()[0], cpu_pressure()
        reaped = signal_and_reap(exp.proc, 15, timeout=SHUTDOWN_TIMEOUT + 10.0)
    finally:
        exp.cleanup()
    out = exp.log_text()[log_offset:]
    if reaped.returncode != 0:
        raise BenchError(f"run {run}: exit code {reaped.returncode}\n{exp.log_tail(20)}")
    if "Shutdown hit the" in out:
        raise BenchError(f"run {run}: shutdown hit its timeout\n{exp.log_tail(20)}")
    m = _RE_LOGGED.search(out)
    if not m:
        raise BenchError(f"run {run}: no '{SHUTDOWN_LINE}' line in the log\n{exp.log_tail(20)}")
    logged_s = float(m.group(1))
    try:
        history = json.loads((exp.state_dir / "shutdown-history.json").read_text())
        state_s = float(history["last_duration_seconds"])
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(f"run {run}: cannot read the shutdown history: {exc}") from None
    offline = wait_live_statuses(watcher, topics, "offline", after=reaped.mono_at_kill,
                                 timeout=10.0)
    retained = retained_snapshot(broker)
    bad = [t for t in topics if retained.get(t) != "offline"]
    if bad:
        raise BenchError(f"run {run}: {len(bad)} of {n} retained statuses are not 'offline', "
                         f"e.g. {[(t, retained.get(t)) for t in bad[:5]]}")
    rec = {
        "sites": n,
        "run": run,
        "sigterm_to_exit_ms": round(reaped.seconds * 1000, 2),
        "in_process_ms": round(state_s * 1000, 2),
        "logged_s": logged_s,
        "after_shutdown_ms": round((reaped.seconds - state_s) * 1000, 2),
        "last_offline_seen_ms": round((max(offline.values()) - reaped.mono_at_kill) * 1000, 2),
        "connect_all_s": round(connect_s, 3),
        "settle_s": round(settle_s, 3),
        "exit_code": reaped.returncode,
        "load1": round(load1, 2),
        "cpu_psi10": psi,
        "retained_offline": n - len(bad),
    }
    ctx.log(f"shutdown N={n} run {run}: {rec['sigterm_to_exit_ms']:.1f} ms to exit, "
            f"in-process {rec['in_process_ms']:.1f} ms (log {logged_s:.2f} s), "
            f"connect {connect_s:.2f} s, settle {settle_s:.2f} s")
    return rec


def run(ctx: BenchContext) -> BenchResult:
    runs = ctx.n_runs(default=7, quick=3)
    raw: list[dict] = []
    rows: list[Row] = []
    errors: list[str] = []
    medians: dict[int, float] = {}
    for n in SITE_COUNTS:
        broker = Broker(ctx.workdir / f"broker-{n}")
        watcher = None
        try:
            broker.start()
            watcher = StatusWatcher(broker, STATUS_FILTER)
            names = [f"s{i:04d}" for i in range(n)]
            exp = ExporterProcess(ctx.workdir / f"exporter-{n}",
                                  [site(name, broker) for name in names],
                                  instance_id="bench", env=exporter_env(
                                      MQTT_SHUTDOWN_TIMEOUT=f"{SHUTDOWN_TIMEOUT:g}"))
            case_raw = []
            for r in range(1, runs + 1):
                try:
                    case_raw.append(_one_run(ctx, broker, watcher, exp, names, r))
                except BenchError as exc:
                    errors.append(f"N={n}: {exc}")
                    ctx.log(f"shutdown N={n} run {r} FAILED: {exc}")
            raw += case_raw
        finally:
            if watcher is not None:
                watcher.close()
            broker.cleanup()
        if not case_raw:
            continue
        wall = [r["sigterm_to_exit_ms"] for r in case_raw]
        medians[n] = statistics.median(wall)
        rows.append(Row(f"N={n}", "SIGTERM->exit", "ms", wall,
                        target=TARGET_SECONDS * 1000 if n == TARGET_SITES else None,
                        extra={"runs ok": f"{len(case_raw)}/{runs}"}))
        rows.append(Row(f"N={n}", "in-process shutdown", "ms",
                        [r["in_process_ms"] for r in case_raw],
                        extra={"runs ok": f"{len(case_raw)}/{runs}"}))
        rows.append(Row(f"N={n}", "exit after shutdown", "ms",
                        [r["after_shutdown_ms"] for r in case_raw],
                        extra={"runs ok": f"{len(case_raw)}/{runs}"}))
    notes = []
    if 1 in medians and TARGET_SITES in medians:
        notes.append(f"Ratio of the {TARGET_SITES}-site median to the 1-site median "
                     f"(SIGTERM->exit): {medians[TARGET_SITES]:.1f} / {medians[1]:.1f} ms = "
                     f"{medians[TARGET_SITES] / medians[1]:.2f}x; the 1-site time is "
                     f"the fixed per-process exit cost (signal handling, history fsync, HTTP "
                     f"stop, kernel teardown), "
                     f"the difference ({medians[TARGET_SITES] - medians[1]:.1f} ms) is what "
                     f"{TARGET_SITES} connections add.")
    return BenchResult("shutdown", "SIGTERM to exit (whole process)", METHOD, rows, raw,
                       notes=notes, errors=errors)
