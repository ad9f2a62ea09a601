"""Unit tests of the exposition (exporter/metrics.py), in-process with an injected clock."""
from __future__ import annotations

import dataclasses
import gzip
import os
import re
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.brokers import BrokerView
from exporter.metrics import (
    COUNTER,
    DOC_MARKER,
    FAMILIES,
    GAUGE,
    HISTOGRAM,
    INFO,
    BrokerFamily,
    ScrapeCache,
    ServiceCollector,
    ServiceFamily,
    SiteFamily,
    build_registry,
    make_metrics_app,
    process_registry,
    reference_markdown,
    render_service_text,
    served_families,
    text_to_openmetrics,
)
from exporter.reload import ConfigStatus
from exporter.state import (
    COOLDOWN,
    DISCONNECT_REASONS,
    REFUSED,
    SITE_STATES,
    Duplicate,
    HistogramData,
    ShutdownHistory,
    SiteState,
)
from exporter.textformat import escape_label_value, format_value
from tests.support.fakes import FakeClock
from tests.support.fakes import site_state as st

pytestmark = pytest.mark.timeout(10)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_FAMILIES = ("mqtt_site_subscriptions_refused_total", "mqtt_exporter_internal_errors_total")


class FakeService:
    """What metrics read of a service (exporter.state.ServiceView)."""

    def __init__(self, instance_id, states, history):
        self.clock = FakeClock()
        self.site_states = states
        self.shutdown_history = history
        self.instance_id = instance_id
        self.running = True
        self.bridge_store = None
        self.brokers = brokers_of(states)
        self.config_status = ConfigStatus(loaded=True, at=0.0)


def brokers_of(states, window=1.0):
    """One BrokerView per endpoint of ``states`` with an enabled site, as the Service builds."""
    views = {}
    for state in states:
        views.setdefault(state.broker, BrokerView(state.broker, window)).add_site(state)
    return [v for v in views.values() if v.sites]


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
    assert "mqtt_site_up" in families and families["mqtt_broker_connect_duration"
                                                     "_seconds"].type == "histogram"
    assert "mqtt_site_connect_duration_seconds" not in families  # opt-in only
    smp = samples(fresh_registry(svc))
    for site in ("a", "b"):
        for reason in DISCONNECT_REASONS:
            assert value(smp, "mqtt_site_disconnects_total", site=site, reason=reason) is not None
        states = {s: value(smp, "mqtt_site_state", site=site, state=s) for s in SITE_STATES}
        assert sorted(states.values()) == [0.0] * (len(SITE_STATES) - 1) + [1.0]
    assert value(smp, "mqtt_site_state", site="b", state="backoff") == 1.0
    assert value(smp, "mqtt_site_disconnects_total", site="b", reason="refused") == 3
    assert value(smp, "mqtt_site_last_connect_duration_seconds", site="a") == 0.01
    assert value(smp, "mqtt_site_last_connect_duration_seconds", site="b") == 0.0
    assert value(smp, "mqtt_broker_connect_duration_seconds_count", broker="127.0.0.1:1883") == 1
    assert value(smp, "mqtt_broker_connect_duration_seconds_bucket", broker="127.0.0.1:1883",
                 le="0.01") == 1
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


@pytest.mark.parametrize("site_histogram", [False, True])
def test_metrics_text_is_byte_identical_to_prometheus_client(tmp_path, site_histogram):
    """/metrics renders the service's families itself (5x faster); it must say exactly what
    generate_latest says of the same families, the opt-in per-site histogram included."""
    families = served_families(site_histogram)
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
        st.subscriptions_refused, st.internal_errors = 2 * i, 10**6 + i
        for v in (0.004, 0.3 * i, 11.0):
            st.connect_duration.observe(v)
        states.append(st)
    # Two endpoints, one with a label value that needs escaping; the other with a broker
    # event counted.
    states[2].broker = "10.0.0.2:8883"
    brokers = brokers_of(states)
    brokers[1].connection_losses = 3
    states[2].connect_duration.observe(0.02)  # linked to its broker's histogram now
    service = SimpleNamespace(clock=clock, site_states=states, shutdown_history=history,
                              instance_id='bfg "back"', brokers=brokers,
                              config_status=ConfigStatus(loaded=True, at=0.0))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service, families))
    text = render_service_text(service, families)
    assert text == generate_latest(registry).decode()
    assert b"".join(c.data for c in ScrapeCache(families).render(service)) == text.encode()
    assert ('mqtt_site_connect_duration_seconds_bucket{le="0.005",site="s-1"} 1.0\n'
            in text) == site_histogram
    assert 'mqtt_broker_connect_duration_seconds_bucket{broker="10.0.0.2:8883",le="+Inf"} 1.0\n' in text
    assert 'mqtt_site_last_connect_duration_seconds{site="s-3"} 11.0\n' in text
    for name in NEW_FAMILIES:
        assert f"# TYPE {name} counter\n" in text
    assert 'mqtt_site_subscriptions_refused_total{site="s-3"} 6.0\n' in text
    assert 'mqtt_exporter_internal_errors_total{site="s-1"} 1.000001e+06\n' in text
    assert 'mqtt_broker_sites{broker="h\\"\\\\ost:1883"} 2.0\n' in text
    assert 'mqtt_broker_sites_connected{broker="h\\"\\\\ost:1883"} 1.0\n' in text
    assert 'mqtt_broker_connection_losses_total{broker="10.0.0.2:8883"} 3.0\n' in text
    # No site at all: headers only, still identical.
    service.site_states, service.brokers = [], []
    assert render_service_text(service, families) == generate_latest(registry).decode()



# -- the table ---------------------------------------------------------------------------

#: Label names whose values come from configuration or from a fixed set, never from traffic.
BOUNDED_LABELS = {"site", "state", "reason", "client_id", "broker", "protocol", "version",
                  "instance_id"}
BROKER_FAMILIES = {"mqtt_broker_sites": GAUGE, "mqtt_broker_sites_connected": GAUGE,
                   "mqtt_broker_connection_losses_total": COUNTER,
                   "mqtt_broker_connect_duration_seconds": HISTOGRAM}
UNITS = ("_seconds", "_bytes", "_total", "_info", "_timestamp_seconds")


def test_family_table_follows_the_conventions():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    for fam in FAMILIES:
        assert fam.help and fam.help.endswith(".") and "\n" not in fam.help, fam.name
        assert fam.name.startswith(("mqtt_site_", "mqtt_exporter_", "mqtt_broker_")), fam.name
        assert isinstance(fam, BrokerFamily) == (fam.labels == ("broker",)), fam.name
        assert isinstance(fam, BrokerFamily) == fam.name.startswith("mqtt_broker_"), fam.name
        assert (fam.type == COUNTER) == fam.name.endswith("_total"), fam.name
        assert (fam.type == INFO) == fam.name.endswith("_info"), fam.name
        assert set(fam.labels) <= BOUNDED_LABELS, fam.name
        assert isinstance(fam, SiteFamily) == (fam.labels[:1] == ("site",)), fam.name
        if fam.each:  # every value exported, from 0: a small fixed set
            assert fam.labels[-1] in ("state", "reason") and 0 < len(fam.each) <= 10, fam.name
        # Base units: durations and times in seconds, never ms/minutes/ages.
        assert not re.search(r"_(ms|milliseconds|minutes|hours|age|kb|mb)(_|$)", fam.name)
        if "duration" in fam.name or "remaining" in fam.name or "timestamp" in fam.name:
            assert fam.name.endswith("_seconds"), fam.name
    # Exposition order of the families that existed before the table: unchanged.
    assert names[:12] == [
        "mqtt_site_up", "mqtt_site_state", "mqtt_site_info", "mqtt_site_connects_total",
        "mqtt_site_disconnects_total", "mqtt_site_reconnect_attempts_total",
        "mqtt_site_cooldown_active", "mqtt_site_cooldown_remaining_seconds",
        "mqtt_site_cooldowns_total", "mqtt_site_messages_received_total",
        "mqtt_site_last_message_timestamp_seconds", "mqtt_site_last_connect_duration_seconds"]
    process = names[names.index("mqtt_exporter_shutdown_duration_seconds"):]
    assert process[:3] == ["mqtt_exporter_shutdown_duration_seconds",
                           "mqtt_exporter_last_shutdown_timed_out", "mqtt_exporter_build_info"]
    assert set(NEW_FAMILIES) <= set(names)
    assert {f.name: f.type for f in FAMILIES if isinstance(f, BrokerFamily)} == BROKER_FAMILIES
    # Per site, then per broker, then the process.
    kinds = [{SiteFamily: 0, BrokerFamily: 1, ServiceFamily: 2}[type(f)] for f in FAMILIES]
    assert kinds == sorted(kinds)
    assert [f.each for f in FAMILIES if f.each] == [SITE_STATES, DISCONNECT_REASONS]


def test_every_read_returns_what_its_type_needs(tmp_path):
    svc = make_service(tmp_path, "inst", ["a"])
    a = svc.site_states[0]
    (view,) = svc.brokers
    for fam in FAMILIES:
        if isinstance(fam, SiteFamily):
            got = fam.read(a, 1000.0)
        elif isinstance(fam, BrokerFamily):
            got = fam.read(view)
        else:
            got = fam.read(svc)
        if fam.type == HISTOGRAM:
            assert isinstance(got, HistogramData), fam.name
        elif fam.type == INFO:
            values = list(got)
            assert len(values) == len(fam.labels) - isinstance(fam, SiteFamily), fam.name
            assert all(isinstance(v, str) for v in values), fam.name
        elif fam.each:
            assert len(list(got)) == len(fam.each), fam.name
        else:
            assert isinstance(got, (int, float)) and not isinstance(got, bool), fam.name


@pytest.mark.parametrize("kwargs, problem", [
    (dict(name="mqtt_site_things", type=COUNTER), "_total"),
    (dict(name="mqtt_site_things_total", type=GAUGE), "_total"),
    (dict(name="mqtt_site_facts", type=INFO), "_info"),
    (dict(name="other_things", type=GAUGE), "start"),
    (dict(name="mqtt_site_x", type="summary"), "type"),
    (dict(name="mqtt_site_x", type=GAUGE, help="No period"), "period"),
    (dict(name="mqtt_site_x", type=GAUGE, labels=("site", "topic")), "besides site"),
    (dict(name="mqtt_site_x", type=GAUGE, labels=("state", "site"), each=("a",)), "site"),
    (dict(name="mqtt_site_x", type=HISTOGRAM, labels=("site", "le")), "le"),
    (dict(name="mqtt_site_x_info", type=INFO, labels=("site", "bad-name")), "label names"),
])
def test_a_wrong_entry_fails_at_import(kwargs, problem):
    kwargs = {"help": "Something.", "read": lambda st, now: 0, **kwargs}
    with pytest.raises(ValueError, match=problem):
        SiteFamily(**kwargs)


@pytest.mark.parametrize("cls, kwargs, problem", [
    (BrokerFamily, dict(name="mqtt_site_x", type=GAUGE), "mqtt_broker_"),
    (BrokerFamily, dict(name="mqtt_broker_x", type=GAUGE, labels=("broker", "reason"),
                        each=("a",)), "one label broker"),
    (BrokerFamily, dict(name="mqtt_broker_x", type=GAUGE, labels=("site",)), "site"),
    (BrokerFamily, dict(name="mqtt_broker_x_info", type=INFO), "one label broker"),
    (ServiceFamily, dict(name="mqtt_broker_x", type=GAUGE), "mqtt_broker_"),
    (ServiceFamily, dict(name="mqtt_exporter_x", type=GAUGE, labels=("broker",)), "broker"),
])
def test_a_wrong_broker_entry_fails_at_import(cls, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        cls(**{"help": "Something.", "read": lambda view: 0, **kwargs})


def test_broker_families_one_series_per_endpoint_from_zero(tmp_path):
    svc = make_service(tmp_path, "inst", ["a", "b", "c", "off"])
    a, b, c, off = svc.site_states
    c.broker = "other:1883"
    off.enabled, off.state = False, "disabled"
    off.broker = "gone:1883"  # only disabled sites there: no series
    svc.brokers = brokers_of(svc.site_states)
    b.state = "backoff"
    smp = samples(fresh_registry(svc))
    assert {dict(k[1])["broker"] for k in smp if k[0] == "mqtt_broker_sites"} == {
        "127.0.0.1:1883", "other:1883"}
    assert value(smp, "mqtt_broker_sites", broker="127.0.0.1:1883") == 2
    assert value(smp, "mqtt_broker_sites_connected", broker="127.0.0.1:1883") == 1
    assert value(smp, "mqtt_broker_sites_connected", broker="other:1883") == 1
    for broker in ("127.0.0.1:1883", "other:1883"):
        assert value(smp, "mqtt_broker_connection_losses_total", broker=broker) == 0
    # A broker event (two sites of one endpoint at once) counts once, not per site.
    view = svc.brokers[0]
    view.record_loss("a", 5.0)
    view.record_loss("b", 5.1)
    a.state = "backoff"
    smp = samples(fresh_registry(svc))
    assert value(smp, "mqtt_broker_connection_losses_total", broker="127.0.0.1:1883") == 1
    assert value(smp, "mqtt_broker_sites_connected", broker="127.0.0.1:1883") == 0
    text = render_service_text(svc)
    assert 'mqtt_broker_connection_losses_total{broker="127.0.0.1:1883"} 1.0\n' in text
    assert 'mqtt_broker_sites{broker="other:1883"} 1.0\n' in text
    assert "gone:1883" not in text.split("# HELP mqtt_broker_sites ")[1].split("# HELP mqtt_exporter")[0]


def test_adding_a_family_is_one_entry(tmp_path):
    """A new entry shows up in the text renderer, in the prometheus_client view (the two
    byte-identical) and in the reference, with nothing else touched."""
    extra = (
        SiteFamily("mqtt_site_test_doubled_total", COUNTER, "Twice the messages.",
                   read=lambda st, now: 2 * st.messages_received),
        SiteFamily("mqtt_site_test_flags", GAUGE, "One per flag.", labels=("site", "flag"),
                   each=("alpha", "zeta"), read=lambda st, now: (1.0, float(st.connects))),
        SiteFamily("mqtt_site_test_facts_info", INFO, "Facts.", labels=("site", "zz", "aa"),
                   read=lambda st, now: (st.client_id, 'q"uote')),
        ServiceFamily("mqtt_exporter_test_sites", GAUGE, "Sites configured.",
                      read=lambda svc: len(svc.site_states)),
        ServiceFamily("mqtt_exporter_test_modes", GAUGE, "By mode.", labels=("mode",),
                      each=("b", "a"), read=lambda svc: (3, 4.5)),
    )
    families = FAMILIES + extra
    svc = make_service(tmp_path, "inst", ["a", "b"])
    svc.site_states[0].messages_received, svc.site_states[1].connects = 4, 7
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(svc, families))
    text = render_service_text(svc, families)
    assert text == generate_latest(registry).decode()
    assert text.startswith(render_service_text(svc))  # appended after the existing ones
    assert 'mqtt_site_test_doubled_total{site="a"} 8.0\n' in text
    assert 'mqtt_site_test_flags{flag="zeta",site="b"} 7.0\n' in text
    assert 'mqtt_site_test_facts_info{aa="q\\"uote",site="a",zz="a_itest"} 1.0\n' in text
    assert "mqtt_exporter_test_sites 2.0\n" in text
    assert 'mqtt_exporter_test_modes{mode="a"} 4.5\n' in text
    assert registry.get_sample_value("mqtt_site_test_flags", {"site": "a", "flag": "alpha"}) == 1
    assert "| `mqtt_site_test_flags` | gauge | `site`, `flag` (alpha, zeta) |" in \
        reference_markdown(families)


def test_new_families_exported_from_zero_and_counting(tmp_path):
    svc = make_service(tmp_path, "inst", ["a", "b"])
    for name in NEW_FAMILIES:
        for site in ("a", "b"):
            assert value(samples(fresh_registry(svc)), name, site=site) == 0.0
    svc.site_states[0].subscriptions_refused += 2
    svc.site_states[1].internal_errors += 1
    smp = samples(fresh_registry(svc))
    assert value(smp, "mqtt_site_subscriptions_refused_total", site="a") == 2
    assert value(smp, "mqtt_site_subscriptions_refused_total", site="b") == 0
    assert value(smp, "mqtt_exporter_internal_errors_total", site="a") == 0
    assert value(smp, "mqtt_exporter_internal_errors_total", site="b") == 1
    text = render_service_text(svc)
    assert 'mqtt_site_subscriptions_refused_total{site="a"} 2.0\n' in text
    assert 'mqtt_exporter_internal_errors_total{site="b"} 1.0\n' in text


def test_up_and_cooldown_follow_the_state_constants(tmp_path):
    svc = make_service(tmp_path, "inst", list(SITE_STATES))
    for state, site in zip(SITE_STATES, svc.site_states):
        site.state = state
    smp = samples(fresh_registry(svc))
    for state in SITE_STATES:
        assert value(smp, "mqtt_site_up", site=state) == (state == "connected")
        assert value(smp, "mqtt_site_cooldown_active", site=state) == (state == COOLDOWN)


def test_metrics_app_serves_the_table_then_the_process_collector(tmp_path):
    svc = make_service(tmp_path, "inst", ["a"])
    app = make_metrics_app(svc, process_registry())
    got = {}
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"},
                        lambda status, headers: got.update(status=status, headers=headers)))
    assert got["status"] == "200 OK"
    text = body.decode()
    assert text.startswith(render_service_text(svc))
    assert "# TYPE process_cpu_seconds_total counter" in text
    assert dict(got["headers"])["Content-Length"] == str(len(body))


def test_docs_metrics_md_is_generated_from_the_code():
    with open(os.path.join(ROOT, "docs", "metrics.md"), encoding="utf-8") as fh:
        head, marker, generated = fh.read().partition(DOC_MARKER)
    assert marker, "docs/metrics.md lost its marker line"
    assert generated == "\n\n" + reference_markdown(), (
        "docs/metrics.md is stale: python -m exporter.metrics --write docs/metrics.md")
    for name in NEW_FAMILIES:  # the intro shows how to use the new families
        assert f"increase({name}" in head
    for fam in FAMILIES:
        assert f"| `{fam.name}` |" in generated
    for prefix in ("mqtt_bridge_messages_total", "mqtt_bridge_payload_errors_total",
                   "process_cpu_seconds_total"):
        assert f"| `{prefix}` |" in generated


def test_reference_cli_prints_the_reference():
    proc = subprocess.run([sys.executable, "-m", "exporter.metrics"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference_markdown()


# -- the scrape cache (what /metrics serves) -------------------------------------------------

def scrape(app, **headers):
    got = {}
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", **headers}
    body = b"".join(app(environ, lambda status, hdrs: got.update(dict(hdrs))))
    assert got["Content-Length"] == str(len(body))
    return body, got


def test_scrape_cache_serves_the_full_render_as_sites_change(tmp_path):
    svc = make_service(tmp_path, "inst", [f"s{i}" for i in range(7)])
    cache = ScrapeCache(served_families(True), batch=3)

    def check():
        text = render_service_text(svc, served_families(True))
        assert b"".join(c.data for c in cache.render(svc)) == text.encode()

    check()
    a, b = svc.site_states[:2]
    a.messages_received, a.last_message_at = 3, 1.8e9 + 0.25
    b.state, b.cooldown_until_monotonic = COOLDOWN, 1010.0
    b.disconnects["takeover"] += 1
    b.connect_duration.observe(0.3)
    check()
    svc.clock.advance(4.0)  # only the remaining cooldown moves
    check()
    svc.site_states = svc.site_states[1:] + [st('new "one"')]  # the sites themselves change
    svc.brokers = brokers_of(svc.site_states)
    check()
    svc.site_states = []
    check()


def test_scrape_cache_pauses_between_steps_and_rewrites_only_what_changed(tmp_path):
    svc = make_service(tmp_path, "inst", [f"s{i}" for i in range(10)])
    pauses = []
    cache = ScrapeCache(pause=lambda: pauses.append(1), batch=4)
    site_families = [f for f in FAMILIES if isinstance(f, SiteFamily)]
    series = sum(len(f.each) or 1 for f in site_families)
    cache.render(svc)
    # 10 sites in steps of 4: 2 pauses while reading, 2 more per family written.
    assert len(pauses) == 2 + 2 * len(site_families)
    assert cache.written == 10 * series
    pauses.clear()
    cache.render(svc)
    assert (len(pauses), cache.written) == (2, 0)  # nothing changed: nothing written
    svc.site_states[9].messages_received += 1
    cache.render(svc)
    assert cache.written == 10  # one family, every site of it


def test_gzip_body_is_one_member_of_the_plain_body(tmp_path):
    svc = make_service(tmp_path, "inst", [f"s{i}" for i in range(50)])
    app = make_metrics_app(svc, process_registry())
    plain, _ = scrape(app)
    for _ in range(2):  # from fresh segments, then from cached ones
        zipped, headers = scrape(app, HTTP_ACCEPT_ENCODING="gzip, deflate")
        assert headers["Content-Encoding"] == "gzip"
        unzipped = zlib.decompressobj(16 + zlib.MAX_WBITS)  # one member: no trailing data
        assert unzipped.decompress(zipped) + unzipped.flush() == plain.replace(
            _cpu_line(plain), _cpu_line(unzipped_text := gzip.decompress(zipped)))
        assert unzipped.eof and not unzipped.unused_data
        assert unzipped_text.startswith(render_service_text(svc).encode())


def _cpu_line(body: bytes) -> bytes:
    """The process collector's CPU line: it moves between two scrapes."""
    return re.search(rb"^process_cpu_seconds_total .*$", body, re.M).group(0)


def test_openmetrics_body_is_the_text_body_converted(tmp_path):
    svc = make_service(tmp_path, "inst", ["a", "b"])
    app = make_metrics_app(svc, CollectorRegistry(auto_describe=False), families=served_families(True))
    plain, _ = scrape(app)
    om, headers = scrape(app, HTTP_ACCEPT="application/openmetrics-text;version=1.0.0")
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.decode() == text_to_openmetrics(plain.decode())
    assert "# TYPE mqtt_site info\n" in om.decode() and om.endswith(b"# EOF\n")


def _changed(value, field_name):
    """A different value of the same kind (changed in place for the in-place ones)."""
    if field_name == "disconnects":
        value["refused"] += 1
        return value
    if field_name == "connect_duration":
        value.observe(0.7)
        return value
    if field_name == "duplicate":
        return Duplicate(None, 1.8e9, 1.8e9) if value is None else None
    if field_name == "state":
        return COOLDOWN if value != COOLDOWN else "backoff"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 2.5
    if isinstance(value, str):
        return value + '"x'
    return 1.8e9 + 0.125  # None: a timestamp


def test_a_change_of_any_site_attribute_reaches_the_cached_scrape(tmp_path):
    """The cache reads a site again only when its key changes: every SiteState attribute,
    assigned or changed in place, must change the key (or the text would go stale)."""
    svc = make_service(tmp_path, "inst", ["a", "b", "c"])
    families = served_families(True)
    cache = ScrapeCache(families)
    cache.render(svc)
    for f in dataclasses.fields(SiteState):
        b = svc.site_states[1]
        setattr(b, f.name, _changed(getattr(b, f.name), f.name))
        if f.name == "state":
            b.cooldown_until_monotonic = svc.clock.mono + 5
        got = b"".join(c.data for c in cache.render(svc)).decode()
        assert got == render_service_text(svc, families), f.name
        assert cache.read == 1 or f.name == "name", f.name  # only b is read again
    svc.clock.advance(1.0)  # the remaining cooldown moves without any attribute changing
    got = b"".join(c.data for c in cache.render(svc)).decode()
    assert got == render_service_text(svc, families) and cache.read == 0
    b = svc.site_states[1]
    label = escape_label_value(b.name)  # the name changed too
    left = b.cooldown_until_monotonic - svc.clock.mono
    assert f'mqtt_site_cooldown_remaining_seconds{{site="{label}"}} {left}\n' in got


def test_format_value_spells_timestamps_as_prometheus_client_does():
    from prometheus_client.utils import floatToGoString

    for value in (1e6, 2e6, 1_800_000_000.25, 1.8e9 + 1 / 7, 9_999_999_999_999_998.0, 1e16,
                  123456789.0, -1.7e9, float("inf"), float("-inf"), float("nan"), 0.0, 7, -3):
        assert format_value(value) == floatToGoString(value), value
