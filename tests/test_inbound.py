"""InboundReader: the packet walk must deliver exactly what paho would have, wherever the
stream is cut into chunks. A scripted socket and a minimal paho stand-in that reads one
packet the way paho does (command byte, remaining length, body through ``_sock_recv``)."""
import pytest
from hypothesis import given, settings, strategies as st

from exporter.inbound import InboundReader

pytestmark = pytest.mark.timeout(60)


def varint(n):
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos=0, v5=False, props=b""):
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += b"\x00\x01"
    if v5:
        body += varint(len(props)) + props
    body += payload
    return bytes([0x30 | (qos << 1)]) + varint(len(body)) + body


PINGRESP = b"\xd0\x00"
CONNACK = b"\x20\x02\x00\x00"


class ScriptedSocket:
    def __init__(self, chunks):
        self.chunks = list(chunks)

    def recv(self, n):
        if not self.chunks:
            raise BlockingIOError
        chunk = self.chunks.pop(0)
        if isinstance(chunk, Exception):
            raise chunk
        return chunk


class PahoStandIn:
    """Reads whole packets with _sock_recv like paho's _packet_read; records them."""

    def __init__(self):
        self.packets = []
        self.lost = False

    def loop_read(self):
        try:
            cmd = self._sock_recv(1)
        except BlockingIOError:
            return 0
        except OSError:
            self.lost = True
            return 7
        if not cmd:
            self.lost = True
            return 7
        length, shift = 0, 0
        while True:
            b = self._sock_recv(1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        body = self._sock_recv(length) if length else b""
        assert len(body) == length, "paho was handed a partial packet"
        self.packets.append(cmd + varint(length) + body)
        return 0


def run(stream_chunks, v5=False, connected=True):
    delivered, client = [], PahoStandIn()
    reader = InboundReader(client, ScriptedSocket(stream_chunks), lambda t, p: delivered.append((t, p)),
                           v5, lambda: connected)
    ended = False
    for _ in range(len(stream_chunks) + 1):
        ended = reader.read() or ended
    return delivered, client, ended, reader


def test_qos0_publish_is_delivered_and_other_packets_go_to_paho():
    qos1 = publish(b"s/q1", b"x", qos=1)
    stream = CONNACK + publish(b"s/a", b"21.5") + PINGRESP + qos1 + publish(b"s/b", b"{}")
    delivered, client, ended, _ = run([stream])
    assert delivered == [("s/a", b"21.5"), ("s/b", b"{}")]
    assert client.packets == [CONNACK, PINGRESP, qos1]
    assert not ended


def test_v5_properties_are_skipped():
    stream = publish(b"s/a", b"on", v5=True, props=b"\x01\x01") + publish(b"s/b", b"1", v5=True)
    delivered, _, _, _ = run([stream], v5=True)
    assert delivered == [("s/a", b"on"), ("s/b", b"1")]


def test_before_connack_everything_goes_to_paho():
    packet = publish(b"s/a", b"1")
    delivered, client, _, _ = run([packet], connected=False)
    assert delivered == [] and client.packets == [packet]


def test_eof_reaches_paho_as_connection_lost():
    delivered, client, ended, _ = run([publish(b"s/a", b"1"), b""])
    assert delivered == [("s/a", b"1")] and ended and client.lost


def test_reset_reaches_paho_as_connection_lost():
    _, client, ended, _ = run([ConnectionResetError(104, "reset")])
    assert ended and client.lost


def test_large_payload_with_multi_byte_length():
    payload = bytes(range(256)) * 600  # 153600 bytes: 3-byte remaining length
    stream = publish(b"s/big", payload)
    chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]
    delivered, _, _, reader = run(chunks)
    assert delivered == [("s/big", payload)] and not reader.buf


STREAM = (CONNACK + publish(b"site/sensors/dev1", b'{"temperature":21.5}')
          + publish(b"site/x", b"", qos=1) + PINGRESP + publish("s/ü".encode(), b"ON")
          + publish(b"site/" + b"t" * 200, b"7" * 300))


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_any_chunking_gives_the_same_result(cuts):
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0] + points, points + [len(STREAM)])]
    delivered, client, ended, reader = run(chunks)
    assert delivered == [("site/sensors/dev1", b'{"temperature":21.5}'), ("s/ü", b"ON"),
                         ("site/" + "t" * 200, b"7" * 300)]
    assert client.packets == [CONNACK, publish(b"site/x", b"", qos=1), PINGRESP]
    assert not ended and not reader.buf
