"""Fast in-process unit tests of the pure parts: reconnect policy, health, state, metrics,
the farewell bytes and the status table.

No gevent monkey patching happens here. exporter.connection is imported only for
``farewell_packets``: it imports gevent (not patched), which is harmless in-process.
"""

from __future__ import annotations

import json
import logging
import os
import random

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.cli import format_status_table
from exporter.health import CRITICAL, DEGRADED, HEALTHY, HTTP_STATUS, health_report, overall_status
from exporter.metrics import ServiceCollector, build_registry
from exporter.reconnect import (
    JITTER,
    KEEP_ALIVE_TIMEOUT,
    SESSION_TAKEN_OVER,
    ConnectionEnd,
    Decision,
    ReconnectPolicy,
)
from exporter.state import (
    CONNECTION_LOST,
    DISCONNECT_REASONS,
    KEEPALIVE_TIMEOUT,
    REFUSED,
    SHUTDOWN_DURATION_BUCKETS,
    SITE_STATES,
    TAKEOVER,
    HistogramData,
    ShutdownHistory,
    SiteState,
)

pytestmark = pytest.mark.timeout(10)

# paho 2.2 on v3.1.1: every broker-side close is reason 128 with no packet from the server.
UNSPECIFIED = 128

REFUSED_END = ConnectionEnd(connected=False)


def short_close(uptime: float = 0.5, code: int = UNSPECIFIED, from_server: bool = False):
    return ConnectionEnd(connected=True, uptime=uptime, reason_code=code, from_server=from_server)


def long_close(uptime: float = 300.0, code: int = UNSPECIFIED, from_server: bool = False):
    return ConnectionEnd(connected=True, uptime=uptime, reason_code=code, from_server=from_server)


def policy(seed: int = 7, **kw) -> ReconnectPolicy:
    args = dict(backoff_min=1.0, backoff_max=60.0, stable_seconds=10.0, cooldown_seconds=30.0)
    args.update(kw)
    return ReconnectPolicy(rng=random.Random(seed), **args)


def assert_jittered(delay: float, nominal: float) -> None:
    assert (1.0 - JITTER) * nominal <= delay <= nominal, (delay, nominal)
    assert 0.8 * nominal <= delay <= nominal, (delay, nominal)


# =========================================================================== reconnect


@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_backoff_doubles_from_min_to_max_with_jitter(seed):
    p = policy(seed)
    decisions = [p.next(REFUSED_END) for _ in range(12)]
    nominal = [min(60.0, 1.0 * 2 ** n) for n in range(12)]
    assert [d.reason for d in decisions] == [REFUSED] * 12
    assert not any(d.cooldown for d in decisions)
    for d, nom in zip(decisions, nominal):
        assert_jittered(d.delay, nom)
    # Capped at the maximum: the last ones are all within jitter of 60.
    assert all(48.0 <= d.delay <= 60.0 for d in decisions[6:])
    # Jitter really varies the delays (not always the nominal value).
    assert any(d.delay < nom for d, nom in zip(decisions, nominal))


def test_backoff_is_reproducible_with_a_seeded_rng():
    pa, pb = policy(99), policy(99)
    assert [pa.next(REFUSED_END).delay for _ in range(8)] == [pb.next(REFUSED_END).delay for _ in range(8)]


def test_backoff_resets_only_after_a_stable_connection():
    p = policy(3)
    for _ in range(4):
        p.next(REFUSED_END)  # nominal 1, 2, 4, 8
    # A short-lived connection (up 2 s < stable 10 s) does not reset the backoff.
    d = p.next(short_close(uptime=2.0))
    assert d.reason == CONNECTION_LOST and not d.cooldown
    assert_jittered(d.delay, 16.0)
    # A refused attempt keeps doubling.
    assert_jittered(p.next(REFUSED_END).delay, 32.0)
    # A connection that stayed up stable_seconds resets it to the minimum...
    d = p.next(long_close(uptime=10.0))
    assert d.reason == CONNECTION_LOST
    assert_jittered(d.delay, 1.0)
    # ...and it grows again from there.
    assert_jittered(p.next(REFUSED_END).delay, 2.0)
    assert_jittered(p.next(REFUSED_END).delay, 4.0)


def test_connect_then_kick_loop_keeps_backing_off_and_becomes_a_takeover():
    p = policy(11)
    decisions = [p.next(short_close(uptime=0.5)) for _ in range(8)]
    # First short close: could be anything (network blip): plain backoff.
    assert decisions[0].reason == CONNECTION_LOST and not decisions[0].cooldown
    assert_jittered(decisions[0].delay, 1.0)
    # Second short close in a row: takeover, with the cooldown, and it stays one.
    for d in decisions[1:]:
        assert d == Decision(TAKEOVER, 30.0, True)
    delays = [d.delay for d in decisions]
    assert delays == sorted(delays), f"delay shrank in a kick loop: {delays}"
    # The backoff never reset: every attempt counted as a failure.
    assert p.failures == 8
    assert p.backoff_delay(p.failures) >= 0.8 * 60.0


def test_connect_then_kick_loop_never_shrinks_the_delay_with_zero_cooldown():
    p = policy(11, cooldown_seconds=0.0)
    delays = [p.next(short_close(uptime=0.5)).delay for _ in range(6)]
    assert delays == sorted(delays) and delays[-1] > 0, delays


def test_v5_session_taken_over_is_a_takeover_on_the_first_close():
    p = policy()
    d = p.next(short_close(uptime=0.5, code=SESSION_TAKEN_OVER, from_server=True))
    assert SESSION_TAKEN_OVER == 0x8E
    assert d == Decision(TAKEOVER, 30.0, True)
    # Even on a long-lived connection: the broker says so explicitly.
    p2 = policy()
    assert p2.next(long_close(code=0x8E, from_server=True)).reason == TAKEOVER


@pytest.mark.parametrize("uptime", [0.5, 300.0])
def test_reason_141_is_keepalive_timeout(uptime):
    assert KEEP_ALIVE_TIMEOUT == 141
    p = policy()
    d = p.next(ConnectionEnd(connected=True, uptime=uptime, reason_code=141))
    assert d.reason == KEEPALIVE_TIMEOUT and not d.cooldown


def test_long_lived_close_is_connection_lost_and_resets():
    p = policy(5)
    for _ in range(5):
        p.next(REFUSED_END)
    p.next(short_close())  # one short close on record
    d = p.next(long_close(uptime=120.0))
    assert d.reason == CONNECTION_LOST and not d.cooldown
    assert_jittered(d.delay, 1.0)
    # The short-close evidence was reset too: a single short close afterwards is no takeover.
    assert p.next(short_close()).reason == CONNECTION_LOST


def test_failed_attempt_is_refused():
    p = policy()
    d = p.next(ConnectionEnd(connected=False))
    assert d.reason == REFUSED and not d.cooldown
    assert_jittered(d.delay, 1.0)


def test_broker_restart_pattern_never_gives_a_takeover():
    p = policy(17)
    reasons = []
    for _ in range(3):  # several restarts in a row
        reasons.append(p.next(long_close(uptime=3600.0)).reason)  # broker SIGTERM
        reasons += [p.next(REFUSED_END).reason for _ in range(3)]  # broker still down
        # back up: a stable connection follows
    reasons.append(p.next(long_close(uptime=60.0)).reason)
    assert TAKEOVER not in reasons
    assert reasons.count(CONNECTION_LOST) == 4 and reasons.count(REFUSED) == 9
    assert p.short_closes == 0


# =========================================================================== health


def st(name="s", state="connected", enabled=True, **kw) -> SiteState:
    s = SiteState(name=name, client_id=f"{name}_itest", broker="127.0.0.1:1883",
                  protocol="3.1.1", enabled=enabled, state=state if enabled else "disabled")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


@pytest.mark.parametrize(
    "states, running, status, code, counts",
    [
        ([st("a"), st("b")], True, HEALTHY, 200, (2, 2, 2, 0)),
        ([st("a"), st("b", "backoff")], True, DEGRADED, 200, (2, 2, 1, 1)),
        ([st("a", "backoff"), st("b", "cooldown")], True, CRITICAL, 503, (2, 2, 0, 2)),
        ([st("a"), st("b")], False, CRITICAL, 503, (2, 2, 2, 0)),
        ([st("a"), st("b", enabled=False)], True, HEALTHY, 200, (2, 1, 1, 0)),
        # Zero enabled sites: nothing is expected to be connected (documented: critical only
        # "with at least one enabled").
        ([st("a", enabled=False)], True, HEALTHY, 200, (1, 0, 0, 0)),
        ([st("a", enabled=False)], False, CRITICAL, 503, (1, 0, 0, 0)),
    ],
    ids=["healthy", "degraded", "critical", "not-running", "disabled-not-enabled",
         "zero-enabled", "zero-enabled-not-running"],
)
def test_health_report_status_and_counts(states, running, status, code, counts):
    got_code, body = health_report(running, "inst", states, 1000.0)
    assert got_code == code == HTTP_STATUS[status]
    total, enabled, healthy, unhealthy = counts
    assert body == {
        "status": status,
        "service": {"running": running, "instance_id": "inst"},
        "connections": {"total": total, "enabled": enabled, "healthy": healthy,
                        "unhealthy": unhealthy},
    }


def test_http_status_codes_and_overall_status():
    assert HTTP_STATUS == {HEALTHY: 200, DEGRADED: 200, CRITICAL: 503}
    assert overall_status(True, 3, 3) == HEALTHY
    assert overall_status(True, 3, 1) == DEGRADED
    assert overall_status(True, 3, 0) == CRITICAL
    assert overall_status(False, 3, 3) == CRITICAL


def test_health_report_verbose_fields():
    states = [
        st("a", connected_since=1_700_000_000.5, connects=2, messages_received=7,
           last_message_at=1_700_000_100.0, reconnect_attempts=3,
           last_disconnect_reason="connection_lost"),
        st("b", "cooldown", cooldown_until_monotonic=1012.3456, cooldowns=1,
           last_disconnect_reason="takeover"),
        st("c", enabled=False),
    ]
    code, body = health_report(True, "inst", states, 1000.0, verbose=True)
    assert code == 200 and body["status"] == DEGRADED
    sites = body["sites"]
    assert [s["name"] for s in sites] == ["a", "b", "c"]
    required = {"name", "client_id", "enabled", "state", "connected", "connected_since",
                "last_disconnect_reason", "reconnects", "cooldown_remaining_s",
                "messages_received", "last_message_at", "broker"}
    for s in sites:
        assert required <= set(s), required - set(s)
    a, b, c = sites
    assert a["connected"] is True and a["state"] == "connected"
    assert a["connected_since"] == 1_700_000_000.5 and a["reconnects"] == 3
    assert a["messages_received"] == 7 and a["last_message_at"] == 1_700_000_100.0
    assert a["client_id"] == "a_itest" and a["broker"] == "127.0.0.1:1883"
    assert b["state"] == "cooldown" and b["connected"] is False
    assert b["cooldown_remaining_s"] == pytest.approx(12.346, abs=1e-9)
    assert b["last_disconnect_reason"] == "takeover"
    assert c["enabled"] is False and c["state"] == "disabled" and c["cooldown_remaining_s"] == 0
    # Non-verbose has no sites; the body is JSON-serialisable either way.
    assert "sites" not in health_report(True, "inst", states, 1000.0)[1]
    json.dumps(body)


def test_format_status_table_lists_every_site_and_state():
    states = [st("alpha"), st("beta", "cooldown", cooldown_until_monotonic=1010.0), st("gamma", enabled=False)]
    _, body = health_report(True, "inst", states, 1000.0, verbose=True)
    table = format_status_table(body)
    lines = table.splitlines()
    assert lines[0].startswith("DEGRADED") and "inst" in lines[0]
    assert lines[1].split()[:2] == ["SITE", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["alpha"][1] == "connected"
    assert rows["beta"][1] == "cooldown" and "10s" in rows["beta"]
    assert rows["gamma"][1] == "disabled"


# =========================================================================== state


def test_histogram_value_on_a_bound_goes_in_that_bucket():
    h = HistogramData((1.0, 2.0, 5.0))
    for v in (0.5, 1.0, 1.0000001, 2.0, 5.0, 5.1, 100.0):
        h.observe(v)
    # Non-cumulative: le=1 -> {0.5, 1.0}; le=2 -> {1.0000001, 2.0}; le=5 -> {5.0}; +Inf -> 2.
    assert h.counts == [2, 2, 1, 2]
    assert h.count == 7 and h.sum == pytest.approx(114.6000001)
    assert h.cumulative() == [("1.0", 2), ("2.0", 4), ("5.0", 5), ("+Inf", 7)]


def test_histogram_empty_and_shutdown_bounds():
    h = HistogramData(SHUTDOWN_DURATION_BUCKETS)
    assert [le for le, _ in h.cumulative()] == [
        "0.05", "0.1", "0.25", "0.5", "0.75", "1.0", "2.0", "5.0", "10.0", "+Inf"]
    assert all(n == 0 for _, n in h.cumulative())
    h.observe(1.0)  # exactly the alerting threshold: counted as "within 1 s"
    assert dict(h.cumulative())["1.0"] == 1 and dict(h.cumulative())["0.75"] == 0


def test_shutdown_history_round_trip(tmp_path):
    fresh = ShutdownHistory.load(str(tmp_path))
    assert fresh.histogram.count == 0 and fresh.last_timed_out is False
    assert fresh.last_duration is None
    fresh.record(0.3, False)
    fresh.record(1.0, False)
    fresh.record(7.5, True)
    loaded = ShutdownHistory.load(str(tmp_path))
    assert loaded.histogram.counts == fresh.histogram.counts
    assert loaded.histogram.count == 3
    assert loaded.histogram.sum == pytest.approx(8.8)
    assert loaded.last_timed_out is True and loaded.last_duration == 7.5
    assert dict(loaded.histogram.cumulative())["1.0"] == 2
    # And it keeps accumulating across "restarts".
    loaded.record(0.1, False)
    again = ShutdownHistory.load(str(tmp_path))
    assert again.histogram.count == 4 and again.last_timed_out is False


def test_shutdown_history_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    state_dir = tmp_path / "state" / "nested"  # created on demand
    h = ShutdownHistory.load(str(state_dir))
    for i in range(5):
        h.record(0.01 * i, False)
        assert sorted(os.listdir(state_dir)) == [ShutdownHistory.FILENAME]
    data = json.loads((state_dir / ShutdownHistory.FILENAME).read_text())
    assert data["count"] == 5 and data["bounds"] == list(SHUTDOWN_DURATION_BUCKETS)


def test_shutdown_history_failed_write_cleans_up_its_temp_file(tmp_path):
    h = ShutdownHistory.load(str(tmp_path))
    # The target path is a directory: os.replace fails after the temp file was written.
    (tmp_path / ShutdownHistory.FILENAME).mkdir()
    (tmp_path / ShutdownHistory.FILENAME / "x").write_text("keep me non-empty")
    with pytest.raises(OSError):
        h.record(0.2, False)
    assert sorted(os.listdir(tmp_path)) == [ShutdownHistory.FILENAME]


GOOD_FILE = {"bounds": list(SHUTDOWN_DURATION_BUCKETS), "counts": [0] * 10, "sum": 0.0,
             "count": 0, "last_timed_out": False}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        "null",
        json.dumps({**GOOD_FILE, "bounds": [1, 2, 3]}),
        json.dumps({**GOOD_FILE, "counts": [1, 2, 3]}),
        json.dumps({k: v for k, v in GOOD_FILE.items() if k != "sum"}),
        json.dumps({**GOOD_FILE, "sum": "abc"}),
        b"\xff\xfe\x00garbage",
    ],
    ids=["bad-json", "empty", "list", "null", "bounds-changed", "wrong-bucket-count",
         "missing-key", "sum-not-a-number", "not-utf8"],
)
def test_corrupt_shutdown_history_gives_fresh_history_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / ShutdownHistory.FILENAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING, logger="exporter.state"):
        h = ShutdownHistory.load(str(tmp_path))
    assert h.histogram.count == 0 and h.histogram.counts == [0] * 10
    assert h.last_timed_out is False
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records), \
        caplog.text
    # The fresh history can be recorded over the corrupt file.
    h.record(0.2, False)
    assert ShutdownHistory.load(str(tmp_path)).histogram.count == 1


def test_shutdown_history_with_non_numeric_counts_is_treated_as_corrupt(tmp_path, caplog):
    (tmp_path / ShutdownHistory.FILENAME).write_text(
        json.dumps({**GOOD_FILE, "counts": ["0"] * 10}))
    with caplog.at_level(logging.WARNING, logger="exporter.state"):
        h = ShutdownHistory.load(str(tmp_path))
    h.histogram.cumulative()  # what every scrape does
    assert h.histogram.counts == [0] * 10


# =========================================================================== metrics


class FakeClock:
    def __init__(self, mono=1000.0, wall=1_800_000_000.0):
        self.mono, self.wall = mono, wall

    def monotonic(self):
        return self.mono

    def time(self):
        return self.wall


class FakeService:
    def __init__(self, instance_id, states, history):
        self.clock = FakeClock()
        self.site_states = states
        self.shutdown_history = history
        self.instance_id = instance_id


def fresh_registry(service) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    return registry


def samples(registry) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(smp, name, **labels):
    return smp.get((name, frozenset(labels.items())))


def make_service(tmp_path, instance_id, names):
    states = [st(n) for n in names]
    return FakeService(instance_id, states, ShutdownHistory.load(str(tmp_path / instance_id)))


def test_two_services_in_one_process_do_not_collide(tmp_path):
    s1 = make_service(tmp_path, "one", ["a", "b"])
    s2 = make_service(tmp_path, "two", ["c"])
    s1.site_states[0].messages_received = 5
    r1, r2 = fresh_registry(s1), fresh_registry(s2)
    # build_registry (with the process collector) also works twice in one process.
    b1, b2 = build_registry(s1), build_registry(s2)
    m1, m2 = samples(r1), samples(r2)
    assert value(m1, "mqtt_exporter_build_info", version=__import__("exporter").__version__,
                 instance_id="one") == 1.0
    assert value(m2, "mqtt_exporter_build_info", version=__import__("exporter").__version__,
                 instance_id="two") == 1.0
    sites1 = {dict(k[1]).get("site") for k in m1 if k[0] == "mqtt_site_up"}
    sites2 = {dict(k[1]).get("site") for k in m2 if k[0] == "mqtt_site_up"}
    assert sites1 == {"a", "b"} and sites2 == {"c"}
    assert value(m1, "mqtt_site_messages_received_total", site="a") == 5
    assert samples(b1).keys() >= m1.keys() and samples(b2).keys() >= m2.keys()


def test_generate_latest_parses_and_has_every_series(tmp_path):
    svc = make_service(tmp_path, "inst", ["a", "b"])
    svc.site_states[1].state = "backoff"
    svc.site_states[1].disconnects[REFUSED] = 3
    svc.site_states[0].connect_duration.observe(0.01)
    svc.shutdown_history.record(0.3, False)
    text = generate_latest(fresh_registry(svc)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "mqtt_site_up" in families and families["mqtt_site_connect_duration"
                                                     "_seconds"].type == "histogram"
    smp = samples(fresh_registry(svc))
    for site in ("a", "b"):
        for reason in DISCONNECT_REASONS:
            assert value(smp, "mqtt_site_disconnects_total", site=site, reason=reason) is not None
        states = {s: value(smp, "mqtt_site_state", site=site, state=s) for s in SITE_STATES}
        assert sorted(states.values()) == [0.0] * (len(SITE_STATES) - 1) + [1.0]
    assert value(smp, "mqtt_site_state", site="b", state="backoff") == 1.0
    assert value(smp, "mqtt_site_disconnects_total", site="b", reason="refused") == 3
    assert value(smp, "mqtt_site_connect_duration_seconds_count", site="a") == 1
    assert value(smp, "mqtt_exporter_shutdown_duration_seconds_bucket", le="0.5") == 1
    assert value(smp, "mqtt_exporter_shutdown_duration_seconds_bucket", le="0.25") == 0
    assert not [k for k in smp if k[0].endswith("_created")]


def test_cooldown_remaining_uses_the_injected_clock(tmp_path):
    svc = make_service(tmp_path, "inst", ["a"])
    a = svc.site_states[0]
    a.state, a.cooldown_until_monotonic = "cooldown", 1030.0
    registry = fresh_registry(svc)
    smp = samples(registry)
    assert value(smp, "mqtt_site_cooldown_remaining_seconds", site="a") == 30.0
    assert value(smp, "mqtt_site_cooldown_active", site="a") == 1.0
    svc.clock.mono = 1025.5
    assert value(samples(registry), "mqtt_site_cooldown_remaining_seconds", site="a") == 4.5
    svc.clock.mono = 1031.0
    assert value(samples(registry), "mqtt_site_cooldown_remaining_seconds", site="a") == 0.0
    a.state = "connecting"
    smp = samples(registry)
    assert value(smp, "mqtt_site_cooldown_active", site="a") == 0.0


# =========================================================================== farewell bytes


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


def test_metrics_text_is_byte_identical_to_prometheus_client(tmp_path):
    """/metrics renders the service's families itself (5x faster); it must say exactly what
    generate_latest says of the same families."""
    from types import SimpleNamespace

    from exporter.metrics import render_service_text

    clock = FakeClock()
    history = ShutdownHistory.load(str(tmp_path))
    history.record(0.3, True)
    states = []
    for i, state in enumerate(("connected", "cooldown", "backoff", "disabled")):
        st = SiteState(name=f"s-{i}", client_id=f"s-{i}_ix", broker='h"\\ost:1883',
                       protocol="5" if i % 2 else "3.1.1", enabled=state != "disabled",
                       state=state, connects=i, reconnect_attempts=3 * i, cooldowns=i,
                       messages_received=10**7 + i, last_message_at=1.8e9 + i / 7 if i else None,
                       cooldown_until_monotonic=clock.mono + 12.5 if state == "cooldown" else None)
        st.disconnects["takeover"] = i
        for v in (0.004, 0.3 * i, 11.0):
            st.connect_duration.observe(v)
        states.append(st)
    service = SimpleNamespace(clock=clock, site_states=states, shutdown_history=history,
                              instance_id='bfg "back"')
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    assert render_service_text(service) == generate_latest(registry).decode()


@pytest.mark.parametrize("code", [0x8B, 0x97, 0x98])  # server shutting down, quota, admin
def test_v5_disconnect_with_another_reason_is_connection_lost_not_evidence(code):
    p = policy()
    p.next(short_close())  # one short close of evidence already
    d = p.next(short_close(code=code, from_server=True))
    assert d.reason == CONNECTION_LOST and not d.cooldown
    assert p.short_closes == 1
