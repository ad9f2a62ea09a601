"""Topics: MQTT filter matching and capture, and the compiled entry of one topic.

A :class:`Topic` is what the hot path needs about a topic, computed once (labels, label text,
field name, the decoders that apply and the one that took the last payload) plus the
positions of the series already seen on it: a tree of :class:`Node` for JSON documents, a
:class:`ScalarSlot` for a plain payload, a dict for explicit mappings. A series links back to
its position (``owner``, ``key``) so that expiry can unlink it.
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .decoders import DecodeFn, MappingSpec
    from .store import Series

FilterLevels = tuple[str, ...]


def split_filter(filter_: str) -> FilterLevels:
    """``"a/+b/#"`` -> ``("a", "+b", "#")``."""
    return tuple(filter_.split("/"))


def topic_matches(filter_levels: FilterLevels, topic_levels: list[str]) -> bool:
    """MQTT filter matching; ``+name`` counts as ``+``. ``$``-topics only match filters that
    start with the same literal level (MQTT rule)."""
    if topic_levels and topic_levels[0].startswith("$") and filter_levels[0] != topic_levels[0]:
        return False
    n = len(topic_levels)
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= n:
            return False
        if level[:1] != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == n


def capture(filter_levels: FilterLevels, topic_levels: list[str]) -> list[tuple[str, str]]:
    """The ``(label, value)`` pairs of a matching filter's named ``+label`` levels."""
    return [(level[1:], topic_levels[i]) for i, level in enumerate(filter_levels)
            if level.startswith("+") and len(level) > 1]


class Slots(Protocol):
    """Where a series is linked from (``Series.owner``): a dict, or a :class:`ScalarSlot`."""

    def get(self, key: Any, /) -> Series | None: ...

    def __setitem__(self, key: Any, value: Series, /) -> None: ...

    def __delitem__(self, key: Any, /) -> None: ...


class ScalarSlot:
    """The one series of a plain (non-JSON) payload; the dict protocol ignores the key."""

    __slots__ = ("series",)

    def __init__(self) -> None:
        self.series: Series | None = None

    def get(self, key: Hashable, /) -> Series | None:
        return self.series

    def __setitem__(self, key: Hashable, value: Series, /) -> None:
        self.series = value

    def __delitem__(self, key: Hashable, /) -> None:
        self.series = None


class Node:
    """A JSON object/array position of one topic: leaves (key -> series) and children."""

    __slots__ = ("leaves", "kids", "path")

    def __init__(self, path: tuple[str | int, ...]):
        self.leaves: dict[str | int, Series] = {}
        self.kids: dict[str | int, Node] = {}
        self.path = path


class Topic:
    """What ingest needs about one topic, compiled once.

    ``decoders`` are the candidates for the topic's payloads (see :mod:`.decoders`);
    ``decode`` is the one that took the last payload (tried first).
    """

    __slots__ = ("topic", "labels", "text", "field", "root", "scalar", "mappings", "mapped",
                 "decoders", "decode")

    def __init__(self, topic: str, labels: dict[str, str], text: str, field: str,
                 mappings: tuple[MappingSpec, ...] | None, decoders: tuple[DecodeFn, ...],
                 decode: DecodeFn):
        self.topic = topic
        self.labels = labels
        self.text = text
        self.field = field
        self.root = Node(())
        self.scalar = ScalarSlot()
        self.mappings = mappings  # the explicit mappings of this topic, or None
        self.mapped: dict[int, Series] = {}  # mapping index -> series
        self.decoders = decoders
        self.decode = decode
