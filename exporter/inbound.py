"""Buffered inbound reads for a paho client: the ingest hot path.

paho reads every packet with three or more ``recv()`` calls and builds a message object
per PUBLISH, which caps a subscriber at ~40 k messages per CPU-second. The reader here
takes what the socket has in one ``recv()`` of up to 64 KB and walks the packets itself:
QoS 0 PUBLISH packets (the bulk of sensor traffic) are decoded in place and delivered
straight to ``deliver(topic, payload)``; any other packet (CONNACK, SUBACK, PINGRESP,
QoS 1/2 PUBLISH, DISCONNECT) is handed to paho, which reads exactly that one packet from
the buffer through its ``_sock_recv`` hook, so paho's state machine stays whole.
Each call handles one chunk and returns, so the hub (and ``/metrics``) runs between chunks.
"""
from __future__ import annotations

import ssl

RECV_SIZE = 65536
_NOT_READY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class InboundReader:
    """Feeds one connection's packets to ``deliver`` (QoS 0 PUBLISH) or to paho (the rest)."""

    def __init__(self, client, sock, deliver, v5: bool, fast_path_enabled):
        self.client = client
        self.sock = sock
        self.deliver = deliver
        self.v5 = v5
        self.fast_path_enabled = fast_path_enabled  # callable: True once CONNACK arrived
        self.buf = bytearray()
        self._paho_pos = 0     # paho's read cursor in buf ...
        self._paho_limit = 0   # ... and the end of the packet it may read
        self._end: bytes | OSError | None = None   # b"" on EOF, the error on a failed recv
        client._sock_recv = self._paho_recv       # paho has no public hook for this

    def _paho_recv(self, bufsize: int) -> bytes:
        pos = self._paho_pos
        n = min(bufsize, self._paho_limit - pos)
        if n <= 0:
            if self._end is None:
                raise BlockingIOError
            if isinstance(self._end, OSError):
                raise self._end
            return b""
        self._paho_pos = pos + n
        return bytes(self.buf[pos:pos + n])

    def read(self) -> bool:
        """Read what the socket has and handle every complete packet.

        Returns True when the connection ended (paho has called on_disconnect).
        """
        sock = self.sock
        try:
            data = sock.recv(RECV_SIZE)
            pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes
            while data and pending is not None and pending():
                data += sock.recv(RECV_SIZE)
        except _NOT_READY:
            return False
        except OSError as exc:
            data = exc
        if isinstance(data, bytes) and data:
            self.buf += data
            return self.dispatch()
        if self.dispatch():
            return True
        # Let paho see the end of the stream the way it would have seen it on its own.
        self._end = data
        self._paho_pos = self._paho_limit = len(self.buf)
        self.client.loop_read()
        return True

    def dispatch(self) -> bool:
        """Handle the complete packets in the buffer; keep a trailing partial one."""
        buf = self.buf
        view = memoryview(buf)  # slices of it copy once; released before buf is resized
        n = len(buf)
        pos = 0
        deliver = self.deliver
        fast = self.fast_path_enabled()
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
                    length = 0        # malformed: paho reports the protocol error
                end = i + length
                if end > n:
                    return False
                if fast and cmd & 0xF6 == 0x30 and length >= 2:   # PUBLISH, QoS 0
                    topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                    start = topic_end
                    if self.v5 and start < end:  # skip the properties
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
                            deliver(topic, view[start:end].tobytes())
                    pos = end
                    continue
                self._paho_pos, self._paho_limit = pos, end
                if self.client.loop_read():
                    return True
                pos = end
                fast = self.fast_path_enabled()
            return False
        finally:
            view.release()
            del buf[:pos]
            self._paho_pos = self._paho_limit = 0
