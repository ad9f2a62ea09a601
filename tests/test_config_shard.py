"""Tests for exporter.config.shard: MQTT_SHARD / MQTT_SHARDS as load_settings reads them, and the
rendezvous hashing itself (golden owners, balance, what moves when N changes)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from exporter.config import ConfigError, Shard, load_settings, reload_sites
from exporter.config.shard import instance_id_warning, owner, score, select, spread

from .support import REPO_ROOT
from .test_config_sites import GOOD, errors_of, load, write_sites

NAMES = [f"tenant-{i}" for i in range(10_000)]


def sites(count: int) -> list[dict]:
    return [{**GOOD, "name": f"site-{i:03d}"} for i in range(count)]


# --- configuration: MQTT_SHARD, MQTT_SHARDS and the host name ---------------------------

@pytest.mark.parametrize("environ, message", [
    ({"MQTT_SHARD": "1"}, "environment: MQTT_SHARD: must be i/N"),
    ({"MQTT_SHARD": "a/b"}, "environment: MQTT_SHARD: must be i/N"),
    ({"MQTT_SHARD": "-1/3"}, "environment: MQTT_SHARD: must be i/N"),
    ({"MQTT_SHARD": "3/3"}, "environment: MQTT_SHARD: i must be below N (0..2), got 3"),
    ({"MQTT_SHARD": "0/0"}, "environment: MQTT_SHARD: N must be 1..10000, got 0"),
    ({"MQTT_SHARDS": "-1"}, "environment: MQTT_SHARDS: "),
    ({"MQTT_SHARDS": "three"}, "environment: MQTT_SHARDS: "),
    ({"MQTT_SHARD": "0/3", "MQTT_SHARDS": "3", "HOSTNAME": "mse-0"},
     "environment: MQTT_SHARDS: set MQTT_SHARD or MQTT_SHARDS, not both"),
    ({"MQTT_SHARDS": "3", "HOSTNAME": "mse-3"},
     "environment: MQTT_SHARDS: the host name 'mse-3' gives ordinal 3, not below MQTT_SHARDS=3"),
    ({"MQTT_SHARDS": "3", "HOSTNAME": "mse"},
     "environment: MQTT_SHARDS: the host name 'mse' does not end in -<ordinal>"),
    ({"MQTT_SHARDS": "3", "HOSTNAME": "web-7d9f8b6c5d-x2k9q"},
     "environment: MQTT_SHARDS: the host name 'web-7d9f8b6c5d-x2k9q' does not end in"),
], ids=["no-slash", "not-numbers", "negative", "index-too-high", "zero-shards",
        "shards-negative", "shards-not-a-number", "both", "ordinal-too-high", "no-ordinal",
        "deployment-pod"])
def test_a_bad_shard_setting_is_one_error_naming_the_variable(tmp_path, environ, message):
    [error] = errors_of(tmp_path, sites(3), **environ)
    assert error.startswith(message), error


def test_shard_from_the_flag_is_named_so_and_wins_over_mqtt_shards(tmp_path):
    write_sites(tmp_path, sites(30))
    environ = {"MQTT_SHARDS": "3", "HOSTNAME": "mse-0"}
    settings = load_settings(environ, cwd=str(tmp_path), overrides={"MQTT_SHARD": "2/3"})
    assert settings.shard == Shard(2, 3)
    with pytest.raises(ConfigError) as info:
        load_settings({}, cwd=str(tmp_path), overrides={"MQTT_SHARD": "2-3"})
    assert str(info.value).startswith("flag --shard (MQTT_SHARD): must be i/N"), info.value


def test_mqtt_shards_takes_the_ordinal_of_a_statefulset_pod_name(tmp_path):
    settings = load(tmp_path, sites(30), MQTT_SHARDS="3", HOSTNAME="mqtt-site-exporter-2")
    assert settings.shard == Shard(2, 3) and settings.sites_total == 30
    assert [s.name for s in settings.sites] == [
        f"site-{i:03d}" for i in range(30) if owner(f"site-{i:03d}", 3) == 2]


@pytest.mark.parametrize("environ", [{"MQTT_SHARD": "0/1"},
                                     {"MQTT_SHARDS": "1", "HOSTNAME": "mse-0"}, {}])
def test_one_shard_or_none_holds_every_site(tmp_path, environ):
    settings = load(tmp_path, sites(20), **environ)
    assert len(settings.sites) == settings.sites_total == 20


def test_the_shards_partition_the_sites_and_a_reload_keeps_the_shard(tmp_path):
    held: list[str] = []
    for index in range(3):
        settings = load(tmp_path, sites(60), MQTT_SHARD=f"{index}/3")
        held += [s.name for s in settings.sites]
        reloaded = reload_sites(settings, "sites:\n" + "".join(
            f"  - {{name: extra-{i}, host: h}}\n" for i in range(30)))
        assert reloaded.shard == Shard(index, 3) and reloaded.sites_total == 30
        assert all(owner(s.name, 3) == index for s in reloaded.sites)
    assert sorted(held) == [f"site-{i:03d}" for i in range(60)]


# --- the hash -----------------------------------------------------------------------------

#: Owners as computed when sharding shipped. If this test fails, the hash changed: every
#: deployment would move most of its sites to other replicas on upgrade.
GOLDEN = {"site-000": (1, 1, 1), "plant_berlin": (2, 2, 5), "a": (2, 2, 9),
          "tenant-42-gateway": (1, 3, 4), "Z": (1, 3, 9)}


def test_golden_owners_so_a_change_of_the_hash_is_caught():
    assert {name: (owner(name, 3), owner(name, 4), owner(name, 10)) for name in GOLDEN} == GOLDEN
    assert (score("site-000", 0), score("site-000", 1)) == (0x1F03632469D2CF8A,
                                                            0xCEF2B2AB779BF7A1)


def test_a_fresh_process_computes_the_same_owners():
    """A replica restart moves no site: owners do not depend on the process (hash seed)."""
    code = ("from exporter.config.shard import owner; "
            "print(','.join(str(owner(f'tenant-{i}', 5)) for i in range(500)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, env={"PYTHONHASHSEED": "12345", "PATH": ""}, check=True,
                         cwd=REPO_ROOT)
    assert out.stdout.strip() == ",".join(str(owner(f"tenant-{i}", 5)) for i in range(500))


@pytest.mark.parametrize("count", [3, 4, 8])
def test_balance_within_a_percentage_point_of_one_nth(count):
    held = spread(NAMES, count)
    assert sum(held) == len(NAMES)
    assert all(abs(h / len(NAMES) - 1 / count) < 0.01 for h in held), held


@pytest.mark.parametrize("count", [1, 3, 4, 8])
def test_n_to_n_plus_one_moves_only_to_the_new_shard_and_about_one_in_n_plus_one(count):
    before = {name: owner(name, count) for name in NAMES}
    after = {name: owner(name, count + 1) for name in NAMES}
    moved = [name for name in NAMES if before[name] != after[name]]
    assert {after[name] for name in moved} == {count}  # only to the new shard
    expected = len(NAMES) / (count + 1)
    sigma = math.sqrt(len(NAMES) * (1 / (count + 1)) * (count / (count + 1)))
    assert abs(len(moved) - expected) < 4 * sigma, (len(moved), expected)


def test_select_keeps_document_order_and_no_shard_keeps_everything():
    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

    items = [Named(f"s{i}") for i in range(200)]
    chosen = select(items, Shard(1, 4))
    assert [i.name for i in chosen] == [i.name for i in items if owner(i.name, 4) == 1]
    assert select(items, None) == tuple(items) == select(items, Shard(0, 1))


# --- the instance ID warning ---------------------------------------------------------------

@pytest.mark.parametrize("instance_id", ["mqtt-site-exporter-7d9f8b6c5d-x2k9q",
                                         "mse-6b7c9d8f5-b9zvw", "a-bcdfghjklm-22222"])
def test_a_deployment_pod_name_as_instance_id_is_warned_about(instance_id):
    warning = instance_id_warning(instance_id)
    assert warning is not None and "Deployment pod name" in warning and "rollout" in warning


@pytest.mark.parametrize("instance_id", ["mse-0", "mqtt-site-exporter-12", "exporter-prod",
                                         "vm-eu-west-1", "host.example.org",
                                         "web-7d9f8b6c5d-abcde"])
def test_stable_names_are_not_warned_about(instance_id):
    assert instance_id_warning(instance_id) is None
