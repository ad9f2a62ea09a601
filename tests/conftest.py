"""Fixtures over tests/support/: real mosquitto brokers, exporter processes, status watchers.

Every process a fixture starts is SIGCONTed and SIGKILLed at teardown, pass or fail.
"""

from __future__ import annotations

import pytest

from tests import support
from tests.support import Broker, ExporterProcess, FakeV5Broker, StatusWatcher


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item so teardown can tell whether the test failed.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _failed(request) -> bool:
    node = request.node
    return any(getattr(getattr(node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    """Path of the mosquitto binary; fails the tests that need it with a clear message."""
    path = support.find_mosquitto()
    if path is None:
        pytest.fail(support.MOSQUITTO_MISSING, pytrace=False)
    return path


@pytest.fixture
def broker_factory(mosquitto_bin, tmp_path, request):
    """make(users=None, port=None, extra_conf="", start=True) -> Broker, in tmp_path/broker-N."""
    brokers: list[Broker] = []

    def make(users=None, port=None, extra_conf="", start=True) -> Broker:
        b = Broker(tmp_path / f"broker-{len(brokers)}", users=users, port=port, extra_conf=extra_conf)
        brokers.append(b)
        if start:
            b.start()
        return b

    yield make
    failed = _failed(request)
    for b in brokers:
        b.cleanup()
        if failed:
            print(f"\n===== {b!r} =====\n{b.diagnostics()}")


@pytest.fixture
def broker(broker_factory) -> Broker:
    """A started anonymous mosquitto on 127.0.0.1:<free port>."""
    return broker_factory()


@pytest.fixture
def fake_v5_factory():
    """make(**FakeV5Broker options) -> FakeV5Broker; all closed at teardown."""
    fakes: list[FakeV5Broker] = []

    def make(**kwargs) -> FakeV5Broker:
        f = FakeV5Broker(**kwargs)
        fakes.append(f)
        return f

    yield make
    for f in fakes:
        f.close()


@pytest.fixture
def exporter_factory(tmp_path, request):
    """make(sites, instance_id="test", state_dir=None, env=None, command=None, start=True)
    -> ExporterProcess in tmp_path/exporter-N. All killed at teardown; on failure each one's
    log tail is printed (pytest shows teardown output of failed tests)."""
    procs: list[ExporterProcess] = []

    def make(sites, instance_id="test", state_dir=None, env=None, command=None, start=True):
        p = ExporterProcess(tmp_path / f"exporter-{len(procs)}", sites, instance_id=instance_id,
                            state_dir=state_dir, env=env, command=command)
        procs.append(p)
        if start:
            p.start()
        return p

    yield make
    failed = _failed(request)
    for p in procs:
        was_running = p.running
        p.cleanup()
        if failed:
            print(f"\n===== exporter {p.dir.name} (instance {p.instance_id}, pid {p.pid}, "
                  f"{'killed at teardown' if was_running else f'rc={p.returncode}'}) log tail =====\n"
                  f"{p.log_tail(80)}")


@pytest.fixture
def status_watcher():
    """make(broker, topic_filter="+/backend/status", qos=1) -> StatusWatcher (subscribed);
    all closed at teardown."""
    watchers: list[StatusWatcher] = []

    def make(broker, topic_filter="+/backend/status", **kwargs) -> StatusWatcher:
        w = StatusWatcher(broker, topic_filter, **kwargs)
        watchers.append(w)
        return w

    yield make
    for w in watchers:
        try:
            w.close()
        except Exception:
            pass


@pytest.fixture
def prometheus_factory(tmp_path, request):
    """make(targets, rule_files=(), interval="1s") -> started tests.support.prometheus.Prometheus in
    tmp_path/prometheus-N scraping the ``host:port`` targets; all killed at teardown."""
    from tests.support.prometheus import Prometheus

    servers: list[Prometheus] = []

    def make(targets, rule_files=(), interval="1s") -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus-{len(servers)}", targets, rule_files,
                            interval)
        servers.append(server)
        return server.start()

    yield make
    failed = _failed(request)
    for server in servers:
        server.cleanup()
        if failed:
            print(f"\n===== prometheus {server.url} log tail =====\n{server.log_tail()}")


@pytest.fixture(scope="session")
def amqtt_bin() -> str:
    """Path of amqtt 0.12.1 (.venv-amqtt, made by `make test`); fails the tests that need it
    with the command that installs it."""
    path = support.find_amqtt()
    if path is None:
        pytest.fail(support.AMQTT_MISSING, pytrace=False)
    return path


@pytest.fixture
def amqtt_broker(amqtt_bin, tmp_path, request):
    """A started amqtt 0.12.1 (MQTT 3.1.1, anonymous) on 127.0.0.1:<free port>: a broker that
    keeps both clients with one client ID connected. Killed at teardown; log tail on failure."""
    b = support.AmqttBroker(tmp_path / "amqtt").start()
    yield b
    failed = _failed(request)
    b.cleanup()
    if failed:
        print(f"\n===== {b!r} =====\n{b.diagnostics()}")
