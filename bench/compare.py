"""Two commits side by side: ``python -m bench.compare OLD [NEW] [--rounds N] [--only NAME]``.

Each commit is checked out into its own git worktree under ``.bench/trees/`` (``NEW``
defaults to the working tree as it is, uncommitted changes included), and each runs ITS
OWN benchmarks (``python -m bench --runs 1`` in its tree: the bench code of a commit
measures the exporter of that commit). The invocations alternate, old then new, for
``--rounds`` rounds, so both see the same machine conditions; the medians over the rounds
are compared per benchmark row, with the ratio new/old.

Prints a markdown table (and writes it with ``--output``). Exit status 1 when a run failed.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import REPO_ROOT

TREES = REPO_ROOT / ".bench" / "trees"
PEER_VENV = REPO_ROOT / ".bench" / "peer-venv"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _git(*args: str, cwd: Path = REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def worktree(rev: str) -> tuple[Path, str]:
    """A detached worktree of ``rev`` (created once, reused), and its short hash."""
    sha = _git("rev-parse", "--short", rev)
    path = TREES / sha
    if not path.exists():
        TREES.mkdir(parents=True, exist_ok=True)
        _git("worktree", "add", "--detach", str(path), sha)
    peer = path / ".bench" / "peer-venv"  # share the peer exporter's venv (built once)
    if PEER_VENV.exists() and not peer.exists():
        peer.parent.mkdir(parents=True, exist_ok=True)
        peer.symlink_to(PEER_VENV)
    return path, sha


def parse_summary(stdout: str) -> dict[tuple[str, str, str], float]:
    """``{(benchmark, case, metric): median}`` from the summary table ``python -m bench``
    prints (fixed-width columns, found from the dashes line under the header)."""
    lines = stdout.splitlines()
    out: dict[tuple[str, str, str], float] = {}
    for i, line in enumerate(lines[:-1]):
        if not (line.startswith("benchmark") and lines[i + 1].startswith("---")):
            continue
        starts = [m.start() for m in re.finditer(r"-+", lines[i + 1])]
        names = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        for row in lines[i + 2:]:
            if not row.strip():
                break
            cells = dict(zip(names, (row[a:b].strip() for a, b in zip(starts, starts[1:] + [None]))))
            try:
                out[(cells["benchmark"], cells["case"], cells["metric"])] = float(cells["median"])
            except (KeyError, ValueError):
                continue
        break
    return out


def run_bench(tree: Path, only: list[str], workdir: Path, label: str) -> dict:
    cmd = [sys.executable, "-m", "bench", "--runs", "1", "--output", str(workdir / f"{label}.md")]
    for name in only:
        cmd += ["--only", name]
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    (workdir / f"{label}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        log(f"{label}: exit {proc.returncode} (see {workdir / (label + '.log')})")
    return parse_summary(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("old", help="the base commit (e.g. HEAD~3, a hash, a tag)")
    p.add_argument("new", nargs="?", help="the commit to compare (default: the working tree)")
    p.add_argument("--rounds", type=int, default=5, help="old/new invocations each (default 5)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="benchmark to run (repeatable; default: all)")
    p.add_argument("--output", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 50:
        p.error("--rounds must be between 1 and 50")
    old_tree, old_sha = worktree(args.old)
    if args.new:
        new_tree, new_sha = worktree(args.new)
    else:
        new_tree, new_sha = REPO_ROOT, _git("rev-parse", "--short", "HEAD") + "+worktree"
    workdir = REPO_ROOT / ".bench" / "compare" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    results: dict[str, list[dict]] = {old_sha: [], new_sha: []}
    for r in range(1, args.rounds + 1):
        for sha, tree in ((old_sha, old_tree), (new_sha, new_tree)):
            log(f"round {r}/{args.rounds}: {sha}")
            results[sha].append(run_bench(tree, args.only, workdir, f"{sha}-{r}"))
    keys = list(dict.fromkeys(k for runs in results.values() for res in runs for k in res))
    rows = [f"| benchmark | case | metric | {old_sha} | {new_sha} | new/old |", "|---|---|---|---|---|---|"]
    failed = False
    for key in keys:
        old = [res[key] for res in results[old_sha] if key in res]
        new = [res[key] for res in results[new_sha] if key in res]
        failed |= len(old) != args.rounds or len(new) != args.rounds
        if not old or not new:
            rows.append(f"| {' | '.join(key)} | {len(old)} runs | {len(new)} runs | |")
            continue
        mo, mn = statistics.median(old), statistics.median(new)
        ratio = f"{mn / mo:.2f}" if mo else ""
        rows.append(f"| {' | '.join(key)} | {mo:.2f} | {mn:.2f} | {ratio} |")
    table = "\n".join([f"Medians over {args.rounds} alternating rounds (each round: one "
                       f"`python -m bench --runs 1` per commit, in its own tree); logs in "
                       f"`{workdir.relative_to(REPO_ROOT)}`.", "", *rows])
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
