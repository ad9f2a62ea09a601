"""Tests for exporter.config.schema: the committed JSON Schema is the generated one, the shipped
sites files validate against it, and documents load_settings rejects are rejected by it too."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import ConfigError, load_settings
from exporter.config.checks import TOPIC_FILTER_PATTERN, topic_filter_problem
from exporter.config.schema import SCHEMA_PATH, render, sites_schema

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["examples/sites.yml", "examples/bridge.yml", "deploy/sites.yml"]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(Path(SCHEMA_PATH).read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_committed_schema_is_the_generated_one():
    committed = Path(SCHEMA_PATH).read_text(encoding="utf-8")
    assert committed == render(), (
        "exporter/config/sites.schema.json is stale: "
        "python -m exporter.config.schema > exporter/config/sites.schema.json")
    assert json.loads(committed) == sites_schema()


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_sites_files_validate(validator, path):
    document = yaml.safe_load((REPO / path).read_text(encoding="utf-8"))
    assert [e.message for e in validator.iter_errors(document)] == []


@pytest.mark.parametrize("path", ["examples/sites.yml", "examples/bridge.yml"])
def test_examples_point_editors_at_the_schema(path):
    first = (REPO / path).read_text(encoding="utf-8").splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, first
    assert (REPO / path).parent.joinpath(match.group(1)).resolve() == Path(SCHEMA_PATH).resolve()


GOOD = {"name": "good", "host": "broker.example.org"}
BAD = {
    "unknown key": {"sites": [{**GOOD, "usernme": "x"}]},
    "unknown top-level key": {"sites": [GOOD], "site": []},
    "bad port": {"sites": [{**GOOD, "port": 70000}]},
    "port as string": {"sites": [{**GOOD, "port": "1883"}]},
    "literal password": {"sites": [{**GOOD, "password": "x"}]},
    "bad protocol": {"sites": [{**GOOD, "protocol": "4"}]},
    "missing host": {"sites": [{"name": "good"}]},
    "bad name": {"sites": [{"name": "bad name!", "host": "h"}]},
    "both password sources": {"sites": [{**GOOD, "password_env": "PW", "password_file": "/x"}]},
    "ca_file without tls": {"sites": [{**GOOD, "ca_file": "/x"}]},
    "hash not last": {"sites": [{**GOOD, "topics": ["a/#/b"]}]},
    "empty topics": {"sites": [{**GOOD, "topics": []}]},
    "keepalive too small": {"sites": [{**GOOD, "keepalive": 4}]},
    "no sites": {"sites": []},
    "bridge not a mapping": {"sites": [{**GOOD, "bridge": "yes"}]},
    "bridge unknown key": {"sites": [{**GOOD, "bridge": {"prefx": "a_"}}]},
    "bridge reserved prefix": {"sites": [{**GOOD, "bridge": {"prefix": "mqtt_site_"}}]},
    "bridge max_depth": {"sites": [{**GOOD, "bridge": {"max_depth": 100}}]},
    "bridge expire_after": {"sites": [{**GOOD, "bridge": {"expire_after": 0}}]},
    "bridge states": {"sites": [{**GOOD, "bridge": {"states": {"x": "one"}}}]},
    "mapping without topic": {"sites": [{**GOOD, "bridge": {"mappings": [{"metric": "x"}]}}]},
    "mapping gauge _total": {"sites": [{**GOOD, "bridge": {"mappings": [{"topic": "a",
                                                                         "metric": "x_total"}]}}]},
    "mapping bad type": {"sites": [{**GOOD, "bridge": {"mappings": [{"topic": "a", "metric": "x",
                                                                     "type": "hist"}]}}]},
}


@pytest.mark.parametrize("document", BAD.values(), ids=BAD.keys())
def test_what_load_settings_rejects_the_schema_rejects(validator, tmp_path, document):
    (tmp_path / "sites.yml").write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError):
        load_settings({"MQTT_INSTANCE_ID": "t", "PW": "pw"}, cwd=str(tmp_path))
    assert list(validator.iter_errors(document)), "the schema accepts it"


GOOD_DOCUMENTS = {
    "minimal": {"sites": [GOOD]},
    "everything": {"sites": [{**GOOD, "port": 8883, "enabled": False, "protocol": 5, "username": "u",
                              "password_env": "PW", "topics": ["a/+/b", "#"], "keepalive": 5,
                              "tls": True, "bridge": {
                                  "prefix": "", "max_series": 1, "expire_after": 0.5, "ignore": [],
                                  "states": {"heat": 2}, "topic_labels": ["x/+dev/#"],
                                  "topic_label": False, "max_payload_bytes": 1, "max_depth": 64,
                                  "mappings": [{"topic": "m", "metric": "x_total", "type": "counter",
                                                "path": "a.b", "scale": 2, "help": None}]}}]},
    "bridge off": {"sites": [{**GOOD, "bridge": False}, {"name": "b", "host": "::1", "bridge": None}]},
}


@pytest.mark.parametrize("document", GOOD_DOCUMENTS.values(), ids=GOOD_DOCUMENTS.keys())
def test_what_load_settings_accepts_the_schema_accepts(validator, tmp_path, document):
    (tmp_path / "sites.yml").write_text(yaml.safe_dump(document))
    load_settings({"MQTT_INSTANCE_ID": "t", "PW": "pw"}, cwd=str(tmp_path))
    assert [e.message for e in validator.iter_errors(document)] == []


@given(st.text(alphabet="ab/#+", max_size=8))
def test_topic_filter_pattern_agrees_with_the_check(topic):
    if topic:
        assert (re.search(TOPIC_FILTER_PATTERN, topic) is not None) == (topic_filter_problem(topic) is None)


def test_schema_module_prints_the_file():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "exporter.config.schema"], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out == render()
