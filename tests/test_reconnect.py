"""Unit tests of the reconnect policy (exporter/reconnect.py): backoff, jitter, takeover evidence.

Pure logic, no I/O, a seeded RNG.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from exporter.reconnect import (
    JITTER,
    KEEP_ALIVE_TIMEOUT,
    SESSION_TAKEN_OVER,
    ConnectionEnd,
    Decision,
    ReconnectPolicy,
)
from exporter.state import CONNECTION_LOST, KEEPALIVE_TIMEOUT, NORMAL, REFUSED, TAKEOVER

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


# =========================================================================== duplicate


def dup(end: ConnectionEnd, **kw) -> ConnectionEnd:
    """``end`` with a duplicate episode open (and any other field of ``kw``)."""
    return replace(end, duplicate=True, **kw)


def test_duplicate_takeovers_double_the_cooldown_up_to_the_ceiling():
    p = policy(cooldown_max=600.0)
    decisions = [p.next(dup(short_close())) for _ in range(8)]
    assert [d.reason for d in decisions] == [TAKEOVER] * 8
    assert all(d.cooldown for d in decisions)
    assert [d.delay for d in decisions] == [30, 60, 120, 240, 480, 600, 600, 600]
    assert p.duplicate_takeovers == 8


def test_with_a_duplicate_the_first_close_is_already_a_takeover_even_a_long_lived_one():
    p = policy()
    assert p.next(dup(long_close(uptime=3600.0))) == Decision(TAKEOVER, 30.0, True)
    p2 = policy()
    assert p2.next(dup(short_close())) == Decision(TAKEOVER, 30.0, True)


def test_duplicate_cooldown_sequence_resets_when_the_episode_ends():
    p = policy(seed=3, cooldown_max=600.0)
    assert [p.next(dup(short_close())).delay for _ in range(3)] == [30, 60, 120]
    # A refused attempt while the episode is open does not reset the count.
    assert p.next(dup(REFUSED_END)).reason == REFUSED
    assert p.next(dup(short_close())).delay == 240
    # The episode ends (the other process left): the next end is judged as today.
    d = p.next(long_close(uptime=300.0))
    assert d.reason == CONNECTION_LOST and not d.cooldown
    assert p.duplicate_takeovers == 0
    # A new episode starts again from the base cooldown.
    assert p.next(dup(short_close())).delay == 30


def test_a_non_duplicate_takeover_in_between_resets_the_doubling():
    p = policy()
    assert [p.next(dup(short_close())).delay for _ in range(3)] == [30, 60, 120]
    # Flag down: the episode's takeovers are no evidence; the evidence rule starts over (two
    # short closes in a row make a takeover with the base cooldown).
    assert p.next(short_close()).reason == CONNECTION_LOST
    assert p.next(short_close()) == Decision(TAKEOVER, 30.0, True)
    assert p.next(dup(short_close())).delay == 30


def test_identified_duplicate_wins_over_a_broker_event():
    p = policy()
    d = p.next(dup(short_close(), broker_event=True))
    assert d == Decision(TAKEOVER, 30.0, True)
    assert p.next(dup(short_close(), broker_event=True)).delay == 60


def test_duplicate_with_v5_session_taken_over_doubles_too():
    p = policy()
    delays = [p.next(dup(short_close(code=SESSION_TAKEN_OVER, from_server=True))).delay
              for _ in range(3)]
    assert delays == [30, 60, 120]


@pytest.mark.parametrize("end, reason", [
    (ConnectionEnd(connected=True, uptime=0.5, reason_code=141), KEEPALIVE_TIMEOUT),
    (short_close(code=0x8B, from_server=True), CONNECTION_LOST),  # server shutting down
    (short_close(code=0x00, from_server=True), NORMAL),
    (REFUSED_END, REFUSED),
])
def test_a_duplicate_does_not_make_other_ends_takeovers(end, reason):
    """Only a broker-side close without a word (or 0x8E) is the duplicate's kick: a
    keepalive timeout is ours, a DISCONNECT with another reason is the broker saying why."""
    p = policy()
    d = p.next(dup(end))
    assert d.reason == reason and not d.cooldown


def test_cooldown_max_below_the_base_turns_the_doubling_off():
    p = policy(cooldown_max=0.0)
    assert [p.next(dup(short_close())).delay for _ in range(4)] == [30.0] * 4


def test_zero_cooldown_turns_duplicate_cooldowns_off_too():
    p = policy(cooldown_seconds=0.0)
    decisions = [p.next(dup(short_close())) for _ in range(5)]
    assert [d.reason for d in decisions] == [TAKEOVER] * 5
    assert not any(d.cooldown for d in decisions)
    delays = [d.delay for d in decisions]
    assert delays == sorted(delays) and delays[0] > 0, delays  # backoff, growing


def test_two_instances_converge_below_one_takeover_per_minute():
    """Both sides of a duplicate with the default 30 s / 600 s: a takeover kicks the other
    side, which cools down and then kicks back. Simulated: after the first minute, each side
    sees at most one takeover per minute, and after a few minutes one per ten."""
    a, b = policy(seed=1), policy(seed=2)
    t, takeovers = 0.0, []
    sides = [a, b]
    turn = 0
    while t < 3600.0:
        victim = sides[turn % 2]
        d = victim.next(dup(short_close(uptime=0.1)))
        assert d.reason == TAKEOVER
        takeovers.append(t)
        t += d.delay  # the victim comes back after its cooldown and kicks the other one
        turn += 1
    after_first_minute = [x for x in takeovers if x >= 60.0]
    per_minute = len(after_first_minute) / ((3600.0 - 60.0) / 60.0)
    assert per_minute <= 1.0, per_minute
    late = [x for x in takeovers if x >= 1200.0]
    assert len(late) <= (3600.0 - 1200.0) / 600.0 + 1


# =========================================================================== broker event


def test_broker_event_is_connection_lost_and_clears_the_evidence():
    p = policy(seed=5)
    p.next(short_close())  # one short close of evidence
    d = p.next(replace(short_close(), broker_event=True))
    assert d.reason == CONNECTION_LOST and not d.cooldown
    assert p.short_closes == 0
    # One more short close alone is no takeover: the evidence started over.
    assert p.next(short_close()).reason == CONNECTION_LOST


def test_broker_killed_four_times_3s_apart_never_a_takeover():
    """The issue: connections up ~3 s (< stable), each closed by a broker restart, with no
    refused attempt in between (the broker is back before the backoff ends). Alone this is
    the evidence pattern; as broker events it is not."""
    alone, shared = policy(seed=9), policy(seed=9)
    alone_reasons = [alone.next(short_close(uptime=3.0)).reason for _ in range(4)]
    assert TAKEOVER in alone_reasons  # why the issue saw 20 cooldowns
    decisions = [shared.next(replace(short_close(uptime=3.0), broker_event=True))
                 for _ in range(4)]
    assert [d.reason for d in decisions] == [CONNECTION_LOST] * 4
    assert not any(d.cooldown for d in decisions)
    for d, nominal in zip(decisions, (1.0, 2.0, 4.0, 8.0)):
        assert_jittered(d.delay, nominal)  # jittered backoff as for any loss


def test_v5_session_taken_over_is_a_takeover_even_in_a_broker_event():
    p = policy()
    d = p.next(replace(short_close(code=SESSION_TAKEN_OVER, from_server=True), broker_event=True))
    assert d == Decision(TAKEOVER, 30.0, True)


def test_without_flags_the_rules_are_todays():
    """duplicate=False, broker_event=False (the defaults): exactly the evidence rules."""
    p = policy(seed=11)
    assert ConnectionEnd(connected=True).duplicate is False
    assert ConnectionEnd(connected=True).broker_event is False
    reasons = [p.next(short_close()).reason for _ in range(3)]
    assert reasons == [CONNECTION_LOST, TAKEOVER, TAKEOVER]


def test_the_end_of_an_identified_episode_is_not_evidence_of_an_unknown_peer():
    """Duplicate takeovers raise the short-close evidence; once the episode is over, one
    short broker-side close (e.g. a broker hiccup) must not make an unknown-peer takeover."""
    p = policy()
    for _ in range(3):
        assert p.next(ConnectionEnd(connected=True, uptime=0.5, reason_code=UNSPECIFIED,
                                    duplicate=True)).reason == TAKEOVER
    d = p.next(short_close())  # the peer left; the broker drops us once, quickly
    assert d.reason == CONNECTION_LOST and not d.cooldown
