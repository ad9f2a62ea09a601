"""Tests for exporter.config.sites: the sites file, every site key, and secret hygiene.

The helpers (GOOD, write_sites, load, errors_of) are shared with the other test_config_* files."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import (
    SITE_NAME_RE,
    ConfigError,
    Secret,
    load_settings,
    summarize_site,
)

GOOD = {"name": "good", "host": "broker.example.org"}
PASSWORD = "pw-Zx81-never-printed"


def write_sites(tmp_path, sites, name="sites.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"sites": sites}))
    return str(path)


def load(tmp_path, sites=None, **environ):
    """Load with an injected environ; the sites file is tmp_path/sites.yml via cwd."""
    if sites is not None:
        write_sites(tmp_path, sites)
    return load_settings(environ, cwd=str(tmp_path))


def errors_of(tmp_path, sites=None, **environ) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, sites, **environ)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# --- bad sites: every error names the file, the site and the key ----------------------

BAD_SITES = {
    "unknown key with suggestion": ({**GOOD, "usernme": "x"}, "usernme", "did you mean 'username'?"),
    "bool given as string": ({**GOOD, "enabled": "yes"}, "enabled", "expected boolean, got string"),
    "int is not a bool": ({**GOOD, "enabled": 1}, "enabled", "expected boolean, got integer"),
    "tls as string": ({**GOOD, "tls": "true"}, "tls", "expected boolean"),
    "port out of range": ({**GOOD, "port": 70000}, "port", "1..65535"),
    "port zero": ({**GOOD, "port": 0}, "port", "1..65535"),
    "port as string": ({**GOOD, "port": "1883"}, "port", "expected integer, got string"),
    "missing host": ({"name": "good"}, "host", "required"),
    "empty host": ({**GOOD, "host": ""}, "host", "must not be empty"),
    "host with space": ({**GOOD, "host": "a b"}, "host", "invalid host"),
    "bad protocol": ({**GOOD, "protocol": "4"}, "protocol", "'3.1.1' or '5'"),
    "protocol as float": ({**GOOD, "protocol": 3.1}, "protocol", "'3.1.1' or '5'"),
    "both password sources": (
        {**GOOD, "password_env": "PW", "password_file": "/x"}, "password_file", "mutually exclusive"),
    "literal password": ({**GOOD, "password": "x"}, "password", "literal passwords are not allowed"),
    "password env unset": ({**GOOD, "password_env": "NOT_SET_PW"}, "password_env", "NOT_SET_PW is not set"),
    "password env empty": ({**GOOD, "password_env": "EMPTY_PW"}, "password_env", "EMPTY_PW is empty"),
    "password file missing": (
        {**GOOD, "password_file": "/nonexistent/pw"}, "password_file", "cannot read password file"),
    "ca_file without tls": ({**GOOD, "ca_file": "CA_FILE"}, "ca_file", "only allowed with tls"),
    "ca_file not a certificate": (
        {**GOOD, "tls": True, "ca_file": "CA_FILE"}, "ca_file", "holds no valid PEM certificate"),
    "ca_file unreadable": (
        {**GOOD, "tls": True, "ca_file": "/nonexistent/ca.pem"}, "ca_file", "cannot read"),
    "hash not last": ({**GOOD, "topics": ["a/#/b"]}, "topics", "'#' must be the whole last level"),
    "plus inside a level": ({**GOOD, "topics": ["a/b+/c"]}, "topics", "'+' must be a whole level"),
    "empty topic": ({**GOOD, "topics": [""]}, "topics", "must not be empty"),
    "empty topics list": ({**GOOD, "topics": []}, "topics", "empty list"),
    "topics as string": ({**GOOD, "topics": "good/#"}, "topics", "expected list, got string"),
    "keepalive too small": ({**GOOD, "keepalive": 4}, "keepalive", "5..65535"),
    "username not a string": ({**GOOD, "username": 5}, "username", "expected string, got integer"),
}


@pytest.mark.parametrize("site, key, message", BAD_SITES.values(), ids=BAD_SITES.keys())
def test_bad_site_is_reported_with_file_site_and_key(tmp_path, site, key, message):
    site = {k: str(tmp_path / "ca.pem") if v == "CA_FILE" else v for k, v in site.items()}
    (tmp_path / "ca.pem").write_text("cert")
    errors = errors_of(tmp_path, [{"name": "first", "host": "h"}, site], EMPTY_PW="")
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{tmp_path / 'sites.yml'}: site 'good' (#2): key '{key}': ")
    assert message in errors[0]


@pytest.mark.parametrize(
    "site, expected",
    [
        ({"host": "h"}, "site #2: key 'name': required"),
        ({"name": "bad name!", "host": "h"},
         "site #2: key 'name': invalid name 'bad name!': use only letters, digits, '_' and '-'"),
        ({"name": 7, "host": "h"}, "site #2: key 'name': expected string, got integer"),
        ({"name": "first", "host": "h"},
         "site 'first' (#2): key 'name': duplicate name; already used by site #1"),
    ],
    ids=["missing", "invalid", "not a string", "duplicate"],
)
def test_bad_name_is_reported_by_index(tmp_path, site, expected):
    errors = errors_of(tmp_path, [{"name": "first", "host": "h"}, site])
    assert errors == [f"{tmp_path / 'sites.yml'}: {expected}"]


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "file not found"),
        ("sites: [\n  {name: a\n",
         "invalid YAML at line 3, column 1: expected ',' or '}', but got '<stream end>'"),
        ("- name: a\n", "top level must be a mapping with a 'sites' list, got list"),
        ("", "top level must be a mapping with a 'sites' list, got null"),
        ("{}\n", "missing 'sites' list"),
        ("sites: {name: a}\n", "'sites' must be a list, got mapping"),
        ("sites: []\n", "no sites configured"),
        ("sites: [{name: a, host: h}]\nsite: []\n",
         "top-level key 'site': unknown key; did you mean 'sites'?"),
        ("sites: [[1]]\n", "site #1: must be a mapping, got list"),
        ("sites:\n  - name: a\n    host: h\n    host: i\n",
         "invalid YAML at line 4, column 5: duplicate key 'host'"),
        (b"\xff\xfe", "cannot read file: not valid UTF-8"),
    ],
    ids=["missing", "invalid yaml", "list", "empty file", "no sites key", "sites mapping",
         "no sites", "unknown top-level key", "site not a mapping", "duplicate key", "not utf-8"],
)
def test_file_level_errors(tmp_path, content, expected):
    path = tmp_path / "sites.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert errors_of(tmp_path) == [f"{path}: {expected}"]


def test_unreadable_file_is_reported(tmp_path):
    (tmp_path / "sites.yml").mkdir()
    [error] = errors_of(tmp_path)
    assert error.startswith(f"{tmp_path / 'sites.yml'}: cannot read file: ")


def test_all_problems_in_one_file_are_reported(tmp_path):
    errors = errors_of(tmp_path, [{**GOOD, "port": 0, "enabled": "yes", "colour": "red"}])
    where = f"{tmp_path / 'sites.yml'}: site 'good' (#1)"
    assert sorted(errors) == sorted([
        f"{where}: key 'colour': unknown key",
        f"{where}: key 'enabled': expected boolean, got string",
        f"{where}: key 'port': must be 1..65535, got 0",
    ])


# --- defaults -------------------------------------------------------------------------
def test_site_defaults_and_overrides(tmp_path):
    sites = [
        {"name": "plain", "host": "h"},
        {"name": "secure", "host": "h", "tls": True, "protocol": 5, "keepalive": 120},
        {"name": "v6", "host": "::1", "port": 1884, "protocol": "5", "enabled": False,
         "topics": ["a/+/b", "#"]},
    ]
    plain, secure, v6 = load(tmp_path, sites, MQTT_KEEP_ALIVE="30").sites
    assert (plain.port, plain.protocol, plain.topics, plain.keepalive, plain.tls) == (
        1883, "3.1.1", ("plain/#",), 30, False)
    assert (secure.port, secure.protocol, secure.keepalive, secure.tls) == (8883, "5", 120, True)
    assert (v6.broker, v6.enabled, v6.topics) == ("[::1]:1884", False, ("a/+/b", "#"))
    assert plain.broker == "h:1883"
    assert plain.client_id("bfg_back") == "plain_ibfg_back"
    assert plain.status_topic == "plain/backend/status"


# --- secrets --------------------------------------------------------------------------


def test_secret_never_prints():
    secret = Secret(PASSWORD)
    assert str(secret) == repr(secret) == f"{secret}" == f"{secret!r}" == "***"
    assert secret.reveal() == PASSWORD
    assert secret == Secret(PASSWORD) and secret != Secret("other")


def test_passwords_are_loaded_and_never_printed(tmp_path):
    (tmp_path / "pw").write_text(PASSWORD + "-file\n")
    sites = [
        {**GOOD, "username": "backend", "password_env": "SITE_PW"},
        {"name": "filed", "host": "h", "password_file": str(tmp_path / "pw")},
    ]
    settings = load(tmp_path, sites, SITE_PW=PASSWORD, MQTT_INSTANCE_ID="bfg_back")
    env_site, file_site = settings.sites
    assert env_site.password.reveal() == PASSWORD
    assert file_site.password.reveal() == PASSWORD + "-file"
    assert file_site.password_source == f"file:{tmp_path / 'pw'}"
    assert summarize_site(env_site, "bfg_back") == (
        "good: broker.example.org:1883 mqtt 3.1.1 client_id=good_ibfg_back user=backend "
        "password=env:SITE_PW topics=good/# keepalive=60 enabled"
    )
    for text in (repr(settings), str(settings), summarize_site(file_site, "i"), repr(file_site)):
        assert PASSWORD not in text


def test_secrets_never_appear_in_errors(tmp_path):
    (tmp_path / "pw").write_bytes(PASSWORD.encode() + b"\xff")  # not UTF-8
    sites = [
        {"name": "a", "host": "h", "password_env": "SITE_PW", "port": 0},
        {"name": "b", "host": "h", "password": PASSWORD},
        {"name": "c", "host": "h", "passwd": PASSWORD},
        {"name": "d", "host": "h", "password_file": str(tmp_path / "pw")},
    ]
    errors = errors_of(tmp_path, sites, SITE_PW=PASSWORD, MQTT_KEEP_ALIVE=PASSWORD)
    assert len(errors) == 5, errors
    assert PASSWORD not in "\n".join(errors)


def test_invalid_yaml_error_does_not_quote_the_line(tmp_path):
    (tmp_path / "sites.yml").write_text(f'sites:\n  - name: a\n    password: "{PASSWORD}\n')
    [error] = errors_of(tmp_path)
    assert "invalid YAML at line" in error and PASSWORD not in error


# --- property: valid names round-trip, invalid ones are rejected ----------------------

NO_SURROGATES = st.characters(exclude_categories=("Cs",))


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(name=st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True))
def test_valid_names_round_trip(tmp_path, name):
    [site] = load(tmp_path, [{"name": name, "host": "h"}], MQTT_INSTANCE_ID="x").sites
    assert site.name == name
    assert site.topics == (f"{name}/#",)
    assert site.status_topic == f"{name}/backend/status"
    assert summarize_site(site, "x").startswith(f"{name}: h:1883 mqtt 3.1.1 client_id={name}_ix ")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(name=st.text(NO_SURROGATES, min_size=1, max_size=20).filter(lambda s: not SITE_NAME_RE.fullmatch(s)))
def test_invalid_names_are_rejected(tmp_path, name):
    [error] = errors_of(tmp_path, [{"name": name, "host": "h"}])
    assert error.startswith(f"{tmp_path / 'sites.yml'}: site #1: key 'name': invalid name ")
