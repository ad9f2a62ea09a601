"""Unit tests of the broker view (exporter/brokers.py): broker events vs lone losses, the
event counter, the site counts. Pure logic, an injected clock."""
from __future__ import annotations

import time

import pytest

from exporter.brokers import MAX_CLUSTERS, BrokerView
from tests.support.fakes import FakeClock, site_state

pytestmark = pytest.mark.timeout(10)

EP = "127.0.0.1:1883"


def view(n: int = 3, window: float = 1.0, clock: FakeClock | None = None,
         disabled: int = 0) -> BrokerView:
    """A view of ``n`` enabled sites s0..s{n-1} (connected) and ``disabled`` disabled ones."""
    states = [site_state(f"s{i}") for i in range(n)]
    states += [site_state(f"off{i}", enabled=False) for i in range(disabled)]
    return BrokerView(EP, window, clock or FakeClock(), states)


def test_two_sites_within_the_window_are_one_broker_event():
    v = view()
    v.record_loss("s0", 100.0)
    v.record_loss("s1", 100.4)
    assert v.is_event(100.0) and v.is_event(100.4)
    assert v.connection_losses == 1
    assert v.last_event_at == 100.0


def test_a_lone_loss_is_not_an_event():
    v = view()
    v.record_loss("s0", 100.0)
    assert not v.is_event(100.0)
    assert v.connection_losses == 0 and v.last_event_at is None


def test_the_same_site_twice_is_not_an_event():
    v = view()
    v.record_loss("s0", 100.0)
    v.record_loss("s0", 100.3)  # paho reported one loss twice, or a quick kick loop
    assert not v.is_event(100.3)
    assert v.connection_losses == 0


def test_losses_further_apart_than_the_window_are_separate():
    v = view()
    v.record_loss("s0", 100.0)
    v.record_loss("s1", 101.5)
    assert not v.is_event(100.0) and not v.is_event(101.5)
    assert v.connection_losses == 0


def test_window_edges_are_inclusive():
    v = view(window=1.0)
    v.record_loss("s0", 100.0)
    v.record_loss("s1", 101.0)
    assert v.is_event(100.0) and v.is_event(101.0)


def test_a_site_that_reports_before_the_others_sees_the_event_after_the_window():
    """The connection records its loss, waits ``window``, then asks: the other sites'
    losses, recorded meanwhile, make it an event."""
    v = view(n=20)
    v.record_loss("s0", 100.0)
    assert not v.is_event(100.0)  # asked too early: alone so far
    for i in range(1, 20):
        v.record_loss(f"s{i}", 100.0 + i * 0.01)
    assert all(v.is_event(100.0 + i * 0.01) for i in range(20))
    assert v.connection_losses == 1, "one event, not one per site"


def test_the_clock_is_used_when_no_time_is_given():
    clock = FakeClock(mono=500.0)
    v = view(clock=clock)
    v.record_loss("s0")
    clock.advance(0.2)
    v.record_loss("s1")
    clock.advance(0.8)
    assert v.is_event()  # 1.0 s after the first loss, 0.8 s after the second
    clock.advance(5.0)
    assert not v.is_event()
    assert v.connection_losses == 1


def test_each_restart_is_one_more_event():
    v = view(n=20)
    for k in range(4):  # broker killed 4 times, 3 s apart
        t = 100.0 + 3.0 * k
        for i in range(20):
            v.record_loss(f"s{i}", t + 0.002 * i)
        assert v.is_event(t)
    assert v.connection_losses == 4


def test_a_slow_cluster_is_still_one_event():
    """10 000 losses the hub notices over several seconds, each within the window of the
    one before: one cluster, one event."""
    v = view(n=10_000)
    for i in range(10_000):
        v.record_loss(f"s{i}", 100.0 + i * 0.0005)  # 5 s in all
    assert v.connection_losses == 1
    assert v.is_event(100.0) and v.is_event(105.0)


def test_a_single_enabled_site_never_makes_an_event():
    v = view(n=1, disabled=3)
    assert v.sites == 1
    v.record_loss("s0", 100.0)
    v.record_loss("off0", 100.1)  # cannot happen (no connection), and still not an event
    assert not v.is_event(100.0)
    assert v.connection_losses == 0


def test_sites_and_connected_read_the_site_states():
    states = [site_state("a"), site_state("b", state="backoff"), site_state("c"),
              site_state("d", enabled=False)]
    v = BrokerView(EP, 1.0, FakeClock(), states)
    assert (v.sites, v.connected) == (3, 2)
    states[1].state = "connected"
    states[0].state = "cooldown"
    assert v.connected == 2
    e = site_state("e")
    v.add_site(e)
    assert (v.sites, v.connected) == (4, 3)
    assert repr(v) == f"<BrokerView {EP} sites=4 connected=3 events=0>"


def test_losses_reported_slightly_out_of_order_join_their_cluster():
    v = view()
    v.record_loss("s0", 100.5)
    v.record_loss("s1", 100.0)  # recorded later, happened earlier (same hub iteration)
    assert v.is_event(100.0)
    assert v.connection_losses == 1


def test_two_lone_losses_of_neighbouring_clusters_make_an_event_for_a_loss_between():
    v = view(window=1.0)
    v.record_loss("s0", 100.0)
    v.record_loss("s1", 101.8)  # 1.8 s later: another cluster
    assert v.connection_losses == 0
    # A third site's loss at 100.9 is within 1 s of both: two other sites near it.
    assert v.is_event(100.9)


def test_memory_is_bounded_and_old_clusters_are_forgotten():
    v = view(n=3)
    for k in range(1000):
        v.record_loss(f"s{k % 3}", 100.0 + 10.0 * k)
    assert len(v._clusters) == MAX_CLUSTERS
    assert v.connection_losses == 0


def test_calls_stay_cheap_at_10000_sites():
    v = view(n=10_000)
    t0 = time.perf_counter()
    for k in range(5):  # five broker events of 10 000 losses each, then every site asks
        base = 100.0 + 10.0 * k
        for i in range(10_000):
            v.record_loss(f"s{i}", base + i * 1e-5)
        for i in range(10_000):
            assert v.is_event(base + i * 1e-5)
    took = time.perf_counter() - t0
    assert v.connection_losses == 5
    assert took < 2.0, f"100 000 calls took {took:.2f}s"


def test_remove_sites_after_a_reload():
    a, b, off = site_state("a"), site_state("b"), site_state("off", enabled=False)
    view = BrokerView("127.0.0.1:1883", 1.0, FakeClock(), states=[a, b, off])
    assert view.sites == 2
    view.remove_sites([a, off])
    assert view.states == [b] and view.sites == 1 and view.connected == 1


def test_every_site_connect_counts_in_its_endpoint_histogram():
    v = view(2)
    a, b = v.states
    a.connect_duration.observe(0.004)
    b.connect_duration.observe(0.3)
    b.connect_duration.observe(0.02)
    hist = v.connect_duration
    assert (hist.count, round(hist.sum, 6)) == (3, 0.324)
    assert dict(hist.cumulative())["0.005"] == 1 and dict(hist.cumulative())["0.5"] == 3
    assert (a.connect_duration.count, b.connect_duration.count) == (1, 2)
    assert b.connect_duration.last == 0.02
