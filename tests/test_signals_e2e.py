"""Signals an operator sends, to the exporter as a real subprocess (issue #9, "Signals").

SIGHUP (reload the sites; here with nothing changed), SIGUSR1 (every site's
state and every greenlet's stack in the log, keeps running), SIGUSR2 (logged, ignored) and
SIGQUIT (a clean shutdown like SIGTERM: `offline` published, shutdown recorded, exit 0).
Before #9 each of them killed the process by its default action, with no log line and no
farewell. Synchronisation is always a wait on a log line, a metric or a broker event.

Also here, in process: the SIGUSR1 dump of a thousand sites does not hold the hub for long.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import time

import pytest

from tests.support import retained, site, wait_until
from tests.support.fakes import site_state

pytestmark = pytest.mark.timeout(40)

INSTANCE = "test"
START_TIMEOUT = 15.0
CONNECT_TIMEOUT = 15.0
FAST_ENV = {"MQTT_BACKOFF_MIN_SECONDS": "0.2", "MQTT_BACKOFF_MAX_SECONDS": "1",
            "MQTT_CONNECT_TIMEOUT": "5"}
NAMES = ("alpha", "beta")


def cid(name: str) -> str:
    return f"{name}_i{INSTANCE}"


def samples(proc, name: str) -> dict[str, float]:
    """{site: value} of one per-site sample."""
    return {dict(labels)["site"]: v for (n, labels), v in proc.metrics().items()
            if n == name and "site" in dict(labels) and len(labels) == 1}


def start_connected(broker, exporter_factory, env=None):
    """An exporter with the sites of NAMES, every one connected (metric and broker log)."""
    proc = exporter_factory([site(n, broker) for n in NAMES], instance_id=INSTANCE,
                            env={**FAST_ENV, **(env or {})})
    proc.wait_ready(START_TIMEOUT)
    wait_until(lambda: sum(samples(proc, "mqtt_site_up").values()) == len(NAMES),
               CONNECT_TIMEOUT, interval=0.05, message="every site up")
    for n in NAMES:
        wait_until(lambda n=n: broker.connects(cid(n)) == 1, CONNECT_TIMEOUT,
                   message=broker.log_text())
    return proc


def assert_untouched(proc, broker) -> None:
    """Still running and healthy, every site still on its first connection."""
    assert proc.running, proc.log_tail()
    status, body = proc.health()
    assert status == 200 and body.get("status") == "healthy", (status, body)
    assert samples(proc, "mqtt_site_up") == dict.fromkeys(NAMES, 1.0)
    assert samples(proc, "mqtt_site_connects_total") == dict.fromkeys(NAMES, 1.0)
    assert samples(proc, "mqtt_site_reconnect_attempts_total") == dict.fromkeys(NAMES, 0.0)
    for n in NAMES:
        assert broker.connects(cid(n)) == 1 and broker.disconnects(cid(n)) == 0, broker.log_text()


def test_sighup_with_an_unchanged_file_reloads_nothing_and_keeps_running(
        broker, exporter_factory):
    """SIGHUP reloads the sites (tests/test_reload_e2e.py has the changes); with the same
    file nothing moves. Neither it nor SIGUSR2 kills the process."""
    proc = start_connected(broker, exporter_factory)
    proc.signal(signal.SIGHUP)
    proc.wait_log(r"Sites reloaded from .*: no change", 10)
    proc.signal(signal.SIGHUP)
    proc.signal(signal.SIGUSR2)
    proc.wait_log(r"SIGUSR2 received: not used by this exporter; ignored", 10)
    wait_until(lambda: proc.log_text().count(": no change") == 2, 10, message=proc.log_tail())
    assert_untouched(proc, broker)
    assert proc.metrics()[("mqtt_exporter_config_reloads_total", frozenset())] == 2
    assert "shutting down" not in proc.log_text()


def test_sigusr1_dumps_sites_and_greenlet_stacks_and_keeps_running(broker, exporter_factory):
    proc = start_connected(broker, exporter_factory, env={"LOG_FORMAT": "json"})
    proc.signal(signal.SIGUSR1)
    proc.wait_log(r"SIGUSR1 dump done: 2 sites, \d+ greenlets", 10)
    records = [json.loads(line) for line in proc.log_text().splitlines()
               if line.startswith("{")]
    per_site = {r["site"]: r["message"] for r in records
                if r.get("site") and r["message"].startswith("Site state:")}
    assert set(per_site) == set(NAMES), records[-10:]
    for n in NAMES:
        line = per_site[n]
        assert "state=connected" in line and f"client_id={cid(n)}" in line, line
        assert re.search(r"connected_since=\d{4}-\d\d-\d\dT\S+Z \(\d+s ago\)", line), line
        assert "last_disconnect=-" in line and "cooldown_left=0s" in line, line
        assert "duplicate=-" in line, line
    stacks = [r["message"] for r in records if r["message"].startswith("Greenlet stack")]
    # The site greenlets wait in exporter/connection.py; the dump itself runs too.
    assert any("exporter/connection.py" in s for s in stacks), stacks
    assert any("dump_state" in s for s in stacks), stacks
    assert_untouched(proc, broker)


def test_sigquit_shuts_down_like_sigterm(broker, exporter_factory, status_watcher):
    watcher = status_watcher(broker)
    proc = start_connected(broker, exporter_factory)
    for n in NAMES:
        watcher.wait_for(f"{n}/backend/status", "online", CONNECT_TIMEOUT)
    t_sig = time.monotonic()
    proc.signal(signal.SIGQUIT)
    assert proc.wait_exit(10) == 0, proc.log_tail()
    for n in NAMES:
        watcher.wait_for(f"{n}/backend/status", "offline", 10, after=t_sig)
        assert retained(broker, f"{n}/backend/status", timeout=10) == "offline"
    log = proc.log_text()
    assert "SIGQUIT received: shutting down" in log
    assert re.search(r"All connections disconnected in \d+\.\d\d s", log), proc.log_tail()
    history = json.loads((proc.state_dir / "shutdown-history.json").read_text())
    assert history["count"] == 1 and history["last_timed_out"] is False, history
    # The broker saw our goodbye (a clean disconnect), not a lost connection.
    for n in NAMES:
        wait_until(lambda n=n: broker.disconnects(cid(n)) == 1, 10, message=broker.log_text())
    assert "Traceback" not in log


@pytest.mark.timeout(30)
def test_sigusr1_dump_of_1000_sites_never_holds_the_hub_long():
    """In process: 1000 site states and 1000 greenlets waiting like site connections. The
    dump yields between chunks of sites; the longest stretch without yielding stays short,
    and the identical stacks come out as one group."""
    import gevent
    from gevent.event import Event

    from exporter.logs import dump_state

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    log = logging.getLogger("test.dump")
    handler = Collect()
    log.addHandler(handler)
    log.propagate = False
    release = Event()

    def waiting_site() -> None:
        release.wait()

    greenlets = [gevent.spawn(waiting_site) for _ in range(1000)]
    gevent.sleep(0)
    states = [site_state(f"s{i:04d}", state="cooldown" if i % 2 else "connected",
                         cooldown_until_monotonic=time.monotonic() + 30)
              for i in range(1000)]
    marks = [time.perf_counter()]
    try:
        dump_state(states, log, pause=lambda: marks.append(time.perf_counter()))
        marks.append(time.perf_counter())
    finally:
        release.set()
        gevent.joinall(greenlets, timeout=5)
        log.removeHandler(handler)
    holds = [b - a for a, b in itertools.pairwise(marks)]
    print(f"\nSIGUSR1 dump, 1000 sites: {sum(holds) * 1000:.1f} ms in total, longest stretch "
          f"without yielding {max(holds) * 1000:.1f} ms")
    assert len(marks) >= 6  # yielded every 200 sites
    assert max(holds) < 0.5, holds
    messages = [r.getMessage() for r in handler.records]
    site_lines = [r for r in handler.records if getattr(r, "site", None)]
    assert len(site_lines) == 1000
    assert "state=cooldown" in site_lines[1].getMessage()
    assert re.search(r"cooldown_left=(29|30)s", site_lines[1].getMessage())
    grouped = [m for m in messages if m.startswith("Greenlet stack (1000 greenlet(s)")]
    assert len(grouped) == 1 and "waiting_site" in grouped[0], messages[-5:]
    assert len(messages) < 1000 + 20
