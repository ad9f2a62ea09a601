"""Unit tests of the MQTT byte layouts (exporter/wire.py)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(10)

def test_farewell_packets_bytes():
    from exporter.connection import farewell_packets  # imports gevent; no monkey patching

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
    from exporter.connection import farewell_packets

    topic = "t" * 200
    pkt = farewell_packets(topic, "3.1.1", True)
    remaining = 2 + 200 + 2 + len(b"offline")  # 211 = 0xD3 -> varint D3 01
    assert remaining == 211
    assert pkt[:3] == b"\x33\xd3\x01"
    assert len(pkt) == 1 + 2 + remaining + 2
    assert pkt[3:5] == (200).to_bytes(2, "big") and pkt[5:205] == topic.encode()
    assert pkt[205:207] != b"\x00\x00"  # a QoS 1 packet id must be non-zero
    assert pkt[207:] == b"offline\xe0\x00"

