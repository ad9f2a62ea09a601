"""The documentation a newcomer walks: README.md and docs/*.md.

- README.md stays short (at most 250 lines) and shows the two quick-start commands
  (``make demo``, ``make test``) in its first 40 lines, with a table of contents.
- Every relative link in README.md and docs/*.md points to a file that exists; a link with
  an ``#anchor`` into a hand-written markdown file points to a heading that exists
  (GitHub's slugs). The generated references (docs/configuration.md, docs/metrics.md) must
  exist; their own contents are tested where they are generated.
- No machine-specific path (a checkout under /work, /root or /home/<user>, a pytest temp
  directory) in any sample.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 250
QUICK_START_LINES = 40
QUICK_START = ("make demo", "make test")
#: Hand-written markdown files whose anchors are checked. The generated ones
#: (configuration.md, metrics.md) may rename headings when the code changes.
ANCHORED = {README, DOCS / "operations.md", DOCS / "architecture.md", DOCS / "bridge.md",
            DOCS / "benchmarks.md", DOCS / "duplicates.md", DOCS / "kubernetes.md",
            DOCS / "scaling.md", DOCS / "sites-source.md"}
MACHINE_PATH = re.compile(r"/work/|/root/|/home/[^/\s<>]+/|/tmp/pytest")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose_lines(text: str):
    """``(line_number, line)`` outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation dropped,
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = _slug(m[1])
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path):
    """``(line_number, target)`` of every inline link outside code."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, m[1]


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_starts_with_the_quick_start():
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:QUICK_START_LINES])
    for command in QUICK_START:
        assert command in head, f"{command!r} not in the first {QUICK_START_LINES} lines"


def test_readme_has_a_table_of_contents():
    text = README.read_text(encoding="utf-8")
    assert re.search(r"^## Contents$", text, re.M), "README.md: no '## Contents'"
    own = anchors(README)
    toc = [t for _, t in links(README) if t.startswith("#")]
    assert len(toc) >= 3 and all(t[1:] in own for t in toc)


def test_docs_exist():
    for name in ("configuration.md", "metrics.md", "operations.md", "architecture.md",
                 "benchmarks.md", "bridge.md", "duplicates.md", "kubernetes.md",
                 "scaling.md", "sites-source.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"
    assert not (DOCS / "runbook.md").exists(), "the runbook moved to docs/operations.md"


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    problems = []
    for number, target in links(doc):
        if _is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        where = f"{doc.relative_to(REPO)}:{number}: {target}"
        try:
            dest.relative_to(REPO)
        except ValueError:
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest in ANCHORED and anchor not in anchors(dest):
            problems.append(f"{where}: no heading for #{anchor}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_machine_specific_paths(doc):
    hits = [f"{doc.relative_to(REPO)}:{n}: {line.strip()}"
            for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
            if MACHINE_PATH.search(line)]
    assert not hits, "\n".join(hits)


def test_slugs_follow_github():
    assert _slug('"Loop di riconnessione" (code 7): two instances with one client ID') == \
        "loop-di-riconnessione-code-7-two-instances-with-one-client-id"
    assert _slug("A site stuck in `backoff`") == "a-site-stuck-in-backoff"
    assert _slug("How to add…") == "how-to-add"
    assert _slug("The bridge's own metrics") == "the-bridges-own-metrics"
