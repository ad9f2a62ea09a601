"""Contract tests of the paho boundary (exporter/client.py) against the REAL paho client.

No stand-ins: each test builds a paho client with ``build_client``, connects it to a
loopback listener where the test plays the broker byte by byte, and drives it the way
``SiteConnection`` does (``InboundReader.read``, ``loop_write``, ``loop_misc``). paho's
clock (``paho.mqtt.client.time_func``, which the reader uses too) is a fake moved by hand,
so keepalive cases run in milliseconds.

These tests pin the paho internals the exporter relies on (``_sock_recv``,
``_last_bytes_received``, ``_sock_close``, ``_sock``): they are the gate for moving the
``paho-mqtt<2.3`` pin in setup.cfg.
"""
from __future__ import annotations

import logging
import selectors
import socket
import time

import paho.mqtt.client as mqtt
import pytest

from exporter import wire
from exporter.client import (
    ErrorReporter,
    InboundReader,
    build_client,
    detach_socket,
    drop_socket,
    ip_family,
    open_tcp,
    write_queued,
)
from exporter.config import SiteConfig
from tests.support import HOST
from tests.support.fakes import FakeClock, site_state

pytestmark = pytest.mark.timeout(30)

IO_TIMEOUT = 2.0


class PahoTime:
    """Stands in for ``paho.mqtt.client.time_func``: paho's (and the reader's) clock."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def paho_time(monkeypatch):
    t = PahoTime()
    monkeypatch.setattr(mqtt, "time_func", t)
    return t


class Link:
    """A real paho client built by exporter.client, and the broker's end of its socket."""

    def __init__(self, v5: bool = False, keepalive: int = 60, raising: tuple[str, ...] = (),
                 clock: FakeClock | None = None) -> None:
        self.v5 = v5
        self.clock = clock or FakeClock()
        self.state = site_state("s")
        self.log = logging.LoggerAdapter(logging.getLogger("exporter.connection"), {"site": "s"})
        self.errors = ErrorReporter(self.state, self.log, self.clock)
        self.raising = raising
        self.connected = False
        self.delivered: list[tuple[str, bytes]] = []
        self.messages: list[tuple[str, bytes, int]] = []
        self.connacks: list[int] = []
        self.subacks: list[list[int]] = []
        self.disconnects: list[int] = []
        srv = socket.create_server((HOST, 0))
        site = SiteConfig(name="s", host=HOST, port=srv.getsockname()[1],
                          protocol="5" if v5 else "3.1.1", keepalive=keepalive)
        self.client = build_client(
            site, "s_itest", clean_session=True, connect_timeout=IO_TIMEOUT,
            will=("s/backend/status", b"offline"), errors=self.errors,
            on_connect=self._on_connect, on_disconnect=self._on_disconnect,
            on_message=self._on_message, on_subscribe=self._on_subscribe)
        srv.settimeout(IO_TIMEOUT)
        self.client.connect(HOST, site.port, keepalive)  # paho writes CONNECT at once
        self.peer, _ = srv.accept()
        srv.close()
        self.peer.settimeout(IO_TIMEOUT)
        self.received = bytearray()  # what the client sent, not yet taken by expect()
        first, _ = self.expect()
        assert first >> 4 == 1, "CONNECT"
        self.reader = InboundReader(self.client, self._deliver, v5, lambda: self.connected,
                                    self._fast_path_error)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.client.socket(), selectors.EVENT_READ)

    # -- the callbacks SiteConnection would give ------------------------------------
    def _maybe_raise(self, where: str) -> None:
        if where in self.raising:
            raise RuntimeError(f"boom in {where}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connacks.append(reason_code.value)
        self.connected = not reason_code.is_failure
        self._maybe_raise("on_connect")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects.append(reason_code.value)

    def _on_message(self, client, userdata, message):
        self._maybe_raise("on_message")
        self.messages.append((message.topic, message.payload, message.qos))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subacks.append([rc.value for rc in reason_codes])

    def _deliver(self, topic: str, payload: bytes) -> None:
        self._maybe_raise("deliver")
        self.delivered.append((topic, payload))

    def _fast_path_error(self, exc: Exception) -> None:
        self.errors.report("on_message", exc)

    # -- the broker's side --------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.peer.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.received) < n:
            chunk = self.peer.recv(65536)
            assert chunk, "the client closed the connection"
            self.received += chunk

    def expect(self) -> tuple[int, bytes]:
        """The next packet the client sent: (first byte, body)."""
        self._fill(2)
        i, length = 1, 0
        while True:
            self._fill(i + 1)
            length |= (self.received[i] & 0x7F) << (7 * (i - 1))
            i += 1
            if self.received[i - 1] < 0x80:
                break
        self._fill(i + length)
        first, body = self.received[0], bytes(self.received[i:i + length])
        del self.received[:i + length]
        return first, body

    def sent_nothing(self) -> bool:
        self.peer.setblocking(False)
        try:
            chunk = self.peer.recv(65536)
        except BlockingIOError:
            return not self.received
        finally:
            self.peer.settimeout(IO_TIMEOUT)
        self.received += chunk
        return False

    # -- the exporter's side ------------------------------------------------------------
    def step(self, timeout: float = 0.0) -> bool:
        """One turn of SiteConnection._serve's loop. True when the connection ended."""
        if self.client.socket() is None:
            return True
        if self.sel.select(timeout) and self.reader.read():
            return True
        if self.client.want_write() and self.client.loop_write():
            return True
        return bool(self.client.loop_misc())

    def pump(self, until, timeout: float = IO_TIMEOUT) -> None:
        """Run the client until ``until()`` is true (bounded)."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out pumping the client"
            if self.step(0.05):
                assert until(), "the connection ended first"
                return

    def take(self, nbytes: int, timeout: float = IO_TIMEOUT) -> None:
        """Let the reader take exactly ``nbytes`` more bytes from its socket."""
        taken = 0
        real = self.reader.sock

        class Counting:
            def recv(self, n):
                nonlocal taken
                data = real.recv(n)
                taken += len(data)
                return data

        self.reader.sock = Counting()
        try:
            deadline = time.monotonic() + timeout
            while taken < nbytes:
                assert time.monotonic() < deadline, f"took {taken} of {nbytes} bytes"
                if self.sel.select(0.05):
                    assert not self.reader.read(), "the connection ended"
        finally:
            self.reader.sock = real

    def connect_ok(self) -> None:
        self.send(wire.connack(v5=self.v5))
        self.pump(lambda: self.connacks)

    def close(self) -> None:
        self.sel.close()
        self.peer.close()
        drop_socket(self.client)


@pytest.fixture
def links():
    made: list[Link] = []

    def make(**kwargs) -> Link:
        link = Link(**kwargs)
        made.append(link)
        return link

    yield make
    for link in made:
        link.close()


# --------------------------------------------------------------------------- packets


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_connack_reaches_on_connect(links, v5):
    link = links(v5=v5)
    assert not link.connected
    link.connect_ok()
    assert link.connacks == [0] and link.connected
    assert link.client.is_connected()


def test_refused_connack_reaches_on_connect(links):
    link = links()
    link.send(wire.connack(reason=5))  # v3.1.1 "not authorised"
    link.pump(lambda: link.connacks)
    assert link.connacks and not link.connected


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_suback_reaches_on_subscribe_with_refused_codes(links, v5):
    link = links(v5=v5)
    link.connect_ok()
    _, mid = link.client.subscribe([("a/#", 0), ("b/#", 0)])
    link.pump(lambda: not link.client.want_write())
    first, body = link.expect()
    assert first == 0x82 and int.from_bytes(body[:2], "big") == mid
    link.send(wire.suback(mid, [0, 0x80], v5=v5))
    link.pump(lambda: link.subacks)
    assert link.subacks == [[0, 0x80]]


def test_pingresp_is_consumed_by_paho(links, paho_time):
    link = links(keepalive=5)
    link.connect_ok()
    paho_time.now += 5
    assert not link.step()  # loop_misc: keepalive due, paho sends PINGREQ
    assert link.expect() == (0xC0, b"")
    link.send(wire.PINGRESP)
    link.take(2)
    assert not link.reader.buf and not link.delivered and not link.messages
    # paho saw the PINGRESP: 4.9 s on, no "PINGRESP overdue" close (it would close at 5).
    paho_time.now += 4.9
    assert not link.step() and link.disconnects == []
    assert link.client.is_connected()


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_qos1_publish_goes_to_paho_which_sends_puback(links, v5):
    link = links(v5=v5)
    link.connect_ok()
    link.send(wire.publish("s/q1", b"21.5", qos=1, packet_id=7, v5=v5))
    link.pump(lambda: link.messages)
    assert link.messages == [("s/q1", b"21.5", 1)] and link.delivered == []
    link.pump(lambda: not link.client.want_write())
    first, body = link.expect()
    assert first == 0x40 and body[:2] == b"\x00\x07"


@pytest.mark.parametrize("v5", [False, True], ids=["v311", "v5"])
def test_qos0_publish_takes_the_fast_path(links, v5):
    link = links(v5=v5)
    link.connect_ok()
    link.send(wire.publish("s/a", b"1", v5=v5, properties=b"\x01\x01" if v5 else b"")
              + wire.publish("s/b", b"2", v5=v5))
    link.pump(lambda: len(link.delivered) == 2)
    assert link.delivered == [("s/a", b"1"), ("s/b", b"2")]
    assert link.messages == []  # paho never saw them


def test_qos0_before_connack_goes_to_paho(links):
    link = links()
    link.send(wire.connack() + wire.publish("s/a", b"1"))
    link.take(4 + 8)
    assert link.connacks == [0]
    # The CONNACK turned the fast path on for the next packet of the same chunk.
    assert link.delivered == [("s/a", b"1")] and link.messages == []


STREAM = (wire.connack() + wire.publish("site/sensors/dev1", b'{"temperature":21.5}')
          + wire.publish("site/q1", b"x", qos=1, packet_id=9) + wire.PINGRESP
          + wire.publish("s/ü", b"ON") + wire.suback(1, [0x80])
          + wire.publish("site/" + "t" * 200, b"7" * 300))


def test_partial_packets_at_every_split_give_the_same_deliveries(links):
    expected = None
    for cut in range(len(STREAM) + 1):
        link = links()
        for part in (STREAM[:cut], STREAM[cut:]):
            if part:
                link.send(part)
                link.take(len(part))  # the reader sees exactly this part, then the rest
        result = (link.connacks, link.delivered, link.messages, link.subacks,
                  bytes(link.reader.buf))
        if expected is None:
            expected = result
            assert link.delivered == [("site/sensors/dev1", b'{"temperature":21.5}'),
                                      ("s/ü", b"ON"), ("site/" + "t" * 200, b"7" * 300)]
            assert link.messages == [("site/q1", b"x", 1)] and link.subacks == [[0x80]]
        assert result == expected, cut
        link.pump(lambda link=link: not link.client.want_write())
        assert link.expect() == (0x40, b"\x00\x09"), cut  # paho's PUBACK
        assert link.disconnects == [], cut
        link.close()


def test_end_of_stream_reaches_on_disconnect(links):
    link = links()
    link.connect_ok()
    link.send(wire.publish("s/a", b"1") + wire.publish("s/cut", b"xyz")[:5])
    link.peer.shutdown(socket.SHUT_WR)
    link.pump(lambda: link.disconnects)
    assert link.delivered == [("s/a", b"1")]
    assert link.disconnects == [128]  # "Unspecified error": paho's connection lost
    assert link.client.socket() is None


def test_reset_reaches_on_disconnect_and_paho_logs_it(links, caplog):
    link = links()
    link.connect_ok()
    link.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    link.peer.close()
    with caplog.at_level(logging.WARNING):
        link.pump(lambda: link.disconnects)
    assert link.disconnects == [128]
    paho = [r for r in caplog.records if r.name == "exporter.paho"]
    assert paho and paho[0].site == "s" and "failed to receive on socket" in paho[0].getMessage()
    assert link.state.internal_errors == 0  # a network error is not a bug


def test_malformed_remaining_length_is_a_protocol_error_for_paho(links):
    link = links()
    link.connect_ok()
    link.send(b"\x30\xff\xff\xff\xff\x01" + b"\x00" * 8)
    link.pump(lambda: link.disconnects)
    assert link.client.socket() is None and link.delivered == []


# --------------------------------------------------------------------------- errors


def test_callback_exception_is_logged_once_with_traceback_and_counted(links, caplog):
    link = links(raising=("on_connect", "on_message", "deliver"))
    with caplog.at_level(logging.ERROR):
        link.connect_ok()
        link.send(wire.publish("s/q", b"1", qos=1, packet_id=1) + wire.publish("s/a", b"2")
                  + wire.publish("s/q", b"3", qos=1, packet_id=2))
        link.pump(lambda: link.state.internal_errors == 4)
    assert link.connected and link.client.is_connected()  # the link lives on
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "on_connect" in errors[0].getMessage() and errors[0].site == "s"
    assert errors[0].exc_info and "boom in on_connect" in caplog.text
    assert "Traceback" in caplog.text
    # paho acknowledged both QoS 1 messages although on_message raised.
    link.pump(lambda: not link.client.want_write())
    assert [link.expect(), link.expect()] == [(0x40, b"\x00\x01"), (0x40, b"\x00\x02")]
    # After the interval, the next one is logged with the count of those suppressed.
    link.clock.advance(60)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        link.send(wire.publish("s/b", b"4"))
        link.pump(lambda: link.state.internal_errors == 5)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "3 more since the last report" in record.getMessage() and record.exc_info


def test_exception_paho_caught_itself_is_counted(links, caplog):
    link = links()
    link.connect_ok()

    def unguarded(client, userdata, message):
        raise ValueError("not wrapped")

    link.client.on_message = unguarded  # bypasses the guard: paho's own net catches it
    with caplog.at_level(logging.ERROR):
        link.send(wire.publish("s/q", b"1", qos=1, packet_id=1))
        link.pump(lambda: link.state.internal_errors == 1)
    assert any(r.name == "exporter.paho" and "Caught exception in on_message" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------- keepalive


def test_slow_large_message_does_not_time_out(links, paho_time):
    """16 KB QoS 0 at ~1.3 KB/s with keepalive 5: 12.6 s of paho time on the wire.

    paho counts every received byte as keepalive traffic; the fast path takes these
    bytes, so the reader must keep paho's clock. A broker queues its PINGRESP behind the
    message in flight, so paho gets no PINGRESP before the message is complete.
    """
    link = links(keepalive=5)
    link.connect_ok()
    message = wire.publish("s/big", bytes(range(256)) * 64)  # 16 KB payload
    step, interval = 100, 100 / 1300
    pings = 0
    for i in range(0, len(message), step):
        paho_time.now += interval
        link.send(message[i:i + step])
        link.take(len(message[i:i + step]))
        assert not link.step(), f"connection closed after {i} bytes ({link.disconnects})"
        while not link.sent_nothing():
            assert link.expect() == (0xC0, b"")
            pings += 1
    assert paho_time.now - 5000.0 > 1.5 * 5 + 5  # well past where paho would give up
    assert link.delivered == [("s/big", bytes(range(256)) * 64)]
    assert pings >= 1 and link.disconnects == []
    link.send(wire.PINGRESP * pings)
    link.take(2 * pings)
    paho_time.now += 4.9
    assert not link.step() and link.client.is_connected()


def test_silent_broker_still_times_out(links, paho_time):
    """The other side of the contract: no bytes at all, paho closes (keepalive 141/v5)."""
    link = links(keepalive=5, v5=True)
    link.connect_ok()
    for _ in range(12):
        paho_time.now += 1
        if link.step():
            break
    # "Keep alive timeout"; paho 2.2 reports it twice (paho.mqtt.python#870).
    assert link.disconnects and set(link.disconnects) == {141}


# --------------------------------------------------------------------------- sockets


def test_drop_and_detach_socket(links):
    link = links()
    link.connect_ok()
    sock = link.client.socket()
    detach_socket(link.client)
    assert link.client.socket() is None and sock.fileno() >= 0  # ours now, still open
    sock.close()
    other = links()
    drop_socket(other.client)
    assert other.client.socket() is None and other.disconnects == []
    assert other.peer.recv(10) == b""  # closed, no DISCONNECT sent
    drop_socket(other.client)  # idempotent


# --------------------------------------------------------------------------- many sites


def test_ip_family_tells_addresses_from_names():
    assert ip_family("127.0.0.1") == socket.AF_INET
    assert ip_family("::1") == socket.AF_INET6
    assert ip_family("broker.example") is None and ip_family("fe80::1%eth0") is None


def test_open_tcp_connects_to_an_address_and_to_a_name():
    with socket.create_server((HOST, 0)) as srv:
        port = srv.getsockname()[1]
        for host in (HOST, "localhost"):
            with open_tcp(host, port, IO_TIMEOUT) as sock:
                peer, _ = srv.accept()
                peer.close()
                assert sock.getpeername()[1] == port


def test_open_tcp_raises_what_describe_failure_classifies():
    with socket.create_server((HOST, 0)) as srv:
        port = srv.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        open_tcp(HOST, port, IO_TIMEOUT)


def test_one_thread_locks_keep_pahos_in_callback_question(links):
    link = links()
    inside = link.client._in_callback_mutex
    with inside:
        assert inside.acquire(False) is False  # paho's "am I in a callback?"
        with pytest.raises(RuntimeError):
            inside.acquire()
    assert inside.acquire(False) is True
    inside.release()
    with link.client._callback_mutex, link.client._callback_mutex:  # an RLock: reentrant
        pass
    with pytest.raises(RuntimeError):
        inside.release()


def test_packets_queued_in_a_callback_leave_in_order_with_write_queued(links):
    link = links()
    link.connect_ok()
    with link.client._in_callback_mutex:  # as inside on_connect: queued, not written
        for i in range(3):
            link.client.publish(f"s/t{i}", b"x", qos=1)
    assert link.client.want_write() and link.sent_nothing()
    assert write_queued(link.client) == 0 and not link.client.want_write()
    topics = []
    for _ in range(3):
        first, body = link.expect()
        assert first >> 4 == 3
        topics.append(body[2:2 + int.from_bytes(body[:2], "big")].decode())
    assert topics == ["s/t0", "s/t1", "s/t2"]


def test_paho_debug_lines_never_reach_the_logger(links, caplog):
    with caplog.at_level(logging.DEBUG, logger="exporter.paho"):
        link = links()
        link.connect_ok()
    assert not [r for r in caplog.records if r.name == "exporter.paho"]
