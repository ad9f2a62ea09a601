"""A scripted MQTT peer on a raw socket: a broker whose every byte the test decides."""
from __future__ import annotations

import dataclasses
import socket
import struct
import threading
import time

from exporter import wire
from exporter.wire import decode_varint as _read_varint
from exporter.wire import read_string as _read_str

from .net import HOST

# --------------------------------------------------------------------------- fake MQTT 5 peer


@dataclasses.dataclass
class ConnectInfo:
    time: float
    client_id: str
    protocol_level: int
    clean_start: bool
    keepalive: int
    will_flag: bool = False
    will_qos: int = 0
    will_retain: bool = False
    will_topic: str | None = None
    will_payload: bytes | None = None
    username: str | None = None


def parse_connect(body: bytes, now: float | None = None) -> ConnectInfo:
    """Parse the variable header + payload of a CONNECT (v3.1.1 or v5)."""
    _, i = _read_str(body, 0)  # protocol name "MQTT"
    level, flags = body[i], body[i + 1]
    keepalive = int.from_bytes(body[i + 2:i + 4], "big")
    i += 4
    if level == 5:
        plen, i = _read_varint(body, i)
        i += plen
    cid, i = _read_str(body, i)
    info = ConnectInfo(
        time=time.monotonic() if now is None else now,
        client_id=cid.decode("utf-8", "replace"),
        protocol_level=level,
        clean_start=bool(flags & 0x02),
        keepalive=keepalive,
        will_flag=bool(flags & 0x04),
        will_qos=(flags >> 3) & 3,
        will_retain=bool(flags & 0x20),
    )
    if info.will_flag:
        if level == 5:
            plen, i = _read_varint(body, i)
            i += plen
        topic, i = _read_str(body, i)
        info.will_topic = topic.decode("utf-8", "replace")
        info.will_payload, i = _read_str(body, i)
    if flags & 0x80:
        user, i = _read_str(body, i)
        info.username = user.decode("utf-8", "replace")
    return info


class FakeV5Broker:
    """A minimal scripted MQTT peer on a raw socket at 127.0.0.1:<free port>.

    Answers CONNECT with CONNACK success (v5: ``20 03 00 00 00``, v3.1.1: ``20 02 00 00``),
    PINGREQ with PINGRESP, SUBSCRIBE with SUBACK (QoS min(requested, 1)), UNSUBSCRIBE with
    UNSUBACK, PUBLISH QoS 1 with PUBACK and QoS 2 with PUBREC/PUBCOMP. With ``kick_after``
    seconds, every connection then gets DISCONNECT ``kick_reason`` (default 0x8E "Session taken
    over": ``E0 02 8E 00``, v5 only) and is closed. Records ``connections`` [(monotonic, client
    id)], ``connects`` [ConnectInfo], ``published`` [(monotonic, topic, payload, qos, retain)],
    ``kicks`` [(monotonic, client id)], ``pubacks`` [packet id] sent by the client.
    ``suback_code`` overrides every SUBACK return code (0x80: refused, as an ACL would),
    ``after_suback`` is written right after each SUBACK (scripted traffic for the client),
    except the SUBACK of a SUBSCRIBE to presence topics only (``*/backend/instance``, the
    exporter's separate presence subscription) unless ``presence_traffic`` is true;
    with ``dribble=(n, interval)`` it is written ``n`` bytes every ``interval`` seconds, the
    way a slow link delivers it (packets from the client are answered only once it is all
    written, as a broker queues its replies behind a message in flight), and
    ``after_suback_done`` records (monotonic) when each one was fully written.
    ``reset_on_accept`` resets every connection as soon as the kernel accepted it (a
    broker dying right after accept), counting them in ``accepted``. ``disconnects``
    records [(monotonic, client id, reason code or None)] for each DISCONNECT received.
    """

    host = HOST

    def __init__(self, kick_after: float | None = None, kick_reason: int = 0x8E,
                 suback_code: int | None = None, after_suback: bytes = b"",
                 reset_on_accept: bool = False, dribble: tuple[int, float] | None = None,
                 presence_traffic: bool = False):
        self.kick_after = kick_after
        self.kick_reason = kick_reason
        self.suback_code = suback_code
        self.after_suback = after_suback
        self.reset_on_accept = reset_on_accept
        self.dribble = dribble
        self.presence_traffic = presence_traffic
        #: Topic filters of every SUBSCRIBE received, in order: [[filter, ...], ...].
        self.subscriptions: list[list[str]] = []
        self.after_suback_done: list[float] = []
        self.disconnects: list[tuple[float, str, int | None]] = []
        self.accepted = 0
        self.pubacks: list[bytes] = []
        self.connections: list[tuple[float, str]] = []
        self.connects: list[ConnectInfo] = []
        self.published: list[tuple[float, str, bytes, int, bool]] = []
        self.kicks: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind((HOST, 0))
        self._srv.listen(64)
        self._srv.settimeout(0.2)
        self.port = self._srv.getsockname()[1]
        self._spawn(self._accept_loop)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"fakev5-{self.port}")
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.reset_on_accept:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            conn.settimeout(0.2)
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn)

    def _recv_exact(self, conn: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            if self._closed.is_set():
                return None
            try:
                chunk = conn.recv(n - len(buf))
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _read_packet(self, conn: socket.socket) -> tuple[int, bytes] | None:
        head = self._recv_exact(conn, 1)
        if head is None:
            return None
        length, mult = 0, 1
        for _ in range(4):
            b = self._recv_exact(conn, 1)
            if b is None:
                return None
            length += (b[0] & 0x7F) * mult
            if not b[0] & 0x80:
                break
            mult *= 128
        body = self._recv_exact(conn, length) if length else b""
        if body is None:
            return None
        return head[0], body

    def _serve(self, conn: socket.socket) -> None:
        wlock = threading.Lock()
        state = {"level": 4, "cid": None, "gone": False}

        def send(data: bytes) -> None:
            with wlock:
                if not state["gone"]:
                    try:
                        conn.sendall(data)
                    except OSError:
                        state["gone"] = True

        def kick() -> None:
            if self._closed.wait(self.kick_after) or state["gone"]:
                return
            with self._lock:
                self.kicks.append((time.monotonic(), state["cid"]))
            send(bytes([0xE0, 0x02, self.kick_reason, 0x00]))
            with wlock:
                state["gone"] = True
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        try:
            while not self._closed.is_set():
                pkt = self._read_packet(conn)
                if pkt is None:
                    return
                first, body = pkt
                ptype = first >> 4
                v5 = state["level"] == 5
                if ptype == 1:  # CONNECT
                    info = parse_connect(body)
                    state["level"], state["cid"] = info.protocol_level, info.client_id
                    with self._lock:
                        self.connects.append(info)
                        self.connections.append((info.time, info.client_id))
                    send(wire.connack(v5=info.protocol_level == 5))
                    if self.kick_after is not None:
                        self._spawn(kick)
                elif ptype == 12:  # PINGREQ
                    send(wire.PINGRESP)
                elif ptype == 8:  # SUBSCRIBE
                    pid, i = body[:2], 2
                    if v5:
                        plen, i = _read_varint(body, i)
                        i += plen
                    codes = bytearray()
                    filters: list[str] = []
                    while i < len(body):
                        raw, i = _read_str(body, i)
                        filters.append(raw.decode("utf-8", "replace"))
                        codes.append(min(body[i] & 0x03, 1) if self.suback_code is None
                                     else self.suback_code)
                        i += 1
                    send(wire.suback(int.from_bytes(pid, "big"), codes, v5))
                    with self._lock:
                        self.subscriptions.append(filters)
                    presence_only = all(f.endswith("/backend/instance") for f in filters)
                    if self.presence_traffic or not presence_only:
                        self._send_after_suback(send, state)
                elif ptype == 10:  # UNSUBSCRIBE
                    pid, i = body[:2], 2
                    if v5:
                        plen, i = _read_varint(body, i)
                        i += plen
                    n = 0
                    while i < len(body):
                        _, i = _read_str(body, i)
                        n += 1
                    payload = pid + (b"\x00" + b"\x00" * n if v5 else b"")
                    send(b"\xb0" + wire.encode_varint(len(payload)) + payload)
                elif ptype == 3:  # PUBLISH
                    qos, retain = (first >> 1) & 3, bool(first & 1)
                    topic, i = _read_str(body, 0)
                    pid = b""
                    if qos:
                        pid, i = body[i:i + 2], i + 2
                    if v5:
                        plen, i = _read_varint(body, i)
                        i += plen
                    with self._lock:
                        self.published.append(
                            (time.monotonic(), topic.decode("utf-8", "replace"), body[i:], qos, retain))
                    if qos == 1:
                        send(b"\x40\x02" + pid)
                    elif qos == 2:
                        send(b"\x50\x02" + pid)
                elif ptype == 4:  # PUBACK from the client
                    with self._lock:
                        self.pubacks.append(body[:2])
                elif ptype == 6:  # PUBREL
                    send(b"\x70\x02" + body[:2])
                elif ptype == 14:  # DISCONNECT
                    with self._lock:
                        self.disconnects.append(
                            (time.monotonic(), state["cid"], body[0] if body else None))
                    return
        except (IndexError, ValueError):
            return  # malformed: drop the connection
        finally:
            with wlock:
                state["gone"] = True
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _send_after_suback(self, send, state: dict) -> None:
        data = self.after_suback
        if not data:
            return
        if self.dribble is None:
            send(data)
        else:
            step, interval = self.dribble
            for i in range(0, len(data), step):
                if i and self._closed.wait(interval):  # pacing, not synchronisation
                    return
                if state["gone"]:
                    return
                send(data[i:i + step])
        if not state["gone"]:
            with self._lock:
                self.after_suback_done.append(time.monotonic())

    def client_ids(self) -> list[str]:
        with self._lock:
            return [cid for _, cid in self.connections]

    def close(self) -> None:
        self._closed.set()
        try:
            self._srv.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)

    cleanup = close

    def __repr__(self) -> str:
        return f"<FakeV5Broker {HOST}:{self.port} connections={len(self.connections)}>"

