"""Unit tests of presence records and the duplicate tracker (exporter/presence.py), on an
injected clock: every rule of docs/duplicates.md."""
from __future__ import annotations

import json
import logging

import pytest

from exporter.presence import (
    ECHO_INTERVAL,
    EXPIRY_FLOOR,
    REFRESH_INTERVAL,
    DuplicateTracker,
    Identity,
    RecordTemplate,
    parse_record,
)
from exporter.state import SiteState
from tests.support.fakes import FakeClock

pytestmark = pytest.mark.timeout(10)

CID = "s_ibfg"
START = 1_800_000_000.0  # our started_at: FakeClock's wall time at construction


def identity(boot: str = "0" * 16, started_at: float = START, host: str = "me",
             pid: int = 1) -> Identity:
    return Identity(instance_id="bfg", boot_id=boot, host=host, pid=pid, version="0.1.0",
                    started_at=started_at)


PEER = identity("b" * 16, started_at=START - 100, host="backend-2", pid=4242)


def record(peer: Identity = PEER, published_at: float = START + 1, online: bool = True,
           cooldown: float = 30.0, client_id: str = CID) -> bytes:
    return RecordTemplate(peer, client_id).render(online, cooldown, published_at)


@pytest.fixture
def env(caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock(mono=1000.0, wall=START)
    state = SiteState(name="s", client_id=CID, broker="127.0.0.1:1883", protocol="3.1.1",
                      enabled=True)
    log = logging.LoggerAdapter(logging.getLogger("test.presence"), {"site": "s"})
    tracker = DuplicateTracker(identity(), CID, state, clock, log)
    return tracker, state, clock, caplog


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- the record


def test_record_is_compact_json_with_every_field():
    raw = RecordTemplate(identity(), CID).render(True, 60.0, START + 5.25)
    assert b" " not in raw and raw.startswith(b'{"client_id":"s_ibfg"')
    assert json.loads(raw) == {
        "client_id": CID, "instance_id": "bfg", "boot_id": "0" * 16, "host": "me", "pid": 1,
        "version": "0.1.0", "started_at": START, "published_at": START + 5.25,
        "state": "online", "cooldown_seconds": 60.0}
    assert json.loads(RecordTemplate(identity(), CID).render(False, 30, START))["state"] == \
        "offline"


def test_identity_new_has_a_fresh_random_boot_id():
    a, b = Identity.new("x", 1.0), Identity.new("x", 1.0)
    assert a.boot_id != b.boot_id and len(a.boot_id) == 16
    int(a.boot_id, 16)


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[1,2]", b'"str"', b"{}", b"\xff\xfe",
    b'{"client_id":"other","boot_id":"b","published_at":1,"state":"online"}',
    b'{"client_id":"s_ibfg","boot_id":"' + b"0" * 16 + b'","published_at":1,"state":"online"}',
    b'{"client_id":"s_ibfg","boot_id":"","published_at":1,"state":"online"}',
    b'{"client_id":"s_ibfg","boot_id":7,"published_at":1,"state":"online"}',
    b'{"client_id":"s_ibfg","boot_id":"b","published_at":"1","state":"online"}',
    b'{"client_id":"s_ibfg","boot_id":"b","published_at":true,"state":"online"}',
    b'{"client_id":"s_ibfg","boot_id":"b","published_at":1,"state":"maybe"}',
    b'{"client_id":"s_ibfg","boot_id":"b","state":"online"}',
    b'{"client_id":"s_ibfg","boot_id":"b","published_at":NaN,"state":"online"}',
    b'{"client_id":"s_ibfg","boot_id":"b","published_at":1,"state":"online","x":"' + b"a" * 5000
    + b'"}',
], ids=lambda p: repr(p[:30]))
def test_parse_ignores_what_is_not_another_process_record(payload):
    assert parse_record(payload, CID, "0" * 16) is None


def test_parse_keeps_known_scalar_fields_only():
    raw = (b'{"client_id":"s_ibfg","boot_id":"b","published_at":5,"state":"online",'
           b'"host":"h","pid":3,"extra":"x","cooldown_seconds":"bad","instance_id":{"a":1}}')
    assert parse_record(raw, CID, "me") == {
        "client_id": CID, "boot_id": "b", "published_at": 5, "state": "online", "host": "h",
        "pid": 3, "cooldown_seconds": 0.0}


# --------------------------------------------------------------------------- evidence


def test_live_record_published_after_our_start_starts_one_episode(env):
    tracker, state, clock, caplog = env
    clock.advance(3)
    tracker.on_payload(record(published_at=START + 2))
    assert tracker.identified and tracker.open
    assert state.duplicate_detections == 1
    dup = state.duplicate
    assert dup is not None and dup.peer["boot_id"] == "b" * 16 and dup.peer["host"] == "backend-2"
    assert dup.first_seen == dup.last_seen == START + 3
    (line,) = warnings(caplog)
    for part in ("s_ibfg", "backend-2", "4242", "b" * 16, "instance bfg", "0.1.0"):
        assert part in line, part
    # More records of the same peer: the same episode, last_seen moves, no new log line.
    clock.advance(10)
    tracker.on_payload(record(published_at=START + 12))
    assert state.duplicate_detections == 1 and len(warnings(caplog)) == 1
    assert state.duplicate.first_seen == START + 3 and state.duplicate.last_seen == START + 13
    report = state.duplicate.report()
    assert report["pid"] == 4242 and report["first_seen"] == START + 3


def test_crashed_predecessor_retained_record_is_not_evidence(env):
    """Rule 2: a SIGKILLed process leaves its last record retained, published before we
    started; at every connect we receive it again. Never a duplicate."""
    tracker, state, clock, _ = env
    stale = record(identity("c" * 16, started_at=START - 500), published_at=START - 3)
    for _ in range(3):
        tracker.on_payload(stale)
        clock.advance(5)
    assert not tracker.open and state.duplicate is None and state.duplicate_detections == 0
    tracker.published(clock.time())
    assert not tracker.publish_due()  # nothing to reply to


def test_offline_record_and_own_boot_are_not_evidence(env):
    tracker, state, _, _ = env
    tracker.on_payload(record(online=False))
    tracker.on_payload(record(identity(), published_at=START + 5))  # our own echo
    assert state.duplicate is None and state.duplicate_detections == 0


def test_only_newer_records_of_a_boot_count(env):
    """Rule 3: a replay (retained at reconnect, overlapping subscriptions) is not fresh."""
    tracker, _state, clock, _ = env
    tracker.on_payload(record(published_at=START + 2))
    fresh = tracker._peers["b" * 16].fresh_at
    clock.advance(50)
    tracker.on_payload(record(published_at=START + 2))  # the same record again
    assert tracker._peers["b" * 16].fresh_at == fresh
    tracker.on_payload(record(published_at=START + 1))  # an older one
    assert tracker._peers["b" * 16].fresh_at == fresh
    tracker.on_payload(record(published_at=START + 40))
    assert tracker._peers["b" * 16].fresh_at == clock.monotonic()


# --------------------------------------------------------------------------- episode ends


def test_tombstone_ends_the_episode_at_once(env):
    tracker, state, clock, caplog = env
    tracker.on_payload(record(published_at=START + 2))
    clock.advance(5)
    tracker.on_payload(record(published_at=START + 6, online=False))
    assert not tracker.open and state.duplicate is None and state.duplicate_detections == 1
    assert any("Duplicate instance gone" in r.getMessage() and "b" * 16 in r.getMessage()
               and "tombstone" in r.getMessage() for r in caplog.records)
    # Its live records replayed afterwards are older than the tombstone: no new episode.
    tracker.on_payload(record(published_at=START + 2))
    assert not tracker.open and state.duplicate_detections == 1


def test_stale_tombstone_does_not_end_a_newer_episode(env):
    tracker, _state, _, _ = env
    tracker.on_payload(record(published_at=START + 10))
    tracker.on_payload(record(published_at=START + 5, online=False))
    assert tracker.identified


@pytest.mark.parametrize(("peer_cd", "our_cd", "limit"), [
    (30.0, 30.0, EXPIRY_FLOOR),            # max(90, 2 x 30 + 30 = 90)
    (120.0, 30.0, 2 * 120 + 30),           # the peer's cooldown
    (30.0, 600.0, 2 * 600 + 30),           # ours
    (1.0, 8.0, EXPIRY_FLOOR),              # scaled knobs: the floor
])
def test_expiry_without_fresh_records(env, peer_cd, our_cd, limit):
    tracker, state, clock, caplog = env
    tracker.on_payload(record(published_at=START + 1, cooldown=peer_cd))
    assert tracker.expiry_seconds(peer_cd, our_cd) == limit
    clock.advance(limit - 0.5)
    tracker.tick(our_cd)
    assert tracker.identified
    clock.advance(0.5)
    tracker.tick(our_cd)
    assert not tracker.open and state.duplicate is None
    assert any("expired" in r.getMessage() for r in caplog.records)


def test_a_fresh_record_after_expiry_is_a_new_episode(env):
    tracker, state, clock, _ = env
    tracker.on_payload(record(published_at=START + 1))
    clock.advance(EXPIRY_FLOOR)
    tracker.tick(30)
    assert not tracker.open
    tracker.on_payload(record(published_at=START + 1))  # the retained replay: not fresh
    assert not tracker.open
    tracker.on_payload(record(published_at=START + EXPIRY_FLOOR + 1))
    assert tracker.identified and state.duplicate_detections == 2


def test_two_other_processes_are_two_detections(env):
    tracker, state, clock, _ = env
    other = identity("d" * 16, host="backend-3")
    tracker.on_payload(record(published_at=START + 1))
    clock.advance(1)
    tracker.on_payload(record(other, published_at=START + 2))
    assert state.duplicate_detections == 2 and state.duplicate.peer["host"] == "backend-3"
    tracker.on_payload(record(other, published_at=START + 3, online=False))
    assert tracker.identified and state.duplicate.peer["host"] == "backend-2"


# --------------------------------------------------------------------------- unknown peer


def test_unknown_peer_episode_from_a_takeover_ends_when_stable(env):
    tracker, state, clock, caplog = env
    tracker.on_takeover()
    assert tracker.open and not tracker.identified
    assert state.duplicate is not None and state.duplicate.peer is None
    assert state.duplicate.report() == {"peer": "unknown", "first_seen": START,
                                        "last_seen": START}
    assert state.duplicate_detections == 1 and len(warnings(caplog)) == 1
    clock.advance(30)
    tracker.on_takeover()
    assert state.duplicate_detections == 1 and state.duplicate.last_seen == START + 30
    assert len(warnings(caplog)) == 1
    tracker.on_stable()
    assert not tracker.open and state.duplicate is None


def test_identified_record_upgrades_an_unknown_episode(env):
    tracker, state, clock, _ = env
    tracker.on_takeover()
    clock.advance(4)
    tracker.on_payload(record(published_at=START + 3))
    assert tracker.identified and state.duplicate_detections == 1  # the same episode
    assert state.duplicate.peer["host"] == "backend-2" and state.duplicate.first_seen == START
    tracker.on_takeover()   # while identified: nothing changes
    tracker.on_stable()     # a stable connection does not end an identified episode
    assert tracker.identified and state.duplicate_detections == 1


# --------------------------------------------------------------------------- reply, refresh


def test_reply_right_after_identification_then_refresh_every_30s(env):
    tracker, _, clock, _ = env
    tracker.echo_interval = 300.0  # the echo check's own schedule is tested below
    tracker.published()          # on connect
    assert not tracker.publish_due()
    clock.advance(REFRESH_INTERVAL * 3)
    assert not tracker.publish_due()  # no episode: nothing to refresh
    tracker.on_payload(record(published_at=START + 1))
    assert tracker.publish_due()      # the reply
    tracker.published()
    assert not tracker.publish_due()
    clock.advance(REFRESH_INTERVAL - 0.1)
    tracker.on_payload(record(published_at=START + 5))  # a refresh of the peer: no reply
    assert not tracker.publish_due()
    clock.advance(0.1)
    assert tracker.publish_due()      # our refresh
    tracker.published()
    tracker.on_payload(record(published_at=START + 200, online=False))
    clock.advance(REFRESH_INTERVAL)
    assert not tracker.publish_due()  # the episode ended: no more refreshes


def test_unknown_episode_refreshes_too(env):
    tracker, _, clock, _ = env
    tracker.published()
    tracker.on_takeover()
    assert not tracker.publish_due()  # no reply for an unknown peer: nobody to answer
    clock.advance(REFRESH_INTERVAL)
    assert tracker.publish_due()


def own_echo(tracker, published_at: float) -> bytes:
    """Our own record as the broker echoes it back."""
    return RecordTemplate(tracker.identity, CID).render(True, 30.0, published_at)


def test_echo_check_is_armed_by_a_first_echo_then_detects_a_deaf_connection(env):
    """amqtt keeps the old connection open but gives its session to the new client: our own
    record stops coming back. The check arms only once an echo was seen."""
    tracker, _, clock, _ = env
    assert tracker.echo_timeout == 5.0
    tracker.connection_started()
    tracker.published(clock.time())
    assert not tracker.deaf()
    tracker.on_payload(own_echo(tracker, clock.time()))   # the echo: armed
    clock.advance(ECHO_INTERVAL)
    assert tracker.publish_due()                           # the periodic echo check
    tracker.published(clock.time())
    assert tracker.seconds_to_next() == pytest.approx(5.0)
    clock.advance(4.9)
    assert not tracker.deaf()
    clock.advance(0.2)
    assert tracker.deaf()                                  # no echo within 5 s
    assert not tracker.deaf()                              # reported once


def test_echo_check_turns_itself_off_when_the_broker_never_echoes(env):
    """An ACL that drops our record (or refuses the subscription) must not make the site
    reconnect forever: without a first echo the check is never armed."""
    tracker, _, clock, caplog = env
    tracker.published(clock.time())
    clock.advance(6)
    assert not tracker.deaf()
    assert any("does not echo" in r.getMessage() for r in caplog.records)
    tracker.published(clock.time())
    clock.advance(60)
    assert not tracker.deaf()


def test_an_older_echo_does_not_count_for_the_newest_record(env):
    tracker, _, clock, _ = env
    first = clock.time()
    tracker.published(first)
    tracker.on_payload(own_echo(tracker, first))           # armed
    tracker.published(first + 1)
    tracker.on_payload(own_echo(tracker, first))           # a replay of the old one
    clock.advance(6)
    assert tracker.deaf()
