"""A packet that breaks a callback costs one message, never the site's connection loop.

A scripted MQTT 3.1.1 peer on loopback answers CONNECT and SUBSCRIBE, then sends a QoS 1
PUBLISH whose topic is not UTF-8 (paho's message.topic raises inside our on_message), then
a valid QoS 0 PUBLISH. The exporter runs as a real subprocess.
"""
import socket
import threading

import pytest

from harness import HOST, wait_until

BAD_TOPIC_QOS1 = b"\x32\x07\x00\x02\xff\xfe\x00\x05x"   # topic b"\xff\xfe", packet id 5
GOOD_QOS0 = b"\x30\x0c\x00\x09site_a/ok" + b"1"


def _read_packet(conn) -> bytes:
    head = conn.recv(1)
    if not head:
        raise ConnectionError("closed")
    length, shift = 0, 0
    while True:
        byte = conn.recv(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head + body


class ScriptedPeer:
    def __init__(self, suback_code: int = 0):
        self.suback_code = suback_code
        self.srv = socket.create_server((HOST, 0))
        self.port = self.srv.getsockname()[1]
        self.connections = 0
        self.pubacks_from_client = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            while True:
                conn, _ = self.srv.accept()
                self.connections += 1
                threading.Thread(target=self._session, args=(conn,), daemon=True).start()
        except OSError:
            return

    def _session(self, conn):
        try:
            while True:
                packet = _read_packet(conn)
                kind = packet[0] & 0xF0
                if kind == 0x10:                       # CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind == 0x80:                     # SUBSCRIBE -> SUBACK, then the test
                    conn.sendall(b"\x90\x03" + packet[1:3] + bytes([self.suback_code])
                                 + BAD_TOPIC_QOS1 + GOOD_QOS0)
                elif kind == 0x30 and packet[0] & 0x06:  # our QoS 1 "online" -> PUBACK
                    topic_len = int.from_bytes(packet[1:3], "big")
                    conn.sendall(b"\x40\x02" + packet[3 + topic_len:5 + topic_len])
                elif kind == 0x40:                     # the exporter acked the bad PUBLISH
                    self.pubacks_from_client.append(packet)
                elif kind == 0xC0:                     # PINGREQ
                    conn.sendall(b"\xd0\x00")
        except (OSError, IndexError):
            conn.close()

    def close(self):
        self.srv.close()


@pytest.fixture
def peer():
    p = ScriptedPeer()
    yield p
    p.close()


@pytest.mark.timeout(60)
def test_callback_error_drops_one_message_and_the_site_lives_on(peer, exporter_factory):
    exp = exporter_factory([{"name": "site_a", "host": HOST, "port": peer.port}])
    exp.wait_ready()
    exp.wait_metric("mqtt_site_messages_received_total", lambda v: v == 1, 15, site="site_a")
    wait_until(lambda: peer.pubacks_from_client, 10, message="PUBACK for the bad PUBLISH")
    assert exp.metric("mqtt_site_up", site="site_a") == 1
    assert exp.metric("mqtt_site_connects_total", site="site_a") == 1
    assert peer.connections == 1
    assert "Traceback" not in exp.log_text(), exp.log_tail(30)


@pytest.mark.timeout(60)
def test_refused_subscription_is_logged_and_shown_in_health(exporter_factory):
    peer = ScriptedPeer(suback_code=0x80)  # e.g. an ACL refusing site_a/#
    try:
        exp = exporter_factory([{"name": "site_a", "host": HOST, "port": peer.port}])
        exp.wait_log(r"refused 1 of the subscriptions \['site_a/#'\]", 15)
        _, body = exp.health(verbose=True)
        assert body["sites"][0]["subscriptions_refused"] == 1
    finally:
        peer.close()
