"""Unit tests of the reconnect policy (exporter/reconnect.py): backoff, jitter, takeover evidence.

Pure logic, no I/O, a seeded RNG.
"""
from __future__ import annotations

import random

import pytest

from exporter.reconnect import (
    JITTER,
    KEEP_ALIVE_TIMEOUT,
    SESSION_TAKEN_OVER,
    ConnectionEnd,
    Decision,
    ReconnectPolicy,
)
from exporter.state import CONNECTION_LOST, KEEPALIVE_TIMEOUT, REFUSED, TAKEOVER

pytestmark = pytest.mark.timeout(10)

# paho 2.2 on v3.1.1: every broker-side close is reason 128 with no packet from the server.
UNSPECIFIED = 128

REFUSED_END = ConnectionEnd(connected=False)


def short_close(uptime: float = 0.5, code: int = UNSPECIFIED, from_server: bool = False):
    return ConnectionEnd(connected=True, uptime=uptime, reason_code=code, from_server=from_server)


def long_close(uptime: float = 300.0, code: int = UNSPECIFIED, from_server: bool = False):
    return ConnectionEnd(connected=True, uptime=uptime, reason_code=code, from_server=from_server)


def policy(seed: int = 7, **kw) -> ReconnectPolicy:
    args = dict(backoff_min=1.0, backoff_max=60.0, stable_seconds=10.0, cooldown_seconds=30.0)
    args.update(kw)
    return ReconnectPolicy(rng=random.Random(seed), **args)


def assert_jittered(delay: float, nominal: float) -> None:
    assert (1.0 - JITTER) * nominal <= delay <= nominal, (delay, nominal)
    assert 0.8 * nominal <= delay <= nominal, (delay, nominal)


# =========================================================================== reconnect


@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_backoff_doubles_from_min_to_max_with_jitter(seed):
    p = policy(seed)
    decisions = [p.next(REFUSED_END) for _ in range(12)]
    nominal = [min(60.0, 1.0 * 2 ** n) for n in range(12)]
    assert [d.reason for d in decisions] == [REFUSED] * 12
    assert not any(d.cooldown for d in decisions)
    for d, nom in zip(decisions, nominal):
        assert_jittered(d.delay, nom)
    # Capped at the maximum: the last ones are all within jitter of 60.
    assert all(48.0 <= d.delay <= 60.0 for d in decisions[6:])
    # Jitter really varies the delays (not always the nominal value).
    assert any(d.delay < nom for d, nom in zip(decisions, nominal))


def test_backoff_is_reproducible_with_a_seeded_rng():
    pa, pb = policy(99), policy(99)
    assert [pa.next(REFUSED_END).delay for _ in range(8)] == [pb.next(REFUSED_END).delay for _ in range(8)]


def test_backoff_resets_only_after_a_stable_connection():
    p = policy(3)
    for _ in range(4):
        p.next(REFUSED_END)  # nominal 1, 2, 4, 8
    # A short-lived connection (up 2 s < stable 10 s) does not reset the backoff.
    d = p.next(short_close(uptime=2.0))
    assert d.reason == CONNECTION_LOST and not d.cooldown
    assert_jittered(d.delay, 16.0)
    # A refused attempt keeps doubling.
    assert_jittered(p.next(REFUSED_END).delay, 32.0)
    # A connection that stayed up stable_seconds resets it to the minimum...
    d = p.next(long_close(uptime=10.0))
    assert d.reason == CONNECTION_LOST
    assert_jittered(d.delay, 1.0)
    # ...and it grows again from there.
    assert_jittered(p.next(REFUSED_END).delay, 2.0)
    assert_jittered(p.next(REFUSED_END).delay, 4.0)


def test_connect_then_kick_loop_keeps_backing_off_and_becomes_a_takeover():
    p = policy(11)
    decisions = [p.next(short_close(uptime=0.5)) for _ in range(8)]
    # First short close: could be anything (network blip): plain backoff.
    assert decisions[0].reason == CONNECTION_LOST and not decisions[0].cooldown
    assert_jittered(decisions[0].delay, 1.0)
    # Second short close in a row: takeover, with the cooldown, and it stays one.
    for d in decisions[1:]:
        assert d == Decision(TAKEOVER, 30.0, True)
    delays = [d.delay for d in decisions]
    assert delays == sorted(delays), f"delay shrank in a kick loop: {delays}"
    # The backoff never reset: every attempt counted as a failure.
    assert p.failures == 8
    assert p.backoff_delay(p.failures) >= 0.8 * 60.0


def test_connect_then_kick_loop_never_shrinks_the_delay_with_zero_cooldown():
    p = policy(11, cooldown_seconds=0.0)
    delays = [p.next(short_close(uptime=0.5)).delay for _ in range(6)]
    assert delays == sorted(delays) and delays[-1] > 0, delays


def test_v5_session_taken_over_is_a_takeover_on_the_first_close():
    p = policy()
    d = p.next(short_close(uptime=0.5, code=SESSION_TAKEN_OVER, from_server=True))
    assert SESSION_TAKEN_OVER == 0x8E
    assert d == Decision(TAKEOVER, 30.0, True)
    # Even on a long-lived connection: the broker says so explicitly.
    p2 = policy()
    assert p2.next(long_close(code=0x8E, from_server=True)).reason == TAKEOVER


@pytest.mark.parametrize("uptime", [0.5, 300.0])
def test_reason_141_is_keepalive_timeout(uptime):
    assert KEEP_ALIVE_TIMEOUT == 141
    p = policy()
    d = p.next(ConnectionEnd(connected=True, uptime=uptime, reason_code=141))
    assert d.reason == KEEPALIVE_TIMEOUT and not d.cooldown


def test_long_lived_close_is_connection_lost_and_resets():
    p = policy(5)
    for _ in range(5):
        p.next(REFUSED_END)
    p.next(short_close())  # one short close on record
    d = p.next(long_close(uptime=120.0))
    assert d.reason == CONNECTION_LOST and not d.cooldown
    assert_jittered(d.delay, 1.0)
    # The short-close evidence was reset too: a single short close afterwards is no takeover.
    assert p.next(short_close()).reason == CONNECTION_LOST


def test_failed_attempt_is_refused():
    p = policy()
    d = p.next(ConnectionEnd(connected=False))
    assert d.reason == REFUSED and not d.cooldown
    assert_jittered(d.delay, 1.0)


def test_broker_restart_pattern_never_gives_a_takeover():
    p = policy(17)
    reasons = []
    for _ in range(3):  # several restarts in a row
        reasons.append(p.next(long_close(uptime=3600.0)).reason)  # broker SIGTERM
        reasons += [p.next(REFUSED_END).reason for _ in range(3)]  # broker still down
        # back up: a stable connection follows
    reasons.append(p.next(long_close(uptime=60.0)).reason)
    assert TAKEOVER not in reasons
    assert reasons.count(CONNECTION_LOST) == 4 and reasons.count(REFUSED) == 9
    assert p.short_closes == 0


# =========================================================================== health


@pytest.mark.parametrize("code", [0x8B, 0x97, 0x98])  # server shutting down, quota, admin
def test_v5_disconnect_with_another_reason_is_connection_lost_not_evidence(code):
    p = policy()
    p.next(short_close())  # one short close of evidence already
    d = p.next(short_close(code=code, from_server=True))
    assert d.reason == CONNECTION_LOST and not d.cooldown
    assert p.short_closes == 1
