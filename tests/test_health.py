"""Unit tests of the health aggregation (exporter/health.py)."""
from __future__ import annotations

import json

import pytest

from exporter.health import CRITICAL, DEGRADED, HEALTHY, HTTP_STATUS, health_report, overall_status
from tests.support.fakes import site_state as st

pytestmark = pytest.mark.timeout(10)

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
                "messages_received", "last_message_at", "broker", "duplicate"}
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
    assert a["duplicate"] is b["duplicate"] is c["duplicate"] is None
    # Non-verbose has no sites; the body is JSON-serialisable either way.
    assert "sites" not in health_report(True, "inst", states, 1000.0)[1]
    json.dumps(body)



def test_a_duplicate_makes_the_status_at_least_degraded_and_shows_in_verbose():
    from exporter.state import Duplicate

    peer = {"client_id": "a_itest", "boot_id": "b" * 16, "host": "h2", "pid": 7}
    known = Duplicate(peer, 1_800_000_000.0, 1_800_000_010.0)
    unknown = Duplicate(None, 1_800_000_000.0, 1_800_000_001.0)
    # Every site connected, one duplicated: degraded (on both instances alike).
    code, body = health_report(True, "inst", [st("a", duplicate=known), st("b")], 1000.0,
                               verbose=True)
    assert (code, body["status"]) == (200, DEGRADED)
    a, b = body["sites"]
    assert a["duplicate"] == {**peer, "first_seen": 1_800_000_000.0,
                              "last_seen": 1_800_000_010.0}
    assert b["duplicate"] is None
    assert health_report(True, "inst", [st("a", duplicate=unknown)], 1000.0, verbose=True)[1][
        "sites"][0]["duplicate"] == {"peer": "unknown", "first_seen": 1_800_000_000.0,
                                     "last_seen": 1_800_000_001.0}
    assert health_report(True, "inst", [st("a", duplicate=unknown)], 1000.0)[1]["status"] == \
        DEGRADED
    # Critical stays critical; a disabled site's stale duplicate does not count.
    assert health_report(True, "inst", [st("a", "cooldown", duplicate=known)], 1000.0)[1][
        "status"] == CRITICAL
    assert health_report(True, "inst", [st("a"), st("b", enabled=False, duplicate=known)],
                         1000.0)[1]["status"] == HEALTHY
    assert overall_status(True, 2, 2, duplicated=1) == DEGRADED
    assert overall_status(True, 2, 0, duplicated=1) == CRITICAL
    json.dumps(body)


def test_service_health_reads_the_service_view():
    """/health's view of a service: running, instance_id, site_states, config_status and the
    clock, nothing else (exporter.state.ServiceView)."""
    from types import SimpleNamespace

    from exporter.health import service_health
    from exporter.reload import ConfigStatus
    from tests.support.fakes import FakeClock

    clock = FakeClock(mono=1000.0)
    states = [st("a"), st("b", "cooldown", cooldown_until_monotonic=1010.0)]
    config = ConfigStatus(loaded=True, at=5.0)
    service = SimpleNamespace(running=True, instance_id="inst", site_states=states, clock=clock,
                              config_status=config)
    assert service_health(service) == health_report(True, "inst", states, 1000.0,
                                                     config=config)
    code, body = service_health(service, verbose=True)
    assert code == 200 and body["status"] == DEGRADED
    assert body["sites"][1]["cooldown_remaining_s"] == 10.0
    clock.advance(4)
    assert service_health(service, verbose=True)[1]["sites"][1]["cooldown_remaining_s"] == 6.0
    service.running = False
    assert service_health(service)[0] == 503


# --- refused subscriptions (issue #9, finding 6): the site is not healthy ---------------


def test_refused_subscriptions_degrade_and_the_site_report_says_why():
    states = [st("a", subscriptions_refused=2, refused_now=2), st("b")]
    code, body = health_report(True, "inst", states, 1000.0, verbose=True)
    assert (code, body["status"]) == (200, DEGRADED)
    assert body["connections"] == {"total": 2, "enabled": 2, "healthy": 1, "unhealthy": 1}
    a, b = body["sites"]
    assert a["connected"] is True and a["subscriptions_refused"] == 2
    assert a["problems"] == ["2 subscription(s) refused by the broker (SUBACK failure, e.g. an "
                             "ACL): those topics are not received"]
    assert b["problems"] == []
    json.dumps(body)


def test_refused_subscriptions_on_every_site_are_degraded_not_critical():
    # Connected everywhere: some topics arrive (status, presence), so the process is useful.
    states = [st("a", subscriptions_refused=1, refused_now=1),
              st("b", subscriptions_refused=3, refused_now=3)]
    code, body = health_report(True, "inst", states, 1000.0)
    assert (code, body["status"]) == (200, DEGRADED)
    assert body["connections"]["healthy"] == 0 and body["connections"]["unhealthy"] == 2
    assert overall_status(True, 2, 2, refused=2) == DEGRADED
    assert overall_status(True, 2, 0, refused=0) == CRITICAL
    assert overall_status(False, 2, 2, refused=1) == CRITICAL


def test_refusals_count_only_for_connected_enabled_sites():
    # Disconnected: already unhealthy for that reason; disabled: not part of the health.
    states = [st("a"), st("b", "backoff", subscriptions_refused=1, refused_now=1),
              st("c", enabled=False, subscriptions_refused=1, refused_now=1)]
    code, body = health_report(True, "inst", states, 1000.0, verbose=True)
    assert (code, body["status"]) == (200, DEGRADED)
    assert body["connections"] == {"total": 3, "enabled": 2, "healthy": 1, "unhealthy": 1}
    assert [s["problems"] for s in body["sites"]] == [[], ["not connected (backoff)"], []]
    disabled = st("c", enabled=False, subscriptions_refused=1, refused_now=1)
    assert health_report(True, "inst", [st("a"), disabled], 1000.0)[1]["status"] == HEALTHY


def test_refusals_clear_when_a_new_connection_subscribes_fine():
    """The all-time counter stays (it feeds the alert); health follows the current connection."""
    a = st("a", subscriptions_refused=2, refused_now=0)
    _, body = health_report(True, "inst", [a], 1000.0, verbose=True)
    assert body["status"] == "healthy" and body["sites"][0]["subscriptions_refused"] == 2
