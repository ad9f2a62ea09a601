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


@dataclass(frozen=True)
class Decision:
    reason: str          # one of state.DISCONNECT_REASONS
    delay: float         # seconds to wait before the next attempt
    cooldown: bool       # True: the delay is a takeover cooldown


class ReconnectPolicy:
    """Stateful per site: remembers failures and short-lived closes across attempts."""

    def __init__(self, backoff_min: float = 1.0, backoff_max: float = 60.0,
                 stable_seconds: float = 10.0, cooldown_seconds: float = 30.0,
                 rng: random.Random | None = None):
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stable_seconds = stable_seconds
        self.cooldown_seconds = cooldown_seconds
        self.rng = rng or random.Random()
        self.failures = 0       # attempts since the last stable connection
        self.short_closes = 0   # broker-side closes of short-lived connections in a row

    def backoff_delay(self, failures: int) -> float:
        base = min(self.backoff_max, self.backoff_min * 2.0 ** min(failures, 32))
        return base * (1.0 - JITTER * self.rng.random())

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
            return NORMAL if (code or 0) < 0x80 else CONNECTION_LOST
        if end.uptime < self.stable_seconds:
            self.short_closes += 1
            if self.short_closes >= SHORT_CLOSES_FOR_TAKEOVER:
                return TAKEOVER
        return CONNECTION_LOST

    def next(self, end: ConnectionEnd) -> Decision:
        reason = self.classify(end)
        if reason == TAKEOVER and self.cooldown_seconds > 0:
            decision = Decision(reason, self.cooldown_seconds, True)
        else:
            decision = Decision(reason, self.backoff_delay(self.failures), False)
        self.failures += 1
        return decision
