"""Unit tests for exporter.config.checks: the declarative field helper and the error collector."""

from __future__ import annotations

import pytest

from exporter.config.checks import (
    BOOLEAN,
    INTEGER,
    INVALID,
    LIST,
    NUMBER,
    STRING,
    Check,
    Field,
    Problems,
    Table,
    is_number,
    topic_filter_problem,
    topic_filters,
    type_name,
    unknown_key,
)


def read(table: Table, raw: dict, context: dict | None = None) -> tuple[dict, list[str]]:
    errors: list[str] = []
    values = table.read(raw, Problems(errors, "f.yml: site 'a' (#1)"), context)
    return values, errors


def test_type_names_and_numbers():
    assert [type_name(v) for v in (True, 1, 1.5, "s", [], {}, None)] == [
        "boolean", "integer", "number", "string", "list", "mapping", "null"]
    assert is_number(1) and is_number(2.5) and is_number(10**400)
    assert not any(is_number(v) for v in (True, float("nan"), float("inf"), "1", None))


def test_unknown_key_suggests_the_closest():
    assert unknown_key("usernme", ("username", "host")) == "unknown key; did you mean 'username'?"
    assert unknown_key("colour", ("username", "host")) == "unknown key"
    assert unknown_key(5, ("username",)) == "unknown key"


@pytest.mark.parametrize("topic, problem", [
    ("a/b", None), ("#", None), ("a/+/#", None), ("+", None),
    ("", "must not be empty"), ("a\0", "must not contain NUL"), ("a" * 65536, "longer than 65535 bytes"),
    ("a/#/b", "'#' must be the whole last level"), ("a#", "'#' must be the whole last level"),
    ("a+/b", "'+' must be a whole level"),
])
def test_topic_filter_problem(topic, problem):
    assert topic_filter_problem(topic) == problem


def test_problems_name_place_and_key_and_nest():
    errors: list[str] = []
    problems = Problems(errors, "f.yml: site 'a' (#1)")
    problems.key("port", "bad")
    problems.nested("bridge.").nested("mappings[1].").key("topic", "required")
    problems.at("must be a mapping")
    Problems(errors, "f.yml", word="top-level key").key("site", "unknown key")
    assert errors == [
        "f.yml: site 'a' (#1): key 'port': bad",
        "f.yml: site 'a' (#1): key 'bridge.mappings[1].topic': required",
        "f.yml: site 'a' (#1): must be a mapping",
        "f.yml: top-level key 'site': unknown key",
    ]
    assert len(problems) == 4


TABLE = Table("t", (
    Field("name", STRING, "h", required=True, non_empty=True, pattern=r"[a-z]+",
          pattern_message="invalid name {value!r}"),
    Field("flag", BOOLEAN, "h", default=False),
    Field("port", INTEGER, "h", default=lambda c: 2 if c.values["flag"] else 1, minimum=1, maximum=10),
    Field("depth", INTEGER, "h", default=3, minimum=1),
    Field("ratio", NUMBER, "h", default=1.0, minimum=0, exclusive_minimum=True,
          range_message="expected > 0, got {value!r}", convert=float),
    Field("kind", STRING, "h", default="a", choices=("a", "b")),
    Field("items", LIST, "h", default=(), items=Field("filter", STRING, "h", steps=(topic_filters,)),
          non_empty=True, empty_message="empty list", convert=tuple),
    Field("first", STRING, "h", yields_to=("second",)),
    Field("second", STRING, "h", excludes=("first",)),
    Field("ctx", INTEGER, "h", default=lambda c: c.context["n"]),
), forbidden={"secret": "never here"})


def test_defaults_computed_from_values_and_context():
    values, errors = read(TABLE, {"name": "a", "flag": True}, {"n": 7})
    assert errors == []
    assert values == {"name": "a", "flag": True, "port": 2, "depth": 3, "ratio": 1.0, "kind": "a",
                      "items": (), "first": None, "second": None, "ctx": 7}


def test_given_values_are_checked_and_converted():
    values, errors = read(TABLE, {"name": "a", "ratio": 2, "items": ["a/#"], "first": "x"}, {"n": 0})
    assert errors == []
    assert values["ratio"] == 2.0 and isinstance(values["ratio"], float)
    assert values["items"] == ("a/#",) and values["first"] == "x"


def test_every_problem_once_in_document_then_declaration_order():
    raw = {"zzz": 1, "secret": "s3cr3t", "name": "A", "flag": "yes", "port": 11, "depth": 0,
           "ratio": 0, "kind": "c", "items": ["a/#/b", 5], "first": "x", "second": "y", "nam": 1}
    values, errors = read(TABLE, raw, {"n": 0})
    where = "f.yml: site 'a' (#1): key"
    assert errors == [
        f"{where} 'zzz': unknown key",
        f"{where} 'secret': never here",
        f"{where} 'nam': unknown key; did you mean 'name'?",
        f"{where} 'name': invalid name 'A'",
        f"{where} 'flag': expected boolean, got string",
        f"{where} 'port': must be 1..10, got 11",
        f"{where} 'depth': must be >= 1, got 0",
        f"{where} 'ratio': expected > 0, got 0",
        f"{where} 'kind': must be 'a' or 'b', got 'c'",
        f"{where} 'items': invalid topic filter 'a/#/b': '#' must be the whole last level",
        f"{where} 'items': filter #2: expected string, got integer",
        f"{where} 'second': first and second are mutually exclusive; use one",
    ]
    assert "s3cr3t" not in "\n".join(errors)
    assert values["first"] is None  # yields to 'second', which reports the conflict
    assert all(values[k] is INVALID for k in ("name", "flag", "port", "depth", "ratio", "kind", "items"))


def test_required_empty_and_bools_are_not_integers():
    _, errors = read(TABLE, {"port": True, "items": []}, {"n": 0})
    assert errors == [
        "f.yml: site 'a' (#1): key 'name': required",
        "f.yml: site 'a' (#1): key 'port': expected integer, got boolean",
        "f.yml: site 'a' (#1): key 'items': empty list",
    ]
    _, errors = read(TABLE, {"name": ""}, {"n": 0})
    assert errors == ["f.yml: site 'a' (#1): key 'name': must not be empty"]


def test_null_is_absent_and_steps_can_fail():
    def even(value: int, check: Check) -> object:
        return value if value % 2 == 0 else check.fail(f"odd: {value}")

    table = Table("t", (Field("help", STRING, "h", null_is_absent=True, default="d"),
                        Field("n", INTEGER, "h", steps=(even,))))
    assert read(table, {"help": None, "n": 2}) == ({"help": "d", "n": 2}, [])
    values, errors = read(table, {"n": 3})
    assert values["n"] is INVALID and not values["n"]
    assert errors == ["f.yml: site 'a' (#1): key 'n': odd: 3"]
