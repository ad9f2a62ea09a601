"""MQTT byte layouts: the variable byte integer, the inbound packet walk, packet builders.

Pure functions over bytes, no paho and no gevent: used by the exporter (the ingest hot
path :func:`walk` and the shutdown's :func:`farewell_packets`), by the tests' scripted
brokers and by the benchmarks. Layouts follow MQTT 3.1.1 and 5.0 (section 1.5.5 for the
variable byte integer, 3.3 for PUBLISH).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

#: Largest value a variable byte integer can carry (four bytes).
VARINT_MAX = 268_435_455

PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"

Deliver = Callable[[str, bytes], object]
HandOver = Callable[[int, int], bool]


def encode_varint(n: int) -> bytes:
    """The variable byte integer for ``0 <= n <= VARINT_MAX`` (1 to 4 bytes)."""
    if not 0 <= n <= VARINT_MAX:
        raise ValueError(f"variable byte integer out of range: {n}")
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_varint(buf: bytes | bytearray | memoryview, i: int = 0) -> tuple[int, int]:
    """``(value, index after it)`` of the variable byte integer at ``buf[i]``.

    Raises ValueError when it is longer than four bytes or cut off by the end of ``buf``.
    """
    value = shift = 0
    for _ in range(4):
        if i >= len(buf):
            raise ValueError("variable byte integer cut off")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise ValueError("malformed variable byte integer (more than four bytes)")


def read_string(buf: bytes, i: int) -> tuple[bytes, int]:
    """``(bytes, index after it)`` of the two-byte-length-prefixed string at ``buf[i]``."""
    n = int.from_bytes(buf[i:i + 2], "big")
    return buf[i + 2:i + 2 + n], i + 2 + n


def walk(buf: bytearray, v5: bool, fast_enabled: Callable[[], bool], deliver: Deliver,
         on_error: Callable[[Exception], object], hand_over: HandOver) -> bool:
    """Handle every complete packet at the start of ``buf``; keep a trailing partial one.

    While ``fast_enabled()`` is true, a QoS 0 PUBLISH is decoded in place (v5 properties
    skipped) and given to ``deliver(topic, payload)``; an exception it raises goes to
    ``on_error`` and costs that one message; a topic that is not UTF-8 drops the packet.
    Any other packet is handed over as ``hand_over(start, end)`` (its bytes are
    ``buf[start:end]``, valid during the call); ``fast_enabled`` is asked again after each
    one (a CONNACK turns the fast path on). A remaining length longer than four bytes is
    handed over as the command byte and five length bytes: the receiver reports the error.

    Returns True as soon as ``hand_over`` returns True (the connection ended), leaving the
    packets after that one unread. The packets handled are removed from ``buf``.
    The ingest hot path: one loop, no allocation per packet beyond the topic and payload.
    """
    view = memoryview(buf)  # slices of it copy once; released before buf is resized
    n = len(buf)
    pos = 0
    fast = fast_enabled()
    try:
        while n - pos >= 2:
            cmd = buf[pos]
            i = pos + 1
            length = shift = 0
            while i < n and shift <= 21:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            else:
                if shift <= 21:
                    return False  # remaining length not complete yet
                length = 1        # malformed: with a fifth length byte, the receiver errs
            end = i + length
            if end > n:
                return False
            if fast and cmd & 0xF6 == 0x30 and length >= 2:   # PUBLISH, QoS 0
                topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                start = topic_end
                if v5 and start < end:  # skip the properties
                    plen = pshift = 0
                    while start < end:
                        byte = buf[start]
                        start += 1
                        plen |= (byte & 0x7F) << pshift
                        if byte < 0x80:
                            break
                        pshift += 7
                    start += plen
                if topic_end <= end and start <= end:
                    try:
                        topic = str(view[i + 2:topic_end], "utf-8")
                    except UnicodeDecodeError:
                        pass  # not valid MQTT; drop the packet
                    else:
                        try:
                            deliver(topic, view[start:end].tobytes())
                        except Exception as exc:  # one message, not the link
                            on_error(exc)
                pos = end
                continue
            stop = hand_over(pos, end)
            pos = end
            if stop:
                return True
            fast = fast_enabled()
        return False
    finally:
        view.release()
        del buf[:pos]


# --------------------------------------------------------------------------- packets


def _with_header(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def _string(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def publish(topic: str | bytes, payload: bytes, qos: int = 0, retain: bool = False,
            packet_id: int = 1, v5: bool = False, properties: bytes = b"") -> bytes:
    """A PUBLISH packet (``packet_id`` only for QoS 1 and 2, ``properties`` only on v5)."""
    raw = topic.encode() if isinstance(topic, str) else topic
    body = _string(raw)
    if qos:
        body += packet_id.to_bytes(2, "big")
    if v5:
        body += encode_varint(len(properties)) + properties
    return _with_header(0x30 | (qos << 1) | int(retain), body + payload)


def connack(v5: bool = False, reason: int = 0, session_present: bool = False) -> bytes:
    """A CONNACK with return code / reason ``reason`` (v5: with empty properties)."""
    body = bytes((int(session_present), reason)) + (b"\x00" if v5 else b"")
    return _with_header(0x20, body)


def suback(packet_id: int, codes: Iterable[int], v5: bool = False) -> bytes:
    """A SUBACK with one return code per filter (0x80: refused)."""
    body = packet_id.to_bytes(2, "big") + (b"\x00" if v5 else b"") + bytes(codes)
    return _with_header(0x90, body)


def puback(packet_id: int) -> bytes:
    """A PUBACK (v3.1.1 layout; also a v5 PUBACK with reason 0 "Success")."""
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def disconnect(reason: int | None = None) -> bytes:
    """A DISCONNECT: v3.1.1 without ``reason``, v5 with the one-byte reason code."""
    return b"\xe0\x00" if reason is None else bytes((0xE0, 0x01, reason))


#: Packet IDs of the farewell's QoS 1 PUBLISHes (paho's own start at 1 and never get here).
FAREWELL_STATUS_ID, FAREWELL_PRESENCE_ID = 0xFFFF, 0xFFFE


def farewell_packets(status_topic: str, protocol: str, lwt_enabled: bool,
                     offline: bytes = b"offline",
                     presence: tuple[str | bytes, bytes] | None = None) -> bytes:
    """The bytes of a graceful goodbye, sent as one write.

    ``presence`` is ``(topic, tombstone)``: first a PUBLISH of the tombstone record (QoS 1,
    retained, packet id 0xFFFE). Then, v5 with a will: DISCONNECT reason 0x04 "Disconnect
    with Will Message" (the broker publishes our ``offline`` will). v3.1.1 with a will:
    PUBLISH ``offline`` (QoS 1, retained, packet id 0xFFFF) then DISCONNECT. Without a will:
    DISCONNECT only.
    """
    v5 = protocol == "5"
    head = b""
    if presence is not None:
        head = publish(presence[0], presence[1], qos=1, retain=True,
                       packet_id=FAREWELL_PRESENCE_ID, v5=v5)
    if not lwt_enabled:
        return head + disconnect(0x00 if v5 else None)
    if v5:
        return head + disconnect(0x04)
    return (head + publish(status_topic, offline, qos=1, retain=True,
                           packet_id=FAREWELL_STATUS_ID) + disconnect())
