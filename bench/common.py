"""Shared pieces of the benchmarks: context/result types, statistics, exact process timing,
the "settled" check, and a snapshot of retained status messages.

Processes, brokers and watchers come from ``tests/support`` (imported, not copied; run the
benchmarks from the repository root, ``python -m bench``, so that ``tests`` is importable).
"""
from __future__ import annotations

import dataclasses
import math
import os
import select
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import support as harness
from tests.support import (  # noqa: F401  (re-exported for the benchmarks)
    REPO_ROOT,
    Broker,
    ExporterProcess,
    StatusWatcher,
    free_port,
    mqtt_client,
    site,
    wait_until,
)

STATUS_FILTER = "+/backend/status"
SHUTDOWN_LINE = "All connections disconnected in"

#: Clock ticks per second for /proc/<pid>/stat utime/stime.
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- types


@dataclasses.dataclass
class BenchContext:
    """What every benchmark function gets."""

    quick: bool
    runs: int | None          # --runs override (None: the benchmark's default)
    workdir: Path             # a fresh directory for this benchmark
    log: Callable[[str], None]

    def n_runs(self, default: int, quick: int) -> int:
        if self.runs is not None:
            return self.runs
        return quick if self.quick else default


@dataclasses.dataclass
class Row:
    """One line of the summary table (one case of a benchmark)."""

    case: str
    metric: str
    unit: str
    values: list[float]               # every run, in run order
    target: float | None = None       # pass when median <= target
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # more columns

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p90(self) -> float:
        return percentile(self.values, 90)

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.median <= self.target else "FAIL"


@dataclasses.dataclass
class BenchResult:
    name: str
    title: str
    method: str                                   # markdown paragraph(s)
    rows: list[Row]
    raw: list[dict[str, Any]]                     # one dict per run (every measured field)
    notes: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)


class BenchError(AssertionError):
    """A run failed its checks (exit code, offline status, ...)."""


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p % of the values <= it."""
    s = sorted(values)
    k = max(1, math.ceil(p / 100.0 * len(s)))
    return s[k - 1]


# --------------------------------------------------------------------------- processes


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (raises if the process is gone)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def wait_cpu_quiet(pids: list[int], timeout: float, window: float = 0.1, quiet_windows: int = 2,
                   max_ticks: int = 1) -> float:
    """Until every pid used <= ``max_ticks`` of CPU in ``quiet_windows`` consecutive windows.

    The "settled" condition: the exporter has finished handling its CONNACKs, the online
    publishes, SUBACKs and PUBACKs, and the broker has finished fanning out. Returns the
    seconds it took. Raises BenchError after ``timeout``.
    """
    start = time.monotonic()
    deadline = start + timeout
    last = [proc_cpu_ticks(p) for p in pids]
    quiet = 0
    while quiet < quiet_windows:
        if time.monotonic() > deadline:
            raise BenchError(f"processes {pids} never went quiet within {timeout:.1f} s")
        time.sleep(window)
        now = [proc_cpu_ticks(p) for p in pids]
        busy = any(b - a > max_ticks for a, b in zip(last, now))
        quiet = 0 if busy else quiet + 1
        last = now
    return time.monotonic() - start


@dataclasses.dataclass
class Reaped:
    mono_at_kill: float     # time.monotonic() right before os.kill (the watcher's clock)
    kill_at: float          # time.perf_counter() right before os.kill
    reaped_at: float        # time.perf_counter() when waitpid returned
    returncode: int         # as Popen reports it: negative for a signal
    rusage: Any = None      # resource.struct_rusage of the child (wait4): its CPU, all threads

    @property
    def seconds(self) -> float:
        return self.reaped_at - self.kill_at


def signal_and_reap(proc, sig: int, timeout: float) -> Reaped:
    """Send ``sig`` to ``proc`` and block until the kernel reports its exit; reap it.

    Waits on a pidfd, which becomes readable the moment
    the process exits, so the measurement has no polling granularity (Popen.wait(timeout)
    sleeps in up-to-50 ms steps). On timeout the process is SIGKILLed and BenchError raised.
    """
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        m0 = time.monotonic()
        t0 = time.perf_counter()
        os.kill(proc.pid, sig)
        ready = poller.poll(timeout * 1000)
        if not ready:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise BenchError(f"pid {proc.pid} did not exit within {timeout:.1f} s of signal {sig}")
        _, status, rusage = os.wait4(proc.pid, 0)
        t1 = time.perf_counter()
    finally:
        os.close(pidfd)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Reaped(m0, t0, t1, proc.returncode, rusage)


def wait_healthy(exp: ExporterProcess, n: int, timeout: float) -> float:
    """Poll /health until connections.healthy == n; returns the seconds it took."""
    start = time.monotonic()
    exp.wait_ready(timeout=timeout)

    def all_connected():
        if not exp.running:
            raise BenchError(f"exporter exited (rc={exp.returncode})\n{exp.log_tail()}")
        try:
            _, body = exp.health()
        except OSError:
            return False
        return body.get("connections", {}).get("healthy") == n

    remaining = max(0.1, timeout - (time.monotonic() - start))
    try:
        wait_until(all_connected, remaining, interval=0.05, message=f"{n} sites healthy")
    except AssertionError as exc:
        raise BenchError(f"{exc}\n{exp.log_tail(20)}") from None
    return time.monotonic() - start


def status_topics(names: list[str]) -> list[str]:
    return [f"{n}/backend/status" for n in names]


def live_statuses(watcher: StatusWatcher, payload: str, after: float) -> dict[str, float]:
    """{topic: first receive time} of non-retained ``payload`` messages received after ``after``.

    Live (forwarded) messages reach a v3.1.1 subscriber with retain=0; only the copies sent
    for a new subscription carry retain=1, so retained leftovers of earlier runs are skipped.
    """
    first: dict[str, float] = {}
    for t, topic, p, retain in watcher.snapshot():
        if t > after and p == payload and not retain and topic not in first:
            first[topic] = t
    return first


def wait_live_statuses(watcher: StatusWatcher, topics: list[str], payload: str, after: float,
                       timeout: float) -> dict[str, float]:
    want = set(topics)

    def complete():
        got = live_statuses(watcher, payload, after)
        return got if want <= got.keys() else None

    try:
        got = wait_until(complete, timeout, interval=0.005,
                         message=f"{payload!r} on all {len(want)} status topics")
    except AssertionError:
        got = live_statuses(watcher, payload, after)
        missing = sorted(want - got.keys())
        raise BenchError(f"{len(missing)} of {len(want)} status topics got no live {payload!r} "
                         f"within {timeout:.1f} s, e.g. {missing[:5]}") from None
    return {t: got[t] for t in topics}


def retained_snapshot(broker: Broker, topic_filter: str = STATUS_FILTER,
                      timeout: float = 10.0) -> dict[str, str]:
    """{topic: payload} of every retained message matching ``topic_filter``."""
    return harness.retained_all(broker, topic_filter, timeout)


def cpu_pressure() -> float | None:
    """``some avg10`` of /proc/pressure/cpu: % of the last 10 s in which some runnable task
    waited for a CPU (None without PSI). Above a few % the machine is contended."""
    try:
        with open("/proc/pressure/cpu") as fh:
            line = fh.readline()
        return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def fresh_listen_port(exp: ExporterProcess) -> None:
    """Give ``exp`` a new EXPORTER_LISTEN port before (re)starting it."""
    exp.port = free_port()
    exp.env["EXPORTER_LISTEN"] = f"{harness.HOST}:{exp.port}"


def exporter_env(**extra: str) -> dict[str, str]:
    """Environment for the benchmarked exporter: defaults of the service, quiet paho."""
    env = {"LOG_LEVEL": "INFO", "MQTT_SHUTDOWN_TIMEOUT": "5"}
    env.update(extra)
    return env


__all__ = [name for name in dir() if not name.startswith("_")] + ["harness"]
