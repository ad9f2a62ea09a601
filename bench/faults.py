"""The fault matrix (issue #9, item 10), measured: per fault, the time to recover after the
fault ends, the takeovers and the most concurrent connections per client ID the broker saw,
and the exit code where the fault ends in a signal.

The same scenarios as ``tests/test_faults_e2e.py`` (which asserts the behaviour), with the
same scaled knobs, run ``--runs`` times each. ``python -m bench --only faults`` puts the
figures in the report; ``python -m bench.faults [--runs N]`` prints only the markdown fault
table (the one in docs/benchmarks.md, "Fault matrix").
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.broker import kick

from .common import (
    SHUTDOWN_LINE,
    BenchContext,
    BenchError,
    BenchResult,
    Broker,
    ExporterProcess,
    Row,
    free_port,
    fresh_listen_port,
    harness,
    signal_and_reap,
    site,
    wait_until,
)

#: The knobs of tests/test_faults_e2e.py.
KNOBS = {
    "MQTT_BACKOFF_MIN_SECONDS": "0.2",
    "MQTT_BACKOFF_MAX_SECONDS": "1",
    "MQTT_CONNECT_TIMEOUT": "2",
    "MQTT_STABLE_SECONDS": "2",
    "MQTT_COOLDOWN_SECONDS": "30",
    "MQTT_SHUTDOWN_TIMEOUT": "2",
    "LOG_LEVEL": "INFO",
}
TEST_FILE = "tests/test_faults_e2e.py"


# --------------------------------------------------------------------------- helpers


class Run:
    """One scenario run: its brokers and exporters, all cleaned up at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.brokers: list[Broker] = []
        self.exporters: list[ExporterProcess] = []

    def broker(self, start: bool = True, **kw: Any) -> Broker:
        b = Broker(self.workdir / f"broker-{len(self.brokers)}", **kw)
        self.brokers.append(b)
        if start:
            b.start()
        return b

    def exporter(self, sites: list[dict], instance: str, **env: object) -> ExporterProcess:
        e = ExporterProcess(self.workdir / f"exporter-{len(self.exporters)}", sites,
                            instance_id=instance,
                            env={**KNOBS, **{k: str(v) for k, v in env.items()}})
        fresh_listen_port(e)
        self.exporters.append(e)
        e.start()
        e.wait_ready(15)
        return e

    def cleanup(self) -> None:
        for e in self.exporters:
            e.cleanup()
        for b in self.brokers:
            b.cleanup()


def _up(exp: ExporterProcess, names: list[str]) -> int:
    if not exp.running:
        raise BenchError(f"exporter exited (rc={exp.returncode})\n{exp.log_tail(20)}")
    snap = exp.metrics()
    return int(sum(snap.get(("mqtt_site_up", frozenset({"site": n}.items())), 0.0)
                   for n in names))


def _wait(pred: Callable[[], Any], timeout: float, what: str, exp: ExporterProcess) -> Any:
    try:
        return wait_until(pred, timeout, interval=0.01, message=what)
    except AssertionError as exc:
        raise BenchError(f"{exc}\n{exp.log_tail(20)}") from None


def _wait_up(exp: ExporterProcess, names: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    _wait(lambda: _up(exp, names) == len(names), timeout, f"{names} up", exp)
    return time.monotonic() - t0


def _metric_at_least(exp: ExporterProcess, name: str, n: float, timeout: float,
                     **labels: str) -> None:
    _wait(lambda: (exp.metric(name, **labels) or 0) >= n, timeout, f"{name}{labels} >= {n}", exp)


def _broker_counts(broker: Broker, names: list[str], instance: str) -> dict[str, int]:
    ids = [f"{n}_i{instance}" for n in names]
    return {"takeovers": sum(broker.takeovers(c) for c in ids),
            "max_concurrent": max(broker.max_concurrent(c) for c in ids)}


def _stable(exp: ExporterProcess, names: list[str], seconds: float) -> None:
    def check() -> bool:
        _, body = exp.health(verbose=True)
        for s in body.get("sites", []):
            if s["name"] in names and (s["state"] != "connected" or s["connected_since"] is None
                                       or time.time() - s["connected_since"] <= seconds + 0.2):
                return False
        return True

    _wait(check, 15, "sites stable", exp)


def _sigterm(exp: ExporterProcess) -> dict[str, Any]:
    assert exp.proc is not None
    reaped = signal_and_reap(exp.proc, signal.SIGTERM, timeout=10.0)
    if SHUTDOWN_LINE not in exp.log_text():
        raise BenchError(f"no shutdown line\n{exp.log_tail(20)}")
    return {"exit_code": reaped.returncode, "exit_s": reaped.seconds}


# --------------------------------------------------------------------------- scenarios


def down_at_start(run: Run) -> dict[str, Any]:
    b = run.broker(start=False, port=free_port())
    names = ["late311", "late5"]
    exp = run.exporter([site("late311", b), site("late5", b, protocol="5")], "down")
    for n in names:
        _metric_at_least(exp, "mqtt_site_disconnects_total", 2, 10, site=n, reason="refused")
    b.start()
    return {"recover_s": _wait_up(exp, names, 20), **_broker_counts(b, names, "down")}


def _restart(run: Run, kill: bool) -> dict[str, Any]:
    b = run.broker()
    names = ["r311", "r5"]
    exp = run.exporter([site("r311", b), site("r5", b, protocol="5")], "rst")
    _wait_up(exp, names, 15)
    _stable(exp, names, 2)
    rc = b.kill() if kill else b.stop()
    _wait(lambda: _up(exp, names) == 0, 10, "sites down", exp)
    b.start()
    return {"recover_s": _wait_up(exp, names, 20), **_broker_counts(b, names, "rst"),
            "broker_exit_code": rc}


def restart_sigterm(run: Run) -> dict[str, Any]:
    return _restart(run, kill=False)


def restart_sigkill(run: Run) -> dict[str, Any]:
    return _restart(run, kill=True)


def frozen(run: Run) -> dict[str, Any]:
    b = run.broker()
    names = ["frz", "frz5"]
    exp = run.exporter([site("frz", b, keepalive=5), site("frz5", b, keepalive=5, protocol="5")],
                       "frz")
    _wait_up(exp, names, 15)
    b.freeze()
    t0 = time.monotonic()
    try:
        _wait(lambda: _up(exp, names) == 0, 25, "sites down (keepalive)", exp)
        detect = time.monotonic() - t0
    finally:
        b.thaw()
    recover = _wait_up(exp, names, 20)
    _stable(exp, names, 2)
    return {"recover_s": recover, "detected_s": detect, **_broker_counts(b, names, "frz")}


def auth_fixed(run: Run) -> dict[str, Any]:
    b = run.broker(users={"faultuser": "right-pw"})
    exp = run.exporter([site("auth", b, username="faultuser", password_env="FAULT_PW")], "auth",
                       FAULT_PW="wrong-pw")
    _metric_at_least(exp, "mqtt_site_disconnects_total", 2, 15, site="auth", reason="refused")
    b.users = {"faultuser": "wrong-pw"}
    b._write_passwords()
    assert b.pid is not None
    t0 = time.monotonic()
    os.kill(b.pid, signal.SIGHUP)
    _wait(lambda: _up(exp, ["auth"]) == 1, 20, "auth up", exp)
    return {"recover_s": time.monotonic() - t0, **_broker_counts(b, ["auth"], "auth")}


def unresolvable(run: Run) -> dict[str, Any]:
    b = run.broker()
    ok = ["ok1", "ok2"]
    exp = run.exporter([site("ghost", b, host="does-not-exist.invalid", port=1883)]
                       + [site(n, b) for n in ok], "dns")
    _wait_up(exp, ok, 15)
    _metric_at_least(exp, "mqtt_site_disconnects_total", 3, 15, site="ghost", reason="refused")
    if not re.search(r"failed: dns: cannot resolve host", exp.log_text()):
        raise BenchError("no dns error logged")
    if any(exp.metric("mqtt_site_connects_total", site=n) != 1 for n in ok):
        raise BenchError("a healthy site reconnected")
    return {**_broker_counts(b, ok, "dns"), **_sigterm(exp)}


def sigterm_backoff(run: Run) -> dict[str, Any]:
    exp = run.exporter([{"name": "wait", "host": harness.HOST, "port": free_port()}], "bo",
                       MQTT_BACKOFF_MIN_SECONDS=30, MQTT_BACKOFF_MAX_SECONDS=60)
    _wait(lambda: exp.metric("mqtt_site_state", site="wait", state="backoff") == 1
          and "Reconnecting to" in exp.log_text(), 15, "in backoff", exp)
    return _sigterm(exp)



def sigterm_cooldown(run: Run) -> dict[str, Any]:
    b = run.broker()
    exp = run.exporter([site("cool", b)], "cd", MQTT_COOLDOWN_SECONDS=60, MQTT_STABLE_SECONDS=10,
                       MQTT_PRESENCE_ENABLED="false")
    for n in (1, 2):
        _metric_at_least(exp, "mqtt_site_connects_total", n, 15, site="cool")
        kick(b, "cool_icd")
    _wait(lambda: exp.metric("mqtt_site_state", site="cool", state="cooldown") == 1, 15,
          "in cooldown", exp)
    return _sigterm(exp)


#: (key, fault, what the exporter does, proving test, scenario or None when covered elsewhere)
FAULTS: list[tuple[str, str, str, str, Callable[[Run], dict[str, Any]] | None]] = [
    ("down_at_start", "broker down at start, then started",
     "`refused` with backoff (health critical); connects at the next attempt",
     "test_broker_down_at_start_then_started", down_at_start),
    ("restart_sigterm", "broker restart (SIGTERM)",
     "`connection_lost`, backoff, reconnect; no takeover, no cooldown",
     "test_broker_restart_is_no_takeover[sigterm]", restart_sigterm),
    ("restart_sigkill", "broker restart (SIGKILL)",
     "`connection_lost`, backoff, reconnect; no takeover, no cooldown",
     "test_broker_restart_is_no_takeover[sigkill]", restart_sigkill),
    ("frozen", "broker frozen (SIGSTOP) past `keepalive: 5`, then thawed",
     "`keepalive_timeout` after ~2 x keepalive, attempts time out (`refused`), reconnect after "
     "the thaw", "test_broker_frozen_past_keepalive_then_thawed", frozen),
    ("auth_fixed", "credentials refused, then fixed on the broker (SIGHUP reload)",
     "`refused`, `last_error` `refused: not authorised` (logged once); same process connects",
     "test_auth_refused_then_fixed_on_the_broker", auth_fixed),
    ("unresolvable", "unresolvable host (`does-not-exist.invalid`)",
     "`dns: cannot resolve host`, backoff; other sites untouched (health degraded); clean "
     "SIGTERM", "test_unresolvable_host_backs_off_and_spares_the_others", unresolvable),
    ("sigterm_backoff", "SIGTERM during a 24-30 s backoff",
     "backoff sleep interrupted, exit 0, shutdown line", "test_sigterm_in_backoff_exits_at_once",
     sigterm_backoff),
    ("sigterm_cooldown", "SIGTERM during a 60 s takeover cooldown",
     "cooldown interrupted, exit 0, shutdown line", "test_sigterm_in_cooldown_exits_at_once",
     sigterm_cooldown),
    ("-", "SIGTERM while the broker is down / waiting for CONNACK",
     "exit 0 at once, no shutdown timeout", "tests/test_lifecycle.py: "
     "test_sigterm_while_broker_down_is_clean, test_sigterm_while_waiting_for_connack_exits_"
     "without_waiting", None),
    ("-", "broker killed 4 times 3 s apart, 20 sites", "one broker event each, no takeover",
     "tests/test_broker_events_e2e.py: test_broker_killed_four_times_is_no_takeover", None),
    ("-", "each TLS failure", "named in `last_error` and logged once",
     "tests/test_tls_e2e.py: test_fault_is_named_in_health_and_log_once", None),
    ("-", "hostile payloads on a bridged site", "counted as bridge errors, connection untouched",
     "tests/test_bridge_integration.py: test_hostile_payloads_do_not_touch_the_connection", None),
    ("-", "HTTP abuse (1000 concurrent, slow clients, huge headers, bad query strings)",
     "bounded pool and deadlines; MQTT unaffected", "tests/test_http_limits_e2e.py", None),
]


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fault_table(raw: list[dict[str, Any]]) -> str:
    """The markdown fault table from the raw runs (medians; takeovers and peaks as max)."""
    out = ["| fault | what the exporter does | test | recover after the fault ends (s) "
           "| takeovers / max connections per client ID (broker) | exit code (s to exit) |",
           "|---|---|---|---|---|---|"]
    for key, fault, does, test, scenario in FAULTS:
        runs = [r for r in raw if r["fault"] == key] if scenario else []
        rec = _med([r["recover_s"] for r in runs if "recover_s" in r])
        extra = _med([r["detected_s"] for r in runs if "detected_s" in r])
        recover = "" if rec is None else f"{rec:.2f}"
        if extra is not None:
            recover += f" (down {extra:.1f} s after SIGSTOP)"
        dup = (f"{max(r['takeovers'] for r in runs)} / {max(r['max_concurrent'] for r in runs)}"
               if runs and "takeovers" in runs[0] else "")
        codes = sorted({r[k] for r in runs for k in ("exit_code", "broker_exit_code") if k in r})
        ex = _med([r["exit_s"] for r in runs if "exit_s" in r])
        code = ", ".join(map(str, codes))
        if "broker_exit_code" in (runs[0] if runs else {}):
            code = f"broker {code}"
        if ex is not None:
            code += f" ({ex:.3f} s)"
        where = f"`{TEST_FILE}::{test}`" if scenario else test
        if runs:
            where += f" ({len(runs)} run{'s' if len(runs) > 1 else ''})"
        out.append(f"| {fault} | {does} | {where} | {recover or '-'} | {dup or '-'} "
                   f"| {code or '-'} |")
    return "\n".join(out)


METHOD = f"""\
Each scenario of `{TEST_FILE}` with its knobs (backoff 0.2..1 s, connect timeout 2 s, stable
after 2 s, cooldown 30 s), a fresh Mosquitto and a fresh exporter process per run, everything
on 127.0.0.1. **recover** = from the moment the fault ends (broker started, SIGCONT, SIGHUP
after the password file was fixed) until `/metrics` shows every site up (polled every 10 ms).
**takeovers** and **max connections per client ID** come from the broker's log
(`Broker.takeovers`, `Broker.max_concurrent`); 0 and 1 are the correct values. **exit code**:
of the exporter after SIGTERM (timed with a pidfd), or of the broker for the restart faults."""


def measure(ctx: BenchContext) -> tuple[list[dict[str, Any]], list[str]]:
    runs = ctx.n_runs(default=3, quick=1)
    raw: list[dict[str, Any]] = []
    errors: list[str] = []
    for key, _, _, _, scenario in FAULTS:
        if scenario is None:
            continue
        for i in range(1, runs + 1):
            r = Run(ctx.workdir / f"{key}-{i}")
            try:
                rec = {"fault": key, "run": i, **scenario(r)}
                raw.append({k: round(v, 4) if isinstance(v, float) else v
                            for k, v in rec.items()})
                ctx.log(f"faults {key} run {i}: {rec}")
            except (BenchError, AssertionError) as exc:
                errors.append(f"{key} run {i}: {exc}")
                ctx.log(f"faults {key} run {i} FAILED: {exc}")
            finally:
                r.cleanup()
    return raw, errors


def run(ctx: BenchContext) -> BenchResult:
    raw, errors = measure(ctx)
    rows = []
    for key, fault, *_ in FAULTS:
        mine = [r for r in raw if r["fault"] == key]
        rec = [r["recover_s"] * 1000 for r in mine if "recover_s" in r]
        ex = [r["exit_s"] * 1000 for r in mine if "exit_s" in r]
        if rec:
            rows.append(Row(fault, "recover", "ms", rec, extra={"runs ok": len(rec)}))
        if ex:
            rows.append(Row(fault, "SIGTERM->exit", "ms", ex, target=1000.0,
                            extra={"runs ok": len(ex)}))
        for r in mine:
            if r.get("takeovers") or r.get("max_concurrent", 1) > 1:
                errors.append(f"{key} run {r['run']}: the broker saw a duplicate: {r}")
            if "exit_code" in r and r["exit_code"] != 0:
                errors.append(f"{key} run {r['run']}: exit code {r['exit_code']}")
    method = METHOD + "\n\n### Fault table\n\n" + fault_table(raw)
    return BenchResult("faults", "Fault matrix: recovery, duplicates, exit codes", method, rows,
                       raw, errors=errors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults",
                                description="Measure the fault matrix; print the markdown table.")
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-bench-faults-"))
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr)  # noqa: E731
    try:
        raw, errors = measure(BenchContext(quick=False, runs=args.runs, workdir=workdir, log=log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(fault_table(raw))
    for e in errors:
        print(f"error: {e.splitlines()[0]}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
