"""``python -m bench [--quick] [--runs N] [--only NAME] [--output PATH] [--keep] [--list]``

Runs the registered benchmarks (see ``bench/__init__.py``), prints a summary table and
writes a markdown report (default ``.bench/results.md``, untracked): date, machine, versions,
method, medians and every raw run. The committed figures, ``bench/results.md``, change only on
purpose: ``make bench-update`` (``--output bench/results.md``). Exit status 1 when a benchmark
or one of its runs failed, or when a row misses its target (verdict FAIL); the report is
written in every case.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import BENCHMARKS
from .common import REPO_ROOT, BenchContext, BenchResult, cpu_pressure, harness

# Untracked (.gitignore: .bench/); the committed bench/results.md is written only on request.
DEFAULT_OUTPUT = REPO_ROOT / ".bench" / "results.md"
COMMITTED_OUTPUT = Path(__file__).resolve().parent / "results.md"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environment


def _run(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                           stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
        return (p.stdout or p.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> list[tuple[str, str]]:
    import gevent
    import paho.mqtt

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mosq = harness.find_mosquitto()
    mosq_version = _run([mosq, "-h"]).splitlines()[0] if mosq else "not found"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    head = _run(["git", "rev-parse", "--short", "HEAD"]) or "?"
    dirty = _run(["git", "status", "--porcelain", "--", "exporter"])
    code = f"git {head}" + (f" + uncommitted changes in exporter/ ({len(dirty.splitlines())} "
                            f"files: the working tree was measured)" if dirty else " (exporter/ clean)")
    return [
        ("nproc", f"{len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()})"),
        ("CPU", cpu or "?"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("OS", _os_release()),
        ("python", platform.python_version()),
        ("paho-mqtt", paho.mqtt.__version__),
        ("gevent", gevent.__version__),
        ("mosquitto", mosq_version),
        ("RLIMIT_NOFILE (bench)", f"{soft}/{hard}"),
        ("load average before", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("CPU pressure before (PSI some avg10, %)", str(cpu_pressure())),
        ("code", code),
    ]


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "?"


# --------------------------------------------------------------------------- output


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"


SUMMARY_COLUMNS = ("benchmark", "case", "metric", "runs", "median", "p90", "min", "max",
                   "target", "verdict")


def summary_rows(results: list[BenchResult]) -> list[tuple[str, ...]]:
    rows = []
    for res in results:
        for row in res.rows:
            rows.append((
                res.name, row.case, f"{row.metric} ({row.unit})",
                str(row.extra.get("runs ok", len(row.values))),
                _fmt(row.median), _fmt(row.p90), _fmt(min(row.values)), _fmt(max(row.values)),
                f"<= {_fmt(row.target)}" if row.target is not None else "", row.verdict,
            ))
        if res.errors and not res.rows:
            rows.append((res.name, "-", "FAILED", "0", "", "", "", "", "", "ERROR"))
    return rows


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def md_table(header: tuple[str, ...] | list[str], rows: list) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


def missed_targets(results: list[BenchResult]) -> list[tuple[str, str, str]]:
    """(benchmark, case, metric) of every row whose verdict is FAIL."""
    return [(res.name, row.case, row.metric) for res in results for row in res.rows
            if row.verdict == "FAIL"]


def write_report(path: Path, results: list[BenchResult], args, started: dt.datetime,
                 elapsed: float, machine: list[tuple[str, str]]) -> None:
    cmd = "python -m bench " + " ".join(sys.argv[1:])
    parts = [
        "# mqtt-site-exporter benchmarks",
        "",
        f"Generated by `{cmd.strip()}` on {started.strftime('%Y-%m-%d %H:%M:%S UTC')} "
        f"({elapsed:.0f} s){' -- quick mode' if args.quick else ''}. "
        "Everything ran on 127.0.0.1 on this one machine (bench, broker and exporter share "
        "the CPUs, and so does anything else running: `load1` in the raw runs is the 1-minute "
        "load average and `cpu_psi10` the CPU pressure (PSI `some avg10`, % of time a runnable "
        "task waited for a CPU) just before each signal; under contention the times inflate). "
        "`make bench` writes a fresh report to `.bench/results.md`; `make bench-update` "
        "replaces this committed one.",
        "",
        "## Machine",
        "",
        md_table(("item", "value"), machine),
        "",
        "## Summary",
        "",
        md_table(SUMMARY_COLUMNS, summary_rows(results)),
        "",
        "Times in milliseconds. p90 is nearest-rank. Verdict compares the median with the target.",
        "",
    ]
    for res in results:
        parts += [f"## {res.name}: {res.title}", "", "### Method", "", res.method, ""]
        if res.notes:
            parts += ["### Findings", ""] + [f"- {n}" for n in res.notes] + [""]
        if res.errors:
            parts += ["### Failed runs", ""] + [
                "```\n" + e.strip() + "\n```" for e in res.errors] + [""]
        if res.raw:
            keys = list(dict.fromkeys(k for r in res.raw for k in r))
            parts += ["### All runs", "", md_table(keys, [[r.get(k, "") for k in keys]
                                                        for r in res.raw]), ""]
    path.write_text("\n".join(parts))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer runs (a smoke test of the bench)")
    p.add_argument("--runs", type=int, help="runs per case, overriding every benchmark's default")
    p.add_argument("--only", action="append", metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="markdown report (default: .bench/results.md, untracked; "
                        "bench/results.md is the committed one: make bench-update)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    if args.runs is not None and not 1 <= args.runs <= 1000:
        p.error("--runs must be between 1 and 1000")
    names = args.only or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    if harness.find_mosquitto() is None:
        print(harness.MOSQUITTO_MISSING, file=sys.stderr)
        return 2

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="mqtt-bench-"))
    results: list[BenchResult] = []
    failed = False
    try:
        for name in names:
            log(f"== {name}")
            ctx = BenchContext(quick=args.quick, runs=args.runs, workdir=workdir / name, log=log)
            ctx.workdir.mkdir(parents=True)
            try:
                res = BENCHMARKS[name](ctx)
            except Exception:  # one broken benchmark must not hide the others' results
                tb = traceback.format_exc()
                log(f"{name} FAILED:\n{tb}")
                res = BenchResult(name, "failed", "", [], [], errors=[tb])
            failed |= bool(res.errors)
            results.append(res)
    finally:
        if args.keep or failed:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t0
    print()
    print(text_table(SUMMARY_COLUMNS, summary_rows(results)))
    for res in results:
        for note in res.notes:
            print(f"\n{res.name}: {note}")
        for err in res.errors:
            print(f"\n{res.name} error: {err.strip().splitlines()[0]}")
    machine.append(("load average after", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    machine.append(("CPU pressure after (PSI some avg10, %)", str(cpu_pressure())))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.output, results, args, started, elapsed, machine)
    print(f"\nreport written to {args.output}")
    missed = missed_targets(results)
    for res_name, case, metric in missed:
        print(f"{res_name}: {case}: {metric} missed its target (FAIL)", file=sys.stderr)
    if failed or missed:
        print(f"bench: {'failed runs' if failed else ''}{' and ' if failed and missed else ''}"
              f"{f'{len(missed)} target(s) missed' if missed else ''}: exit status 1",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
