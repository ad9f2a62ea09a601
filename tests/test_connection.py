"""SiteConnection in-process: the injected clock, a scripted peer on loopback, real paho.

gevent is not monkey-patched in the pytest process, and needs not be: the connection's
greenlet waits on paho's (real, non-blocking) socket with a gevent io watcher, which works
on any file descriptor; paho's connect() is a blocking loopback connect, instant here. The
scripted peer runs in OS threads. So the test's main greenlet only has to yield to the hub
while it waits: :func:`gwait` polls a condition with ``gevent.sleep`` and a deadline.
"""
from __future__ import annotations

import json
import logging
import time

import gevent
import gevent.socket
import pytest
from gevent.lock import BoundedSemaphore

from exporter import wire
from exporter.config import Settings, SiteConfig
from exporter.connection import Drains, SiteConnection, drain_until_closed
from exporter.presence import Identity, RecordTemplate
from tests.support import HOST
from tests.support.fakes import FakeClock

pytestmark = pytest.mark.timeout(60)


def gwait(predicate, timeout: float = 5.0, message: str = ""):
    """Run the hub until ``predicate()`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {message or predicate}"
        gevent.sleep(0.005)


class RaisingBridge:
    """A bridge whose ingest fails on one topic (a bug in our code, for the error path)."""

    def __init__(self, bad_topic: str) -> None:
        self.bad_topic = bad_topic
        self.ingested: list[tuple[str, bytes]] = []

    def ingest(self, topic: str, payload: bytes) -> None:
        if topic == self.bad_topic:
            raise KeyError(topic)
        self.ingested.append((topic, payload))


@pytest.fixture
def connections(fake_v5_factory):
    made: list[SiteConnection] = []

    def make(protocol: str = "3.1.1", bridge=None, clean_session: bool = True, identity=None,
             connect_slots=None, **peer_options):
        peer = fake_v5_factory(**peer_options)
        site = SiteConfig(name="s", host=HOST, port=peer.port, protocol=protocol,
                          topics=("s/#",), keepalive=60)
        settings = Settings(sites_file="unused.yml", instance_id="t", sites=(site,),
                            backoff_min_seconds=0.05, backoff_max_seconds=0.1,
                            connect_timeout=2.0, cooldown_seconds=30.0,
                            clean_session=clean_session)
        conn = SiteConnection(site, settings, FakeClock(), bridge=bridge, identity=identity,
                              connect_slots=connect_slots)
        made.append(conn)
        return conn, peer

    yield make
    for conn in made:
        conn.stop()
        if conn._greenlet is not None:
            conn._greenlet.kill()
        conn._close_socket()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_connecting_then_connected(connections, protocol, caplog):
    conn, peer = connections(protocol)
    st = conn.state
    assert st.state == "connecting" and st.connects == 0
    with caplog.at_level(logging.INFO):
        conn.start()
        gwait(lambda: st.state == "connected")
    assert st.connects == 1 and st.reconnect_attempts == 0
    assert st.connected_since == conn.clock.time()
    assert st.connected_at_monotonic == conn.clock.monotonic()
    assert st.connect_duration.count == 1  # 0 s on the fake clock
    info = peer.connects[0]
    assert info.client_id == "s_it" and info.protocol_level == (5 if protocol == "5" else 4)
    assert (info.will_topic, info.will_payload, info.will_qos, info.will_retain) == (
        "s/backend/status", b"offline", 1, True)
    gwait(lambda: peer.published)
    assert peer.published[0][1:] == ("s/backend/status", b"online", 1, True)
    assert "Connected to 127.0.0.1:" in caplog.text and "Using client ID s_it" in caplog.text


def test_refused_subscription_is_counted(connections, caplog):
    conn, _ = connections(suback_code=0x80)
    conn.start()
    gwait(lambda: conn.state.subscriptions_refused == 1)
    assert conn.state.state == "connected"
    assert "refused 1 of the subscriptions ['s/#']" in caplog.text


def test_messages_are_counted_and_our_status_echo_is_not(connections):
    bridge = RaisingBridge("none")
    conn, _ = connections(bridge=bridge, after_suback=(
        wire.publish("s/backend/status", b"online") + wire.publish("s/a", b"1")
        + wire.publish("s/q", b"2", qos=1, packet_id=4)))
    conn.start()
    gwait(lambda: conn.state.messages_received == 2)
    assert conn.state.last_message_at == conn.clock.time()
    assert bridge.ingested == [("s/a", b"1"), ("s/q", b"2")]


def test_fast_path_error_is_counted_logged_and_survived(connections, caplog):
    bridge = RaisingBridge("s/bad")
    conn, peer = connections(bridge=bridge, after_suback=(
        wire.publish("s/bad", b"1") + wire.publish("s/ok", b"2")))
    conn.start()
    gwait(lambda: bridge.ingested)
    assert conn.state.internal_errors == 1
    assert bridge.ingested == [("s/ok", b"2")] and conn.state.state == "connected"
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.site == "s" and record.exc_info and "KeyError" in caplog.text
    assert "Traceback" in caplog.text
    assert len(peer.connections) == 1


def test_paho_callback_error_is_counted_and_acked(connections, caplog):
    bad_topic_qos1 = b"\x32\x07\x00\x02\xff\xfe\x00\x05x"  # topic not UTF-8, packet id 5
    conn, peer = connections(after_suback=bad_topic_qos1 + wire.publish("s/ok", b"2"))
    conn.start()
    gwait(lambda: conn.state.messages_received == 1)
    gwait(lambda: b"\x00\x05" in peer.pubacks, message="PUBACK of the bad PUBLISH")
    assert conn.state.internal_errors == 1 and conn.state.state == "connected"
    assert "Internal error in on_message" in caplog.text and "Traceback" in caplog.text


def test_unexpected_error_is_counted_and_the_site_reconnects(connections, caplog):
    conn, peer = connections()
    serve = conn._serve
    calls = []

    def broken_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return serve(*args)

    conn._serve = broken_once
    conn.start()
    gwait(lambda: conn.state.state == "connected" and len(calls) == 2)
    assert conn.state.internal_errors == 1 and conn.state.reconnect_attempts == 1
    assert "Unexpected error on the connection to" in caplog.text
    assert len(peer.connections) == 2


def test_takeover_on_v5_enters_cooldown_on_the_injected_clock(connections, caplog):
    conn, _ = connections("5", kick_after=0.05)
    conn.start()
    gwait(lambda: conn.state.state == "cooldown")
    st = conn.state
    assert st.cooldowns == 1 and st.disconnects["takeover"] == 1
    assert st.cooldown_until_monotonic == conn.clock.monotonic() + 30.0
    assert st.cooldown_remaining(conn.clock.monotonic()) == 30.0
    assert "likely duplicate client ID. Setting 30s cooldown" in caplog.text


@pytest.mark.parametrize(("protocol", "reason"), [("3.1.1", None), ("5", 0x04)])
def test_stop_then_farewell_sends_the_goodbye_in_one_write(connections, protocol, reason):
    conn, peer = connections(protocol)
    conn.start()
    gwait(lambda: conn.state.state == "connected" and peer.published)
    conn.stop()
    assert conn.state.state == "stopping"
    sock = conn.send_farewell()
    assert sock is not None and conn._client.socket() is None  # the socket is ours now
    assert gevent.spawn(drain_until_closed, sock).get(timeout=5) is True
    assert sock.fileno() == -1
    gwait(lambda: peer.disconnects)
    assert [d[1:] for d in peer.disconnects] == [("s_it", reason)]
    offline = [p[1:] for p in peer.published if p[2] == b"offline"]
    # v3.1.1 publishes the offline status itself; v5 asks the broker for the will (0x04).
    assert offline == ([("s/backend/status", b"offline", 1, True)] if reason is None else [])
    assert conn.state.disconnects["normal"] == 1
    assert conn.send_farewell() is None  # nothing left to say goodbye on


def test_no_farewell_without_a_connack(connections):
    conn, peer = connections(reset_on_accept=True)  # accepted, then reset: never a CONNACK
    conn.start()
    gwait(lambda: peer.accepted >= 1 and conn.state.state != "connecting")
    conn.stop()
    assert conn.send_farewell() is None
    assert conn.state.state == "stopping" and conn.state.connects == 0
    assert conn.state.disconnects["normal"] == 0


# --------------------------------------------------------------------------- presence

WALL = 1_800_000_000.0  # FakeClock's wall time: our started_at


def ident(boot: str = "a" * 16, host: str = "me", pid: int = 1) -> Identity:
    return Identity("t", boot, host, pid, "0.1.0", WALL)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_presence_subscribe_first_then_our_record_and_a_tombstone_in_the_farewell(
        connections, protocol):
    conn, peer = connections(protocol, identity=ident())
    conn.start()
    gwait(lambda: len(peer.subscriptions) == 2 and len(peer.published) == 2)
    assert peer.subscriptions == [["s/backend/instance"], ["s/#"]]
    (_, topic, payload, qos, retain), = [p for p in peer.published if p[1] != "s/backend/status"]
    rec = json.loads(payload)
    assert (topic, qos, retain) == ("s/backend/instance", 1, True)
    assert rec["boot_id"] == "a" * 16 and rec["state"] == "online"
    assert rec["client_id"] == "s_it" and rec["cooldown_seconds"] == 30.0
    conn.stop()
    sock = conn.send_farewell()
    assert gevent.spawn(drain_until_closed, sock).get(timeout=5) is True
    gwait(lambda: peer.disconnects)
    after = [p[1:] for p in peer.published[2:]]
    assert after[0][0] == "s/backend/instance" and after[0][2:] == (1, True)
    assert json.loads(after[0][1])["state"] == "offline"
    assert [a[0] for a in after[1:]] == (["s/backend/status"] if protocol == "3.1.1" else [])


def test_peer_record_identifies_a_duplicate_and_is_not_site_traffic(connections, caplog):
    bridge = RaisingBridge("none")
    other = RecordTemplate(ident("b" * 16, host="other", pid=99), "s_it").render(
        True, 60.0, WALL + 5)
    conn, peer = connections(identity=ident(), bridge=bridge, presence_traffic=True,
                             after_suback=wire.publish("s/backend/instance", other, qos=1,
                                                       retain=True, packet_id=9)
                             + wire.publish("s/backend/instance", b"", retain=True))
    conn.start()
    gwait(lambda: conn.state.duplicate is not None)
    st = conn.state
    assert st.duplicate.peer["host"] == "other" and st.duplicate.peer["pid"] == 99
    assert st.duplicate_detections == 1 and conn.tracker.identified
    assert st.messages_received == 0 and bridge.ingested == []
    # The reply: our record again, right after the identification.
    gwait(lambda: len([p for p in peer.published if p[1] == "s/backend/instance"]) == 2)
    assert sum("Duplicate instance: another process uses client ID s_it (host other, pid 99"
               in r.getMessage() for r in caplog.records) == 1


def test_presence_disabled_publishes_and_subscribes_nothing_extra(connections):
    conn, peer = connections(identity=None)
    conn.start()
    gwait(lambda: peer.subscriptions and peer.published)
    assert peer.subscriptions == [["s/#"]]
    assert all(p[1] != "s/backend/instance" for p in peer.published)


# --------------------------------------------------------------------------- many sites


def test_an_attempt_waits_for_a_connect_slot_and_frees_it_at_connack(connections):
    slots = BoundedSemaphore(1)
    slots.acquire()  # the endpoint's one slot is taken
    conn, peer = connections(connect_slots=slots)
    conn.start()
    gevent.sleep(0)  # the greenlet runs until it blocks: on the slot, before any connect
    assert peer.accepted == 0 and conn.state.state == "connecting"
    slots.release()
    gwait(lambda: conn.state.state == "connected")
    assert slots.acquire(blocking=False)  # given back at the CONNACK, not held while serving


def test_a_stopped_site_gives_up_waiting_for_a_slot(connections):
    slots = BoundedSemaphore(1)
    slots.acquire()
    conn, peer = connections(connect_slots=slots)
    conn.start()
    gevent.sleep(0)
    conn.stop()
    slots.release()
    gwait(lambda: conn._greenlet.dead)
    assert peer.accepted == 0 and slots.acquire(blocking=False)


def test_drains_close_every_socket_once_the_broker_has_closed(connections):
    pairs = [connections() for _ in range(3)]
    for conn, _ in pairs:
        conn.start()
    gwait(lambda: all(c.state.state == "connected" and p.published for c, p in pairs))
    for conn, _ in pairs:
        conn.stop()
    sockets = [conn.send_farewell() for conn, _ in pairs]
    drains = Drains(sockets)
    assert drains.total == 3
    assert drains.wait(5) is True and drains.pending == 0
    assert all(s.fileno() == -1 for s in sockets) and drains.abandon() == 0
    gwait(lambda: all(p.disconnects for _, p in pairs))


def test_drains_abandon_the_sockets_a_broker_keeps_open():
    server = gevent.socket.socket()
    server.bind((HOST, 0))
    server.listen(1)
    client = gevent.socket.create_connection(server.getsockname(), timeout=2)
    peer, _ = server.accept()
    try:
        drains = Drains([client])
        assert drains.wait(0.05) is False and drains.pending == 1
        assert drains.abandon() == 1 and client.fileno() == -1
        assert Drains([]).wait(0) is True
    finally:
        peer.close()
        server.close()
