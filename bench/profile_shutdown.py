"""Where does the 1000-site SIGTERM->exit time go? Samples the exporter with py-spy.

    .venv/bin/pip install py-spy        # a tool for this script only, not a dependency
    .venv/bin/python -m bench.profile_shutdown [--sites 1000] [--runs 5] [--rate 1000]

Not part of the registry (it needs py-spy and attaches with ptrace). Per run: start the
exporter with N sites, wait until all are connected and settled (same rules as the shutdown
benchmark), attach ``py-spy record --nonblocking --idle --format raw``, SIGTERM, reap, and
aggregate the collapsed stacks of all runs: self and inclusive time per function, in ms per
shutdown (samples / rate / runs).
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import (
    STATUS_FILTER,
    Broker,
    ExporterProcess,
    StatusWatcher,
    exporter_env,
    fresh_listen_port,
    signal_and_reap,
    site,
    status_topics,
    wait_cpu_quiet,
    wait_healthy,
    wait_live_statuses,
    wait_until,
)


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    name, _, loc = frame.partition(" (")
    return f"{name} ({Path(loc.rstrip(')')).name})" if loc else name


def _shutdown_samples(path: Path):
    """(stack, count) of the samples from the signal handler's first sample to the end.

    speedscope keeps samples in time order: everything before the first sample inside
    ``on_signal``/``Service.shutdown`` is the idle service and is dropped. Samples in between
    with an empty stack (the hub inside libev) are kept as "<hub/libev>".
    """
    data = json.loads(path.read_text())
    frames = [f"{f['name']} ({Path(f.get('file') or '?').name}:{f.get('line', '?')})"
              for f in data["shared"]["frames"]]
    out = []
    for prof in data["profiles"]:
        seq = [";".join(frames[i] for i in sample) for sample in prof["samples"]]
        weights = prof.get("weights") or [1] * len(seq)
        start = next((i for i, s in enumerate(seq)
                      if "on_signal (" in s or "Service.shutdown (" in s), None)
        if start is None:
            continue
        for s, _w in zip(seq[start:], weights[start:]):
            out.append((s or "<hub/libev>", 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_shutdown")
    p.add_argument("--sites", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="mqtt-prof-"))
    broker = Broker(work / "broker")
    watcher = None
    stacks: collections.Counter[str] = collections.Counter()
    walls = []
    try:
        broker.start()
        watcher = StatusWatcher(broker, STATUS_FILTER)
        names = [f"s{i:04d}" for i in range(args.sites)]
        exp = ExporterProcess(work / "exporter", [site(n, broker) for n in names],
                              instance_id="prof", env=exporter_env())
        for r in range(1, args.runs + 1):
            t_start = time.monotonic()
            fresh_listen_port(exp)
            exp.start()
            spy = None
            out = work / f"run{r}.txt"
            err = work / f"run{r}.err"
            try:
                wait_healthy(exp, args.sites, timeout=60)
                wait_live_statuses(watcher, status_topics(names), "online", t_start, 10)
                with open(err, "wb") as fh:
                    spy = subprocess.Popen(
                        [pyspy, "record", "--pid", str(exp.pid), "--rate", str(args.rate),
                         "--format", "speedscope", "--idle", "--nonblocking", "-o", str(out)],
                        stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                wait_until(lambda err=err: b"Sampling process" in err.read_bytes(), 10,
                           message="py-spy attached")
                wait_cpu_quiet([exp.pid, broker.pid], timeout=15)
                reaped = signal_and_reap(exp.proc, 15, timeout=20)
                spy.wait(timeout=20)
            finally:
                exp.cleanup()
                if spy is not None and spy.poll() is None:
                    spy.kill()
                    spy.wait(timeout=5)
            walls.append(reaped.seconds * 1000)
            for stack, count in _shutdown_samples(out):
                stacks[stack] += count
            print(f"run {r}: SIGTERM->exit {walls[-1]:.1f} ms", file=sys.stderr)
    finally:
        if watcher is not None:
            watcher.close()
        broker.cleanup()
    per_run = 1000.0 / args.rate / args.runs  # ms per sample, averaged over runs

    shut = stacks
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for s, c in shut.items():
        frames = [_short(f) for f in s.split(";")]
        selfc[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    print(f"\nSIGTERM->exit per run (ms): {', '.join(f'{w:.1f}' for w in walls)}")
    print(f"samples on the shutdown path: {sum(shut.values())} "
          f"({sum(shut.values()) * per_run:.1f} ms per run); all samples {sum(stacks.values())}")
    print(f"\nInclusive ms per shutdown (top {args.top}):")
    for f, c in incl.most_common(args.top):
        print(f"  {c * per_run:7.1f}  {f}")
    print(f"\nSelf ms per shutdown (top {args.top}):")
    for f, c in selfc.most_common(args.top):
        print(f"  {c * per_run:7.1f}  {f}")
    print(f"\nraw stacks in {work}")
    return 0
