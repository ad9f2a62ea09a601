"""Refused subscriptions against a real Mosquitto ACL (issue #9, finding 6): the site stays
connected, but health is ``degraded`` and the site's report says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import HOST, wait_until

pytestmark = pytest.mark.timeout(60)


DYNSEC = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def test_acl_refused_subscription_degrades_health(tmp_path, broker_factory, exporter_factory):
    # Debian's Mosquitto 2.0.11 grants every SUBSCRIBE under an acl_file (it filters delivery
    # instead; measured), so the ACL comes from its dynamic-security plugin, which refuses
    # site_a/secret/# with SUBACK 0x80 and allows everything else to anonymous clients.
    if not Path(DYNSEC).exists():
        pytest.skip("mosquitto_dynamic_security.so not installed (Debian package mosquitto)")
    dynsec = tmp_path / "dynsec.json"
    dynsec.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": True, "unsubscribe": True},
        "clients": [],
        "groups": [{"groupname": "anon", "roles": [{"rolename": "limited"}], "clients": []}],
        "roles": [{"rolename": "limited", "acls": [
            {"acltype": "subscribePattern", "topic": "site_a/secret/#", "priority": 0,
             "allow": False}]}],
        "anonymousGroup": "anon",
    }))
    broker = broker_factory(extra_conf=f"plugin {DYNSEC}\nplugin_opt_config_file {dynsec}")
    exp = exporter_factory([
        {"name": "site_a", "host": HOST, "port": broker.port,
         "topics": ["site_a/open/#", "site_a/secret/#"]},
        {"name": "site_b", "host": HOST, "port": broker.port},
    ]).wait_ready()
    exp.wait_log(r"\[site_a\].*refused 1 of the subscriptions", 15)
    wait_until(lambda: exp.health()[1]["connections"]["enabled"] == 2
               and exp.metric("mqtt_site_up", site="site_b") == 1, 15,
               message="site_b connected")
    code, body = exp.health(verbose=True)
    assert (code, body["status"]) == (200, "degraded"), body
    assert body["connections"] == {"total": 2, "enabled": 2, "healthy": 1, "unhealthy": 1}
    a, b = body["sites"]
    assert a["connected"] is True and a["subscriptions_refused"] == 1
    assert len(a["problems"]) == 1 and "1 subscription(s) refused by the broker" in a["problems"][0]
    assert b["connected"] is True and b["problems"] == [] and b["subscriptions_refused"] == 0
    assert exp.metric("mqtt_site_subscriptions_refused_total", site="site_a") == 1


@pytest.mark.timeout(30)
def test_liveness_stays_200_while_no_broker_answers(exporter_factory):
    """/-/healthy is for a liveness probe: 200 whenever the process serves HTTP, even when
    /health is 503 because no broker answers (restarting the exporter would not help)."""
    from tests.support import free_port
    proc = exporter_factory([{"name": "nowhere", "host": "127.0.0.1", "port": free_port()}])
    proc.wait_ready(15)
    assert proc.health()[0] == 503
    status, _, body = proc.http_get("/-/healthy")
    assert (status, body) == (200, b"OK\n"), (status, body)
