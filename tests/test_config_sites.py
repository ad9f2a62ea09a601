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
from exporter.config.tls import TlsConfig

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
    assert error == f"{tmp_path / 'sites.yml'}: not a regular file (a directory)"


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
        1883, "3.1.1", ("plain/#",), 30, None)
    assert (secure.port, secure.protocol, secure.keepalive, secure.tls) == (
        8883, "5", 120, TlsConfig())
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


# ======================================================================================
# --- limits (issue #9, finding 5): every input bounded, refused before anything connects
# ======================================================================================

import os as _os  # noqa: E402

from exporter.config import sites as _sites  # noqa: E402
from exporter.wire import farewell_packets  # noqa: E402

pytestmark = pytest.mark.timeout(30)  # the whole file (a module-level mark)


def _only_error(tmp_path, content: str | bytes | None = None, **environ) -> str:
    path = tmp_path / "sites.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    [error] = errors_of(tmp_path, **environ)
    assert "Traceback" not in error
    return error


def test_limits_keep_every_derived_mqtt_string_valid():
    # MQTT client IDs and topic names are UTF-8 strings of at most 65535 bytes.
    assert _sites.CLIENT_ID_MAX_BYTES == 256 + 2 + 128 < 65535
    assert _sites.TOPIC_MAX_BYTES == 256 + len("/backend/instance") < 65535


def test_longest_allowed_name_and_instance_id_build_a_valid_farewell(tmp_path):
    name, instance = "n" * _sites.SITE_NAME_MAX_BYTES, "\u00e9" * (_sites.INSTANCE_ID_MAX_BYTES // 2)
    settings_ = load(tmp_path, [{"name": name, "host": "h"}], MQTT_INSTANCE_ID=instance)
    [site] = settings_.sites
    assert len(site.client_id(settings_.instance_id).encode()) == _sites.CLIENT_ID_MAX_BYTES
    # The seed died here with OverflowError on a long name; the presence topic is the longest.
    presence = (site.presence_topic, b"tombstone")
    assert len(site.presence_topic) == _sites.TOPIC_MAX_BYTES
    for protocol in ("3.1.1", "5"):
        packets = farewell_packets(site.status_topic, protocol, True, presence=presence)
        assert site.presence_topic.encode() in packets
    assert site.status_topic.encode() in farewell_packets(site.status_topic, "3.1.1", True)


def test_site_name_over_the_limit_is_refused_without_echoing_it(tmp_path):
    for name in ("n" * 257, "n" * 70_000, "n" * 70_000 + "!"):
        error = _only_error(tmp_path, yaml.safe_dump({"sites": [{"name": name, "host": "h"}]}))
        assert error == (f"{tmp_path / 'sites.yml'}: site #1: key 'name': {len(name)} characters "
                         "long; at most 256 (the name is part of the client ID and of topic names)")


@pytest.mark.parametrize("value, problem", [
    ("i" * 129, "129 bytes long; at most 128"),
    ("\u00e9" * 65, "130 bytes long; at most 128"),
    ("a\nb", "invalid value 'a\\nb': no whitespace or control characters"),
    ("a b", "no whitespace or control characters"),
    ("a\x00b", "no whitespace or control characters"),
    ("", "must not be empty"),
], ids=["long", "long-utf8", "newline", "space", "nul", "empty"])
def test_instance_id_limits(tmp_path, value, problem):
    write_sites(tmp_path, [GOOD])
    [error] = errors_of(tmp_path, MQTT_INSTANCE_ID=value)
    assert error.startswith("environment: MQTT_INSTANCE_ID: ") and problem in error


@pytest.mark.parametrize("host, problem", [
    ("broker\nevil", "invalid host 'broker\\nevil': no whitespace or control characters"),
    ("broker\r", "no whitespace or control characters"),
    ("a\tb", "no whitespace or control characters"),
    ("a\x00b", "invalid host 'a\\x00b': no whitespace or control characters"),
    ("a\x7fb", "no whitespace or control characters"),
    ("a\u200bb", "no whitespace or control characters"),  # zero-width space (format char)
    ("a" * 64 + ".example", "each dot-separated label must have 1-63 characters"),
    ("a..example", "each dot-separated label must have 1-63 characters"),
    (".".join(["a" * 60] * 5), "a host name has at most 253 characters, got 304"),
    ("1:2", "a host name or IP address (IPv6 without brackets)"),
], ids=["newline", "cr", "tab", "nul", "del", "zero-width", "long-label", "empty-label",
        "too-long", "bad-ipv6"])
def test_host_syntax_is_refused(tmp_path, host, problem):
    [error] = errors_of(tmp_path, [{**GOOD, "host": host}])
    assert error.startswith(f"{tmp_path / 'sites.yml'}: site 'good' (#1): key 'host': invalid host ")
    assert problem in error and "\n" not in error
    assert len(error) < 300  # a long host is cut in the message


@pytest.mark.parametrize("host", [
    "broker.example.org", "broker.example.org.", "b\u00fccher.example", "_mqtt.local",
    "127.0.0.1", "::1", "fe80::1%eth0", "a" * 63 + "." + "b" * 63, ".".join(["a" * 63] * 4)[:253],
])
def test_host_syntax_accepts_real_hosts(tmp_path, host):
    [site] = load(tmp_path, [{**GOOD, "host": host}], MQTT_INSTANCE_ID="x").sites
    assert site.host == host


def test_sites_file_must_be_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.yml"
    _os.mkfifo(fifo)  # open() would block forever waiting for a writer
    (tmp_path / "dir.yml").mkdir()
    for path, kind in ((fifo, "a FIFO"), (tmp_path / "dir.yml", "a directory"),
                       ("/dev/zero", "a character device"), ("/dev/null", "a character device")):
        [error] = errors_of(tmp_path, MQTT_SITES_FILE=str(path), MQTT_INSTANCE_ID="x")
        assert error == f"{path}: not a regular file ({kind})"


def test_sites_file_size_limit(tmp_path, monkeypatch):
    body = yaml.safe_dump({"sites": [GOOD]}).encode()
    monkeypatch.setattr(_sites, "SITES_FILE_MAX_BYTES", 100)
    (tmp_path / "sites.yml").write_bytes(body + b"#" * (100 - len(body) - 1) + b"\n")
    assert load(tmp_path, MQTT_INSTANCE_ID="x").sites[0].name == "good"  # exactly the limit
    (tmp_path / "sites.yml").write_bytes(body + b"#" * (100 - len(body)) + b"\n")
    assert _only_error(tmp_path) == (f"{tmp_path / 'sites.yml'}: larger than 100 bytes (0 MiB), "
                                     "the limit of a sites file")


def test_sites_file_over_16_mib_is_refused_unread(tmp_path):
    with open(tmp_path / "sites.yml", "wb") as f:
        f.truncate(_sites.SITES_FILE_MAX_BYTES + 1)  # sparse: no disk used
    assert _only_error(tmp_path) == (f"{tmp_path / 'sites.yml'}: larger than 16777216 bytes "
                                     "(16 MiB), the limit of a sites file")


def _nested_flow(depth: int) -> str:
    return "sites: " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"


def _nested_block(depth: int) -> str:
    return "".join("  " * i + "k:\n" for i in range(depth)) + "  " * depth + "k: v\n"


@pytest.mark.parametrize("text, line", [
    (_nested_flow(65), 1), (_nested_flow(10_000), 1), (_nested_block(65), 65),
    (_nested_block(2_000), 65),
    ("sites: " + "".join(f"&a{i} [" for i in range(64)) + "]" * 64 + "\n", 1),
], ids=["flow-65", "flow-10000", "block-65", "block-2000", "anchored-65"])
def test_yaml_nesting_depth_is_refused_without_recursion(tmp_path, text, line):
    error = _only_error(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'sites.yml'}: invalid YAML at line {line}, column ")
    assert error.endswith(": mappings and lists nested deeper than 64 levels")


def test_yaml_nesting_at_the_limit_is_parsed(tmp_path):
    # 64 levels: the top mapping, 'sites', and 62 lists inside it: reaches the site check.
    assert _only_error(tmp_path, _nested_flow(64)).endswith("site #1: must be a mapping, got list")


def test_recursive_alias_does_not_loop(tmp_path):
    assert _only_error(tmp_path, "sites: &a [*a]\n").endswith("site #1: must be a mapping, got list")


@pytest.mark.parametrize("text, what", [
    ("sites:\n- {name: a, host: h, port: " + "9" * 5000 + "}\n", "int"),
    ("sites:\n- {name: a, host: h, port: 2026-13-45}\n", "timestamp"),
    ("sites:\n- {name: a, host: h, port: 2026-02-30}\n", "timestamp"),
], ids=["int-4300-digits", "month-13", "february-30"])
def test_unconvertible_scalars_are_yaml_errors_with_a_position(tmp_path, text, what):
    error = _only_error(tmp_path, text)
    assert error == (f"{tmp_path / 'sites.yml'}: invalid YAML at line 2, column 28: cannot "
                     f"convert this {what} value (ValueError)")


def test_long_duplicate_key_is_cut_in_the_message(tmp_path):
    key = "k" * 1000  # PyYAML's longest simple key is 1024 characters
    error = _only_error(tmp_path, f"sites: []\n{key}: 1\n{key}: 2\n")
    assert "(1000 characters)" in error and len(error) < 300


# --- tls: true/false or a mapping (issue #9); the deprecated site-level ca_file -------------

import json as _json  # noqa: E402

import jsonschema as _jsonschema  # noqa: E402
import trustme as _trustme  # noqa: E402
from cryptography.hazmat.primitives import serialization as _serialization  # noqa: E402

from exporter.config.schema import SCHEMA_PATH as _SCHEMA_PATH  # noqa: E402


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    """Paths of PEM files: ca, cert, key, both (cert + key), other_key, encrypted_key, junk."""
    d = tmp_path_factory.mktemp("pem")
    ca = _trustme.CA()
    leaf, other = ca.issue_cert("client.example"), ca.issue_cert("other.example")
    key = _serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(_serialization.Encoding.PEM, _serialization.PrivateFormat.PKCS8,
                                  _serialization.BestAvailableEncryption(b"secret-pass"))
    files = {
        "ca": ca.cert_pem.bytes(),
        "cert": leaf.cert_chain_pems[0].bytes(),
        "key": leaf.private_key_pem.bytes(),
        "both": leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes(),
        "other_key": other.private_key_pem.bytes(),
        "encrypted_key": encrypted,
        "junk": b"not a PEM file\n",
    }
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
    return {name: str(d / f"{name}.pem") for name in files}


def test_tls_mapping_is_loaded(tmp_path, pem):
    tls = {"ca_file": pem["ca"], "cert_file": pem["cert"], "key_file": pem["key"],
           "server_name": "broker.example.org", "insecure_skip_verify": False}
    both = {"cert_file": pem["both"]}  # the key in the certificate file
    a, b, c = load(tmp_path, [{**GOOD, "tls": tls}, {"name": "b", "host": "h", "tls": both},
                              {"name": "c", "host": "h", "tls": False}]).sites
    assert a.tls == TlsConfig(**tls) and a.port == 8883 and a.ca_file == pem["ca"]
    assert a.warnings == ()
    assert b.tls == TlsConfig(cert_file=pem["both"]) and b.port == 8883
    assert c.tls is None and c.port == 1883


TLS_BAD = {
    "not bool or mapping": ("yes", "tls", "expected boolean or mapping, got string"),
    "null": (None, "tls", "expected boolean or mapping, got null"),
    "unknown key": ({"cafile": "x"}, "tls.cafile", "unknown key; did you mean 'ca_file'?"),
    "ca_file junk": ({"ca_file": "junk"}, "tls.ca_file", "holds no valid PEM certificate"),
    "ca_file missing": ({"ca_file": "/nonexistent/ca.pem"}, "tls.ca_file", "cannot read CA file"),
    "cert_file missing": ({"cert_file": "/nonexistent/c.pem", "key_file": "key"}, "tls.cert_file",
                          "cannot read certificate file"),
    "cert_file is a key": ({"cert_file": "key", "key_file": "key"}, "tls.cert_file",
                           "holds no PEM certificate"),
    "cert without key": ({"cert_file": "cert"}, "tls.cert_file",
                         "holds no private key; set tls.key_file"),
    "key without cert": ({"key_file": "key"}, "tls.key_file", "only with tls.cert_file"),
    "key of another cert": ({"cert_file": "cert", "key_file": "other_key"}, "tls.key_file",
                            "the private key does not match tls.cert_file"),
    "key junk": ({"cert_file": "cert", "key_file": "junk"}, "tls.key_file",
                 "holds no valid PEM private key"),
    "key encrypted": ({"cert_file": "cert", "key_file": "encrypted_key"}, "tls.key_file",
                      "the private key is encrypted"),
    "server_name with space": ({"server_name": "a b"}, "tls.server_name", "no whitespace"),
    "server_name empty": ({"server_name": ""}, "tls.server_name", "must not be empty"),
    "skip-verify as string": ({"insecure_skip_verify": "yes"}, "tls.insecure_skip_verify",
                              "expected boolean, got string"),
}


@pytest.mark.parametrize("tls, key, message", TLS_BAD.values(), ids=TLS_BAD.keys())
def test_bad_tls_is_reported_with_file_site_and_key(tmp_path, pem, tls, key, message):
    if isinstance(tls, dict):
        tls = {k: pem.get(v, v) if isinstance(v, str) else v for k, v in tls.items()}
    errors = errors_of(tmp_path, [{"name": "first", "host": "h"}, {**GOOD, "tls": tls}])
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{tmp_path / 'sites.yml'}: site 'good' (#2): key '{key}': ")
    assert message in errors[0]
    assert "PRIVATE KEY" not in errors[0] and "secret-pass" not in errors[0]


def test_site_level_ca_file_is_a_deprecated_alias(tmp_path, pem):
    [site] = load(tmp_path, [{**GOOD, "tls": True, "ca_file": pem["ca"]}]).sites
    assert site.tls == TlsConfig(ca_file=pem["ca"]) and site.ca_file == pem["ca"]
    assert site.warnings == (
        f"{tmp_path / 'sites.yml'}: site 'good' (#1): key 'ca_file': deprecated; use "
        "tls: {ca_file: ...} (still works with tls: true)",)
    [error] = errors_of(tmp_path, [{**GOOD, "tls": {"ca_file": pem["ca"]}, "ca_file": pem["ca"]}])
    assert error.endswith("key 'ca_file': also given as tls.ca_file; keep only tls.ca_file")
    assert "mqtts" in summarize_site(site, "i") and f"ca_file={pem['ca']}" in summarize_site(site, "i")


def test_insecure_skip_verify_is_a_warning(tmp_path):
    [site] = load(tmp_path, [{**GOOD, "tls": {"insecure_skip_verify": True}}]).sites
    assert site.tls == TlsConfig(insecure_skip_verify=True)
    [warning] = site.warnings
    assert "key 'tls.insecure_skip_verify': tls.insecure_skip_verify is true" in warning


def test_schema_knows_the_tls_mapping(pem):
    validator = _jsonschema.Draft7Validator(_json.loads(open(_SCHEMA_PATH, encoding="utf-8").read()))

    def errors(tls, **extra):
        return list(validator.iter_errors({"sites": [{**GOOD, "tls": tls, **extra}]}))

    assert errors(True) == [] and errors(False) == []
    assert errors({"ca_file": "a", "cert_file": "c", "key_file": "k", "server_name": "s",
                   "insecure_skip_verify": True}) == []
    assert errors({"ca_file": "a"}, ca_file="x") == []  # the alias with a mapping: check-config says no
    assert errors({"cafile": "a"}) and errors({"key_file": "k"}) and errors("yes")
    assert errors(False, ca_file="x")
