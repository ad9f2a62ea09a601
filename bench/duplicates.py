"""Duplicate instances (docs/duplicates.md) with the real defaults, on three brokers, and a
crash-looping broker that must never be taken for a duplicate.

Part 1, per broker (Mosquitto MQTT 3.1.1, Mosquitto MQTT 5, amqtt 0.12.1; the three run at the
same time, each on its own broker): exporter 1 up on every site, then exporter 2 with the same
instance ID. Time from the second start until every site is flagged on both sides; then
takeovers and connects per site per minute in the first minutes after convergence; then SIGTERM
of the second and the time until the first's flags clear.

Part 2: one exporter, N sites on one Mosquitto, the broker SIGKILLed and restarted K times
3 s apart: cooldowns, takeovers, duplicate flags, broker events, and the seconds until every
site is back after the last restart.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from .common import (
    BenchContext,
    BenchError,
    BenchResult,
    Broker,
    ExporterProcess,
    Row,
    cpu_pressure,
    exporter_env,
    harness,
    site,
    wait_until,
)

INSTANCE = "benchdup"
FLAG_TIMEOUT = 120.0      # give up waiting for both sides to flag every site
CLEAR_TIMEOUT = 20.0      # ... and for the first's flags to clear after the second's SIGTERM,
CLEAR_CAP = 150.0         # plus exporter 1's longest cooldown left then, at most this in all
BACK_TIMEOUT = 240.0      # ... and for every site back after the crash loop
RESTART_GAP = 3.0         # seconds between two broker kills (crash loop)
POLL = 0.1                # /metrics poll interval of the bench

BROKERS = ("mosquitto v3.1.1", "mosquitto v5", "amqtt v3.1.1")


def _params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sites": 3, "minutes": 1, "crash": [(20, 4)]}
    return {"sites": 10, "minutes": 3, "crash": [(20, 4), (200, 3)]}


def method(quick: bool) -> str:
    p = _params(quick)
    crash = ", ".join(f"{n} sites x {k} restarts" for n, k in p["crash"])
    return f"""\
Real defaults of the exporter throughout (`MQTT_COOLDOWN_SECONDS` 30, \
`MQTT_DUPLICATE_COOLDOWN_MAX_SECONDS` 600, backoff 1-60 s, stable 10 s, keepalive 60,
clean session, presence on); only `LOG_LEVEL=INFO` and `MQTT_SHUTDOWN_TIMEOUT=5` are set.
Everything on 127.0.0.1; the bench polls each exporter's `/metrics` every {POLL:g} s.

**Duplicates** (three cases at the same time, each with its own broker: Debian Mosquitto with
{p['sites']} MQTT 3.1.1 sites, the same with MQTT 5 sites, amqtt 0.12.1 from `.venv-amqtt`
with {p['sites']} MQTT 3.1.1 sites): start exporter 1 (instance `{INSTANCE}`), wait until
`mqtt_site_up` is 1 on every site, then start exporter 2 with the same instance ID (same client
IDs). **time to flag** = from exporter 2's `Popen` until `mqtt_site_duplicate_instance` is 1 on
every site of both exporters in one poll (that instant is *convergence*; gives up after
{FLAG_TIMEOUT:.0f} s). Then {p['minutes']} minute(s) of observation: per minute after convergence,
**takeovers per site per minute** = Mosquitto's "already connected, closing old connection"
lines for the sites' client IDs whose (whole-second) log timestamp falls in that minute,
divided by the number of sites (amqtt never logs one for a clean session: 0 by construction),
and **connects per site per minute** = the increase of `mqtt_site_connects_total`, summed over
both exporters, divided by the number of sites (the broker-independent view: every takeover
costs one connect). Sites still flagged on each side are sampled at every minute boundary.
Finally SIGTERM exporter 2: **clear after SIGTERM** = until `mqtt_site_duplicate_instance` is 0
on every site of exporter 1 (a site in a cooldown sees the tombstone only at its next
connect: gives up after {CLEAR_TIMEOUT:.0f} s + exporter 1's longest cooldown left at the
SIGTERM, recorded as `cooldown_left_at_stop_s`, at most {CLEAR_CAP:.0f} s).

**Crash loop** ({crash}): one exporter, all sites on one Mosquitto (v3.1.1), wait until all
are up; then K times: SIGKILL the broker, start it again on the same port (it accepts again in
~10 ms), wait {RESTART_GAP:g} s (kills are {RESTART_GAP:g} s apart). After the last start the
broker stays up: **back after stable** = from that start until `mqtt_site_up` is 1 on every
site. Counted over the whole episode (increase of the exporter's counters): cooldowns entered
(`mqtt_site_cooldowns_total`), takeovers (`mqtt_site_disconnects_total{{reason="takeover"}}`),
broker events (`mqtt_broker_connection_losses_total`), the most sites flagged
`mqtt_site_duplicate_instance` at once (any poll), and the broker's own takeover lines. A
crashing broker must give 0 cooldowns, 0 takeovers and 0 flags.
One run per case unless `--runs` says otherwise (the full run takes about 8 minutes)."""


# --------------------------------------------------------------------------- helpers


def _scrape(exp: ExporterProcess) -> dict[tuple[str, frozenset], float]:
    if not exp.running:
        raise BenchError(f"exporter pid {exp.pid} exited (rc={exp.returncode})\n{exp.log_tail(20)}")
    return exp.metrics()


def _per_site(m: dict, name: str, sites: list[str], **labels: str) -> list[float]:
    return [m.get((name, frozenset({"site": s, **labels}.items())), 0.0) for s in sites]


def _sum(m: dict, name: str, sites: list[str], **labels: str) -> float:
    return sum(_per_site(m, name, sites, **labels))


def _all(m: dict, name: str, sites: list[str], value: float) -> bool:
    return all(v == value for v in _per_site(m, name, sites))


def _flagged(m: dict, sites: list[str]) -> int:
    return sum(1 for v in _per_site(m, "mqtt_site_duplicate_instance", sites) if v == 1.0)


def _wait_all_up(exp: ExporterProcess, sites: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    exp.wait_ready(timeout)
    try:
        wait_until(lambda: _all(_scrape(exp), "mqtt_site_up", sites, 1.0),
                   max(0.1, timeout - (time.monotonic() - t0)), interval=POLL,
                   message=f"{len(sites)} sites up")
    except AssertionError as exc:
        raise BenchError(f"{exc}\n{exp.log_tail(20)}") from None
    return time.monotonic() - t0


def _sleep_until(deadline: float, check: Callable[[], None]) -> None:
    """Pass wall time (the measurement window), checking the processes every second."""
    while (left := deadline - time.monotonic()) > 0:
        check()
        time.sleep(min(1.0, left))


class _Broker:
    """Mosquitto or amqtt, one interface for the duplicate case."""

    def __init__(self, kind: str, directory):
        self.kind = kind
        self.impl = (harness.AmqttBroker(directory) if kind.startswith("amqtt")
                     else Broker(directory))

    def takeover_times(self, client_ids: set[str]) -> list[float]:
        if isinstance(self.impl, Broker):
            return [ts for ts, kind, cid in self.impl.events() if kind == "takeover" and cid in client_ids]
        return []


# --------------------------------------------------------------------------- part 1


def _duplicate_case(ctx: BenchContext, kind: str, n_sites: int, minutes: int, run: int) -> dict:
    tag = kind.replace(" ", "-")
    b = _Broker(kind, ctx.workdir / f"{tag}-r{run}" / "broker")
    names = [f"d{i:02d}" for i in range(n_sites)]
    ids = {f"{n}_i{INSTANCE}" for n in names}
    proto = {"protocol": "5"} if kind.endswith("v5") else {}
    rec: dict[str, Any] = {"case": kind, "run": run, "sites": n_sites}
    first = second = None
    try:
        b.impl.start()
        sites = [site(n, b.impl, **proto) for n in names]
        first = ExporterProcess(ctx.workdir / f"{tag}-r{run}" / "exporter-1", sites,
                                instance_id=INSTANCE, env=exporter_env())
        second = ExporterProcess(ctx.workdir / f"{tag}-r{run}" / "exporter-2", sites,
                                 instance_id=INSTANCE, env=exporter_env())
        first.start()
        _wait_all_up(first, names, 30.0)

        t0 = time.monotonic()
        second.start()
        flags: tuple[int, int] = (0, 0)

        def converged():
            nonlocal flags
            try:
                flags = (_flagged(_scrape(first), names), _flagged(_scrape(second), names))
            except OSError:  # exporter 2 not listening yet
                return False
            return flags == (n_sites, n_sites)

        try:
            wait_until(converged, FLAG_TIMEOUT, interval=POLL)
        except AssertionError:
            rec["flag_s"] = None
            rec["flagged_at_timeout"] = f"{flags[0]}/{flags[1]}"
            raise BenchError(f"{kind}: not every site flagged on both sides within "
                             f"{FLAG_TIMEOUT:.0f} s (first {flags[0]}, second {flags[1]} of "
                             f"{n_sites})\n--- exporter 1\n{first.log_tail(15)}\n--- exporter 2\n"
                             f"{second.log_tail(15)}") from None
        t_conv = time.monotonic()
        wall_conv = time.time()
        rec["flag_s"] = round(t_conv - t0, 2)
        ctx.log(f"duplicates {kind} run {run}: every site flagged on both sides after "
                f"{rec['flag_s']:.2f} s")

        def alive():
            for e in (first, second):
                if not e.running:
                    raise BenchError(f"{kind}: exporter pid {e.pid} exited (rc={e.returncode})\n"
                                     f"{e.log_tail(20)}")

        def connects() -> float:
            return (_sum(_scrape(first), "mqtt_site_connects_total", names)
                    + _sum(_scrape(second), "mqtt_site_connects_total", names))

        c_prev = connects()
        for minute in range(1, minutes + 1):
            _sleep_until(t_conv + 60.0 * minute, alive)
            c_now = connects()
            m1, m2 = _scrape(first), _scrape(second)
            lo, hi = wall_conv + 60.0 * (minute - 1), wall_conv + 60.0 * minute
            tk = sum(1 for ts in b.takeover_times(ids) if lo <= ts < hi)
            rec[f"takeovers_m{minute}"] = round(tk / n_sites, 2)
            rec[f"connects_m{minute}"] = round((c_now - c_prev) / n_sites, 2)
            rec[f"flagged_m{minute}"] = f"{_flagged(m1, names)}/{_flagged(m2, names)}"
            c_prev = c_now
            ctx.log(f"duplicates {kind} run {run}: minute {minute}: takeovers/site "
                    f"{rec[f'takeovers_m{minute}']}, connects/site {rec[f'connects_m{minute}']}, "
                    f"flagged {rec[f'flagged_m{minute}']}")
        m1 = _scrape(first)
        m2 = _scrape(second)
        rec["detections"] = f"{_sum(m1, 'mqtt_site_duplicate_detections_total', names):g}/" \
                            f"{_sum(m2, 'mqtt_site_duplicate_detections_total', names):g}"
        rec["cooldowns"] = f"{_sum(m1, 'mqtt_site_cooldowns_total', names):g}/" \
                           f"{_sum(m2, 'mqtt_site_cooldowns_total', names):g}"

        # Exporter 1 sees the tombstone live, or at its next connect when it is in a cooldown.
        left = max(_per_site(_scrape(first), "mqtt_site_cooldown_remaining_seconds", names))
        rec["cooldown_left_at_stop_s"] = round(left, 1)
        clear_timeout = min(CLEAR_TIMEOUT + left, CLEAR_CAP)
        second.terminate()
        t_stop = time.monotonic()
        second.wait_exit(15)
        try:
            wait_until(lambda: _flagged(_scrape(first), names) == 0, clear_timeout, interval=POLL)
            rec["clear_s"] = round(time.monotonic() - t_stop, 2)
        except AssertionError:
            rec["clear_s"] = None
            rec["flagged_after_stop"] = _flagged(_scrape(first), names)
        rec["load1"] = round(os.getloadavg()[0], 2)
        rec["cpu_psi10"] = cpu_pressure()
        return rec
    finally:
        for e in (first, second):
            if e is not None:
                e.cleanup()
        b.impl.cleanup()


# --------------------------------------------------------------------------- part 2


def _crash_case(ctx: BenchContext, n_sites: int, restarts: int, run: int) -> dict:
    d = ctx.workdir / f"crash-{n_sites}x{restarts}-r{run}"
    broker = Broker(d / "broker")
    names = [f"c{i:03d}" for i in range(n_sites)]
    exp = ExporterProcess(d / "exporter", [site(n, broker) for n in names],
                          instance_id="benchcrash", env=exporter_env())
    rec: dict[str, Any] = {"case": f"crash {n_sites}x{restarts}", "run": run, "sites": n_sites}
    max_flagged = 0
    stop_poll = threading.Event()

    def poll_flags():  # the most sites flagged at once, over the whole episode
        nonlocal max_flagged
        while not stop_poll.wait(POLL):
            try:
                max_flagged = max(max_flagged, _flagged(exp.metrics(), names))
            except OSError:
                pass

    poller = threading.Thread(target=poll_flags, daemon=True)
    try:
        broker.start()
        exp.start()
        _wait_all_up(exp, names, 30.0 + 0.05 * n_sites)
        before = _scrape(exp)
        poller.start()
        for i in range(restarts):
            t_kill = time.monotonic()
            broker.kill()
            broker.start()
            if i + 1 < restarts:
                _sleep_until(t_kill + RESTART_GAP, lambda: None)
        t_stable = time.monotonic()
        try:
            wait_until(lambda: _all(_scrape(exp), "mqtt_site_up", names, 1.0), BACK_TIMEOUT,
                       interval=POLL)
            rec["back_s"] = round(time.monotonic() - t_stable, 2)
        except AssertionError:
            up = sum(_per_site(_scrape(exp), "mqtt_site_up", names))
            rec["back_s"] = None
            raise BenchError(f"crash {n_sites}x{restarts}: only {up:g} of {n_sites} sites back "
                             f"{BACK_TIMEOUT:.0f} s after the broker was stable\n"
                             f"{exp.log_tail(20)}") from None
        after = _scrape(exp)
        stop_poll.set()
        poller.join(5)
        max_flagged = max(max_flagged, _flagged(after, names))

        def delta(name: str, **labels: str) -> float:
            return _sum(after, name, names, **labels) - _sum(before, name, names, **labels)

        losses = sum(v for (k, _), v in after.items() if k == "mqtt_broker_connection_losses_total") \
            - sum(v for (k, _), v in before.items() if k == "mqtt_broker_connection_losses_total")
        rec.update({
            "cooldowns": delta("mqtt_site_cooldowns_total"),
            "takeovers": delta("mqtt_site_disconnects_total", reason="takeover"),
            "connection_lost": delta("mqtt_site_disconnects_total", reason="connection_lost"),
            "refused": delta("mqtt_site_disconnects_total", reason="refused"),
            "broker_events": losses,
            "max_flagged": max_flagged,
            "broker_log_takeovers": broker.takeovers(),
            "cpu_psi10": cpu_pressure(),
        })
        ctx.log(f"crash {n_sites}x{restarts} run {run}: back after {rec['back_s']:.2f} s, "
                f"cooldowns {rec['cooldowns']:g}, takeovers {rec['takeovers']:g}, broker events "
                f"{losses:g}, max flagged {max_flagged}")
        return rec
    finally:
        stop_poll.set()
        exp.cleanup()
        broker.cleanup()


# --------------------------------------------------------------------------- run


def run(ctx: BenchContext) -> BenchResult:
    p = _params(ctx.quick)
    runs = ctx.n_runs(default=1, quick=1)
    if harness.find_amqtt() is None:
        raise BenchError(harness.AMQTT_MISSING)
    raw: list[dict] = []
    errors: list[str] = []
    rows: list[Row] = []

    def case(kind: str, r: int, results: dict[str, dict | Exception]) -> None:
        try:
            results[kind] = _duplicate_case(ctx, kind, p["sites"], p["minutes"], r)
        except Exception as exc:  # reported per case
            results[kind] = exc

    for r in range(1, runs + 1):
        results: dict[str, dict | Exception] = {}
        threads = [threading.Thread(target=case, args=(k, r, results)) for k in BROKERS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for kind in BROKERS:
            res = results[kind]
            if isinstance(res, Exception):
                errors.append(f"{kind} run {r}: {res}")
                ctx.log(f"duplicates {kind} run {r} FAILED: {res}")
            else:
                raw.append(res)

    for kind in BROKERS:
        recs = [x for x in raw if x["case"] == kind]
        if not recs:
            continue
        ok = {"runs ok": f"{len(recs)}/{runs}"}
        rows.append(Row(kind, "time to flag, both sides", "s", [x["flag_s"] for x in recs], extra=ok))
        for minute in range(1, p["minutes"] + 1):
            rows.append(Row(kind, f"takeovers/site, minute {minute} after convergence", "count",
                            [x[f"takeovers_m{minute}"] for x in recs], extra=ok))
            rows.append(Row(kind, f"connects/site (both), minute {minute}", "count",
                            [x[f"connects_m{minute}"] for x in recs], extra=ok))
        clears = [x["clear_s"] for x in recs if x.get("clear_s") is not None]
        if clears:
            rows.append(Row(kind, "flags clear after SIGTERM of the other", "s", clears,
                            extra={"runs ok": f"{len(clears)}/{runs}"}))

    for n, k in p["crash"]:
        recs = []
        for r in range(1, runs + 1):
            try:
                recs.append(_crash_case(ctx, n, k, r))
            except Exception as exc:  # reported per case
                errors.append(f"crash {n}x{k} run {r}: {exc}")
                ctx.log(f"crash {n}x{k} run {r} FAILED: {exc}")
        raw += recs
        if not recs:
            continue
        ok = {"runs ok": f"{len(recs)}/{runs}"}
        case_name = f"crash loop {n} sites x {k} restarts"
        rows.append(Row(case_name, "back after broker stable", "s", [x["back_s"] for x in recs], extra=ok))
        rows.append(Row(case_name, "cooldowns entered", "count", [x["cooldowns"] for x in recs],
                        target=0, extra=ok))
        rows.append(Row(case_name, "takeovers counted", "count", [x["takeovers"] for x in recs],
                        target=0, extra=ok))
        rows.append(Row(case_name, "sites flagged duplicate (max)", "count",
                        [x["max_flagged"] for x in recs], target=0, extra=ok))

    notes = []
    for kind in BROKERS:
        recs = [x for x in raw if x["case"] == kind]
        if recs:
            per_min = [statistics.median(x[f"takeovers_m{m}"] for x in recs)
                       for m in range(1, p["minutes"] + 1)]
            clears = ", ".join(
                (f"not within {min(CLEAR_TIMEOUT + x['cooldown_left_at_stop_s'], CLEAR_CAP):.0f} s"
                 if x.get("clear_s") is None else f"{x['clear_s']:.2f} s")
                + f" (longest cooldown left then {x['cooldown_left_at_stop_s']:g} s)" for x in recs)
            notes.append(f"{kind}: every site flagged on both sides after "
                         f"{statistics.median(x['flag_s'] for x in recs):.1f} s (median); "
                         f"takeovers per site per minute after convergence: "
                         f"{', '.join(f'{v:g}' for v in per_min)} (minutes 1..{p['minutes']}); "
                         f"flags cleared after the other's SIGTERM: {clears}.")
    return BenchResult("duplicates", "Duplicate instances: time to flag, takeover rate, crash loop",
                       method(ctx.quick), rows, raw, notes=notes, errors=errors)
