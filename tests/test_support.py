"""Proof that the test support (tests/support/) works, with plain paho clients only (no exporter)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from tests.support import (
    kill_proc,
    mqtt_client,
    port_accepts,
    retained,
    site,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)


class Conn:
    """A paho client (loop_start) that records on_connect/on_disconnect and never reconnects:
    on a broker-side close it calls disconnect() from the callback, which ends paho's loop
    (otherwise two clients with one id would take each other over forever)."""

    def __init__(self, broker, client_id="", protocol=mqtt.MQTTv311, keepalive=60,
                 anonymous=False, **kw):
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: list = []
        self.disconnects: list[tuple[int, bool]] = []
        creds = None if anonymous else getattr(broker, "credentials", None)
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=protocol, **kw)
        if creds:
            self.c.username_pw_set(*creds)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.broker, self.keepalive = broker, keepalive

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack.append(reason_code.value)
        if not reason_code.is_failure:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects.append((reason_code.value, flags.is_disconnect_packet_from_server))
        self.disconnected.set()
        client.disconnect()  # stop paho's own reconnect loop

    def start(self):
        self.c.connect(self.broker.host, self.broker.port, keepalive=self.keepalive)
        self.c.loop_start()
        return self

    def wait_connected(self, timeout=5.0):
        wait_until(self.connected.is_set, timeout, message=f"connack; got {self.connack}")
        return self

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


@pytest.fixture
def conns():
    made: list[Conn] = []

    def make(*a, **kw) -> Conn:
        c = Conn(*a, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def time_wait_on(port: int) -> int:
    """Sockets in TIME_WAIT whose local port is ``port`` (from /proc/net/tcp)."""
    n = 0
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            local, state = line.split()[1], line.split()[3]
            if int(local.split(":")[1], 16) == port and state == "06":
                n += 1
    return n


# ------------------------------------------------------------------ basics


@pytest.mark.timeout(5)
def test_wait_until_returns_value_or_raises_with_last_value():
    calls = iter(range(100))
    assert wait_until(lambda: next(calls) >= 3 and "yes", 2, interval=0.001) == "yes"
    with pytest.raises(AssertionError, match=r"the thing.*last value: 0"):
        wait_until(lambda: 0, 0.05, message="the thing")


# ------------------------------------------------------------------ Broker


@pytest.mark.timeout(20)
def test_broker_stop_and_restart_on_the_same_port_despite_time_wait(broker, conns):
    port, first_pid = broker.port, broker.pid
    c = conns(broker, "tw").start().wait_connected()
    broker.stop()
    assert not port_accepts(broker.host, port)
    wait_until(c.disconnected.is_set, 5, message="client saw the broker go")
    # The broker closed first, so the server side of that connection sits in TIME_WAIT...
    assert time_wait_on(port) >= 1
    # ...and mosquitto (SO_REUSEADDR) binds the same port regardless.
    broker.start()
    assert broker.port == port and broker.pid != first_pid
    conns(broker, "after-start").start().wait_connected()
    pid2 = broker.pid
    broker.restart()
    assert broker.port == port and broker.pid != pid2 and broker.running
    conns(broker, "after-restart").start().wait_connected()
    log = broker.log_text()
    assert log.count("mosquitto version 2.0.11 starting") == 3
    assert log.count("terminating") == 2
    broker.kill()
    assert not broker.running


@pytest.mark.timeout(15)
def test_freeze_stalls_connect_and_thaw_resumes(broker, conns):
    broker.freeze()
    try:
        c = conns(broker, "frozen").start()  # TCP handshake done by the kernel backlog
        assert not c.connected.wait(1.0), "a frozen broker sent CONNACK"
        # a raw MQTT CONNECT gets no answer either: the read times out
        with socket.create_connection((broker.host, broker.port), timeout=2) as s:
            s.sendall(bytes.fromhex("100c00044d5154540402003c0000"))
            s.settimeout(0.5)
            with pytest.raises(socket.timeout):
                s.recv(4)
    finally:
        broker.thaw()
    c.wait_connected(5)
    assert broker.connects("frozen") == 1


@pytest.mark.timeout(15)
def test_broker_with_users_requires_the_password(broker_factory, conns):
    b = broker_factory(users={"backend": "s3cret", "other": "pw2"})
    assert b.credentials == ("backend", "s3cret")
    assert "allow_anonymous false" in b.conf_path.read_text()
    anon = conns(b, "anon", anonymous=True).start()
    wait_until(lambda: anon.connack, 5, message="CONNACK for anonymous")
    assert anon.connack == [135]  # v3.1.1 rc 5 -> paho "Not authorized"
    ok = conns(b, "authed").start().wait_connected()
    ok.close()
    wait_until(lambda: b.disconnects("authed") == 1, 5)
    assert b.connects("authed") == 1 and b.connects("anon") == 0
    assert "u'backend'" in b.log_text()
    assert retained(b, "nothing/here") is None  # helpers authenticate as the first user


@pytest.mark.timeout(15)
def test_log_accounting_normal_client(broker, conns):
    a = conns(broker, "solo").start().wait_connected()
    a.close()  # clean DISCONNECT -> "Client solo disconnected."
    wait_until(lambda: broker.disconnects("solo") == 1, 5, message=broker.log_text())
    b = conns(broker, "solo").start().wait_connected()
    b.c.loop_stop()
    b.c.socket().close()  # no DISCONNECT -> "Client solo closed its connection."
    wait_until(lambda: broker.disconnects("solo") == 2, 5, message=broker.log_text())
    kinds = [k for _, k, cid in broker.events() if cid == "solo"]
    assert kinds == ["connect", "disconnect", "connect", "disconnect"]
    assert broker.connects("solo") == 2
    assert broker.takeovers() == 0
    assert broker.max_concurrent("solo") == 1
    assert broker.live("solo") == 0
    assert "Client solo closed its connection." in broker.log_text()


@pytest.mark.timeout(15)
@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_log_accounting_takeover(broker, conns, protocol):
    first = conns(broker, "dup", protocol=protocol).start().wait_connected()
    second = conns(broker, "dup", protocol=protocol).start().wait_connected()
    wait_until(first.disconnected.is_set, 5, message="first client kicked")
    wait_until(lambda: broker.takeovers("dup") == 1 and broker.connects("dup") == 2, 5,
               message=broker.log_text())
    # 2.0.11 closes the socket without a DISCONNECT packet, v3.1.1 and v5 alike: paho says 128.
    assert first.disconnects[0] == (128, False)
    assert broker.max_concurrent("dup") == 2
    assert broker.takeovers() == 1
    assert broker.live("dup") == 1
    assert [k for _, k, c in broker.events() if c == "dup"] == ["connect", "takeover", "connect"]
    second.close()
    wait_until(lambda: broker.live("dup") == 0, 5)
    assert broker.max_concurrent("dup") == 2 and broker.takeovers("dup") == 1


# ------------------------------------------------------------------ StatusWatcher


@pytest.mark.timeout(15)
def test_status_watcher_sees_retained_message(broker, status_watcher):
    pub = mqtt_client(broker, "publisher")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        pub.publish("s1/backend/status", "online", qos=1, retain=True).wait_for_publish(5)
    finally:
        pub.disconnect()
        pub.loop_stop()
    w = status_watcher(broker)
    t = w.wait_for("s1/backend/status", "online", 5)
    assert w.find("s1/backend/status", "online")[3] is True  # retain flag
    assert t <= time.monotonic()
    assert w.payloads("s1/backend/status") == ["online"]
    assert retained(broker, "s1/backend/status") == "online"
    assert retained(broker, "s2/backend/status") is None
    with pytest.raises(AssertionError, match="offline"):
        w.wait_for("s1/backend/status", "offline", 0.2)


WILL_CLIENT = textwrap.dedent(
    """
    import sys, time
    import paho.mqtt.client as m
    port, cid, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    c = m.Client(m.CallbackAPIVersion.VERSION2, client_id=cid)
    c.will_set(topic, "offline", qos=1, retain=True)
    c.on_connect = lambda cl, u, f, rc, p: cl.publish(topic, "online", qos=1, retain=True)
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    time.sleep(30)  # lifetime cap; the test SIGKILLs it long before
    """
)


@pytest.mark.timeout(20)
def test_will_after_sigkilled_client(broker, status_watcher):
    w = status_watcher(broker)
    topic = "w1/backend/status"
    proc = subprocess.Popen([sys.executable, "-c", WILL_CLIENT, str(broker.port), "willer", topic],
                            stdin=subprocess.DEVNULL)
    try:
        w.wait_for(topic, "online", 10)
        t0 = time.monotonic()
        proc.kill()
        t_off = w.wait_for(topic, "offline", 5, after=t0)
        proc.wait(5)
    finally:
        kill_proc(proc)
    latency = t_off - t0
    print(f"will latency after SIGKILL: {latency * 1000:.1f} ms")
    assert 0 <= latency < 1.0
    assert w.payloads(topic) == ["online", "offline"]
    assert retained(broker, topic) == "offline"
    wait_until(lambda: broker.disconnects("willer") == 1, 5)
    assert "Client willer closed its connection." in broker.log_text()
    assert broker.max_concurrent("willer") == 1 and broker.live("willer") == 0


# ------------------------------------------------------------------ FakeV5Broker


@pytest.mark.timeout(10)
def test_fake_v5_broker_kicks_with_session_taken_over(fake_v5_factory, conns):
    fake = fake_v5_factory(kick_after=0.2)
    c = conns(fake, "site-a/backend", protocol=mqtt.MQTTv5)
    c.c.will_set("site-a/backend/status", "offline", qos=1, retain=True)
    c.start().wait_connected()
    wait_until(c.disconnected.is_set, 5, message="kick")
    assert c.disconnects[0] == (142, True)
    assert fake.client_ids() == ["site-a/backend"]
    info = fake.connects[0]
    assert (info.protocol_level, info.clean_start, info.keepalive) == (5, True, 60)
    assert (info.will_flag, info.will_topic, info.will_payload, info.will_qos, info.will_retain) == (
        True, "site-a/backend/status", b"offline", 1, True)
    assert len(fake.kicks) == 1


@pytest.mark.timeout(10)
def test_fake_v5_broker_answers_subscribe_publish_ping(fake_v5_factory, conns):
    fake = fake_v5_factory()
    c = conns(fake, "plain", protocol=mqtt.MQTTv5)
    subacks, pubacks = [], []
    c.c.on_subscribe = lambda cl, u, mid, rcs, p: subacks.append([rc.value for rc in rcs])
    c.c.on_publish = lambda cl, u, mid, rc, p: pubacks.append(mid)
    c.start().wait_connected()
    c.c.subscribe([("a/#", 1), ("b", 0), ("c", 2)])
    info = c.c.publish("x/y", "hello", qos=1, retain=True)
    wait_until(lambda: subacks and pubacks, 5, message="SUBACK and PUBACK")
    assert subacks == [[1, 0, 1]] and pubacks == [info.mid]
    assert [(t, p, q, r) for _, t, p, q, r in fake.published] == [("x/y", b"hello", 1, True)]
    # PINGREQ -> PINGRESP, and a v3.1.1 CONNECT gets a v3.1.1 CONNACK, on a raw socket
    with socket.create_connection((fake.host, fake.port), timeout=2) as s:
        s.sendall(bytes.fromhex("100d00044d5154540402003c000152") + b"\xc0\x00")
        got = b""
        for _ in range(10):
            if len(got) >= 6:
                break
            got += s.recv(6 - len(got))
        assert got == bytes.fromhex("20020000d000")
    assert fake.client_ids() == ["plain", "R"]
    assert fake.connects[1].protocol_level == 4
    assert not c.disconnects


# ------------------------------------------------------------------ ExporterProcess (stand-in)

STAND_IN = textwrap.dedent(
    """
    # Stand-in for `python -m exporter run`: only proves ExporterProcess's plumbing.
    import json, os, signal, sys, yaml
    from http.server import BaseHTTPRequestHandler, HTTPServer
    sites = yaml.safe_load(open(os.environ["MQTT_SITES_FILE"]))["sites"]
    host, port = os.environ["EXPORTER_LISTEN"].split(":")
    METRICS = "# TYPE mqtt_site_connects counter\\n" + "".join(
        f'mqtt_site_connects_total{{site="{s["name"]}"}} {i + 1}\\n' for i, s in enumerate(sites))
    METRICS += "# TYPE mqtt_exporter_up gauge\\nmqtt_exporter_up 1\\n"
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/health"):
                body = json.dumps({"status": "ok", "instance": os.environ["MQTT_INSTANCE_ID"],
                                   "verbose": "verbose" in self.path,
                                   "state_dir": os.environ["MQTT_STATE_DIR"],
                                   "extra": os.environ.get("EXTRA_VAR"),
                                   "sites": [s["name"] for s in sites]}).encode()
                code, ctype = 200, "application/json"
            elif self.path == "/metrics":
                body, code, ctype = METRICS.encode(), 200, "text/plain; version=0.0.4"
            else:
                body, code, ctype = b"nope", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    srv = HTTPServer((host, int(port)), H)
    def bye(*_):
        print("shutting down on SIGTERM", flush=True)
        os._exit(0)
    signal.signal(signal.SIGTERM, bye)
    print(f"listening on {host}:{port} with {len(sites)} sites, stdin={sys.stdin.read()!r}", flush=True)
    srv.serve_forever()
    """
)


@pytest.mark.timeout(20)
def test_exporter_process_plumbing_with_a_stand_in(broker, exporter_factory, tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    shared = tmp_path / "shared"
    ex = exporter_factory([site("a", broker), site("b", broker, client_id="x")], instance_id="i1",
                          state_dir=shared, env={"EXTRA_VAR": "yes"},
                          command=[sys.executable, str(script)])
    ex.wait_ready(10)
    m = ex.wait_log(r"listening on 127\.0\.0\.1:(\d+) with 2 sites, stdin=''", 5)
    assert int(m.group(1)) == ex.port and ex.url == f"http://127.0.0.1:{ex.port}"
    status, body = ex.health(verbose=True)
    assert status == 200 and body["instance"] == "i1" and body["verbose"] is True
    assert body["sites"] == ["a", "b"] and body["extra"] == "yes"
    assert body["state_dir"] == str(shared / "state")
    assert ex.http_get("/nope")[0] == 404
    assert ex.metric("mqtt_site_connects_total", site="b") == 2.0
    assert ex.metric("mqtt_exporter_up") == 1.0
    assert ex.metric("mqtt_site_connects_total", site="zzz") is None
    assert ex.wait_metric("mqtt_site_connects_total", lambda v: v == 1.0, 2, site="a") == 1.0
    assert ("mqtt_site_connects_total", frozenset({("site", "a")})) in ex.metrics()
    ex.terminate()
    assert ex.wait_exit(5) == 0 and ex.returncode == 0
    assert "shutting down on SIGTERM" in ex.log_text()
    assert "site: a" not in ex.log_text() and "name: a" in ex.sites_file.read_text()


@pytest.mark.timeout(10)
def test_exporter_factory_kills_a_frozen_process(exporter_factory, broker, tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    ex = exporter_factory([site("a", broker)], command=[sys.executable, str(script)])
    ex.wait_ready(10)
    ex.signal(signal.SIGSTOP)
    ex.cleanup()  # what the fixture does at teardown
    assert ex.returncode == -signal.SIGKILL


# ------------------------------------------------------------------ amqtt: a broker that never kicks


@pytest.mark.timeout(30)
def test_amqtt_keeps_both_clients_with_one_id_connected_and_only_the_newest_hears(
        amqtt_broker, conns):
    """The fact the duplicate detection is built for: amqtt 0.12.1 never kicks the old client.

    Two raw paho clients, one client ID, clean session (the exporter's default), both subscribed:
    the second CONNECT gets a CONNACK and the first connection stays open; for 3 s (keepalive
    1 s, so several PINGREQ rounds) the first one keeps getting PUBACKs for its own publishes,
    which reach the second one, and neither sees a disconnect. Messages of a third client reach
    only the second one: the first is connected but deaf (amqtt dropped its session's
    subscriptions when the second connected). amqtt logs no take-over for clean sessions.
    """
    received: dict[str, list[str]] = {"old": [], "new": []}
    subacks: dict[str, int] = {"old": 0, "new": 0}
    pair = {}
    for name in ("old", "new"):
        c = conns(amqtt_broker, client_id="site_dup_itest", keepalive=1)
        c.c.on_message = lambda cl, u, m, name=name: received[name].append(m.payload.decode())
        c.c.on_subscribe = lambda cl, u, mid, rcs, p, name=name: subacks.__setitem__(name, subacks[name] + 1)
        c.start().wait_connected()
        c.c.subscribe("dup/#", qos=1)
        wait_until(lambda name=name: subacks[name] == 1, 5, message=f"{name} SUBACK")
        pair[name] = c
    old, new = pair["old"], pair["new"]

    other = conns(amqtt_broker, client_id="harness-pub").start().wait_connected()
    for i in range(5):
        other.c.publish("dup/x", f"m{i}", qos=1).wait_for_publish(5)
    wait_until(lambda: len(received["new"]) == 5, 5, message=f"new got {received['new']}")

    start, rounds = time.monotonic(), 0
    while time.monotonic() - start < 3.0:  # active: every round needs the old link alive
        tag = f"r{rounds}"
        old.c.publish("dup/from-old", tag, qos=1).wait_for_publish(5)
        wait_until(lambda tag=tag: tag in received["new"], 5, message=f"old's {tag} at new")
        rounds += 1
    assert old.c.is_connected() and new.c.is_connected()
    assert old.disconnects == [] and new.disconnects == []
    assert old.connack == [0] and new.connack == [0]
    assert received["old"] == []  # connected, PUBACKed, PINGed, and deaf
    assert received["new"][:5] == [f"m{i}" for i in range(5)]
    assert amqtt_broker.takeovers() == 0
