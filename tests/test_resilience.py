"""A packet that breaks a callback costs one message, never the site's connection loop.

The harness's scripted peer answers CONNECT and SUBSCRIBE, then sends a QoS 1 PUBLISH whose
topic is not UTF-8 (paho's message.topic raises inside our on_message), then a valid QoS 0
PUBLISH. The exporter runs as a real subprocess.
"""
import pytest

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
    assert "Traceback" not in exp.log_text(), exp.log_tail(30)


@pytest.mark.timeout(60)
def test_refused_subscription_is_logged_and_shown_in_health(fake_v5_factory, exporter_factory):
    peer = fake_v5_factory(suback_code=0x80)  # e.g. an ACL refusing site_a/#
    exp = start(exporter_factory, peer)
    exp.wait_log(r"refused 1 of the subscriptions \['site_a/#'\]", 15)
    _, body = exp.health(verbose=True)
    assert body["sites"][0]["subscriptions_refused"] == 1
