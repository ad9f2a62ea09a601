"""Test support: real brokers, real processes, real sockets. No mocks.

Imported by the tests and by the benchmarks (``from tests.support import Broker``; the
repository root is on ``sys.path`` under pytest and under ``python -m bench``).
Everything listens on 127.0.0.1 only.

- :mod:`.net`: free ports, ``wait_until``, process clean-up, a paho client factory
- :mod:`.process`: what the broker processes share (start, stop, freeze, clean-up)
- :mod:`.broker`: a real Mosquitto (``Broker``) and its log accounting; ``StatusWatcher``
- :mod:`.exporter`: the exporter as a subprocess (``ExporterProcess``)
- :mod:`.scripted`: a scripted MQTT peer (``FakeV5Broker``)
- :mod:`.prometheus`: a real Prometheus (``Prometheus``)
"""
from .amqtt import AMQTT_MISSING, AmqttBroker, find_amqtt
from .broker import Broker, StatusWatcher, retained, retained_all
from .exporter import ExporterProcess, site
from .net import (
                  HOST,
                  MOSQUITTO_MISSING,
                  REPO_ROOT,
                  find_mosquitto,
                  find_tool,
                  free_port,
                  kill_proc,
                  mqtt_client,
                  port_accepts,
                  wait_until,
)
from .scripted import ConnectInfo, FakeV5Broker, parse_connect

__all__ = [
                  "AMQTT_MISSING",
                  "HOST",
                  "MOSQUITTO_MISSING",
                  "REPO_ROOT",
                  "AmqttBroker",
                  "Broker",
                  "ConnectInfo",
                  "ExporterProcess",
                  "FakeV5Broker",
                  "StatusWatcher",
                  "find_amqtt",
                  "find_mosquitto",
                  "find_tool",
                  "free_port",
                  "kill_proc",
                  "mqtt_client",
                  "parse_connect",
                  "port_accepts",
                  "retained",
                  "retained_all",
                  "site",
                  "wait_until",
]
