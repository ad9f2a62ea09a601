"""Reconnect behaviour end to end: real mosquitto per test, the exporter as a real subprocess.

What is covered (see exporter/reconnect.py for the policy):
- two live instances with one client ID (the production accident): a cooldown, and a bounded
  takeover loop instead of paho's ~1 kick per second; with presence records (identified, one
  INFO line per takeover) and without (MQTT_PRESENCE_ENABLED=false: the seed's evidence rule
  and its warning). The cooldown's doubling while identified is pinned to the base here (the
  ceiling equals the cooldown); tests/test_duplicates_e2e.py covers convergence;
- the exact MQTT 5 path (DISCONNECT 0x8E from a scripted peer): cooldown on the first kick,
  and no attempt during the cooldown;
- broker restart, broker down at start, a reconnect storm over 20 sites, a frozen broker
  (keepalive), a single kick of a long-lived connection: none of them is a takeover.

Timing knobs (MQTT_COOLDOWN_SECONDS, MQTT_STABLE_SECONDS, MQTT_BACKOFF_*) keep the file short.
No sleep is used as synchronisation: every wait is ``wait_until`` on a metric, /health, a log
line or the broker's log, with a deadline. Deadlines are generous (a loaded 2-core machine);
assertions are about behaviour and counts, not tight timings.
"""

from __future__ import annotations

import math
import time

import pytest

from tests.support import HOST, free_port, site, wait_until
from tests.support.broker import kick

COOLDOWN_LOG = (
    r"Broker closed connection \(code 7\) - likely duplicate client ID\. "
    r"Setting {secs}s cooldown to prevent reconnect loop\."
)
#: The same takeover when the other process is identified by its presence record: one
#: warning per episode (the tracker's), this INFO line per takeover.
IDENTIFIED_COOLDOWN_LOG = r"Taken over by duplicate instance \(host .*\): cooldown {secs}s"


#: exporter/connection.py bug (see test_reset_right_after_tcp_accept_keeps_retrying): connect()
#: returned MQTT_ERR_CONN_LOST without raising, _serve() then dereferences client.socket() None
#: and the site's greenlet dies for good.
GREENLET_CRASH = "Traceback (most recent call last)"  # any crashed greenlet prints one


def knobs(cooldown=4, stable=3, backoff_min=0.5, backoff_max=2, connect_timeout=2, **extra):
    env = {
        "MQTT_COOLDOWN_SECONDS": str(cooldown),
        "MQTT_STABLE_SECONDS": str(stable),
        "MQTT_BACKOFF_MIN_SECONDS": str(backoff_min),
        "MQTT_BACKOFF_MAX_SECONDS": str(backoff_max),
        "MQTT_CONNECT_TIMEOUT": str(connect_timeout),
        "MQTT_SHUTDOWN_TIMEOUT": "2",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


class _AnyFloat:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, float)


ANY_FLOAT = _AnyFloat()


def cid(name: str, instance: str) -> str:
    """The exporter's client ID for a site (config.SiteConfig.client_id)."""
    return f"{name}_i{instance}"


def m(proc, name: str, **labels) -> float:
    """A metric sample that must exist (every series is exported from 0)."""
    value = proc.metric(name, **labels)
    assert value is not None, f"{name}{labels} missing from /metrics of {proc!r}"
    return value


def site_report(proc, name: str) -> dict:
    status, body = proc.health(verbose=True)
    for s in body.get("sites", []):
        if s["name"] == name:
            return s
    raise AssertionError(f"site {name} not in /health?verbose=true ({status}): {body}")


def wait_stable(proc, name: str, stable: float, timeout: float) -> dict:
    """Until the site has been connected for longer than ``stable`` s (its own connected_since)."""

    def check():
        if not proc.running:
            raise AssertionError(f"exporter exited\n{proc.log_tail()}")
        s = site_report(proc, name)
        if s["state"] == "connected" and s["connected_since"] is not None \
                and time.time() - s["connected_since"] > stable + 0.3:
            return s
        return None

    return wait_until(check, timeout, interval=0.1, message=f"{name} connected > {stable}s")


def observe(seconds: float, sample, interval: float = 0.1) -> list:
    """Poll ``sample()`` until ``seconds`` have passed; return every value seen.

    A bounded observation window (a wait on a deadline while watching), not a blind sleep:
    ``sample`` may raise to fail early (an exporter died, a forbidden event showed up).
    """
    seen = []
    end = time.monotonic() + seconds

    def tick():
        seen.append(sample())
        return time.monotonic() >= end

    wait_until(tick, seconds + 30, interval=interval, message="observation window")
    return seen


# --------------------------------------------------------------------------- 1. duplicate


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("presence", [True, False], ids=["presence", "no-presence"])
def test_duplicate_instance_enters_cooldown_and_bounds_the_loop(broker, exporter_factory,
                                                                presence):
    cooldown, stable, bmin, bmax = 4.0, 3.0, 0.25, 2.0
    # The ceiling at the cooldown: no doubling, so the period arithmetic below holds.
    env = knobs(cooldown=cooldown, stable=stable, backoff_min=bmin, backoff_max=bmax,
                MQTT_DUPLICATE_COOLDOWN_MAX_SECONDS=cooldown,
                MQTT_PRESENCE_ENABLED=str(presence).lower())
    sites = [site("plant", broker)]
    client_id = cid("plant", "dup")

    a = exporter_factory(sites, instance_id="dup", env=env).wait_ready()
    wait_stable(a, "plant", stable, timeout=20)
    assert broker.takeovers(client_id) == 0

    b = exporter_factory(sites, instance_id="dup", env=env).wait_ready()
    procs = {"A": a, "B": b}

    # Within a deadline one of them is caught in cooldown, seen by metrics AND health.
    def in_cooldown():
        for label, p in procs.items():
            if not p.running:
                raise AssertionError(f"exporter {label} exited\n{p.log_tail()}")
            if p.metric("mqtt_site_cooldown_active", site="plant") != 1:
                continue
            remaining = p.metric("mqtt_site_cooldown_remaining_seconds", site="plant")
            state = p.metric("mqtt_site_state", site="plant", state="cooldown")
            s = site_report(p, "plant")
            if (remaining and remaining > 0 and state == 1 and s["state"] == "cooldown"
                    and s["cooldown_remaining_s"] > 0):
                return label, remaining, s
        return None

    label, remaining, report = wait_until(in_cooldown, 30, interval=0.05,
                                          message="one exporter in cooldown")
    cooling = procs[label]
    assert 0 < remaining <= cooldown
    assert 0 < report["cooldown_remaining_s"] <= cooldown
    assert report["last_disconnect_reason"] == "takeover"
    assert report["cooldowns"] >= 1
    assert m(cooling, "mqtt_site_cooldowns_total", site="plant") >= 1
    assert m(cooling, "mqtt_site_disconnects_total", site="plant", reason="takeover") >= 1
    cooling.wait_log((IDENTIFIED_COOLDOWN_LOG if presence else COOLDOWN_LOG).format(secs="4"),
                     timeout=5)
    # Both sides flag the duplicate: identified by its record, or an unknown peer.
    if presence:
        for p in procs.values():
            p.wait_metric("mqtt_site_duplicate_instance", lambda v: v == 1, 20, site="plant")
    else:
        assert report["duplicate"] == {"peer": "unknown", "first_seen": ANY_FLOAT,
                                       "last_seen": ANY_FLOAT}
        assert "Duplicate instance:" not in cooling.log_text()

    # Bounded loop: watch a fixed window while polling the broker log and both exporters.
    window = 12.0
    t0 = broker.takeovers(client_id)
    att0 = {k: m(p, "mqtt_site_reconnect_attempts_total", site="plant") for k, p in procs.items()}

    def sample():
        for k, p in procs.items():
            if not p.running:
                raise AssertionError(f"exporter {k} exited\n{p.log_tail()}")
        return broker.takeovers(client_id)

    start = time.monotonic()
    observe(window, sample, interval=0.2)
    elapsed = time.monotonic() - start
    kicks = broker.takeovers(client_id) - t0
    attempts = {k: m(p, "mqtt_site_reconnect_attempts_total", site="plant") - att0[k]
                for k, p in procs.items()}
    cooldowns = {k: m(p, "mqtt_site_cooldowns_total", site="plant") for k, p in procs.items()}
    print(f"\nduplicate window {elapsed:.1f}s: broker takeovers={kicks} "
          f"attempts={attempts} cooldowns_total={cooldowns}")

    # Design bound: per cooldown+backoff period, each side reconnects at most once (the
    # cooled side after its cooldown, the other after one backoff), and each reconnect
    # kicks the other side at most once: <= 2 kicks per period, +1 period for the edges.
    periods = math.ceil(elapsed / (cooldown + bmin * 0.8)) + 1
    assert kicks <= 2 * periods, f"{kicks} takeovers in {elapsed:.1f}s > {2 * periods}"
    for k, n in attempts.items():
        assert n <= periods + 1, f"exporter {k}: {n} reconnect attempts in {elapsed:.1f}s"
    # Every takeover in the window is caused by one of our attempts.
    assert kicks <= sum(attempts.values()) + 1
    # paho's own reconnect kicks about once per min_delay (61/min at min_delay=1 s,
    # GUIDE.md); with the same minimum delay as ours that is elapsed/bmin kicks: we must be
    # at least 5x below. (Against the absolute 61/min this cannot hold with a 4 s cooldown:
    # the design allows 2 kicks per cooldown+backoff, ~27/min here; with the production
    # defaults, 30 s cooldown, it is ~4/min, 15x below.)
    paho_equivalent = elapsed / bmin
    print(f"paho-equivalent kicks at min_delay={bmin}s: {paho_equivalent:.0f} "
          f"(ours {kicks}, {paho_equivalent / max(kicks, 1):.1f}x below)")
    assert kicks * 5 <= paho_equivalent, (kicks, paho_equivalent)
    assert sum(cooldowns.values()) >= 2, "the loop keeps being detected as a takeover"

    # Stop B: A comes back and stays, no more takeovers.
    b.terminate()
    b.wait_exit(10)
    t_stop = broker.takeovers(client_id)
    # "Stays": A connected for longer than a cooldown + stable (B would have kicked by then).
    wait_stable(a, "plant", cooldown + stable, timeout=30)
    assert broker.takeovers(client_id) == t_stop
    assert m(a, "mqtt_site_up", site="plant") == 1
    assert broker.live(client_id) == 1


# --------------------------------------------------------------------------- 2. v5 0x8E


@pytest.mark.timeout(45)
def test_v5_session_taken_over_cools_down_at_first_kick(fake_v5_factory, exporter_factory):
    cooldown = 3.0
    fake = fake_v5_factory(kick_after=0.2)
    sites = [{"name": "v5site", "host": HOST, "port": fake.port, "protocol": "5"}]
    exp = exporter_factory(sites, instance_id="v5", env=knobs(cooldown=cooldown, stable=3,
                                                              backoff_min=0.2, backoff_max=1))
    exp.wait_ready()

    exp.wait_metric("mqtt_site_cooldowns_total", lambda v: v == 1, 15, site="v5site")
    assert len(fake.kicks) == 1
    assert m(exp, "mqtt_site_disconnects_total", site="v5site", reason="takeover") == 1
    for reason in ("connection_lost", "keepalive_timeout", "refused", "normal"):
        assert m(exp, "mqtt_site_disconnects_total", site="v5site", reason=reason) == 0, reason
    assert m(exp, "mqtt_site_connects_total", site="v5site") == 1
    exp.wait_log(COOLDOWN_LOG.format(secs="3"), timeout=5)
    s = site_report(exp, "v5site")
    assert s["last_disconnect_reason"] == "takeover"

    # During the cooldown: no attempt at all (the fake sees one connection), until it ends.
    during = []

    def cooled_down():
        n = len(fake.client_ids())  # read before the scrape: the scrape is the later snapshot
        snap = exp.metrics()
        state = snap[("mqtt_site_state", frozenset({"site": "v5site", "state": "cooldown"}.items()))]
        attempts = snap[("mqtt_site_reconnect_attempts_total", frozenset({"site": "v5site"}.items()))]
        if state == 1 and attempts == 0:  # the first cooldown (the 2nd connection is kicked too)
            during.append(n)
            assert n == 1, f"connection attempt during the cooldown ({n} connections)"
        return n >= 2

    wait_until(cooled_down, cooldown + 15, interval=0.05, message="second connection")
    assert during, "never observed the cooldown state"
    assert fake.client_ids()[:2] == [cid("v5site", "v5")] * 2
    # The second connection came only after the whole cooldown (same monotonic clock).
    gap = fake.connections[1][0] - fake.kicks[0][0]
    assert gap >= cooldown - 0.25, f"reconnected {gap:.2f}s after the kick, cooldown {cooldown}s"
    exp.wait_metric("mqtt_site_reconnect_attempts_total", lambda v: v == 1, 5, site="v5site")


# --------------------------------------------------------------------------- 3. restart


@pytest.mark.timeout(45)
def test_broker_restart_reconnects_quickly_without_cooldown(broker, exporter_factory):
    stable = 2.0
    exp = exporter_factory([site("s1", broker)], instance_id="rs",
                           env=knobs(stable=stable, backoff_min=0.2, backoff_max=1))
    exp.wait_ready()
    wait_stable(exp, "s1", stable, timeout=20)
    assert m(exp, "mqtt_site_connects_total", site="s1") == 1

    t = time.monotonic()
    broker.restart()
    exp.wait_metric("mqtt_site_connects_total", lambda v: v == 2, 10, site="s1")
    took = time.monotonic() - t
    exp.wait_metric("mqtt_site_up", lambda v: v == 1, 5, site="s1")
    print(f"\nbroker restart: back after {took:.2f}s")
    assert took < 10
    assert m(exp, "mqtt_site_cooldowns_total", site="s1") == 0
    assert m(exp, "mqtt_site_disconnects_total", site="s1", reason="takeover") == 0
    assert m(exp, "mqtt_site_disconnects_total", site="s1", reason="connection_lost") >= 1
    assert broker.connects(cid("s1", "rs")) == 2
    assert broker.takeovers(cid("s1", "rs")) == 0
    assert site_report(exp, "s1")["state"] == "connected"


# --------------------------------------------------------------------------- 4. down at start


@pytest.mark.timeout(45)
def test_broker_down_at_start_then_up(broker_factory, exporter_factory):
    port = free_port()
    b = broker_factory(port=port, start=False)
    exp = exporter_factory([site("late", b)], instance_id="late",
                           env=knobs(backoff_min=0.2, backoff_max=1))
    exp.wait_ready()

    status, body = exp.health()
    assert (status, body["status"]) == (503, "critical"), body
    first = exp.wait_metric("mqtt_site_disconnects_total", lambda v: v and v >= 1, 10,
                            site="late", reason="refused")
    exp.wait_metric("mqtt_site_disconnects_total", lambda v: v and v > first, 10,
                    site="late", reason="refused")
    exp.wait_metric("mqtt_site_state", lambda v: v == 1, 10, site="late", state="backoff")
    assert m(exp, "mqtt_site_up", site="late") == 0
    assert m(exp, "mqtt_site_connects_total", site="late") == 0
    assert m(exp, "mqtt_site_cooldowns_total", site="late") == 0
    s = site_report(exp, "late")
    assert s["last_disconnect_reason"] == "refused"
    assert exp.running

    b.start()
    assert b.port == port
    def healthy():
        status, body = exp.health()
        return status == 200 and body.get("status") == "healthy"

    wait_until(healthy, 15, interval=0.1, message="health 200 healthy")
    assert m(exp, "mqtt_site_up", site="late") == 1
    assert m(exp, "mqtt_site_cooldowns_total", site="late") == 0
    assert m(exp, "mqtt_site_disconnects_total", site="late", reason="takeover") == 0


# --------------------------------------------------------------------------- 5. storm


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_reconnect_storm_never_two_clients_per_id(broker, exporter_factory):
    n = 20
    names = [f"st{i:02d}" for i in range(n)]
    exp = exporter_factory([site(nm, broker) for nm in names], instance_id="storm",
                           env=knobs(cooldown=2, stable=2, backoff_min=0.1, backoff_max=1))
    exp.wait_ready()

    def all_up():
        return sum(m(exp, "mqtt_site_up", site=nm) for nm in names) == n

    wait_until(all_up, 20, interval=0.1, message="all sites up")

    # Two quick restarts in a row, then a SIGKILL while reconnects are in flight.
    broker.restart()
    broker.restart()
    log_len = len(broker.log_text())
    wait_until(lambda: "New client connected" in broker.log_text()[log_len:], 10, interval=0.01,
               message="a reconnect in flight")
    broker.kill()
    broker.start()

    def up_sites():
        return [nm for nm in names if m(exp, "mqtt_site_up", site=nm) == 1]

    def settled():
        up = up_sites()
        if GREENLET_CRASH in exp.log_text():
            raise AssertionError(f"a site greenlet died:\n{exp.log_tail(30)}")
        if len(up) < n:
            return None
        return up if all(broker.live(cid(nm, "storm")) == 1 for nm in up) else None

    up = wait_until(settled, 30, interval=0.2, message="all sites back after the storm")
    # Everybody stays up through a stable period (no late kick of a ghost connection).
    for nm in up:
        wait_stable(exp, nm, 2, timeout=20)
    assert up_sites() == up

    peaks = {nm: broker.max_concurrent(cid(nm, "storm")) for nm in names}
    kicks = {nm: broker.takeovers(cid(nm, "storm")) for nm in names}
    cooldowns = sum(m(exp, "mqtt_site_cooldowns_total", site=nm) for nm in names)
    connects = sum(broker.connects(cid(nm, "storm")) for nm in names)
    print(f"\nstorm: broker connects={connects} exporter cooldowns={cooldowns}")
    assert peaks == dict.fromkeys(names, 1), {k: v for k, v in peaks.items() if v != 1}
    assert kicks == dict.fromkeys(names, 0), {k: v for k, v in kicks.items() if v}
    assert GREENLET_CRASH not in exp.log_text()
    assert len(up) == n


# --------------------------------------------------------------------------- 6. keepalive


@pytest.mark.timeout(60)
def test_frozen_broker_detected_by_keepalive_then_recovers(broker, exporter_factory):
    keepalive = 2
    exp = exporter_factory([site("ka", broker)], instance_id="ka",
                           env=knobs(cooldown=2, stable=2, backoff_min=0.2, backoff_max=1,
                                     connect_timeout=2, MQTT_KEEP_ALIVE=keepalive))
    exp.wait_ready()
    exp.wait_metric("mqtt_site_up", lambda v: v == 1, 15, site="ka")

    broker.freeze()
    t = time.monotonic()
    try:
        exp.wait_metric("mqtt_site_up", lambda v: v == 0, 6 * keepalive + 5, site="ka")
        down_after = time.monotonic() - t
        exp.wait_metric("mqtt_site_disconnects_total", lambda v: v and v >= 1, 5,
                        site="ka", reason="keepalive_timeout")
        # Then attempts against the frozen broker: TCP accepted by the kernel, no CONNACK.
        exp.wait_metric("mqtt_site_disconnects_total", lambda v: v and v >= 1, 15,
                        site="ka", reason="refused")
        assert m(exp, "mqtt_site_disconnects_total", site="ka", reason="takeover") == 0
        assert m(exp, "mqtt_site_cooldowns_total", site="ka") == 0
        print(f"\nkeepalive {keepalive}s: down after {down_after:.2f}s")
    finally:
        broker.thaw()
    exp.wait_metric("mqtt_site_up", lambda v: v == 1, 25, site="ka")
    assert m(exp, "mqtt_site_connects_total", site="ka") >= 2


# --------------------------------------------------------------------------- 7. one kick


@pytest.mark.timeout(45)
def test_single_kick_of_stable_connection_is_connection_lost(broker, exporter_factory):
    stable = 2.0
    exp = exporter_factory([site("one", broker)], instance_id="one",
                           env=knobs(cooldown=4, stable=stable, backoff_min=1, backoff_max=2))
    exp.wait_ready()
    wait_stable(exp, "one", stable, timeout=20)
    client_id = cid("one", "one")

    kick(broker, client_id)  # a plain client with the same ID kicks it once and leaves
    assert broker.takeovers(client_id) >= 1

    exp.wait_metric("mqtt_site_connects_total", lambda v: v == 2, 15, site="one")
    s = wait_stable(exp, "one", stable, timeout=20)
    assert s["last_disconnect_reason"] == "connection_lost"
    assert m(exp, "mqtt_site_disconnects_total", site="one", reason="connection_lost") == 1
    assert m(exp, "mqtt_site_disconnects_total", site="one", reason="takeover") == 0
    assert m(exp, "mqtt_site_cooldowns_total", site="one") == 0
    assert m(exp, "mqtt_site_connects_total", site="one") == 2
    assert "likely duplicate client ID" not in exp.log_text()


# --------------------------------------------------------------------------- 8. reset peer


@pytest.fixture
def reset_peer(fake_v5_factory):
    """A listener that resets every connection right after the TCP accept, before CONNECT
    is written: a broker dying (SIGKILL) at that moment, or a load balancer without a
    backend."""
    return fake_v5_factory(reset_on_accept=True)


@pytest.mark.timeout(45)
def test_reset_right_after_tcp_accept_keeps_retrying(reset_peer, exporter_factory):
    # The reset races paho's CONNECT write; several sites x many attempts make the race
    # (measured: hit within the first few dozen attempts) a certainty in practice.
    names = [f"rst{i}" for i in range(10)]
    sites = [{"name": nm, "host": HOST, "port": reset_peer.port} for nm in names]
    exp = exporter_factory(sites, instance_id="rst",
                           env=knobs(backoff_min=0.02, backoff_max=0.05, connect_timeout=1))
    exp.wait_ready()
    want = 30

    def retrying():
        if GREENLET_CRASH in exp.log_text():
            raise AssertionError(f"site greenlet died:\n{exp.log_tail(20)}")
        return all(m(exp, "mqtt_site_reconnect_attempts_total", site=nm) >= want for nm in names)

    wait_until(retrying, 30, interval=0.1, message=f"{want} attempts per site against a resetting peer")
    for nm in names:
        assert m(exp, "mqtt_site_disconnects_total", site=nm, reason="refused") >= want
        assert m(exp, "mqtt_site_connects_total", site=nm) == 0
        assert m(exp, "mqtt_site_cooldowns_total", site=nm) == 0
        assert site_report(exp, nm)["state"] in ("connecting", "backoff")
