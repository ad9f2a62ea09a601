"""The connection survives what it must: broken callbacks and slow links.

- A packet that breaks a callback costs one message, never the site's connection loop: the
  scripted peer answers CONNECT and SUBSCRIBE, then sends a QoS 1 PUBLISH whose topic is not
  UTF-8 (paho's message.topic raises inside our on_message), then a valid QoS 0 PUBLISH. The
  error is logged with its traceback and counted.
- A large QoS 0 message on a slow link is keepalive traffic while it arrives (paho counts
  every received byte; the inbound fast path must keep paho's clock).

The exporter runs as a real subprocess.
"""
import re

import pytest

from exporter import wire
from tests.support import HOST, wait_until

BAD_TOPIC_QOS1 = b"\x32\x07\x00\x02\xff\xfe\x00\x05x"   # topic b"\xff\xfe", packet id 5
GOOD_QOS0 = b"\x30\x0c\x00\x09site_a/ok" + b"1"


def start(exporter_factory, peer):
    return exporter_factory([{"name": "site_a", "host": HOST, "port": peer.port}])


@pytest.mark.timeout(60)
def test_callback_error_drops_one_message_and_the_site_lives_on(fake_v5_factory,
                                                                 exporter_factory):
    peer = fake_v5_factory(after_suback=BAD_TOPIC_QOS1 + GOOD_QOS0)
    exp = start(exporter_factory, peer).wait_ready()
    exp.wait_metric("mqtt_site_messages_received_total", lambda v: v == 1, 15, site="site_a")
    wait_until(lambda: b"\x00\x05" in peer.pubacks, 10, message="PUBACK for the bad PUBLISH")
    assert exp.metric("mqtt_site_up", site="site_a") == 1
    assert exp.metric("mqtt_site_connects_total", site="site_a") == 1
    assert len(peer.connections) == 1
    # Logged once, with the site and the traceback, and counted.
    log = exp.log_text()
    assert len(re.findall(r"\[site_a\]: Internal error in on_message", log)) == 1, log
    assert "Traceback" in log and "UnicodeDecodeError" in log, exp.log_tail(30)
    assert exp.metric("mqtt_exporter_internal_errors_total", site="site_a") == 1
    _, body = exp.health(verbose=True)
    if "internal_errors" in body["sites"][0]:
        assert body["sites"][0]["internal_errors"] == 1


@pytest.mark.timeout(60)
def test_refused_subscription_is_logged_and_shown_in_health(fake_v5_factory, exporter_factory):
    peer = fake_v5_factory(suback_code=0x80)  # e.g. an ACL refusing site_a/#
    exp = start(exporter_factory, peer)
    exp.wait_log(r"refused 1 of the subscriptions \['site_a/#'\]", 15)
    _, body = exp.health(verbose=True)
    assert body["sites"][0]["subscriptions_refused"] == 1


#: The issue's reproduction: 16 KB of QoS 0 at about 1.3 KB/s to a site with keepalive 5.
SLOW_PAYLOAD = bytes(range(256)) * 64
SLOW_STEP, SLOW_INTERVAL = 130, 0.1


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_large_message_on_a_slow_link_keeps_the_connection(fake_v5_factory, exporter_factory):
    message = wire.publish("site_a/big", SLOW_PAYLOAD)
    peer = fake_v5_factory(after_suback=message, dribble=(SLOW_STEP, SLOW_INTERVAL))
    exp = exporter_factory([{"name": "site_a", "host": HOST, "port": peer.port,
                             "keepalive": 5}]).wait_ready()
    exp.wait_metric("mqtt_site_messages_received_total", lambda v: v == 1, 30, site="site_a")
    wait_until(lambda: peer.after_suback_done, 5, message="the peer finished writing")
    # The message took longer than paho's 1.5 x keepalive to arrive ...
    assert peer.after_suback_done[0] - peer.connections[0][0] > 1.5 * 5
    # ... on one connection that never timed out.
    assert exp.metric("mqtt_site_up", site="site_a") == 1
    assert exp.metric("mqtt_site_connects_total", site="site_a") == 1
    assert exp.metric("mqtt_site_disconnects_total", site="site_a",
                      reason="keepalive_timeout") == 0
    assert len(peer.connections) == 1, exp.log_tail(30)
    assert "Reconnecting" not in exp.log_text(), exp.log_tail(30)
