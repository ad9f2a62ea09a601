"""Baseline for the bridge benchmark: a bare paho + gevent subscriber that counts messages.

``python bench/bare_subscriber.py`` with BENCH_MQTT_HOST, BENCH_MQTT_PORT, BENCH_TOPIC
(default ``bench/sensors/#``) and BENCH_LISTEN (``host:port``). One paho 2.x client driven
by one greenlet the way the exporter drives its sites (wait on the socket with a gevent
watcher, then ``loop_read``/``loop_write``/``loop_misc``), ``on_message`` only counts, and
``GET /count`` (gevent.pywsgi, in the same hub) answers ``{"count": n, "connected": bool}``.
No parsing, no metrics: the ceiling of a plain paho client under gevent.
"""
from gevent import monkey

monkey.patch_all()

import json
import os
import signal

import gevent
import gevent.socket
import paho.mqtt.client as mqtt
from gevent.pywsgi import WSGIServer

count = 0
connected = False


def on_connect(client, userdata, flags, reason_code, properties):
    global connected
    connected = not reason_code.is_failure
    client.subscribe(os.environ.get("BENCH_TOPIC", "bench/sensors/#"), qos=0)


def on_message(client, userdata, message):
    global count
    count += 1


def serve(client) -> None:
    sock = client.socket()
    loop = gevent.get_hub().loop
    rd, rw = loop.io(sock.fileno(), 1), loop.io(sock.fileno(), 3)
    while client.socket() is not None:
        try:
            gevent.socket.wait(rw if client.want_write() else rd, timeout=5.0)
        except TimeoutError:
            pass
        if (client.loop_read() or (client.want_write() and client.loop_write())
                or client.loop_misc()):
            return


def app(environ, start_response):
    body = json.dumps({"count": count, "connected": connected}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def main() -> None:
    host, port = os.environ.get("BENCH_LISTEN", "127.0.0.1:9999").rsplit(":", 1)
    server = WSGIServer((host, int(port)), app, log=None)
    server.start()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-bare-{os.getpid()}")
    client.on_connect, client.on_message = on_connect, on_message
    client.connect(os.environ.get("BENCH_MQTT_HOST", "127.0.0.1"),
                   int(os.environ["BENCH_MQTT_PORT"]), keepalive=60)
    worker = gevent.spawn(serve, client)
    gevent.signal_handler(signal.SIGTERM, worker.kill)
    worker.join()
    server.stop(timeout=0)


if __name__ == "__main__":
    main()
