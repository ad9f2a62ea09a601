"""The service's start-up for many sites (exporter/supervisor.py): the collector paused while
it builds, one backoff generator, one connect gate per broker endpoint. In-process, no
network: the connections are built, not started (tests/test_lifecycle.py runs the service).
"""
from __future__ import annotations

import gc

import pytest

from exporter.config import Settings, SiteConfig
from exporter.supervisor import Service, collector_paused

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("enabled", [True, False])
def test_collector_paused_restores_the_collector_as_it_was(enabled):
    seen = []

    @collector_paused
    def build(fail: bool) -> str:
        seen.append(gc.isenabled())
        if fail:
            raise ValueError("bad")
        return "built"

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        assert build(False) == "built"
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError):
            build(True)
        assert gc.isenabled() is enabled and seen == [False, False]
    finally:
        (gc.enable if was else gc.disable)()


def test_sites_share_the_rng_and_one_connect_gate_per_endpoint(tmp_path):
    sites = tuple(SiteConfig(name=f"s{i}", host="127.0.0.1", port=1883 + i % 2)
                  for i in range(4))
    settings = Settings(sites_file="unused.yml", instance_id="t", sites=sites,
                        state_dir=str(tmp_path))
    service = Service(settings)
    assert len({id(c.policy.rng) for c in service.connections}) == 1
    gates = [c._slot.slots for c in service.connections]
    assert gates[0] is gates[2] and gates[1] is gates[3] and gates[0] is not gates[1]
    assert gc.isenabled()


def test_a_connection_keeps_few_enough_attributes_to_share_its_dict_keys(tmp_path):
    """CPython 3.11 shares one dict's keys among the instances of a class up to 29
    attributes: 300 bytes a site; one more attribute makes it 1.6 KB a site."""
    import sys
    sites = tuple(SiteConfig(name=f"s{i}", host="127.0.0.1", port=1883) for i in range(3))
    service = Service(Settings(sites_file="unused.yml", instance_id="t", sites=sites,
                               state_dir=str(tmp_path)))
    conn = service.connections[-1]
    assert len(vars(conn)) <= 29
    if sys.version_info[:2] == (3, 11):
        assert sys.getsizeof(vars(conn)) < 1000
