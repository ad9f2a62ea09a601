"""Tests for exporter.config.docs: docs/configuration.md is generated from the declarations."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.config.bridge import BRIDGE_TABLE, MAPPING_TABLE
from exporter.config.docs import render
from exporter.config.environment import ENV_VARS
from exporter.config.sites import SITE_TABLE

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_doc_is_the_generated_one():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: python -m exporter.config.docs > docs/configuration.md")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start:end if end != -1 else None]


def _first_column(section: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def test_doc_lists_exactly_the_declared_names():
    text = DOC.read_text(encoding="utf-8")
    assert _first_column(_section(text, "## Environment variables")) == [v.name for v in ENV_VARS]
    assert _first_column(_section(text, "### Site keys")) == [*SITE_TABLE.keys, *SITE_TABLE.forbidden]
    assert _first_column(_section(text, "### Bridge keys")) == list(BRIDGE_TABLE.keys)
    assert _first_column(_section(text, "### Bridge mapping keys")) == list(MAPPING_TABLE.keys)


def test_doc_explains_editor_validation_and_the_authority():
    text = DOC.read_text(encoding="utf-8")
    section = _section(text, "## Validating sites.yml in your editor")
    for needle in ("yaml-language-server", "check-jsonschema", "mqtt-site-exporter check-config",
                   "exporter/config/sites.schema.json"):
        assert needle in section, needle
