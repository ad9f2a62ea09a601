"""The bridge of one site: :meth:`SiteBridge.ingest` is the hot path, called by the site's
connection for every message; it never raises.

Per message: one dict lookup gives the topic's compiled :class:`~.topics.Topic`, then one call
to the decoder that took the topic's last payload (see :mod:`.decoders`). A JSON payload costs
one ``orjson.loads`` and one dict lookup plus two attribute stores per numeric leaf; no string
is built and no regex runs for a series seen before. Names are computed once, when a series is
created (:meth:`SiteBridge.create`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Hashable
from typing import TYPE_CHECKING

from ..textformat import escape_label_value
from .decoders import DECODERS, Decoder, MappingSpec, States, dispatch, ignore
from .names import bridged_name, field_name
from .topics import Topic, capture, split_filter, topic_matches

if TYPE_CHECKING:
    from ..config import BridgeConfig
    from .store import BridgeStore, SiteStats
    from .topics import Slots

log = logging.getLogger(__name__)

#: Topic levels that do not make a field name (an index like ``relay/0``).
_NUMERIC_LEVEL = re.compile(r"[0-9]+")

#: The compiled entry of every ignored topic.
IGNORED = Topic("", {}, "", "", None, (), ignore)


class SiteBridge:
    """The bridge of one site. ``ingest(topic, payload)`` is the hot path; it never raises."""

    def __init__(self, store: BridgeStore, stats: SiteStats, config: BridgeConfig,
                 status_topic: str, decoders: tuple[Decoder, ...] | None = None):
        self.store = store
        self.name = stats.site
        self.config = config
        self.prefix = config.prefix
        self.max_series = config.max_series
        self.expire_after = config.expire_after
        self.max_payload = config.max_payload_bytes
        self.max_depth = config.max_depth
        self.stats = stats
        self._monotonic = store.clock.monotonic
        self._ignore = [split_filter(f) for f in (status_topic, "$SYS/#", *config.ignore)]
        self._patterns = [split_filter(p) for p in config.topic_labels]
        self._mappings = [(split_filter(m.topic), MappingSpec(m)) for m in config.mappings]
        states = States(config.states)
        self.states_exact = states.exact
        self.states_text = states.text
        self.states_loose = states.loose
        self.states_numeric = states.numeric
        table = DECODERS if decoders is None else decoders
        self._topic_decoders = [d for d in table if d.topics is not None]
        self._format_decoders = tuple(d.decode for d in table if d.topics is None)
        self._topics: dict[str, Topic] = {}
        #: Compiled topics kept; the cache is cleared when full (series stay in the store).
        self.max_topics = max(1024, 2 * config.max_series)
        self._error_logged = False

    # -- hot path ----------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes | bytearray | memoryview) -> None:
        """Turn one message into samples. Never raises."""
        try:
            entry = self._topics.get(topic)
            if entry is None:
                entry = self._compile(topic)
            if entry is IGNORED:
                return
            stats = self.stats
            stats.messages += 1
            data = payload if type(payload) is bytes else bytes(payload)
            if len(data) > self.max_payload:
                stats.errors["too_large"] += 1
                return
            if not data:
                return
            now = self._monotonic()
            if not entry.decode(self, entry, data, now):
                dispatch(self, entry, data, now)
        except Exception:  # the connection must never see a bridge bug
            if not self._error_logged:
                self._error_logged = True
                log.exception("Bridge [%s]: unexpected error (logged once per site)", self.name)

    # -- the one update-or-create path -----------------------------------------------------
    def put(self, entry: Topic, owner: Slots, key: Hashable, path: tuple[str | int, ...],
            value: float, now: float, spec: MappingSpec | None = None) -> None:
        """Set the series at ``owner[key]`` of ``entry``; create it on first sight (named
        from ``path``, or by ``spec``). The hot decoders inline the update of an existing
        series and call :meth:`create` directly."""
        s = owner.get(key)
        if s is None:
            self.create(entry, owner, key, path, value, now, spec)
        else:
            s.value = value
            s.updated = now

    def create(self, entry: Topic, owner: Slots, key: Hashable, path: tuple[str | int, ...],
               value: float, now: float, spec: MappingSpec | None = None) -> None:
        """The slow half of :meth:`put`: name the series, then let the store relink, create or
        drop it (caps)."""
        if spec is None:
            kind = "gauge"
            name = bridged_name(self.prefix, field_name(path), kind)
            help_text = f"MQTT payload field '{'.'.join(map(str, path))}' (bridged)."
        else:
            kind, name, help_text = spec.kind, spec.name, spec.help
        self.store.add(self.stats, self.max_series, name, kind, help_text, entry.labels,
                       entry.text, owner, key, value, now)

    # -- topics --------------------------------------------------------------------------
    def _compile(self, topic: str) -> Topic:
        if len(self._topics) >= self.max_topics:
            self._topics.clear()
        levels = topic.split("/")
        if any(topic_matches(f, levels) for f in self._ignore):
            self._topics[topic] = IGNORED
            return IGNORED
        labels = {"site": self.name}
        if self.config.topic_label:
            labels["topic"] = topic
        for pattern in self._patterns:
            if topic_matches(pattern, levels):
                for label, value in capture(pattern, levels):
                    labels[label] = value
                break
        text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sorted(labels.items()))
        field = next((level for level in reversed(levels)
                      if level and not _NUMERIC_LEVEL.fullmatch(level)), "value")
        mappings = tuple(m for f, m in self._mappings if topic_matches(f, levels)) or None
        entry = Topic(topic, labels, text, field, mappings, self._format_decoders, dispatch)
        for decoder in self._topic_decoders:
            if decoder.topics is not None and decoder.topics(self, entry):
                entry.decoders = (decoder.decode,)
                entry.decode = decoder.decode
                break
        self._topics[topic] = entry
        return entry
