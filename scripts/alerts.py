#!/usr/bin/env python3
"""Set the absolute ``runbook_url`` of every alert from ONE base URL.

    python scripts/alerts.py                       # rewrite with the default base URL
    python scripts/alerts.py --base-url URL        # your fork / wiki / internal Git
    python scripts/alerts.py --check               # exit 1 if a file is not current
    python scripts/alerts.py --base-url URL --out-dir DIR   # a copy for your Prometheus

Alertmanager and Grafana open ``runbook_url`` as it is: a repository-relative path opens
nothing there, and Prometheus cannot template an annotation from a variable. So the rule file
holds literal absolute URLs, ``<base>#<lowercase alert name>`` (the anchor of the alert's
section in docs/operations.md), written by this script from ``DEFAULT_BASE_URL`` below: the one
place where the base URL is set. The promtool tests (alerts/tests/*.yml) repeat each alert's
annotations, so their ``runbook_url`` lines are rewritten the same way.

Only ``runbook_url:`` lines change (a text rewrite: comments and layout stay as they are).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# THE RUNBOOK BASE URL: docs/operations.md as rendered by the project's repository. Change it
# here (then run this script) or pass --base-url.
DEFAULT_BASE_URL = ("https://github.com/mqtt-site-exporter/mqtt-site-exporter/blob/main/"
                    "docs/operations.md")

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "alerts"
_ALERT = re.compile(r"^\s*-\s*alert:\s*(\S+)\s*$")
_RUNBOOK = re.compile(r"^(?P<indent>\s*)runbook_url:\s*(?P<url>\S+)\s*$")


def rule_files(alerts_dir: Path = ALERTS) -> list[Path]:
    return sorted(alerts_dir.glob("*.rules.yml"))


def test_files(alerts_dir: Path = ALERTS) -> list[Path]:
    return sorted((alerts_dir / "tests").glob("*.yml"))


def _fail(path: Path, lineno: int, msg: str) -> None:
    raise SystemExit(f"{path}:{lineno}: {msg}")


def rewrite_rules(text: str, base: str, path: Path) -> str:
    """Every runbook_url of a rule file becomes ``<base>#<lowercase name of its alert>``."""
    out, alert = [], None
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        if m := _ALERT.match(line):
            alert = m[1]
        elif m := _RUNBOOK.match(line):
            if alert is None:
                _fail(path, n, "runbook_url outside an alert")
            nl = "\n" if line.endswith("\n") else ""
            line = f"{m['indent']}runbook_url: {base}#{alert.lower()}{nl}"
        out.append(line)
    return "".join(out)


def rewrite_tests(text: str, base: str, path: Path) -> str:
    """Every runbook_url of a promtool test file keeps its anchor and gets ``base``."""
    out = []
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        if m := _RUNBOOK.match(line):
            _, sep, anchor = m["url"].partition("#")
            if not sep or not anchor:
                _fail(path, n, f"runbook_url without an #anchor: {m['url']}")
            nl = "\n" if line.endswith("\n") else ""
            line = f"{m['indent']}runbook_url: {base}#{anchor}{nl}"
        out.append(line)
    return "".join(out)


def render(base: str, alerts_dir: Path = ALERTS) -> dict[Path, str]:
    """{path relative to alerts_dir: new text} for every rule and promtool test file."""
    out = {}
    for path in rule_files(alerts_dir):
        out[path.relative_to(alerts_dir)] = rewrite_rules(path.read_text(), base, path)
    for path in test_files(alerts_dir):
        out[path.relative_to(alerts_dir)] = rewrite_tests(path.read_text(), base, path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help=f"URL of docs/operations.md, without '#' (default: {DEFAULT_BASE_URL})")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 when a file differs from what would be written")
    p.add_argument("--out-dir", type=Path,
                   help="write the files under this directory (same layout: "
                        "*.rules.yml, tests/*.yml) instead of alerts/")
    args = p.parse_args(argv)
    base = args.base_url
    if not re.match(r"^https?://\S+$", base) or "#" in base:
        p.error(f"--base-url must be an absolute http(s) URL without '#', got {base!r}")
    stale = []
    for rel, text in render(base).items():
        target = (args.out_dir or ALERTS) / rel
        current = target.read_text() if target.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(target))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {target}", file=sys.stderr)
    if stale:
        print("runbook URLs not current (run `python scripts/alerts.py"
              f"{'' if base == DEFAULT_BASE_URL else ' --base-url ' + base}`): "
              + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
