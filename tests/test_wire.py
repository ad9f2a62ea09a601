"""Unit tests of the MQTT byte layouts (exporter/wire.py): varints, the packet walk, packets."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import wire
from exporter.wire import (
    VARINT_MAX,
    decode_varint,
    encode_varint,
    farewell_packets,
    publish,
    walk,
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- varint

@given(st.integers(min_value=0, max_value=VARINT_MAX))
def test_varint_round_trip(n):
    raw = encode_varint(n)
    assert 1 <= len(raw) <= 4
    assert decode_varint(b"\xaa" + raw + b"\x55", 1) == (n, 1 + len(raw))


@pytest.mark.parametrize(("n", "raw"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
    (VARINT_MAX, b"\xff\xff\xff\x7f"),
])
def test_varint_boundaries_from_the_spec(n, raw):
    assert encode_varint(n) == raw and decode_varint(raw) == (n, len(raw))


def test_varint_errors():
    with pytest.raises(ValueError):
        encode_varint(VARINT_MAX + 1)
    with pytest.raises(ValueError):
        encode_varint(-1)
    with pytest.raises(ValueError, match="more than four"):
        decode_varint(b"\xff\xff\xff\xff\x01")
    with pytest.raises(ValueError, match="cut off"):
        decode_varint(b"\x80\x80")


# --------------------------------------------------------------------------- the walk

CONNACK = wire.connack()
QOS1 = publish("site/x", b"", qos=1, packet_id=3)
STREAM = (CONNACK + publish("site/sensors/dev1", b'{"temperature":21.5}') + QOS1
          + wire.PINGRESP + publish("s/ü", b"ON") + publish("site/" + "t" * 200, b"7" * 300)
          + wire.suback(2, [0, 0x80]))
DELIVERED = [("site/sensors/dev1", b'{"temperature":21.5}'), ("s/ü", b"ON"),
             ("site/" + "t" * 200, b"7" * 300)]
HANDED = [CONNACK, QOS1, wire.PINGRESP, wire.suback(2, [0, 0x80])]


class Walker:
    """Drives walk() the way the reader does: bytes arrive, complete packets leave."""

    def __init__(self, v5=False, fast=None, stop_at=None, deliver_raises=()):
        self.buf = bytearray()
        self.v5 = v5
        self.fast = fast  # None: on once a CONNACK was handed over
        self.connected = False
        self.delivered, self.handed, self.errors = [], [], []
        self.stop_at, self.deliver_raises = stop_at, deliver_raises

    def _fast(self):
        return self.connected if self.fast is None else self.fast

    def _deliver(self, topic, payload):
        if topic in self.deliver_raises:
            raise RuntimeError(topic)
        self.delivered.append((topic, payload))

    def _hand_over(self, start, end):
        packet = bytes(self.buf[start:end])
        self.handed.append(packet)
        if packet[0] == 0x20:
            self.connected = True
        return packet == self.stop_at

    def feed(self, data):
        self.buf += data
        return walk(self.buf, self.v5, self._fast, self._deliver, self.errors.append,
                    self._hand_over)


def test_qos0_is_delivered_after_connack_and_the_rest_handed_over():
    w = Walker()
    assert w.feed(STREAM) is False
    assert w.delivered == DELIVERED
    assert w.handed == HANDED
    assert not w.buf


def test_before_connack_everything_is_handed_over():
    w = Walker(fast=False)
    packet = publish("s/a", b"1")
    w.feed(packet)
    assert w.delivered == [] and w.handed == [packet]


def test_stream_cut_at_every_point_gives_the_same_result():
    for cut in range(len(STREAM) + 1):
        w = Walker()
        w.feed(STREAM[:cut])
        assert len(w.buf) <= cut
        w.feed(STREAM[cut:])
        assert (w.delivered, w.handed, bytes(w.buf)) == (DELIVERED, HANDED, b""), cut


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_any_chunking_gives_the_same_result(cuts):
    points = sorted(set(cuts))
    w = Walker()
    for a, b in zip([0, *points], [*points, len(STREAM)]):
        w.feed(STREAM[a:b])
    assert (w.delivered, w.handed, bytes(w.buf)) == (DELIVERED, HANDED, b"")


def test_v5_properties_are_skipped():
    w = Walker(v5=True, fast=True)
    w.feed(publish("s/a", b"on", v5=True, properties=b"\x01\x01")
           + publish("s/b", b"1", v5=True))
    assert w.delivered == [("s/a", b"on"), ("s/b", b"1")]


def test_large_payload_with_a_three_byte_remaining_length():
    payload = bytes(range(256)) * 600  # 153600 bytes
    stream = publish("s/big", payload)
    assert stream[1:4] == encode_varint(len(stream) - 4)
    w = Walker(fast=True)
    for i in range(0, len(stream), 65536):
        w.feed(stream[i:i + 65536])
    assert w.delivered == [("s/big", payload)] and not w.buf


def test_hand_over_true_stops_and_keeps_the_rest():
    w = Walker(stop_at=wire.PINGRESP)
    rest = publish("s/after", b"1")
    assert w.feed(CONNACK + wire.PINGRESP + rest) is True
    assert w.handed == [CONNACK, wire.PINGRESP]
    assert bytes(w.buf) == rest and w.delivered == []


def test_a_delivery_error_costs_that_message_only():
    w = Walker(fast=True, deliver_raises=("s/bad",))
    w.feed(publish("s/bad", b"1") + publish("s/good", b"2"))
    assert w.delivered == [("s/good", b"2")]
    assert [str(e) for e in w.errors] == ["s/bad"]


def test_a_topic_that_is_not_utf8_is_dropped():
    w = Walker(fast=True)
    w.feed(publish(b"\xff\xfe", b"1") + publish("s/ok", b"2"))
    assert w.delivered == [("s/ok", b"2")] and w.errors == []


def test_a_malformed_remaining_length_is_handed_over():
    w = Walker(fast=True)
    w.feed(b"\x30\xff\xff\xff\xff\x01" + b"\x00" * 8)
    assert w.handed[0] == b"\x30\xff\xff\xff\xff\x01"


# --------------------------------------------------------------------------- packets

def test_builders_match_the_spec_bytes():
    assert wire.connack() == b"\x20\x02\x00\x00"
    assert wire.connack(v5=True) == b"\x20\x03\x00\x00\x00"
    assert wire.suback(1, [0, 0x80]) == b"\x90\x04\x00\x01\x00\x80"
    assert wire.suback(1, [1], v5=True) == b"\x90\x04\x00\x01\x00\x01"
    assert wire.puback(5) == b"\x40\x02\x00\x05"
    assert wire.disconnect() == b"\xe0\x00" and wire.disconnect(0x8E) == b"\xe0\x01\x8e"
    assert publish("a/b", b"x") == b"\x30\x06\x00\x03a/bx"
    assert publish("a/b", b"x", qos=1, retain=True, packet_id=7) == b"\x33\x08\x00\x03a/b\x00\x07x"
    assert publish("a", b"", v5=True, properties=b"\x01\x01") == b"\x30\x06\x00\x01a\x02\x01\x01"


def test_farewell_packets_bytes():
    topic = "site_a/backend/status"
    v3 = farewell_packets(topic, "3.1.1", True)
    body = len(topic).to_bytes(2, "big") + topic.encode() + b"\xff\xff" + b"offline"
    assert v3 == b"\x33" + bytes([len(body)]) + body + b"\xe0\x00"
    assert v3[0] == 0x33  # PUBLISH, QoS 1, retain
    assert v3.endswith(b"offline\xe0\x00")
    assert v3[2:4] == len(topic).to_bytes(2, "big") and v3[4:4 + len(topic)] == topic.encode()
    # v5 with a will: one DISCONNECT with reason 0x04 "Disconnect with Will Message".
    assert farewell_packets(topic, "5", True) == b"\xe0\x01\x04"
    # No will: a plain DISCONNECT only.
    assert farewell_packets(topic, "3.1.1", False) == b"\xe0\x00"
    assert farewell_packets(topic, "5", False) == b"\xe0\x01\x00"


def test_farewell_packets_remaining_length_for_a_200_byte_topic():
    topic = "t" * 200
    pkt = farewell_packets(topic, "3.1.1", True)
    remaining = 2 + 200 + 2 + len(b"offline")  # 211 = 0xD3 -> varint D3 01
    assert remaining == 211
    assert pkt[:3] == b"\x33\xd3\x01"
    assert len(pkt) == 1 + 2 + remaining + 2
    assert pkt[3:5] == (200).to_bytes(2, "big") and pkt[5:205] == topic.encode()
    assert pkt[205:207] != b"\x00\x00"  # a QoS 1 packet id must be non-zero
    assert pkt[207:] == b"offline\xe0\x00"


def test_farewell_packets_with_the_presence_tombstone_first():
    from exporter.wire import FAREWELL_PRESENCE_ID, FAREWELL_STATUS_ID

    status, presence = "s/backend/status", "s/backend/instance"
    tomb = b'{"state":"offline"}'
    assert FAREWELL_PRESENCE_ID != FAREWELL_STATUS_ID and FAREWELL_PRESENCE_ID
    for protocol, v5 in (("3.1.1", False), ("5", True)):
        head = publish(presence, tomb, qos=1, retain=True, packet_id=0xFFFE, v5=v5)
        for lwt in (True, False):
            got = farewell_packets(status, protocol, lwt, presence=(presence, tomb))
            assert got == head + farewell_packets(status, protocol, lwt)
    # v3.1.1 with a will: tombstone (QoS 1 retained, id 0xFFFE), offline (id 0xFFFF), DISCONNECT.
    v3 = farewell_packets(status, "3.1.1", True, presence=(presence, tomb))
    n = 2 + len(presence) + 2 + len(tomb)
    assert v3[:2] == bytes((0x33, n)) and v3[2 + 2 + len(presence):2 + 2 + len(presence) + 2] \
        == b"\xff\xfe"
    assert v3[2 + n:].startswith(b"\x33") and v3.endswith(b"\xff\xffoffline\xe0\x00")
    # v5: the tombstone carries an empty property length, then DISCONNECT 0x04.
    v5 = farewell_packets(status, "5", True, presence=(presence, tomb))
    assert v5 == bytes((0x33, n + 1)) + b"\x00\x12" + presence.encode() + b"\xff\xfe\x00" \
        + tomb + b"\xe0\x01\x04"
