"""The fault matrix of issue #9 (item 10), end to end: a real Mosquitto per test, the exporter
as a real subprocess, scaled knobs (backoff 0.2..1 s, connect timeout 2 s).

One test per fault (docs/benchmarks.md, "Fault matrix", lists them with their measured
figures, ``python -m bench --only faults``):

- broker down at start, then started: every site connects within a bound;
- broker restarted by SIGTERM and by SIGKILL: back within a bound, no takeover, no cooldown,
  never two connections per client ID on the broker;
- broker frozen (SIGSTOP) past a site's ``keepalive: 5``, then thawed: the loss is a
  keepalive timeout (or connection lost), the site is back after the thaw, never two
  connections per client ID;
- credentials refused, then fixed on the broker (password file rewritten, broker reloaded by
  SIGHUP): ``refused`` counted, verbose /health names the cause, the same process recovers;
- unresolvable host: that site backs off and says ``dns:``, the other sites are untouched,
  shutdown is clean;
- SIGTERM while a site sits in a long backoff, and while it sits in a takeover cooldown:
  exit 0 at once, the shutdown line logged.

Covered elsewhere (not repeated here): HTTP abuse (test_http_limits_e2e.py), each TLS failure
(test_tls_e2e.py), SIGTERM while the broker is down and while waiting for CONNACK
(test_lifecycle.py), hostile payloads on a bridged site (test_bridge_integration.py), a broker
killed repeatedly (test_broker_events_e2e.py).

Every wait is ``wait_until`` on a metric, /health, a log line or the broker's log.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.support import HOST, free_port, site, wait_until
from tests.support.broker import kick

pytestmark = pytest.mark.timeout(45)

#: Recovery bound once the broker is reachable again: backoff max 1 s (+ the connect), with a
#: wide margin for a loaded 2-core machine.
BACK_WITHIN = 5.0
#: SIGTERM -> exit when nothing is connected (backoff, cooldown): "about one second".
EXIT_WITHIN = 2.0
SHUTDOWN_LINE = r"All connections disconnected in \d+\.\d\d s"


def knobs(**extra: object) -> dict[str, str]:
    env = {
        "MQTT_BACKOFF_MIN_SECONDS": "0.2",
        "MQTT_BACKOFF_MAX_SECONDS": "1",
        "MQTT_CONNECT_TIMEOUT": "2",
        "MQTT_STABLE_SECONDS": "2",
        # A false takeover would show as a 30 s outage, far beyond BACK_WITHIN.
        "MQTT_COOLDOWN_SECONDS": "30",
        "MQTT_SHUTDOWN_TIMEOUT": "2",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cid(name: str, instance: str) -> str:
    return f"{name}_i{instance}"


def total(exp, metric: str, names: list[str], **labels: str) -> float:
    snap = exp.metrics()
    return sum(snap.get((metric, frozenset({"site": n, **labels}.items())), 0.0) for n in names)


def up_count(exp, names: list[str]) -> float:
    if not exp.running:
        raise AssertionError(f"exporter exited (rc={exp.returncode})\n{exp.log_tail()}")
    return total(exp, "mqtt_site_up", names)


def wait_all_up(exp, names: list[str], timeout: float) -> float:
    """Seconds until every site is up."""
    t0 = time.monotonic()
    wait_until(lambda: up_count(exp, names) == len(names), timeout, interval=0.05,
               message=f"all of {names} up\n{exp.log_tail(20)}")
    return time.monotonic() - t0


def site_report(exp, name: str) -> dict:
    _, body = exp.health(verbose=True)
    for s in body.get("sites", []):
        if s["name"] == name:
            return s
    raise AssertionError(f"site {name} not in verbose /health: {body}")


def wait_stable(exp, names: list[str], stable: float, timeout: float) -> None:
    """Until every site has been connected longer than ``stable`` s (its connected_since)."""

    def check() -> bool:
        for n in names:
            s = site_report(exp, n)
            if s["state"] != "connected" or s["connected_since"] is None \
                    or time.time() - s["connected_since"] <= stable + 0.2:
                return False
        return True

    wait_until(check, timeout, interval=0.1, message=f"{names} stable > {stable}s")


def assert_no_duplicates(broker, exp, names: list[str], instance: str) -> None:
    for n in names:
        assert broker.takeovers(cid(n, instance)) == 0, (n, broker.log_text()[-2000:])
        assert broker.max_concurrent(cid(n, instance)) <= 1, (n, broker.log_text()[-2000:])
    assert total(exp, "mqtt_site_cooldowns_total", names) == 0, exp.log_tail(30)
    assert total(exp, "mqtt_site_disconnects_total", names, reason="takeover") == 0
    assert "likely duplicate client ID" not in exp.log_text()


def sigterm(exp, timeout: float = 10.0) -> tuple[int, float]:
    t0 = time.monotonic()
    exp.terminate()
    rc = exp.wait_exit(timeout)
    return rc, time.monotonic() - t0


# --------------------------------------------------------------------------- broker faults


def test_broker_down_at_start_then_started(broker_factory, exporter_factory):
    b = broker_factory(port=free_port(), start=False)
    names = ["late311", "late5"]
    exp = exporter_factory([site("late311", b), site("late5", b, protocol="5")],
                           instance_id="down", env=knobs()).wait_ready()
    for n in names:
        exp.wait_metric("mqtt_site_disconnects_total", lambda v: bool(v and v >= 2), 10,
                        site=n, reason="refused")
    status, body = exp.health()
    assert (status, body["status"]) == (503, "critical"), body
    assert site_report(exp, "late311")["last_error"] == "connection refused"

    b.start()
    took = wait_all_up(exp, names, BACK_WITHIN + 10)
    print(f"\nbroker down at start: all sites up {took:.2f}s after the broker started")
    assert took <= BACK_WITHIN
    assert_no_duplicates(b, exp, names, "down")
    assert exp.health()[0] == 200


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_broker_restart_is_no_takeover(broker, exporter_factory, how):
    names = ["r311", "r5"]
    exp = exporter_factory([site("r311", broker), site("r5", broker, protocol="5")],
                           instance_id="rst", env=knobs()).wait_ready()
    wait_all_up(exp, names, 15)
    wait_stable(exp, names, 2, 15)

    rc = broker.stop() if how == "sigterm" else broker.kill()
    wait_until(lambda: up_count(exp, names) == 0, 10, interval=0.05, message="sites down")
    broker.start()
    took = wait_all_up(exp, names, BACK_WITHIN + 10)
    print(f"\nbroker {how} (rc {rc}): all sites back {took:.2f}s after the broker restarted")
    assert took <= BACK_WITHIN
    assert_no_duplicates(broker, exp, names, "rst")
    assert total(exp, "mqtt_site_disconnects_total", names, reason="connection_lost") == 2
    for n in names:
        assert broker.connects(cid(n, "rst")) == 2
        assert broker.live(cid(n, "rst")) == 1


def test_broker_frozen_past_keepalive_then_thawed(broker, exporter_factory):
    names = ["frz", "frz5"]
    exp = exporter_factory([site("frz", broker, keepalive=5),
                            site("frz5", broker, keepalive=5, protocol="5")],
                           instance_id="frz", env=knobs()).wait_ready()
    wait_all_up(exp, names, 15)

    broker.freeze()
    t_freeze = time.monotonic()
    try:
        # paho pings after 5 s of silence and gives up 5 s later without a PINGRESP.
        wait_until(lambda: up_count(exp, names) == 0, 20, interval=0.1,
                   message="sites down with the broker frozen")
        down_after = time.monotonic() - t_freeze
        keepalive = total(exp, "mqtt_site_disconnects_total", names, reason="keepalive_timeout")
        lost = total(exp, "mqtt_site_disconnects_total", names, reason="connection_lost")
        assert keepalive + lost == 2, exp.metrics_text()
    finally:
        broker.thaw()
    t_thaw = time.monotonic()
    took = wait_all_up(exp, names, BACK_WITHIN + 10)
    print(f"\nbroker frozen: sites down {down_after:.2f}s after SIGSTOP (keepalive_timeout "
          f"{keepalive:g}, connection_lost {lost:g}), back "
          f"{time.monotonic() - t_thaw:.2f}s after SIGCONT")
    assert took <= BACK_WITHIN
    # The broker noticed the old connections only after the thaw: it must never have held an
    # old and a new one with the same client ID at once (a takeover line would say so).
    wait_stable(exp, names, 2, 15)
    assert_no_duplicates(broker, exp, names, "frz")
    for n in names:
        assert broker.live(cid(n, "frz")) == 1


def test_auth_refused_then_fixed_on_the_broker(broker_factory, exporter_factory):
    right, wrong = "right-Pw-9f3c", "wrong-Pw-71ab"
    b = broker_factory(users={"faultuser": right})
    exp = exporter_factory([site("auth", b, username="faultuser", password_env="FAULT_PW")],
                           instance_id="auth", env=knobs(FAULT_PW=wrong)).wait_ready()
    exp.wait_metric("mqtt_site_disconnects_total", lambda v: bool(v and v >= 2), 15,
                    site="auth", reason="refused")
    report = site_report(exp, "auth")
    assert report["last_error"] == "refused: not authorised", report
    assert not report["connected"]
    assert exp.metric("mqtt_site_connects_total", site="auth") == 0
    lines = re.findall(r"^.*Connection to .* failed: (.*)$", exp.log_text(), re.M)
    assert lines == ["refused: not authorised"], lines  # once per change, not per attempt

    # Fixed on the broker's side: the password file now holds what the exporter sends, and
    # mosquitto reloads it on SIGHUP. The same exporter process recovers.
    b.users = {"faultuser": wrong}
    b._write_passwords()
    t_fix = time.monotonic()
    os.kill(b.pid, signal.SIGHUP)
    pid = exp.pid
    exp.wait_metric("mqtt_site_up", lambda v: v == 1, BACK_WITHIN + 10, site="auth")
    took = time.monotonic() - t_fix
    print(f"\nauth fixed on the broker: connected {took:.2f}s later")
    assert took <= BACK_WITHIN
    assert exp.pid == pid and exp.running
    assert_no_duplicates(b, exp, ["auth"], "auth")
    _, body = exp.health(verbose=True)
    for text in (str(body), exp.metrics_text(), exp.log_text()):
        assert right not in text and wrong not in text


def test_unresolvable_host_backs_off_and_spares_the_others(broker, exporter_factory):
    ok = ["ok1", "ok2"]
    sites = [site("ghost", broker, host="does-not-exist.invalid", port=1883)] + \
        [site(n, broker) for n in ok]
    exp = exporter_factory(sites, instance_id="dns", env=knobs()).wait_ready()
    wait_all_up(exp, ok, 15)
    exp.wait_metric("mqtt_site_disconnects_total", lambda v: bool(v and v >= 3), 15,
                    site="ghost", reason="refused")
    exp.wait_log(r"Connection to does-not-exist\.invalid:1883 failed: dns: cannot resolve host",
                 5)
    exp.wait_log(r"Reconnecting to does-not-exist\.invalid:1883 in \d+\.\d s \(refused\)", 5)
    report = site_report(exp, "ghost")
    assert report["last_error"] == "dns: cannot resolve host", report
    assert exp.metric("mqtt_site_up", site="ghost") == 0
    status, body = exp.health()
    assert status == 200 and body["status"] == "degraded", body
    # The other sites were never disturbed.
    for n in ok:
        assert exp.metric("mqtt_site_connects_total", site=n) == 1
        assert exp.metric("mqtt_site_up", site=n) == 1
    assert_no_duplicates(broker, exp, ok, "dns")

    rc, elapsed = sigterm(exp)
    print(f"\nunresolvable host: SIGTERM -> exit {rc} in {elapsed:.2f}s")
    assert rc == 0, exp.log_tail()
    assert elapsed <= EXIT_WITHIN + 1, exp.log_tail()
    assert re.search(SHUTDOWN_LINE, exp.log_text()), exp.log_tail()
    for n in ok:
        wait_until(lambda n=n: broker.disconnects(cid(n, "dns")) == 1, 5,
                   message=f"{n} said goodbye")


# --------------------------------------------------------------------------- SIGTERM timing


def test_sigterm_in_backoff_exits_at_once(exporter_factory):
    port = free_port()  # nothing listens: every attempt is refused at once
    exp = exporter_factory([{"name": "wait", "host": HOST, "port": port}], instance_id="bo",
                           env=knobs(MQTT_BACKOFF_MIN_SECONDS=30,
                                     MQTT_BACKOFF_MAX_SECONDS=60)).wait_ready()
    exp.wait_log(r"Reconnecting to .* in \d\d\.\d s \(refused\)", 15)
    exp.wait_metric("mqtt_site_state", lambda v: v == 1, 5, site="wait", state="backoff")
    rc, elapsed = sigterm(exp)
    print(f"\nSIGTERM in a 24-30 s backoff: exit {rc} in {elapsed:.2f}s")
    assert rc == 0, exp.log_tail()
    assert elapsed <= EXIT_WITHIN, exp.log_tail()
    assert re.search(SHUTDOWN_LINE, exp.log_text()), exp.log_tail()
    assert "SIGTERM received: shutting down" in exp.log_text()



def test_sigterm_in_cooldown_exits_at_once(broker, exporter_factory):
    exp = exporter_factory([site("cool", broker)], instance_id="cd",
                           env=knobs(MQTT_COOLDOWN_SECONDS=60, MQTT_STABLE_SECONDS=10,
                                     MQTT_PRESENCE_ENABLED="false")).wait_ready()
    for n in (1, 2):  # two short-lived connections closed in a row: a takeover
        exp.wait_metric("mqtt_site_connects_total", lambda v, n=n: v == n, 15, site="cool")
        kick(broker, cid("cool", "cd"))
    exp.wait_metric("mqtt_site_state", lambda v: v == 1, 15, site="cool", state="cooldown")
    exp.wait_log(r"Setting 60s cooldown", 5)
    rc, elapsed = sigterm(exp)
    print(f"\nSIGTERM in a 60 s cooldown: exit {rc} in {elapsed:.2f}s")
    assert rc == 0, exp.log_tail()
    assert elapsed <= EXIT_WITHIN, exp.log_tail()
    assert re.search(SHUTDOWN_LINE, exp.log_text()), exp.log_tail()
