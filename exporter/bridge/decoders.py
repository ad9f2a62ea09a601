"""Payload formats: the decoder table and its one dispatch.

A decoder is a function ``decode(site, topic, payload, now) -> bool``: it either takes the
payload (writes its values with :meth:`SiteBridge.put <.site.SiteBridge.put>`, or counts an
error) and returns True, or returns False without side effects: "not my format".

:data:`DECODERS` is the default table, in order:

=========== =========================== ====================================================
decoder     takes                       values
=========== =========================== ====================================================
mapping     every payload of a topic    the explicit ``mappings:`` of that topic (JSON paths
            with ``mappings:``          or the whole payload), scaled; nothing else
json        payloads starting ``{``/``[`` every number, boolean and state string, flattened
state       a known state string         ``on``/``off``/... exact, or with other case or
                                        spacing (``bridge.states`` merged over the defaults)
number      a plain number              the number (``21``, `` -3.25``, ``1e3``)
=========== =========================== ====================================================

Two kinds of decoder: a *topic* decoder (``Decoder.topics`` set) takes every payload of the
topics it applies to (the first such decoder wins and no other is asked); a *format* decoder
takes a payload format disjoint from the other formats, so at most one takes any payload.
Disjointness is what makes the hot path one call: a topic remembers the decoder that took its
last payload (``Topic.decode``) and tries it first; only when it declines does
:func:`dispatch` ask the topic's candidates in order. A payload no decoder takes is counted
(``binary``, ``invalid_utf8`` or ``no_numeric_value``).

**Adding a payload format** is one decoder: write the function (decline fast on payloads that
are not yours, values through ``site.put(topic, owner, key, path, value, now)``), then put a
:class:`Decoder` in the table (``DECODERS``, or ``BridgeStore.site(..., decoders=...)`` for one
site) before the format decoders it must precede.

Payload errors (``mqtt_bridge_payload_errors_total{site,reason}``, all exported from 0):

=================== =====================================================================
reason              payload
=================== =====================================================================
binary              control bytes (NUL etc.): not text
invalid_utf8        text that is not valid UTF-8
invalid_json        starts with ``{``/``[`` but is not JSON
too_large           longer than ``max_payload_bytes``
too_deep            JSON nested deeper than ``max_depth``
non_finite          NaN or +-Inf (``nan``, ``inf``, ``1e999``, ...)
no_numeric_value    valid text or JSON without any number, boolean or known state string
=================== =====================================================================

An empty payload (a retained message being cleared) is ignored and not counted.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson

from .constants import DEFAULT_STATES
from .names import bridged_name
from .topics import Node

if TYPE_CHECKING:
    from ..config import BridgeMapping
    from .site import SiteBridge
    from .topics import Topic

#: ``decode(site, topic, payload, now) -> taken``; False: not this decoder's format.
DecodeFn: TypeAlias = Callable[["SiteBridge", "Topic", bytes, float], bool]
#: ``applies(site, topic)``: does a topic decoder take this (compiled) topic's payloads?
TopicTest: TypeAlias = Callable[["SiteBridge", "Topic"], bool]

_JSON_START = frozenset(b"{[")
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_DROPPED = object()  # load_json's "payload dropped" (JSON null is a valid document)
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


class Decoder:
    """One entry of the decoder table: a name, the decode function and, for a topic
    decoder, the test of the topics it takes (None: a format decoder)."""

    __slots__ = ("name", "decode", "topics")

    def __init__(self, name: str, decode: DecodeFn, topics: TopicTest | None = None):
        self.name = name
        self.decode = decode
        self.topics = topics

    def __repr__(self) -> str:
        return f"Decoder({self.name!r})"


class MappingSpec:
    """One ``mappings:`` entry, ready for the hot path (name and help computed once)."""

    __slots__ = ("path", "scale", "name", "kind", "help")

    def __init__(self, mapping: BridgeMapping):
        self.path = mapping.path
        self.scale = mapping.scale
        self.kind = mapping.type
        self.name = bridged_name("", mapping.metric, mapping.type)
        self.help = mapping.help or f"MQTT {mapping.topic} {mapping.path or 'payload'} (bridged)."


class States:
    """The state strings of one site (``bridge.states`` merged over :data:`DEFAULT_STATES`):
    ``exact`` payloads (lower, UPPER, Capitalized), ``text`` the same as str, ``loose`` by
    lowercased key. ``numeric``: some exact state also reads as a number (it wins)."""

    __slots__ = ("exact", "text", "loose", "numeric")

    def __init__(self, states: Iterable[tuple[str, float]]):
        merged = {**DEFAULT_STATES, **dict(states)}
        self.loose = {k.lower(): v for k, v in merged.items()}
        self.text: dict[str, float] = {}
        for key, value in self.loose.items():
            for variant in (key, key.upper(), key.capitalize()):
                self.text[variant] = value
        # A payload starting with { or [ is JSON's, whatever the states say.
        self.exact = {k.encode(): v for k, v in self.text.items() if k[:1] not in ("{", "[")}
        self.numeric = any(_float_or_none(k) is not None for k in self.exact)


def _float_or_none(payload: bytes) -> float | None:
    try:
        return float(payload)
    except ValueError:
        return None


# --- helpers shared by decoders -----------------------------------------------------------


def text_problem(payload: bytes) -> str | None:
    """``binary`` or ``invalid_utf8`` when the payload is not UTF-8 text, else None."""
    if _CONTROL.search(payload):
        return "binary"
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    return None


def number_or_loose_state(site: SiteBridge, payload: bytes) -> float | None:
    """The value of a non-JSON payload that is not an exact state string: a number or a
    state string with other case or spacing; None when neither (the error is counted)."""
    errors = site.stats.errors
    try:
        number = float(payload)
    except ValueError:
        pass
    else:
        if number - number != 0:  # NaN or +-Inf
            errors["non_finite"] += 1
            return None
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    reason = text_problem(payload)
    if reason is None:
        value = site.states_loose.get(payload.decode().strip().lower())
        if value is not None:
            return value
        reason = "no_numeric_value"
    errors[reason] += 1
    return None


def load_json(site: SiteBridge, payload: bytes) -> Any:
    """The parsed document, or ``_DROPPED`` (counted) when invalid or too deep."""
    try:
        doc = _loads(payload)
    except _JSONDecodeError as exc:
        site.stats.errors[_json_error(payload, exc)] += 1
        return _DROPPED
    if (payload.count(b"{") + payload.count(b"[") > site.max_depth
            and _too_deep(doc, 1, site.max_depth)):
        site.stats.errors["too_deep"] += 1
        return _DROPPED
    return doc


def _json_error(payload: bytes, exc: Exception) -> str:
    reason = text_problem(payload)
    if reason is not None:
        return reason
    message = str(exc)
    if "depth limit" in message or "recursion" in message:
        return "too_deep"
    if ("infinity" in message or "NaN" in message
            or b"NaN" in payload or b"Infinity" in payload):  # orjson rejects the literals
        return "non_finite"
    return "invalid_json"


def _too_deep(doc: Any, depth: int, max_depth: int) -> bool:
    if depth > max_depth:
        return True
    values = doc.values() if type(doc) is dict else doc
    for v in values:
        t = type(v)
        if (t is dict or t is list) and _too_deep(v, depth + 1, max_depth):
            return True
    return False


def _lookup(doc: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if type(doc) is dict:
            doc = doc.get(part)
        elif type(doc) is list and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


# --- the decoders ---------------------------------------------------------------------------


def decode_json(site: SiteBridge, entry: Topic, payload: bytes, now: float) -> bool:
    """A JSON document: every numeric leaf (numbers, booleans, state strings) by its path."""
    if payload[0] not in _JSON_START:
        return False
    try:
        doc = _loads(payload)
    except _JSONDecodeError as exc:
        site.stats.errors[_json_error(payload, exc)] += 1
        return True
    if (payload.count(b"{") + payload.count(b"[") > site.max_depth
            and _too_deep(doc, 1, site.max_depth)):
        site.stats.errors["too_deep"] += 1
        return True
    if type(doc) is dict:
        found = _walk(site, doc.items(), entry, entry.root, now)
    else:
        root = entry.root
        node = root.kids.get(entry.field)
        if node is None:
            node = root.kids[entry.field] = Node((entry.field,))
        found = _walk(site, enumerate(doc), entry, node, now)
    if not found:
        site.stats.errors["no_numeric_value"] += 1
    return True


def _walk(site: SiteBridge, items: Iterable[tuple[Any, Any]], entry: Topic, node: Node,
          now: float) -> int:
    """Update every numeric leaf under ``node``; returns how many were found."""
    found = 0
    leaves = node.leaves
    for k, v in items:
        t = type(v)
        if t is float or t is int:
            pass
        elif t is bool:
            v = 1 if v else 0
        elif t is dict or t is list:
            kid = node.kids.get(k)
            if kid is None:  # kept only if a series was created under it (cap!)
                kid = Node(node.path + (k,))
                found += _walk(site, v.items() if t is dict else enumerate(v), entry, kid, now)
                if kid.leaves or kid.kids:
                    node.kids[k] = kid
            else:
                found += _walk(site, v.items() if t is dict else enumerate(v), entry, kid, now)
            continue
        elif t is str:
            state = site.states_text.get(v)
            if state is None:
                if len(v) > 32:
                    continue
                state = site.states_loose.get(v.strip().lower())
                if state is None:
                    continue
            v = state
        else:
            continue
        found += 1
        # site.put, inlined: this loop is the hot path of JSON payloads.
        s = leaves.get(k)
        if s is None:
            site.create(entry, leaves, k, node.path + (k,), v, now)
        else:
            s.value = v
            s.updated = now
    return found


def decode_state(site: SiteBridge, entry: Topic, payload: bytes, now: float) -> bool:
    """A known state string: exact, or (a text that is not a number) with other case or
    surrounding spaces."""
    value = site.states_exact.get(payload)
    if value is None:
        if (payload[0] in _JSON_START or _float_or_none(payload) is not None
                or text_problem(payload) is not None):
            return False
        value = site.states_loose.get(payload.decode().strip().lower())
        if value is None:
            return False
    # site.put, inlined (hot path).
    s = entry.scalar.series
    if s is None:
        site.create(entry, entry.scalar, None, (entry.field,), value, now)
    else:
        s.value = value
        s.updated = now
    return True


def decode_number(site: SiteBridge, entry: Topic, payload: bytes, now: float) -> bool:
    """A plain number (``NaN``/``inf`` counted as ``non_finite``)."""
    if site.states_numeric and payload in site.states_exact:
        return False  # an exact state string wins
    try:
        number = float(payload)
    except ValueError:
        return False
    if number - number != 0:  # NaN or +-Inf
        site.stats.errors["non_finite"] += 1
        return True
    value = int(number) if number.is_integer() and abs(number) < 2**53 else number
    # site.put, inlined (hot path).
    s = entry.scalar.series
    if s is None:
        site.create(entry, entry.scalar, None, (entry.field,), value, now)
    else:
        s.value = value
        s.updated = now
    return True


def decode_mapping(site: SiteBridge, entry: Topic, payload: bytes, now: float) -> bool:
    """The explicit mappings of the topic: the value at each mapping's path (the whole
    payload for a mapping without path), scaled; other values are not bridged."""
    mappings = entry.mappings
    if not mappings:
        return False
    errors = site.stats.errors
    mapped = entry.mapped
    doc = None
    if payload[0] in _JSON_START:
        doc = load_json(site, payload)
        if doc is _DROPPED:
            return True
    found = 0
    for index, mapping in enumerate(mappings):
        value: Any
        if doc is None:
            if mapping.path:
                continue
            value = site.states_exact.get(payload)
            if value is None:
                value = number_or_loose_state(site, payload)
                if value is None:
                    return True  # counted once
        else:
            value = _lookup(doc, mapping.path)
            t = type(value)
            if t is bool:
                value = 1 if value else 0
            elif t is str:
                value = site.states_text.get(value) or site.states_loose.get(
                    value.strip().lower())
            elif t is not int and t is not float:
                value = None
            if value is None:
                continue
        if mapping.scale != 1.0:
            value = value * mapping.scale
            if value - value != 0:  # overflowed to +-Inf
                errors["non_finite"] += 1
                continue
        found += 1
        # site.put, inlined.
        s = mapped.get(index)
        if s is None:
            site.create(entry, mapped, index, (), value, now, mapping)
        else:
            s.value = value
            s.updated = now
    if not found:
        errors["no_numeric_value"] += 1
    return True


def has_mappings(site: SiteBridge, entry: Topic) -> bool:
    """The topic matches a ``mappings:`` filter of its site."""
    return entry.mappings is not None


def dispatch(site: SiteBridge, entry: Topic, payload: bytes, now: float) -> bool:
    """The one dispatch: the first of the topic's decoders that takes the payload, which
    the topic then tries first; a payload none takes is counted. Always True."""
    for decode in entry.decoders:
        if decode(site, entry, payload, now):
            entry.decode = decode
            return True
    site.stats.errors[text_problem(payload) or "no_numeric_value"] += 1
    return True


def ignore(site: SiteBridge, entry: Topic, payload: bytes, now: float) -> bool:
    """The decoder of ignored topics (never called: ingest stops before)."""
    return True


#: The default decoder table: topic decoders first, then the (disjoint) formats, most
#: frequent first.
DECODERS: tuple[Decoder, ...] = (
    Decoder("mapping", decode_mapping, topics=has_mappings),
    Decoder("json", decode_json),
    Decoder("state", decode_state),
    Decoder("number", decode_number),
)
