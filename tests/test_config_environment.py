"""Tests for exporter.config.environment: every variable, .env, injected environ, defaults."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from exporter.config import ConfigError, Settings, SiteConfig, load_settings
from exporter.config.environment import ENV_VARS, parse_listen

from .test_config_sites import GOOD, errors_of, load, write_sites


def test_env_errors_are_collected_with_site_errors(tmp_path):
    errors = errors_of(
        tmp_path, [{**GOOD, "port": 0}],
        MQTT_KEEP_ALIVE="abc", MQTT_CLEAN_SESSION="maybe", EXPORTER_LISTEN="nonsense", LOG_FORMAT="xml",
    )
    assert len(errors) == 5, errors
    for var in ("MQTT_KEEP_ALIVE", "MQTT_CLEAN_SESSION", "EXPORTER_LISTEN", "LOG_FORMAT"):
        assert any(e.startswith(f"environment: {var}: ") for e in errors), var
    assert any("key 'port'" in e for e in errors)


@pytest.mark.parametrize(
    "var, value",
    [
        ("MQTT_KEEP_ALIVE", "0"),
        ("MQTT_SHUTDOWN_TIMEOUT", "0"),
        ("MQTT_COOLDOWN_SECONDS", "-1"),
        ("MQTT_BACKOFF_MIN_SECONDS", "0"),
        ("MQTT_STABLE_SECONDS", "x"),
        ("MQTT_CONNECT_TIMEOUT", "-2"),
        ("MQTT_LWT_ENABLED", "sometimes"),
        ("MQTT_STATE_DIR", ""),
        ("LOG_LEVEL", "verbose"),
        ("EXPORTER_LISTEN", "::1:8000"),
        ("EXPORTER_LISTEN", "0.0.0.0:0"),
        ("EXPORTER_LISTEN", ":8000"),
        ("MQTT_BACKOFF_MAX_SECONDS", "0.5"),
    ],
)
def test_bad_env_value(tmp_path, var, value):
    [error] = errors_of(tmp_path, [GOOD], **{var: value})
    assert error.startswith(f"environment: {var}: ")


def test_defaults(tmp_path):
    settings = load(tmp_path, [GOOD])
    assert settings == Settings(
        sites_file=str(tmp_path / "sites.yml"),
        instance_id=socket.gethostname(),
        sites=(SiteConfig(name="good", host="broker.example.org", port=1883, topics=("good/#",)),),
        sites_total=1,
    )


def test_env_values_are_parsed(tmp_path):
    write_sites(tmp_path, [GOOD], name="other.yml")
    settings = load(
        tmp_path, MQTT_SITES_FILE="other.yml", MQTT_INSTANCE_ID="bfg_back", MQTT_CLEAN_SESSION="false",
        MQTT_LWT_ENABLED="no", MQTT_KEEP_ALIVE="30", MQTT_SHUTDOWN_TIMEOUT="2.5", MQTT_COOLDOWN_SECONDS="0",
        MQTT_STATE_DIR="/var/lib/x", EXPORTER_LISTEN="[::1]:9100", LOG_LEVEL="debug", LOG_FORMAT="JSON",
        MQTT_BACKOFF_MIN_SECONDS="2", MQTT_BACKOFF_MAX_SECONDS="2", MQTT_STABLE_SECONDS="20",
        MQTT_CONNECT_TIMEOUT="3",
    )
    assert settings == Settings(
        sites_file=str(tmp_path / "other.yml"), instance_id="bfg_back", clean_session=False,
        lwt_enabled=False, keepalive=30, shutdown_timeout=2.5, cooldown_seconds=0.0,
        state_dir="/var/lib/x", listen_host="::1", listen_port=9100, log_level="DEBUG",
        log_format="json", backoff_min_seconds=2.0, backoff_max_seconds=2.0, stable_seconds=20.0,
        connect_timeout=3.0, sites=settings.sites, sites_total=1,
    )
    assert settings.sites[0].keepalive == 30



def test_dotenv_is_read_when_environ_is_none_and_process_env_wins(tmp_path, monkeypatch):
    for var in ("MQTT_SITES_FILE", "MQTT_INSTANCE_ID", "MQTT_KEEP_ALIVE", "LOG_LEVEL", "SITE_PW"):
        monkeypatch.delenv(var, raising=False)
    write_sites(tmp_path, [{**GOOD, "password_env": "SITE_PW", "username": "u"}], name="from-dotenv.yml")
    (tmp_path / ".env").write_text(
        "MQTT_SITES_FILE=from-dotenv.yml\nMQTT_KEEP_ALIVE=30\nLOG_LEVEL=debug\nSITE_PW=dotenv-pw\n"
    )
    monkeypatch.setenv("MQTT_KEEP_ALIVE", "45")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.sites_file == str(tmp_path / "from-dotenv.yml")
    assert (settings.keepalive, settings.log_level) == (45, "DEBUG")
    assert settings.sites[0].password.reveal() == "dotenv-pw"


def test_injected_environ_ignores_dotenv_and_process_env(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("LOG_LEVEL=debug\n")
    monkeypatch.setenv("MQTT_KEEP_ALIVE", "45")
    settings = load(tmp_path, [GOOD])
    assert (settings.keepalive, settings.log_level) == (60, "INFO")


# --- the table: one declaration per variable ------------------------------------------------


def test_every_setting_comes_from_one_declared_variable():
    settings_fields = {f.name for f in dataclasses.fields(Settings)} - {
        "sites", "listen_host", "listen_port", "web_config",  # web_config: read from web_config_file
        "sites_total", "sites_loaded", "source", "lookup"}  # what the sites source gave
    declared = [var.setting for var in ENV_VARS]
    assert len(declared) == len(set(declared))
    assert set(declared) == settings_fields | {"listen"}
    assert len({var.name for var in ENV_VARS}) == len(ENV_VARS)


def test_declared_defaults_are_the_settings_defaults(tmp_path):
    """With nothing set, every variable's declared default gives the Settings default."""
    settings = load(tmp_path, [GOOD])
    for var in ENV_VARS:
        if var.setting == "listen":
            assert (settings.listen_host, settings.listen_port) == parse_listen(var.default)
        elif var.setting == "sites_file":  # resolved against cwd
            assert settings.sites_file == str(tmp_path / var.default)
        else:
            default = var.default_value()
            expected = var.parse(default) if var.parser is not None else default
            assert getattr(settings, var.setting) == expected, var.name
    defaults = Settings(sites_file="x", instance_id="x")
    for f in dataclasses.fields(Settings):
        if f.name not in ("sites_file", "instance_id", "sites", "sites_total", "source", "lookup"):
            assert getattr(settings, f.name) == getattr(defaults, f.name), f.name


def test_injected_environ_is_the_only_source_of_password_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SITE_PW", "from-process")
    (tmp_path / ".env").write_text("SITE_PW=from-dotenv\n")
    [error] = errors_of(tmp_path, [{**GOOD, "password_env": "SITE_PW"}])
    assert error.endswith("key 'password_env': environment variable SITE_PW is not set")


def test_unreadable_dotenv_is_reported(tmp_path, monkeypatch):
    (tmp_path / ".env").mkdir()
    write_sites(tmp_path, [GOOD])
    monkeypatch.setenv("MQTT_SITES_FILE", str(tmp_path / "sites.yml"))
    with pytest.raises(ConfigError) as info:
        load_settings(cwd=str(tmp_path))
    assert info.value.errors == [
        "environment: .env: cannot read: path must be a filename, not a directory."]


def test_marshmallow_messages_are_kept(tmp_path):
    errors = errors_of(tmp_path, [GOOD], MQTT_KEEP_ALIVE="abc", MQTT_SHUTDOWN_TIMEOUT="0",
                       MQTT_STATE_DIR="", MQTT_BACKOFF_MIN_SECONDS="5", MQTT_BACKOFF_MAX_SECONDS="2")
    assert errors == [
        "environment: MQTT_KEEP_ALIVE: Not a valid integer.",
        "environment: MQTT_SHUTDOWN_TIMEOUT: Must be greater than 0.",
        "environment: MQTT_STATE_DIR: must not be empty",
        "environment: MQTT_BACKOFF_MAX_SECONDS: must be >= MQTT_BACKOFF_MIN_SECONDS (5.0)",
    ]
