"""The declarative checks every part of the configuration is read with.

A :class:`Field` declares one key: its kind, default, range, choices, pattern, extra steps
and help text. A :class:`Table` is the list of fields of one mapping (a site, a ``bridge:``
block, a bridge mapping); :meth:`Table.read` validates a parsed YAML mapping against it and
reports every problem to a :class:`Problems` collector, which names the file, the site and
the key. The same declarations give the JSON Schema (``schema.py``) and the reference
documentation (``docs.py``), so the three cannot disagree.

Messages may echo a bad value (a port, a topic filter): no key ever holds a secret, since
passwords come only from environment variables or files, and a literal ``password`` key is a
forbidden key whose value is never read.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final


class ConfigError(Exception):
    """Every configuration problem found, one line each in `errors`."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class _Invalid:
    """Marker for a value that failed its checks (the problem is already reported)."""

    _instance: _Invalid | None = None

    def __new__(cls) -> _Invalid:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INVALID"

    def __bool__(self) -> bool:
        return False


INVALID: Final = _Invalid()

_TYPE_NAMES: dict[type, str] = {
    bool: "boolean", int: "integer", float: "number", str: "string",
    list: "list", dict: "mapping", type(None): "null",
}


def type_name(value: Any) -> str:
    """The YAML-ish name of a value's type, as messages print it ('integer', 'mapping')."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def is_number(value: Any) -> bool:
    """A finite int or float (never a bool)."""
    return type(value) in (int, float) and value == value and abs(value) != float("inf")


def unknown_key(key: Any, known: Sequence[str]) -> str:
    """'unknown key', with a did-you-mean suggestion when a known key is close."""
    close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
    return "unknown key" + (f"; did you mean '{close[0]}'?" if close else "")


def topic_filter_problem(topic: str) -> str | None:
    """What is wrong with an MQTT topic filter, or None when it is valid."""
    if not topic:
        return "must not be empty"
    if "\0" in topic:
        return "must not contain NUL"
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "longer than 65535 bytes"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be the whole last level"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


#: JSON Schema pattern for a topic filter (the level rules of topic_filter_problem).
TOPIC_FILTER_PATTERN = r"^(?:(?:[^/#+]*|\+)/)*(?:[^/#+]*|\+|#)$"


class Problems:
    """Collects problems as ``<where>: key '<prefix><key>': <message>`` lines.

    ``nested(prefix)`` shares the list and prefixes keys (``bridge.``, ``bridge.mappings[1].``).
    """

    def __init__(self, errors: list[str], where: str, prefix: str = "", word: str = "key") -> None:
        self.errors = errors
        self.where = where
        self.prefix = prefix
        self.word = word

    def key(self, key: Any, message: str) -> None:
        """A problem with one key."""
        self.errors.append(f"{self.where}: {self.word} '{self.prefix}{key}': {message}")

    def at(self, message: str) -> None:
        """A problem with the place itself (the file, a site as a whole)."""
        self.errors.append(f"{self.where}: {message}")

    def nested(self, prefix: str) -> Problems:
        """Same list and place, keys prefixed with ``prefix``."""
        return Problems(self.errors, self.where, self.prefix + prefix, self.word)

    def __len__(self) -> int:
        return len(self.errors)


@dataclass(frozen=True)
class Kind:
    """A value type: how to recognise it, what messages call it, its JSON Schema type."""

    name: str
    test: Callable[[Any], bool]
    json: Mapping[str, Any]


ANY = Kind("any value", lambda v: True, {})
STRING = Kind("string", lambda v: isinstance(v, str), {"type": "string"})
INTEGER = Kind("integer", lambda v: type(v) is int, {"type": "integer"})
NUMBER = Kind("number", is_number, {"type": "number"})
BOOLEAN = Kind("boolean", lambda v: isinstance(v, bool), {"type": "boolean"})
LIST = Kind("list", lambda v: isinstance(v, list), {"type": "array"})
MAPPING = Kind("mapping", lambda v: isinstance(v, dict), {"type": "object"})


@dataclass(frozen=True)
class Check:
    """What a step of a field sees: where to report, the values read so far, the context."""

    problems: Problems
    key: str
    values: Mapping[str, Any]
    context: Mapping[str, Any]

    def fail(self, message: str) -> _Invalid:
        """Report ``message`` for this field's key; returns INVALID for ``return check.fail(...)``."""
        self.problems.key(self.key, message)
        return INVALID


#: A step after the built-in checks: returns the (possibly converted) value, or INVALID
#: after reporting through ``check.fail``.
Step = Callable[[Any, Check], Any]


@dataclass(frozen=True)
class Field:
    """One key of a mapping, declared once: validation, JSON Schema and docs come from it.

    Checks run in this order, the first failure ends them: present (``required``),
    ``coerce``, kind (``type_message``), ``non_empty``, ``max_length``, range, ``choices``, ``pattern``,
    list ``items``, then ``steps``. A default is never checked.
    """

    key: str
    kind: Kind
    help: str
    default: Any = None  #: value when absent; a callable gets the Check (values read so far)
    default_doc: str | None = None  #: how the docs show a computed default
    doc_type: str | None = None  #: how the docs name the type (default: ``expected`` or the kind)
    required: bool = False
    required_message: str = "required"
    null_is_absent: bool = False  #: an explicit ``null`` counts as absent
    coerce: Callable[[Any], Any] | None = None
    type_message: str = "expected {expected}, got {got}"
    expected: str | None = None  #: the kind's name in messages, when it differs
    non_empty: bool = False  #: strings and lists: ``empty_message``
    empty_message: str = "must not be empty"
    max_length: int | None = None  #: strings and lists: at most this many characters / items
    length_message: str = "{length} long; at most {max_length}"
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    range_message: str | None = None  #: format with {value}
    choices: tuple[Any, ...] | None = None
    show: Callable[[Any], str] = repr  #: how a bad value is echoed in a choices message
    pattern: str | None = None  #: full-match regex
    pattern_message: str = "invalid value {value!r}"
    items: Field | None = None  #: lists: each item (its key is the item's label)
    excludes: tuple[str, ...] = ()  #: keys that must not be given with this one (reported here)
    yields_to: tuple[str, ...] = ()  #: with one of these keys given, this one is not read
    steps: tuple[Step, ...] = ()
    schema: Mapping[str, Any] = field(default_factory=dict)  #: extra JSON Schema keywords
    convert: Callable[[Any], Any] | None = None  #: applied to a valid given value

    def read(self, raw: Mapping[Any, Any], check: Check) -> Any:
        """The field's value from ``raw`` (default when absent), or INVALID (reported)."""
        present = self.key in raw and not (self.null_is_absent and raw[self.key] is None)
        if not present:
            if self.required:
                return check.fail(self.required_message)
            return self.default(check) if callable(self.default) else self.default
        if any(other in raw for other in self.yields_to):
            return self.default
        for other in self.excludes:
            if other in raw:
                return check.fail(f"{other} and {self.key} are mutually exclusive; use one")
        value = self.check_value(raw[self.key], check)
        if value is INVALID or self.convert is None:
            return value
        return self.convert(value)

    def check_value(self, value: Any, check: Check, label: str = "") -> Any:
        """Run the checks on a given value; ``label`` prefixes type problems (list items)."""
        if self.coerce is not None:
            value = self.coerce(value)
        if not self.kind.test(value):
            return check.fail(label + self.type_message.format(
                expected=self.expected or self.kind.name, got=type_name(value)))
        if self.non_empty and not value:
            return check.fail(label + self.empty_message)
        if self.max_length is not None and len(value) > self.max_length:
            return check.fail(label + self.length_message.format(
                length=len(value), max_length=self.max_length))
        if not self.in_range(value):
            return check.fail(self.describe_range(value))
        if self.choices is not None and value not in self.choices:
            allowed = " or ".join(repr(c) for c in self.choices)
            return check.fail(f"must be {allowed}, got {self.show(value)}")
        if self.pattern is not None and not _fullmatch(self.pattern, value):
            return check.fail(self.pattern_message.format(value=value))
        if self.items is not None:
            ok = True
            for i, item in enumerate(value, 1):
                ok = self.items.check_value(item, check, f"{self.items.key} #{i}: ") is not INVALID and ok
            if not ok:
                return INVALID
        for step in self.steps:
            value = step(value, check)
            if value is INVALID:
                return INVALID
        return value

    def in_range(self, value: Any) -> bool:
        if self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        ):
            return False
        return self.maximum is None or value <= self.maximum

    def describe_range(self, value: Any) -> str:
        if self.range_message is not None:
            return self.range_message.format(value=value)
        if self.maximum is not None:
            return f"must be {self.minimum}..{self.maximum}, got {value}"
        return f"must be >= {self.minimum}, got {value}"


def _fullmatch(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


@dataclass(frozen=True)
class Table:
    """The declared keys of one mapping; ``forbidden`` keys get their own message."""

    title: str
    fields: tuple[Field, ...]
    forbidden: Mapping[str, str] = field(default_factory=dict)
    schema: Mapping[str, Any] = field(default_factory=dict)  #: extra JSON Schema (cross-key rules)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.key for f in self.fields)

    def __getitem__(self, key: str) -> Field:
        for f in self.fields:
            if f.key == key:
                return f
        raise KeyError(key)

    def read(
        self,
        raw: Mapping[Any, Any],
        problems: Problems,
        context: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Every declared key's value (INVALID where a problem was reported).

        Unknown and forbidden keys are reported first, in the order of the document, then
        each field in declaration order.
        """
        report_unknown_keys(raw, self.keys, problems, self.forbidden)
        values: dict[str, Any] = {}
        for f in self.fields:
            values[f.key] = f.read(raw, Check(problems, f.key, values, context or {}))
        return values


def report_unknown_keys(
    raw: Mapping[Any, Any],
    known: Sequence[str],
    problems: Problems,
    forbidden: Mapping[str, str] | None = None,
) -> None:
    """Report every key of ``raw`` that is forbidden or not in ``known``, in document order."""
    for key in raw:
        if forbidden and key in forbidden:
            problems.key(key, forbidden[key])
        elif key not in known:
            problems.key(key, unknown_key(key, known))


def topic_filters(value: str, check: Check) -> Any:
    """Step: a topic filter (a list item's step reports per filter)."""
    if problem := topic_filter_problem(value):
        return check.fail(f"invalid topic filter {value!r}: {problem}")
    return value


def documented_default(f: Field) -> str:
    """How the docs show a field's default ('' when there is none)."""
    if f.default_doc is not None:
        return f.default_doc
    if f.required:
        return "required"
    if f.default is None:
        return "-"
    if isinstance(f.default, bool):
        return "true" if f.default else "false"
    if isinstance(f.default, (tuple, list)) and not f.default:
        return "[]"
    if isinstance(f.default, str):
        return f'"{f.default}"'
    return str(f.default)


__all__ = [
    "ANY", "BOOLEAN", "INTEGER", "INVALID", "LIST", "MAPPING", "NUMBER", "STRING",
    "TOPIC_FILTER_PATTERN", "Check", "ConfigError", "Field", "Kind", "Problems", "Step", "Table",
    "documented_default", "is_number", "report_unknown_keys", "topic_filter_problem",
    "topic_filters", "type_name", "unknown_key",
]
