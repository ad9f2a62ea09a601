"""Onboarding (issue #9, finding 9): what a newcomer runs first works as written.

- LICENSE exists and is the MIT licence the package metadata declares.
- scripts/ensure-deps.sh waits (bounded, with a message naming the holder) for the apt/dpkg
  locks another apt run holds, instead of failing at once.
- The README's quick start names every Debian package and venv `make test` / `make demo`
  install (derived from the Makefile and ensure-deps.sh, not from a hand-kept list).
- The demo banner's commands run as printed, from the repository root.
- `make bench` exits non-zero when a target is missed and writes to the untracked
  .bench/results.md; only `make bench-update` writes the committed bench/results.md.
"""
from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import site, wait_until

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
ENSURE_DEPS = REPO / "scripts" / "ensure-deps.sh"
README = REPO / "README.md"


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 30)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, **kw)


# --------------------------------------------------------------------------- LICENSE


def test_license_file_is_mit_as_the_metadata_says():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 mqtt-site-exporter authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text


# --------------------------------------------------------------------------- ensure-deps


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)      # an fcntl record lock, as apt and dpkg take
print("locked", flush=True)
sys.stdin.readline()                # hold it until the test says so
"""


@pytest.fixture
def held_lock(tmp_path):
    """A lock file held (fcntl) by another process, as unattended-upgrades holds dpkg's;
    returns (path, holder process); writing a line to its stdin releases it."""
    path = tmp_path / "lock-frontend"
    path.touch()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout and proc.stdout.readline() == "locked\n"
    yield path, proc
    proc.kill()
    proc.wait(5)


def _lock_env(path: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, ENSURE_DEPS_APT_LOCKS=f"{path} /nonexistent/lock",
                ENSURE_DEPS_LOCK_POLL="0.1", PYTHON=sys.executable, **extra)


def test_ensure_deps_waits_for_the_dpkg_lock_then_goes_on(held_lock):
    """Finding 9: ensure-deps.sh gave up at once when another apt process held the lock."""
    path, holder = held_lock
    proc = subprocess.Popen(["bash", str(ENSURE_DEPS), "--wait-for-locks"], cwd=REPO,
                            env=_lock_env(path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr
        line = proc.stderr.readline()   # blocks until it reports the wait
        assert f"waiting for {path}, held by pid {holder.pid}" in line, line
        assert "up to 300 s" in line, line
        assert proc.poll() is None, "it must wait while the lock is held"
        assert holder.stdin
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert proc.wait(15) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_ensure_deps_lock_wait_is_bounded(held_lock):
    path, holder = held_lock
    proc = _run(["bash", str(ENSURE_DEPS), "--wait-for-locks"],
                env=_lock_env(path, ENSURE_DEPS_LOCK_TIMEOUT="1"))
    assert proc.returncode == 1, proc.stderr
    assert f"{path} is still held by pid {holder.pid}" in proc.stderr
    assert "after 1 s" in proc.stderr


def test_ensure_deps_without_a_held_lock_does_not_wait(tmp_path):
    free = tmp_path / "lock"
    free.touch()
    proc = _run(["bash", str(ENSURE_DEPS), "--wait-for-locks"],
                env=_lock_env(free, ENSURE_DEPS_LOCK_TIMEOUT="1"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_ensure_deps_waits_before_apt_get():
    """The install path waits before its first apt-get, and apt-get itself waits too (for a
    run that takes the lock in between), with the same bound."""
    text = ENSURE_DEPS.read_text()
    install = text[text.index('echo "ensure-deps: installing'):]
    assert install.index("wait_for_apt_locks") < install.index("apt-get ")
    assert install.count('-o "DPkg::Lock::Timeout=$LOCK_TIMEOUT"') == 2
    assert re.search(r"^LOCK_TIMEOUT=\$\{ENSURE_DEPS_LOCK_TIMEOUT:-300\}$", text, re.M)


# --------------------------------------------------------------------------- README


def _make_recipe(target: str) -> tuple[list[str], list[str]]:
    """(prerequisites, recipe lines) of a Makefile target."""
    lines = (REPO / "Makefile").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(rf"^{re.escape(target)}:(?!=)(.*)$", line)
        if m:
            recipe = []
            for nxt in lines[i + 1:]:
                if not nxt.startswith("\t"):
                    break
                recipe.append(nxt.strip())
            return m[1].split(), recipe
    raise AssertionError(f"no target {target} in the Makefile")


def _installed_by(target: str, seen: set[str] | None = None) -> tuple[set[str], bool]:
    """(Debian packages the target's ensure-deps.sh calls may install, builds the amqtt venv)."""
    seen = seen if seen is not None else set()
    if target in seen:
        return set(), False
    seen.add(target)
    text = ENSURE_DEPS.read_text()
    pkg = dict(re.findall(r"^\s*\[([\w-]+)\]=([\w.+-]+)$", text, re.M))
    defaults = re.search(r'^for tool in (.*?) "\$@"; do$', text, re.M)
    assert defaults, "ensure-deps.sh: the default tool list moved"
    prereqs, recipe = _make_recipe(target)
    packages: set[str] = set()
    amqtt = "$(AMQTT_BIN)" in prereqs
    for line in recipe:
        m = re.search(r"ensure-deps\.sh(.*)$", line)
        if m:
            tools = defaults[1].split() + m[1].split()
            packages |= {pkg[t] for t in tools}
            packages.add("python3-venv")   # when `python3 -m venv` cannot work
    for pre in prereqs:
        if re.fullmatch(r"[\w-]+", pre) and pre not in ("venv",):
            more, more_amqtt = _installed_by(pre, seen)
            packages |= more
            amqtt |= more_amqtt
    return packages, amqtt


def test_quick_start_names_every_package_it_installs():
    """Finding 9: the README's quick start omitted packages that `make test` installs."""
    text = README.read_text()
    quick = text[text.index("## Quick start"):text.index("## Contents")]
    for target in ("test", "demo"):
        packages, amqtt = _installed_by(target)
        assert packages >= {"mosquitto", "prometheus", "python3-venv"}, packages
        for package in sorted(packages):
            assert f"`{package}`" in quick, f"quick start does not name {package} ({target})"
        if amqtt:
            assert ".venv-amqtt" in quick and "amqtt" in quick
    assert "`.venv`" in quick


# --------------------------------------------------------------------------- demo banner


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_banner_commands_run_as_printed(broker, exporter_factory):
    """Finding 9: the banner printed `mqtt-site-exporter status ...`, which is not on the
    PATH. Every command it prints now runs as printed from the repository root, here against
    a real exporter (mosquitto_sub, which never exits, is only resolved)."""
    demo = _demo_module()
    exporter = exporter_factory([site("site_88", broker)])
    exporter.wait_ready()
    wait_until(lambda: exporter.health()[1].get("status") == "healthy", 20,
               message="exporter healthy")
    commands = demo.try_commands(exporter.url)
    assert any(" -m exporter status --url " in c for c in commands), commands
    banner = demo.banner(exporter.url)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"   # no venv on the PATH
    for command in commands:
        assert f"  {command}\n" in banner
        argv0 = shlex.split(command)[0]
        resolves = (REPO / argv0).exists() if "/" in argv0 else _run(
            ["bash", "-c", f"command -v {argv0}"], env=env).returncode == 0
        assert resolves, f"{argv0!r} of {command!r} does not resolve from the repository root"
        if argv0 == "mosquitto_sub":
            continue
        proc = _run(["bash", "-c", command], env=env)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        assert proc.stdout.strip(), command
        if " status " in command:
            assert "HEALTHY" in proc.stdout and "site_88" in proc.stdout, proc.stdout


def test_readme_tour_shows_the_banner_commands():
    demo = _demo_module()
    text = README.read_text()
    for command in demo.try_commands("http://127.0.0.1:8000"):
        assert f"  {command}\n" in text, command


# --------------------------------------------------------------------------- bench


def _bench_main(monkeypatch, verdict_ok: bool):
    import bench.__main__ as bench_main
    from bench.common import BenchResult, Row

    def fake(ctx):
        value = 5.0 if verdict_ok else 50.0
        return BenchResult("fake", "a fake benchmark", "none", [
            Row("case", "time", "ms", [value, value, value], target=10.0)], [])

    monkeypatch.setattr(bench_main, "BENCHMARKS", {"fake": fake})
    return bench_main


@pytest.mark.parametrize("ok", [True, False], ids=["target-met", "target-missed"])
def test_bench_exit_status_follows_the_verdict(monkeypatch, tmp_path, capsys, ok):
    """Finding 9: `make bench` exited 0 when a target was missed."""
    bench_main = _bench_main(monkeypatch, ok)
    out = tmp_path / "sub" / "results.md"
    rc = bench_main.main(["--only", "fake", "--output", str(out)])
    report = out.read_text()
    assert ("| PASS |" if ok else "| FAIL |") in report
    assert rc == (0 if ok else 1), capsys.readouterr()
    if not ok:
        assert "missed its target" in capsys.readouterr().err


def test_bench_default_output_is_untracked():
    """Finding 9: `make bench` rewrote the tracked bench/results.md."""
    import bench.__main__ as bench_main

    assert bench_main.DEFAULT_OUTPUT == REPO / ".bench" / "results.md"
    proc = _run(["git", "check-ignore", "-q", str(bench_main.DEFAULT_OUTPUT)])
    assert proc.returncode == 0, ".bench/results.md must be ignored by git"
    tracked = _run(["git", "ls-files", "--error-unmatch", "bench/results.md"])
    assert tracked.returncode == 0, "bench/results.md is the committed report"
    bench = _run(["make", "-n", "bench"])
    update = _run(["make", "-n", "bench-update"])
    assert bench.returncode == 0 and update.returncode == 0, bench.stderr + update.stderr
    assert "-m bench --output .bench/results.md" in bench.stdout
    assert "bench/results.md" not in bench.stdout.replace(".bench/results.md", "")
    assert "-m bench --output bench/results.md" in update.stdout
