"""Sharding end to end: replicas as real processes over 300 sites on one real Mosquitto, like the
pods of a StatefulSet (``MQTT_SHARDS=N``, ``HOSTNAME`` and the instance ID ``mse-<i>``).

Who holds a site is checked twice: broker-side (which client IDs ``<site>_imse-<i>`` are
connected, from Mosquitto's log) and exporter-side (``mqtt_site_up`` in each ``/metrics``).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from exporter.config.shard import owner
from tests.support import site, wait_until
from tests.support.broker import retained_all

pytestmark = pytest.mark.timeout(90)

SITE_NAMES = [f"site-{i:03d}" for i in range(300)]
ENV = {"MQTT_BACKOFF_MIN_SECONDS": "0.2", "MQTT_BACKOFF_MAX_SECONDS": "1",
       "MQTT_SHUTDOWN_TIMEOUT": "3", "MQTT_SITES_RELOAD_SECONDS": "0"}
SITE_UP = re.compile(r'^mqtt_site_up\{site="([^"]+)"\} (\S+)$', re.M)


def start_replica(exporter_factory, broker, index: int, count: int, sites=SITE_NAMES):
    """Replica ``index`` of ``count``: instance ID and host name ``mse-<index>``."""
    name = f"mse-{index}"
    return exporter_factory([site(n, broker) for n in sites], instance_id=name,
                            env={**ENV, "MQTT_SHARDS": str(count), "HOSTNAME": name})


def site_up(exp) -> dict[str, float]:
    """``mqtt_site_up`` of one replica, by site."""
    return {name: float(value) for name, value in SITE_UP.findall(exp.metrics_text())}


def up_sites(exp) -> set[str]:
    return {name for name, value in site_up(exp).items() if value == 1}


def wait_all_held(replicas, sites=SITE_NAMES, timeout: float = 20) -> list[set[str]]:
    """Until every site is up on some replica; then each replica's up sites."""
    held: list[list[set[str]]] = [[]]

    def covered():
        held[0] = [up_sites(exp.wait_ready()) for exp in replicas]
        return set().union(*held[0]) == set(sites)

    wait_until(covered, timeout, interval=0.1,
               message=f"all sites up: {[len(h) for h in held[0]]} per replica")
    return held[0]


def broker_view(broker) -> tuple[Counter, dict[str, set[str]]]:
    """(count of each (event kind, replica client ID), the client IDs live per site), from one
    pass over the broker's log, after a sentinel (every earlier connection is logged by then)."""
    broker.sentinel()
    counts: Counter = Counter()
    live: Counter = Counter()
    for _, kind, client_id in broker.events():
        if "_imse-" not in client_id:  # sentinels, the broker's own port probe
            continue
        counts[kind, client_id] += 1
        live[client_id] += 1 if kind == "connect" else -1 if live[client_id] > 0 else 0
    holders: dict[str, set[str]] = {name: set() for name in SITE_NAMES}
    for client_id, n in live.items():
        name, sep, _ = client_id.partition("_imse-")
        if n > 0 and sep and name in holders:
            holders[name].add(client_id)
    return counts, holders


def assert_partition(replicas, held: list[set[str]], count: int) -> None:
    """Each site up on exactly one replica, the one rendezvous hashing names, and no replica
    has a series for another's site."""
    assert sum(len(h) for h in held) == len(SITE_NAMES), [len(h) for h in held]
    for index, (exp, sites) in enumerate(zip(replicas, held)):
        assert sites == {n for n in SITE_NAMES if owner(n, count) == index}, index
        assert set(site_up(exp)) == sites, index


def assert_one_holder_each(holders: dict[str, set[str]], held: list[set[str]]) -> None:
    """Broker-side: one live client ID per site, the one of the replica that reports it up."""
    expected = {name: {f"{name}_imse-{index}"} for index, sites in enumerate(held)
                for name in sites}
    assert holders == expected, {n: h for n, h in holders.items() if h != expected.get(n)}


def scale_up(exporter_factory, broker, replicas, sites=SITE_NAMES) -> list[set[str]]:
    """N -> N+1: replica N starts with MQTT_SHARDS=N+1 and holds its sites (the moved ones
    are held twice meanwhile, under two client IDs), then the N others restart with it."""
    count = len(replicas) + 1
    replicas.append(start_replica(exporter_factory, broker, count - 1, count, sites))
    mine = {n for n in sites if owner(n, count) == count - 1}
    wait_until(lambda: up_sites(replicas[-1].wait_ready()) == mine, 20,
               message="the new replica holds its sites")
    for exp in replicas[:-1]:
        exp.terminate()
    for exp in replicas[:-1]:
        assert exp.wait_exit(15) == 0
        exp.env["MQTT_SHARDS"] = str(count)
        exp.start()
    return wait_all_held(replicas, sites)


def test_replicas_partition_the_sites_a_restart_moves_none_and_a_fourth_takes_a_quarter(
        broker, exporter_factory):
    replicas = [start_replica(exporter_factory, broker, i, 3) for i in range(3)]
    held = wait_all_held(replicas)
    assert_partition(replicas, held, 3)
    assert all(len(h) > 60 for h in held), [len(h) for h in held]  # 100 +- a few sigma
    counts, holders = broker_view(broker)
    assert_one_holder_each(holders, held)
    for index in range(3):  # the replica reports its shard
        assert replicas[index].metric("mqtt_exporter_shard") == index
        assert replicas[index].metric("mqtt_exporter_shards") == 3
        assert replicas[index].metric("mqtt_exporter_config_sites") == len(SITE_NAMES)

    # Restart replica 1 (SIGTERM, start again with the same environment): it takes the same
    # sites back; the others' connections see no connect and no disconnect.
    restarted = replicas[1]
    restarted.terminate()
    assert restarted.wait_exit(15) == 0
    restarted.start()
    assert wait_all_held(replicas) == held
    after, holders = broker_view(broker)
    assert_one_holder_each(holders, held)
    changed = {key for key in set(counts) | set(after) if counts[key] != after[key]}
    assert all(client_id.endswith("_imse-1") for _, client_id in changed), sorted(changed)[:5]
    assert {cid for kind, cid in changed if kind == "connect"} == {
        f"{name}_imse-1" for name in held[1]}

    # 3 -> 4 shards as a StatefulSet does it: the fourth replica starts with MQTT_SHARDS=4
    # and is ready, then the three restart with MQTT_SHARDS=4. Only its sites move.
    now = scale_up(exporter_factory, broker, replicas)
    assert_partition(replicas, now, 4)
    moved = {n for n in SITE_NAMES if next(i for i, h in enumerate(now) if n in h)
             != next(i for i, h in enumerate(held) if n in h)}
    assert moved == now[3], "a site moved between two old replicas"
    assert 45 <= len(moved) <= 105, len(moved)  # a quarter of 300, +- 4 sigma
    assert_one_holder_each(broker_view(broker)[1], now)


def test_a_moved_site_stays_online_after_its_old_holder_restarts(broker, exporter_factory):
    """After 2 -> 3 shards, every site's retained status is 'online': a site's status topic
    is one per site, not per holder, so the new holder answers the old holder's farewell
    'offline' with 'online' again."""
    sites = SITE_NAMES[:40]
    replicas = [start_replica(exporter_factory, broker, i, 2, sites) for i in range(2)]
    wait_all_held(replicas, sites)
    scale_up(exporter_factory, broker, replicas, sites)

    def all_online():
        statuses = retained_all(broker, "+/backend/status")
        return {n: statuses.get(f"{n}/backend/status") for n in sites} == dict.fromkeys(
            sites, "online")

    wait_until(all_online, 10, message="every site's retained status 'online'")
