"""Health aggregation for ``/health``: pure functions over the service's state.

``healthy``: every enabled site connected and none duplicated; ``degraded``: some enabled
site not connected, or another process uses some enabled site's client ID (a duplicate
episode, docs/duplicates.md: on both instances), or the broker refused some of a connected
site's subscriptions (SUBACK failure, e.g. an ACL: connected, but those topics never arrive;
such a site is not counted as healthy, and its ``problems`` say why); ``critical``: none connected (with at
least one enabled), the service not running, or no sites document loaded yet
(MQTT_SITES_URL has not answered). HTTP 200 for healthy and degraded, 503 for critical. A
rejected reload does not change the status (the last good sites keep running); ``config``
says so. No secret is ever included: the site objects carry none, a URL is shown without
credentials.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .state import ServiceView, SiteState

if TYPE_CHECKING:
    from .reload import ConfigStatus

HEALTHY, DEGRADED, CRITICAL = "healthy", "degraded", "critical"
HTTP_STATUS = {HEALTHY: 200, DEGRADED: 200, CRITICAL: 503}


def overall_status(running: bool, enabled: int, connected: int, duplicated: int = 0,
                   refused: int = 0) -> str:
    """``refused``: connected sites with refused subscriptions (degraded, never critical)."""
    if not running or (enabled and not connected):
        return CRITICAL
    return HEALTHY if connected >= enabled and not duplicated and not refused else DEGRADED


def refused(st: SiteState) -> bool:
    """A connected, enabled site whose broker refused some of its subscriptions on the
    current connection (a reconnect that subscribes fine clears it)."""
    return st.enabled and st.connected and st.refused_now > 0


def site_problems(st: SiteState) -> list[str]:
    """Why an enabled site is not healthy; empty when it is (or is disabled)."""
    if not st.enabled:
        return []
    problems = [] if st.connected else [f"not connected ({st.state})"]
    if st.duplicate is not None:
        problems.append("another process uses this client ID")
    if refused(st):
        problems.append(f"{st.refused_now} subscription(s) refused by the broker "
                        "(SUBACK failure, e.g. an ACL): those topics are not received")
    return problems


def site_report(st: SiteState, now_monotonic: float) -> dict[str, Any]:
    return {
        "name": st.name,
        "client_id": st.client_id,
        "broker": st.broker,
        "protocol": st.protocol,
        "enabled": st.enabled,
        "state": st.state,
        "connected": st.connected,
        "connected_since": st.connected_since,
        "last_disconnect_reason": st.last_disconnect_reason,
        "last_disconnect_at": st.last_disconnect_at,
        "last_error": st.last_error,
        "last_error_at": st.last_error_at,
        "connects": st.connects,
        "reconnects": st.reconnect_attempts,
        "cooldowns": st.cooldowns,
        "cooldown_remaining_s": round(st.cooldown_remaining(now_monotonic), 3),
        "subscriptions_refused": st.subscriptions_refused,
        "problems": site_problems(st),
        "messages_received": st.messages_received,
        "last_message_at": st.last_message_at,
        "duplicate": st.duplicate.report() if st.duplicate is not None else None,
    }


def health_report(running: bool, instance_id: str, states: Sequence[SiteState],
                  now_monotonic: float, verbose: bool = False,
                  config: ConfigStatus | None = None) -> tuple[int, dict[str, Any]]:
    """Returns ``(http_status, body)`` for the given site states (and the sites document's
    load history, ``config``, when given)."""
    enabled = sum(1 for st in states if st.enabled)
    connected = sum(1 for st in states if st.enabled and st.connected)
    duplicated = sum(1 for st in states if st.enabled and st.duplicate is not None)
    with_refusals = sum(1 for st in states if refused(st))
    status = overall_status(running, enabled, connected, duplicated, with_refusals)
    if config is not None and not config.loaded:
        status = CRITICAL
    healthy = connected - with_refusals
    body: dict[str, Any] = {
        "status": status,
        "service": {"running": running, "instance_id": instance_id},
        "connections": {"total": len(states), "enabled": enabled,
                        "healthy": healthy, "unhealthy": enabled - healthy},
    }
    if verbose and config is not None:
        body["service"]["shard"] = str(config.shard) if config.shard is not None else None
        body["config"] = config.report()
    if verbose:
        body["sites"] = [site_report(st, now_monotonic) for st in states]
    return HTTP_STATUS[status], body


def service_health(service: ServiceView, verbose: bool = False) -> tuple[int, dict[str, Any]]:
    """:func:`health_report` of a running (or stopped) service, as ``/health`` serves it."""
    return health_report(service.running, service.instance_id, service.site_states,
                         service.clock.monotonic(), verbose, service.config_status)
