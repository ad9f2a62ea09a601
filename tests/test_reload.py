"""Tests for exporter.reload: the Reloader and ConfigStatus, over a real sites file and a
stand-in service that records what it is asked to apply (the Service's side, broker-side, is
proven by tests/test_reload_e2e.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from exporter.config import Settings, load_settings
from exporter.reload import MAX_ERRORS_SHOWN, ConfigStatus, Reloader
from exporter.supervisor import SiteChanges
from tests.support.fakes import FakeClock

SITE = {"name": "a", "host": "broker.example.org"}


def write(tmp_path, sites) -> None:
    """Atomic, like a ConfigMap update: a new inode every time."""
    tmp = tmp_path / "sites.tmp"
    tmp.write_text(yaml.safe_dump({"sites": sites}))
    os.replace(tmp, tmp_path / "sites.yml")


@dataclass
class Recorder:
    """What the Reloader drives: settings, config_status, apply()."""

    settings: Settings
    config_status: ConfigStatus = field(default_factory=lambda: ConfigStatus(True, 0.0))
    applied: list[tuple[str, ...]] = field(default_factory=list)

    def apply(self, settings: Settings) -> SiteChanges:
        before = {s.name for s in self.settings.sites}
        self.settings = settings
        self.applied.append(tuple(s.name for s in settings.sites))
        return SiteChanges(added=tuple(s.name for s in settings.sites if s.name not in before))


def reloader(tmp_path, sites, **environ) -> tuple[Reloader, Recorder, FakeClock]:
    write(tmp_path, sites)
    settings = load_settings({"MQTT_STATE_DIR": str(tmp_path), **environ}, cwd=str(tmp_path))
    clock = FakeClock(wall=1000.0)
    service = Recorder(settings)
    return Reloader(service, clock), service, clock


def test_unchanged_file_is_not_read_again_and_not_counted(tmp_path):
    r, service, _ = reloader(tmp_path, [SITE])
    assert r.reload() is None and r.reload() is None
    assert service.applied == [] and service.config_status.reloads == 0


def test_a_change_is_applied_and_recorded(tmp_path):
    r, service, clock = reloader(tmp_path, [SITE])
    write(tmp_path, [SITE, {**SITE, "name": "b"}])
    clock.advance(5)
    assert r.reload() is True
    assert service.applied == [("a", "b")]
    status = service.config_status
    assert (status.successful, status.success_at, status.reloads, status.failures) == (
        True, 1005.0, 1, 0)
    assert status.last_changes == "1 added, 0 removed, 0 changed" and status.sites_total == 2


def test_force_reads_an_unchanged_file(tmp_path):
    r, service, _ = reloader(tmp_path, [SITE])
    assert r.reload(force=True) is True
    assert service.applied == [("a",)]


def test_an_invalid_document_is_rejected_whole(tmp_path):
    r, service, clock = reloader(tmp_path, [SITE])
    write(tmp_path, [{**SITE, "name": "b"}, {**SITE, "port": "x"},
                     *({"name": f"bad{i}"} for i in range(30))])
    clock.advance(5)
    assert r.reload() is False
    assert service.applied == []
    status = service.config_status
    assert (status.successful, status.success_at, status.at, status.failures) == (
        False, 0.0, 1005.0, 1)
    assert len(status.errors) == MAX_ERRORS_SHOWN and status.more_errors == 11
    assert "site 'a' (#2): key 'port'" in status.errors[0]
    # The same broken file is not re-read at every poll; a fixed one is applied.
    assert r.reload() is None
    write(tmp_path, [SITE, {**SITE, "name": "b"}])
    assert r.reload() is True and service.config_status.errors == ()


def test_an_unreadable_document_is_a_failure_naming_it(tmp_path):
    r, service, _ = reloader(tmp_path, [SITE])
    (tmp_path / "sites.yml").unlink()
    assert r.reload() is False
    assert service.config_status.errors == (f"{tmp_path / 'sites.yml'}: file not found",)


def test_reload_respects_the_shard(tmp_path):
    names = [f"s{i}" for i in range(40)]
    r, service, _ = reloader(tmp_path, [SITE], MQTT_SHARD="1/2")
    write(tmp_path, [{**SITE, "name": n} for n in names])
    assert r.reload() is True
    held = service.applied[-1]
    assert 0 < len(held) < len(names) and service.config_status.sites_total == 40
    assert all(service.settings.shard.owns(n) for n in held)


def test_report_names_shard_and_counts():
    status = ConfigStatus(loaded=True, at=10.0)
    assert status.success_at == 10.0
    report = status.report()
    assert report["last_reload_successful"] is True and report["shard"] is None
    assert ConfigStatus(loaded=False, at=10.0).success_at is None


def test_applied_hook_gets_the_new_settings_only_when_applied(tmp_path):
    r, _, _ = reloader(tmp_path, [SITE])
    seen = []
    r.applied = lambda settings: seen.append(len(settings.sites))
    write(tmp_path, [{**SITE, "port": "x"}])
    assert r.reload() is False and seen == []
    write(tmp_path, [SITE, {**SITE, "name": "b"}])
    assert r.reload() is True and seen == [2]


def test_a_failure_that_repeats_is_logged_once_at_error(tmp_path, caplog):
    import logging
    r, _, _ = reloader(tmp_path, [SITE])
    (tmp_path / "sites.yml").unlink()
    with caplog.at_level(logging.DEBUG, logger="exporter.reload"):
        assert r.reload(force=True) is False
        assert r.reload(force=True) is False
    levels = [(rec.levelname, rec.getMessage().split(" (")[0]) for rec in caplog.records]
    assert levels == [("ERROR", "Sites could not be read, keeping the running configuration"),
                      ("DEBUG", "Sites could not be read, keeping the running configuration")]


def test_site_changes_name_the_sites_up_to_a_limit():
    from exporter.supervisor import SiteChanges
    many = SiteChanges(added=tuple(f"a{i}" for i in range(25)), removed=("x",))
    assert many.names().endswith("a19 and 5 more; removed: 1 sites)")
    assert SiteChanges(added=("a",), changed=("c",)).names() == " (added: a; changed: c)"
    assert SiteChanges().names() == ""
