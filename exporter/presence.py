"""Presence records: know, don't guess, when another process uses a site's client ID.

Every process has an :class:`Identity` (a random boot ID, new at every start). For each site
it keeps a retained presence record on ``<site>/backend/instance`` and watches that topic
(docs/duplicates.md). This module is pure: the record's bytes (:class:`RecordTemplate`), its
parsing (:func:`parse_record`) and the per-site :class:`DuplicateTracker`, which applies the
liveness rules on an injected clock and writes ``SiteState.duplicate`` and
``SiteState.duplicate_detections``. The connection does the I/O.

A record with our client ID and another boot ID is **evidence** of another live process when
it is ``online``, was published after this process started (a crashed predecessor's
retained record never is) and is newer than the last record of that boot ID we saw. An
episode ends with that boot's tombstone (``"state": "offline"``, its graceful stop) or when
no fresh record arrived for ``max(90 s, 2 x max(its cooldown, ours) + 30 s)``. A takeover
with no identified peer opens an **unknown-peer** episode (a client that is not this
exporter); it ends when a connection stays up ``stable_seconds``, and an identified record
upgrades it.

**Echo check.** We subscribe to our own presence topic, so every record we publish comes back
to us. A connection whose own record stops coming back is **deaf**: the broker gave our
session (and its subscriptions) to another client without closing our connection, as amqtt
0.12.1 does. The connection then reconnects, which takes the session back and delivers the
other process's retained record: identification works on brokers that never kick. The check
is armed only once an echo has been seen on the site (an ACL that drops our record turns it
off instead of reconnecting forever).
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .state import Duplicate

if TYPE_CHECKING:
    from .state import SiteState

ONLINE, OFFLINE = "online", "offline"
#: Refresh our record this often while an episode is open (both sides keep seeing each other).
REFRESH_INTERVAL = 30.0
#: Outside episodes, republish our record this often (MQTT_PRESENCE_INTERVAL_SECONDS) and
#: expect the broker to echo it back within ``min(ECHO_TIMEOUT, max(1 s, interval / 2))``.
ECHO_INTERVAL = 30.0
ECHO_TIMEOUT = 5.0
#: An identified peer expires after ``max(EXPIRY_FLOOR, 2 x max(cooldowns) + EXPIRY_MARGIN)``
#: seconds without a fresh record.
EXPIRY_FLOOR = 90.0
EXPIRY_MARGIN = 30.0
#: Records longer than this are not ours (ours are about 300 bytes).
MAX_RECORD_BYTES = 4096
#: Boot IDs whose last record is remembered (rule 3: only newer records count).
MAX_REMEMBERED_BOOTS = 64
#: The fields of a record kept (and shown in /health); anything else is dropped.
RECORD_FIELDS = ("client_id", "instance_id", "boot_id", "host", "pid", "version", "started_at",
                 "published_at", "state", "cooldown_seconds")


@dataclass(frozen=True)
class Identity:
    """Who this process is, as written in its presence records."""

    instance_id: str
    boot_id: str
    host: str
    pid: int
    version: str
    started_at: float  # wall clock

    @classmethod
    def new(cls, instance_id: str, started_at: float) -> Identity:
        """A fresh identity: a random boot ID, this host and this pid."""
        return cls(instance_id=instance_id, boot_id=secrets.token_hex(8),
                   host=socket.gethostname(), pid=os.getpid(), version=__version__,
                   started_at=started_at)


def _number(value: float) -> str:
    """A finite float as a JSON number."""
    value = float(value)
    return repr(value) if math.isfinite(value) else "0.0"


class RecordTemplate:
    """One site's presence record as compact JSON bytes; the fixed part is encoded once.

    Rendering is a few string joins (the shutdown builds 1000 tombstones in the farewell).
    """

    def __init__(self, identity: Identity, client_id: str) -> None:
        fixed = {"client_id": client_id, "instance_id": identity.instance_id,
                 "boot_id": identity.boot_id, "host": identity.host, "pid": identity.pid,
                 "version": identity.version, "started_at": identity.started_at}
        self._prefix = json.dumps(fixed, separators=(",", ":"))[:-1]

    def render(self, online: bool, cooldown_seconds: float, published_at: float) -> bytes:
        state = ONLINE if online else OFFLINE
        return (f'{self._prefix},"published_at":{_number(published_at)},"state":"{state}",'
                f'"cooldown_seconds":{_number(cooldown_seconds)}}}').encode()


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def parse_record(payload: bytes, client_id: str, own_boot_id: str) -> dict[str, Any] | None:
    """The record in ``payload`` if it is another process's record for ``client_id``.

    None for anything else: empty, too long, not JSON, not an object, another client ID,
    our own boot ID, a missing or mistyped ``boot_id`` / ``published_at`` / ``state``.
    Only :data:`RECORD_FIELDS` with scalar values are kept.
    """
    if not payload or len(payload) > MAX_RECORD_BYTES:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("client_id") != client_id:
        return None
    boot = data.get("boot_id")
    if not isinstance(boot, str) or not boot or boot == own_boot_id:
        return None
    if not _is_number(data.get("published_at")) or data.get("state") not in (ONLINE, OFFLINE):
        return None
    record = {k: data[k] for k in RECORD_FIELDS
              if k in data and (data[k] is None or isinstance(data[k], (str, int, float)))}
    cooldown = record.get("cooldown_seconds")
    ok = isinstance(cooldown, (int, float)) and _is_number(cooldown) and cooldown >= 0
    record["cooldown_seconds"] = float(cooldown) if ok and cooldown is not None else 0.0
    return record


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


@dataclass
class _Peer:
    record: dict[str, Any]
    first_seen: float      # wall clock
    last_seen: float       # wall clock
    fresh_at: float        # monotonic: when the last fresh record arrived


class DuplicateTracker:
    """One site's duplicate episodes (pure: no I/O; the connection feeds it and publishes).

    Feed it every presence payload (:meth:`on_payload`), every takeover decision
    (:meth:`on_takeover`), a connection that stayed up ``stable_seconds``
    (:meth:`on_stable`), and the clock (:meth:`tick`, for expiry). Ask :meth:`publish_due`
    whether to publish our record now (a reply right after an identification, a refresh
    every :data:`REFRESH_INTERVAL` while an episode is open), and tell :meth:`published`.
    It writes ``state.duplicate`` and ``state.duplicate_detections``.
    """

    def __init__(self, identity: Identity, client_id: str, state: SiteState, clock: Clock,
                 log: logging.LoggerAdapter[logging.Logger],
                 refresh_interval: float = REFRESH_INTERVAL,
                 expiry_floor: float = EXPIRY_FLOOR,
                 echo_interval: float = ECHO_INTERVAL) -> None:
        self.identity = identity
        self.client_id = client_id
        self.state = state
        self.clock = clock
        self.log = log
        self.refresh_interval = refresh_interval
        self.expiry_floor = expiry_floor
        self._peers: dict[str, _Peer] = {}           # identified, live, by boot ID
        self._latest: dict[str, float] = {}          # boot ID -> newest published_at seen
        self._unknown: Duplicate | None = None       # an unknown-peer episode
        self._reply_due = False
        self._published_at: float | None = None      # monotonic, our last record
        self.echo_interval = echo_interval
        self.echo_timeout = min(ECHO_TIMEOUT, max(1.0, echo_interval / 2))
        self._echo_pending: float | None = None      # published_at of our record in flight
        self._echo_deadline = 0.0                    # monotonic
        self._echo_works: bool | None = None         # None: no echo seen yet on this site
        self._boot_bytes = identity.boot_id.encode()

    # -- what the connection asks ----------------------------------------------------
    @property
    def identified(self) -> bool:
        """An identified duplicate is live (the cooldown grows while this holds)."""
        return bool(self._peers)

    @property
    def open(self) -> bool:
        """Any episode is open, identified or unknown."""
        return bool(self._peers) or self._unknown is not None

    def peer(self) -> dict[str, Any] | None:
        """The record of the identified peer seen last, or None."""
        if not self._peers:
            return None
        return max(self._peers.values(), key=lambda p: p.fresh_at).record

    def expiry_seconds(self, peer_cooldown: float, our_cooldown: float) -> float:
        return max(self.expiry_floor, 2 * max(peer_cooldown, our_cooldown) + EXPIRY_MARGIN)

    @property
    def reply_due(self) -> bool:
        """A peer was just identified: it should see a live record of ours at once."""
        return self._reply_due

    def publish_due(self) -> bool:
        """True when our record should be published now (reply, refresh or echo check)."""
        if self._reply_due or self._published_at is None:
            return True
        interval = min(self.refresh_interval, self.echo_interval) if self.open \
            else self.echo_interval
        return self.clock.monotonic() - self._published_at >= interval

    def published(self, published_at: float | None = None) -> None:
        """Our record was just published (on connect, as a reply or a refresh);
        ``published_at`` is the value in it, whose echo we then expect."""
        now = self.clock.monotonic()
        self._published_at = now
        self._reply_due = False
        if published_at is not None and self._echo_works is not False:
            if self._echo_pending is None:  # the oldest record in flight sets the deadline
                self._echo_deadline = now + self.echo_timeout
            self._echo_pending = published_at

    def seconds_to_next(self) -> float:
        """Seconds until :meth:`publish_due` or :meth:`deaf` may change (the connection's I/O
        loop sleeps no longer than this)."""
        now = self.clock.monotonic()
        if self._reply_due or self._published_at is None:
            return 0.0
        interval = min(self.refresh_interval, self.echo_interval) if self.open \
            else self.echo_interval
        due = self._published_at + interval - now
        if self._echo_pending is not None:
            due = min(due, self._echo_deadline - now)
        return max(0.0, due)

    def connection_started(self) -> None:
        """A new connection: nothing of ours is in flight on it."""
        self._echo_pending = None

    def deaf(self) -> bool:
        """Our record did not come back in time: another client has our session.

        Until a first echo was seen on this site the check is not armed: a broker (or an
        ACL) that never delivers our record back turns it off, once, with a log line.
        """
        if self._echo_pending is None or self.clock.monotonic() < self._echo_deadline:
            return False
        self._echo_pending = None
        if self._echo_works:
            return True
        if self._echo_works is None:
            self._echo_works = False
            self.log.info("The broker does not echo our presence record on %s (an ACL?): "
                          "no deaf-connection check for this site",
                          f"{self.client_id.rsplit('_i', 1)[0]}/backend/instance")
        return False

    # -- what the connection feeds ---------------------------------------------------
    def on_payload(self, payload: bytes) -> None:
        """A message on the presence topic (ours, the peer's, retained or live)."""
        if self._echo_pending is not None and self._boot_bytes in payload:
            self._check_echo(payload)
        record = parse_record(payload, self.client_id, self.identity.boot_id)
        if record is None:
            return
        boot, published = record["boot_id"], float(record["published_at"])
        latest = self._latest.get(boot)
        if latest is not None and published <= latest:
            return  # rule 3: seen already (a retained replay, an overlapping subscription)
        self._remember(boot, published)
        if record["state"] == OFFLINE:
            if boot in self._peers:
                self._end_peer(boot, "stopped (its tombstone)")
            return
        if published <= self.identity.started_at:
            return  # rule 2: published before we started (a crashed predecessor's record)
        now_wall, now_mono = self.clock.time(), self.clock.monotonic()
        known = self._peers.get(boot)
        if known is not None:
            known.record, known.last_seen, known.fresh_at = record, now_wall, now_mono
            self._show()
            return
        upgrade = self._unknown is not None and not self._peers
        first_seen = self._unknown.first_seen if upgrade and self._unknown else now_wall
        self._peers[boot] = _Peer(record, first_seen, now_wall, now_mono)
        self._unknown = None
        if not upgrade:
            self.state.duplicate_detections += 1
        self._reply_due = True
        self.log.warning(
            "Duplicate instance: another process uses client ID %s (host %s, pid %s, boot ID %s, "
            "instance %s, version %s)", self.client_id, record.get("host"), record.get("pid"),
            boot, record.get("instance_id"), record.get("version"))
        self._show()

    def on_takeover(self) -> None:
        """The reconnect policy decided TAKEOVER: with no identified peer, an unknown one."""
        if self._peers:
            return
        now = self.clock.time()
        if self._unknown is not None:
            self._unknown.last_seen = now
            return
        self._unknown = Duplicate(None, now, now)
        self.state.duplicate_detections += 1
        self.log.warning("Duplicate client ID %s: taken over by a client that publishes no "
                         "presence record (not this exporter)", self.client_id)
        self._show()

    def on_stable(self) -> None:
        """A connection stayed up ``stable_seconds``: an unknown peer has gone."""
        if self._unknown is not None and not self._peers:
            self._unknown = None
            self.log.info("Duplicate client ID %s: the unknown peer has not come back",
                          self.client_id)
            self._show()

    def tick(self, our_cooldown: float) -> None:
        """Expire identified peers with no fresh record for too long."""
        now = self.clock.monotonic()
        for boot, peer in list(self._peers.items()):
            limit = self.expiry_seconds(float(peer.record["cooldown_seconds"]), our_cooldown)
            if now - peer.fresh_at >= limit:
                self._end_peer(boot, f"expired (no record for {limit:g} s)")

    # -- internals -------------------------------------------------------------------
    def _check_echo(self, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if (isinstance(data, dict) and data.get("boot_id") == self.identity.boot_id
                and data.get("client_id") == self.client_id
                and data.get("published_at") == self._echo_pending):
            self._echo_pending = None
            self._echo_works = True

    def _remember(self, boot: str, published: float) -> None:
        self._latest.pop(boot, None)
        self._latest[boot] = published
        while len(self._latest) > MAX_REMEMBERED_BOOTS:  # oldest insertion first
            oldest = next(iter(self._latest))
            if oldest in self._peers:
                break
            del self._latest[oldest]

    def _end_peer(self, boot: str, why: str) -> None:
        peer = self._peers.pop(boot)
        self.log.info("Duplicate instance gone: host %s, pid %s, boot ID %s %s",
                         peer.record.get("host"), peer.record.get("pid"), boot, why)
        self._show()

    def _show(self) -> None:
        """Write the open episode (if any) into the site's state."""
        if self._peers:
            latest = max(self._peers.values(), key=lambda p: p.fresh_at)
            self.state.duplicate = Duplicate(dict(latest.record), latest.first_seen,
                                             latest.last_seen)
        else:
            self.state.duplicate = self._unknown
