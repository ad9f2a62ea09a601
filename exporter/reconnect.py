"""Reconnect policy: classify how a connection ended, then back off or cool down.

Pure logic, no I/O: the connection feeds it one :class:`ConnectionEnd` per attempt and
sleeps for the returned :class:`Decision`.

Takeover ("code 7") detection:
- MQTT 5 with a broker that says so: DISCONNECT reason 0x8E "Session taken over".
- Otherwise by evidence, because paho reports every broker-side close the same way
  (reason 128 on v3.1.1): a broker-side close of a connection that had been up for less
  than ``stable_seconds``, for the second time in a row (no stable connection and no
  refused attempt in between), is a takeover. A broker restart closes a long-lived
  connection (not a takeover) and then refuses connects (which clears the evidence), so
  restarts do not cost a cooldown.

Two facts from outside sharpen this (docs/duplicates.md), each on :class:`ConnectionEnd`:

- ``duplicate``: another process using our client ID is identified by its presence record
  (an unknown peer, inferred from takeovers, keeps the base cooldown). Then every
  broker-side close is a takeover, and the cooldown doubles at each one in a row, from
  ``cooldown_seconds`` up to ``cooldown_max``, so two instances converge to a takeover per
  cooldown instead of fighting. It wins over a broker event: a duplicate that starts kicks every site of a
  broker at once, which looks like one.
- ``broker_event``: several sites of this broker endpoint lost their connections at once
  (:mod:`exporter.brokers`): it is the broker (restart, crash, network), never a takeover;
  the short-close evidence starts over and the site backs off with jitter like any loss.

The policy as a table (first matching row wins; "close" is a broker-side close without a
DISCONNECT packet, the only kind paho reports on v3.1.1):

=====================================  ==========  ============  =================  ==========
end                                    duplicate   broker_event  reason             wait
=====================================  ==========  ============  =================  ==========
no CONNACK                             any         any           refused            backoff
DISCONNECT 0x8E (session taken over)   yes / no    any           takeover           cooldown*
keepalive timeout (141)                any         any           keepalive_timeout  backoff
DISCONNECT with another code           any         any           normal/conn. lost  backoff
close                                  yes         any           takeover           cooldown*
close                                  no          yes           connection_lost    backoff
close, up < stable, 2nd in a row       no          no            takeover           cooldown
other close                            no          no            connection_lost    backoff
=====================================  ==========  ============  =================  ==========

cooldown*: ``cooldown_seconds * 2 ** (k - 1)`` capped at ``max(cooldown_max,
cooldown_seconds)``, k the takeovers in a row with ``duplicate`` set (k starts over at the
first end without it); without ``duplicate``, ``cooldown_seconds``. Every refused attempt,
every broker event and every stable connection clears the short-close evidence.

A cooldown of 0 turns cooldowns off: a takeover then backs off like any other loss.
The backoff (``backoff_min`` doubling to ``backoff_max``, with jitter) resets only after a
connection stayed up ``stable_seconds``: a connect-then-kick loop keeps backing off.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .state import CONNECTION_LOST, KEEPALIVE_TIMEOUT, NORMAL, REFUSED, TAKEOVER

SESSION_TAKEN_OVER = 0x8E
KEEP_ALIVE_TIMEOUT = 0x8D
#: How many short-lived broker-side closes in a row make a takeover on v3.1.1.
SHORT_CLOSES_FOR_TAKEOVER = 2
#: Jitter takes up to this fraction off each backoff delay.
JITTER = 0.2


@dataclass(frozen=True)
class ConnectionEnd:
    """How one attempt ended, as seen by the connection."""

    connected: bool            # a successful CONNACK was received
    uptime: float = 0.0        # seconds from CONNACK to the end
    reason_code: int | None = None
    from_server: bool = False  # the broker sent a DISCONNECT packet
    #: A duplicate episode is open for the site when this connection ended: another process
    #: using our client ID is identified (exporter/presence.py).
    duplicate: bool = False
    #: Other sites of the same broker endpoint lost their connections at the same time
    #: (exporter/brokers.py): the broker restarted, crashed or the network broke.
    broker_event: bool = False
    #: We closed the connection because our own presence record no longer came back: the
    #: broker gave our session to another client without closing ours (amqtt). Classified
    #: like a silent broker-side close, but never part of a broker event.
    deaf: bool = False


@dataclass(frozen=True)
class Decision:
    reason: str          # one of state.DISCONNECT_REASONS
    delay: float         # seconds to wait before the next attempt
    cooldown: bool       # True: the delay is a takeover cooldown


class ReconnectPolicy:
    """Stateful per site: remembers failures and short-lived closes across attempts."""

    def __init__(self, backoff_min: float = 1.0, backoff_max: float = 60.0,
                 stable_seconds: float = 10.0, cooldown_seconds: float = 30.0,
                 rng: random.Random | None = None, cooldown_max: float = 600.0):
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stable_seconds = stable_seconds
        self.cooldown_seconds = cooldown_seconds
        #: Ceiling of the doubling cooldown while a duplicate is identified (never below
        #: ``cooldown_seconds``: a smaller value turns the doubling off).
        self.cooldown_max = cooldown_max
        self.rng = rng or random.Random()
        self.failures = 0       # attempts since the last stable connection
        self.short_closes = 0   # broker-side closes of short-lived connections in a row
        self.duplicate_takeovers = 0  # takeovers in a row while a duplicate is identified

    def backoff_delay(self, failures: int) -> float:
        base = min(self.backoff_max, self.backoff_min * 2.0 ** min(failures, 32))
        return base * (1.0 - JITTER * self.rng.random())

    def cooldown_for(self, duplicate_takeovers: int) -> float:
        """The cooldown after the k-th takeover in a row with a duplicate identified (k=0:
        no duplicate): ``cooldown_seconds`` doubling per takeover up to the ceiling."""
        base = self.cooldown_seconds
        if duplicate_takeovers <= 1 or base <= 0:
            return base
        ceiling = max(self.cooldown_max, base)
        return min(ceiling, base * 2.0 ** min(duplicate_takeovers - 1, 64))

    def classify(self, end: ConnectionEnd) -> str:
        """The disconnect reason; updates the short-close evidence."""
        if not end.connected:
            # Refused attempts between two short closes mean the broker was away (a restart),
            # not that another client holds our ID: that evidence starts over.
            self.short_closes = 0
            return REFUSED
        if end.uptime >= self.stable_seconds:
            self.failures = 0
            self.short_closes = 0
        code = end.reason_code
        if code == SESSION_TAKEN_OVER:
            self.short_closes = max(self.short_closes + 1, SHORT_CLOSES_FOR_TAKEOVER)
            return TAKEOVER
        if code == KEEP_ALIVE_TIMEOUT:
            return KEEPALIVE_TIMEOUT
        if end.from_server:  # the broker said why: only 0x8E (above) is a takeover
            if end.broker_event:
                self.short_closes = 0
            return NORMAL if (code or 0) < 0x80 else CONNECTION_LOST
        # A broker-side close without a word: on v3.1.1 a takeover, FIN, RST and broker
        # restart all look like this.
        if end.duplicate:  # another process with our ID is identified: it kicked us
            self.short_closes = max(self.short_closes + 1, SHORT_CLOSES_FOR_TAKEOVER)
            return TAKEOVER
        if end.broker_event:  # several sites of this broker at once: the broker, not a peer
            self.short_closes = 0
            return CONNECTION_LOST
        if end.uptime < self.stable_seconds:
            self.short_closes += 1
            if self.short_closes >= SHORT_CLOSES_FOR_TAKEOVER:
                return TAKEOVER
        return CONNECTION_LOST

    def next(self, end: ConnectionEnd) -> Decision:
        if not end.duplicate and self.duplicate_takeovers:
            # The identified episode is over: its takeovers are no evidence of another,
            # unknown peer (one broker hiccup right after it must not open one).
            self.short_closes = 0
        reason = self.classify(end)
        if not end.duplicate:
            self.duplicate_takeovers = 0
        elif reason == TAKEOVER:
            self.duplicate_takeovers += 1
        cooldown = self.cooldown_for(self.duplicate_takeovers) if reason == TAKEOVER else 0.0
        if cooldown > 0:
            decision = Decision(reason, cooldown, True)
        else:
            decision = Decision(reason, self.backoff_delay(self.failures), False)
        self.failures += 1
        return decision
