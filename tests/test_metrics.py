"""Unit tests of the exposition (exporter/metrics.py), in-process with an injected clock."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.metrics import ServiceCollector, build_registry
from exporter.state import DISCONNECT_REASONS, REFUSED, SITE_STATES, ShutdownHistory, SiteState
from tests.support.fakes import FakeClock
from tests.support.fakes import site_state as st

pytestmark = pytest.mark.timeout(10)

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

