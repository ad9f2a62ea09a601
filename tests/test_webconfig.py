"""Tests for exporter.webconfig: the exporter-toolkit web config file (TLS and basic auth in
front of /metrics and /health), its validation, the SSL context and the basic-auth check.

Certificates come from trustme (a throwaway CA); bcrypt hashes use cost 4 unless the cost is
the point of the test.
"""

from __future__ import annotations

import base64
import os
import ssl
import threading
import time

import bcrypt
import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization

from exporter.config import ConfigError, load_settings
from exporter.webconfig import (
    AUTH_CACHE_SECONDS,
    TLSServerConfig,
    WebConfig,
    load_web_config,
)
from tests.support.net import REPO_ROOT

pytestmark = pytest.mark.timeout(30)

PASSWORD = "pw-Web-9f3-never-printed"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(ca, tmp_path):
    """tmp_path/{ca.pem,server.pem,server.key,other.key}: a server cert for 127.0.0.1 and a
    key of another certificate."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.issue_cert("other.example").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    return tmp_path


def write(tmp_path, document, name="web.yml") -> str:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return str(path)


def problems(path: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_web_config(path)
    return info.value.errors


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"HTTP_AUTHORIZATION": f"Basic {token}"}


# --- loading a good file ------------------------------------------------------------------


def test_full_config_loads_with_paths_relative_to_the_file(pki):
    path = write(pki, {
        "tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                              "client_ca_file": "ca.pem",
                              "client_auth_type": "RequireAndVerifyClientCert",
                              "min_version": "TLS13"},
        "basic_auth_users": {"prometheus": HASH},
    })
    config = load_web_config(path)
    assert config.tls == TLSServerConfig(
        cert_file=str(pki / "server.pem"), key_file=str(pki / "server.key"),
        client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki / "ca.pem"),
        min_version="TLS13")
    assert config.users == ("prometheus",) and config.auth_enabled
    context = config.ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize(("auth_type", "mode"), [
    ("NoClientCert", ssl.CERT_NONE),
    ("VerifyClientCertIfGiven", ssl.CERT_OPTIONAL),
    ("RequireAndVerifyClientCert", ssl.CERT_REQUIRED),
])
def test_client_auth_type_gives_the_verify_mode(pki, auth_type, mode):
    tls = {"cert_file": "server.pem", "key_file": "server.key", "client_auth_type": auth_type}
    if auth_type != "NoClientCert":
        tls["client_ca_file"] = "ca.pem"
    context = load_web_config(write(pki, {"tls_server_config": tls})).ssl_context()
    assert context is not None and context.verify_mode == mode
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2  # exporter-toolkit's default


def test_basic_auth_only_has_no_ssl_context(tmp_path):
    config = load_web_config(write(tmp_path, {"basic_auth_users": {"alice": HASH}}))
    assert config.tls is None and config.ssl_context() is None


def test_repr_and_describe_never_show_a_hash(pki):
    config = load_web_config(write(pki, {
        "tls_server_config": {"cert_file": "server.pem", "key_file": "server.key"},
        "basic_auth_users": {"alice": HASH}}))
    for text in (repr(config), config.describe()):
        assert "alice" in text and HASH not in text and HASH[7:29] not in text



def touch(path, seconds_later: int) -> None:
    """Set the file's mtime ``seconds_later`` than the test's start (a distinct stamp)."""
    when = int(time.time() + seconds_later) * 10**9
    os.utime(path, ns=(when, when))


class FakeSocket:
    """What the SNI callback gets: something with a settable ``context``."""

    def __init__(self, context):
        self.context = context


def test_renewed_certificate_is_loaded_at_the_next_handshake(ca, pki, caplog):
    config = load_web_config(write(pki, {
        "tls_server_config": {"cert_file": "server.pem", "key_file": "server.key"}}))
    context = config.ssl_context()
    hello = context.sni_callback
    sock = FakeSocket(context)
    hello(sock, None, context)
    assert sock.context is context  # unchanged files: nothing loaded

    # half a renewal: the key of another certificate; the old pair stays, one warning
    (pki / "server.key").write_bytes((pki / "other.key").read_bytes())
    touch(pki / "server.key", 1)  # file times may be coarser than this test is fast
    with caplog.at_level("INFO", logger="exporter.webconfig"):
        hello(sock, None, context)
        hello(sock, None, context)
    assert sock.context is context
    assert [r.getMessage() for r in caplog.records] == [
        "Web config: cannot load the renewed TLS files (KEY_VALUES_MISMATCH); keeping the "
        "previous ones"]

    # the whole renewal: loaded, and used for this connection and the next ones
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_pem.write_to_path(str(pki / "server.key"))
    leaf.cert_chain_pems[0].write_to_path(str(pki / "server.pem"))
    touch(pki / "server.key", 2)
    touch(pki / "server.pem", 2)
    hello(sock, None, context)
    renewed = sock.context
    assert renewed is not context
    next_sock = FakeSocket(context)
    hello(next_sock, None, context)
    assert next_sock.context is renewed


# --- every problem at once, by file and key -----------------------------------------------


def test_every_problem_is_reported_at_once_naming_file_and_key(pki):
    bad_hash = "$2b$04$" + "x" * 20  # too short
    path = write(pki, {
        "tls_server_config": {"cert_file": "missing.pem", "key_file": "other.key",
                              "client_auth_type": "VerifyClientCert", "min_versoin": "TLS12"},
        "basic_auth_users": {"alice": bad_hash, "bob": "plaintext-password", "carol": 42,
                             "d:ve": HASH},
        "basic_auth_user": {},
    })
    errors = problems(path)
    text = "\n".join(errors)
    assert all(e.startswith(f"{path}: ") for e in errors), errors
    expected = [
        "key 'basic_auth_user': unknown key; did you mean 'basic_auth_users'?",
        "key 'tls_server_config.min_versoin': unknown key; did you mean 'min_version'?",
        f"key 'tls_server_config.cert_file': cannot read certificate file "
        f"'{pki / 'missing.pem'}': No such file or directory",
        "key 'tls_server_config.client_auth_type': must be 'NoClientCert' or",
        "key 'basic_auth_users.alice': not a valid bcrypt hash",
        "key 'basic_auth_users.bob': not a valid bcrypt hash",
        "key 'basic_auth_users.carol': expected a bcrypt hash string, got integer",
        "key 'basic_auth_users.d:ve': user name must not contain ':'",
    ]
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in\n{text}"
    assert len(errors) == len(expected), errors
    # never echo a hash or a password
    assert bad_hash not in text and "plaintext-password" not in text and HASH not in text


def test_key_that_does_not_match_the_certificate(pki):
    path = write(pki, {"tls_server_config": {"cert_file": "server.pem", "key_file": "other.key"}})
    assert problems(path) == [
        f"{path}: key 'tls_server_config.key_file': '{pki / 'other.key'}' does not match the "
        "certificate in cert_file"]


def test_unreadable_and_non_pem_files(pki):
    (pki / "garbage.pem").write_text("not a certificate\n")
    (pki / "dir.key").mkdir()
    path = write(pki, {"tls_server_config": {"cert_file": "garbage.pem", "key_file": "dir.key",
                                             "client_ca_file": "server.key",
                                             "client_auth_type": "VerifyClientCertIfGiven"}})
    errors = problems(path)
    assert errors == [
        f"{path}: key 'tls_server_config.cert_file': '{pki / 'garbage.pem'}' holds no valid PEM "
        "certificate",
        f"{path}: key 'tls_server_config.key_file': cannot read key file '{pki / 'dir.key'}': "
        "Is a directory",
        f"{path}: key 'tls_server_config.client_ca_file': '{pki / 'server.key'}' holds no valid "
        "PEM certificate",
    ]
    key_text = (pki / "server.key").read_text()
    assert key_text.splitlines()[1] not in "\n".join(errors)


def test_encrypted_key_is_refused_without_prompting(pki):
    key = serialization.load_pem_private_key((pki / "server.key").read_bytes(), None)
    (pki / "enc.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    path = write(pki, {"tls_server_config": {"cert_file": "server.pem", "key_file": "enc.key"}})
    [error] = problems(path)
    assert "key 'tls_server_config.key_file'" in error and "is encrypted" in error


@pytest.mark.parametrize("auth_type", ["RequestClientCert", "RequireAnyClientCert"])
def test_toolkit_values_python_cannot_honour_are_refused(pki, auth_type):
    path = write(pki, {"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                             "client_auth_type": auth_type}})
    [error] = problems(path)
    assert error.startswith(f"{path}: key 'tls_server_config.client_auth_type': '{auth_type}'")
    assert "VerifyClientCertIfGiven or RequireAndVerifyClientCert" in error


def test_client_ca_rules_versions_and_unsupported_keys(pki):
    path = write(pki, {"tls_server_config": {
        "cert_file": "server.pem", "key_file": "server.key",
        "client_auth_type": "RequireAndVerifyClientCert",
        "min_version": "TLS13", "max_version": "TLS12", "cipher_suites": ["x"]},
        "http_server_config": {"http2": True}})
    errors = [e.removeprefix(f"{path}: ") for e in problems(path)]
    assert errors == [
        "key 'http_server_config': not supported by mqtt-site-exporter",
        "key 'tls_server_config.cipher_suites': not supported by mqtt-site-exporter",
        "key 'tls_server_config.client_ca_file': required with client_auth_type "
        "RequireAndVerifyClientCert",
        "key 'tls_server_config.max_version': TLS12 is older than min_version TLS13",
    ]
    path = write(pki, {"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                             "client_ca_file": "ca.pem", "min_version": "TLS1.2"}})
    errors = [e.removeprefix(f"{path}: ") for e in problems(path)]
    assert errors[0].startswith("key 'tls_server_config.min_version': must be 'TLS10' or")
    assert errors[1].startswith("key 'tls_server_config.client_ca_file': given without a "
                                "client_auth_type")


@pytest.mark.parametrize(("document", "message"), [
    ("", "empty: give tls_server_config, basic_auth_users or both"),
    ("{}\n", "neither tls_server_config nor basic_auth_users is given"),
    ("- a\n", "top level must be a mapping, got list"),
    ("basic_auth_users: {}\n", "key 'basic_auth_users': empty mapping"),
    ("tls_server_config: {}\n", "key 'tls_server_config.cert_file': required"),
    ("basic_auth_users:\n  a: x\n  a: y\n", "invalid YAML at line 3, column 3: duplicate key 'a'"),
    ("tls_server_config: yes\n", "key 'tls_server_config': expected mapping, got boolean"),
])
def test_malformed_files(tmp_path, document, message):
    path = write(tmp_path, document)
    errors = problems(path)
    assert any(e.startswith(f"{path}: {message}") for e in errors), errors


def test_missing_file(tmp_path):
    assert problems(str(tmp_path / "nope.yml")) == [f"{tmp_path / 'nope.yml'}: file not found"]


def test_example_web_config_is_valid(tmp_path, ca):
    """examples/web-config.yml loads once its certificate files exist (hash included)."""
    example = REPO_ROOT / "examples" / "web-config.yml"
    document = yaml.safe_load(example.read_text())
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    tls = document["tls_server_config"]
    for key, name in (("cert_file", "server.pem"), ("key_file", "server.key"),
                      ("client_ca_file", "ca.pem")):
        if key in tls:
            tls[key] = name
    (tmp_path / "web.yml").write_text(yaml.safe_dump(document))
    config = load_web_config(str(tmp_path / "web.yml"))
    assert config.tls is not None and config.auth_enabled


# --- load_settings: EXPORTER_WEB_CONFIG_FILE ----------------------------------------------


def test_off_by_default(tmp_path):
    (tmp_path / "sites.yml").write_text(yaml.safe_dump({"sites": [{"name": "a", "host": "h"}]}))
    settings = load_settings({}, cwd=str(tmp_path))
    assert settings.web_config_file == "" and settings.web_config is None


def test_settings_report_web_config_problems_with_the_others(tmp_path):
    (tmp_path / "sites.yml").write_text(yaml.safe_dump({"sites": [{"name": "a", "hots": "h"}]}))
    write(tmp_path, {"basic_auth_users": {"alice": "secret-pw"}})
    with pytest.raises(ConfigError) as info:
        load_settings({"EXPORTER_WEB_CONFIG_FILE": "web.yml"}, cwd=str(tmp_path))
    text = str(info.value)
    assert "site 'a' (#1): key 'hots': unknown key" in text
    assert f"{tmp_path / 'web.yml'}: key 'basic_auth_users.alice': not a valid bcrypt hash" in text
    assert "secret-pw" not in text


def test_settings_carry_the_loaded_web_config(tmp_path):
    (tmp_path / "sites.yml").write_text(yaml.safe_dump({"sites": [{"name": "a", "host": "h"}]}))
    write(tmp_path, {"basic_auth_users": {"alice": HASH}})
    settings = load_settings({"EXPORTER_WEB_CONFIG_FILE": "web.yml"}, cwd=str(tmp_path))
    assert settings.web_config is not None and settings.web_config.users == ("alice",)
    assert settings.web_config_file == str(tmp_path / "web.yml")
    assert HASH not in repr(settings)


# --- authorize -----------------------------------------------------------------------------


class CountingCheck:
    """bcrypt.checkpw in the calling thread, counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls += 1
        return bcrypt.checkpw(password, hashed)


def make_config(clock=None, checkpw=None) -> WebConfig:
    kwargs = {"checkpw": checkpw or CountingCheck()}
    if clock is not None:
        kwargs["clock"] = clock
    return WebConfig("web.yml", None, {"alice": HASH, "bob": HASH}, **kwargs)


def test_without_users_everything_passes():
    assert WebConfig("web.yml", None, None).authorize({}) is True


@pytest.mark.parametrize("environ", [
    {},
    {"HTTP_AUTHORIZATION": "Bearer abc"},
    {"HTTP_AUTHORIZATION": "Basic !!!not-base64"},
    {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"no-colon").decode()},
    {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"\xff\xfe:pw").decode()},
    basic("alice", "wrong"),
    basic("alice", ""),
    basic("mallory", PASSWORD),
    basic("alice", PASSWORD + "x" * 100),  # longer than bcrypt's 72 bytes
    basic("alice", PASSWORD + "\0"),
])
def test_refused(environ):
    assert make_config().authorize(environ) is False


def test_right_password_passes_any_scheme_case():
    config = make_config()
    assert config.authorize(basic("alice", PASSWORD)) is True
    header = basic("bob", PASSWORD)["HTTP_AUTHORIZATION"].replace("Basic", "bAsIc")
    assert config.authorize({"HTTP_AUTHORIZATION": header}) is True


def test_unknown_user_pays_for_a_bcrypt_check_too():
    check = CountingCheck()
    assert make_config(checkpw=check).authorize(basic("mallory", "x")) is False
    assert check.calls == 1


def test_success_is_cached_for_a_short_time_and_failures_never():
    now = [1000.0]
    check = CountingCheck()
    config = make_config(clock=lambda: now[0], checkpw=check)
    assert config.authorize(basic("alice", PASSWORD)) is True
    assert check.calls == 1
    for _ in range(3):  # scrapes within the cache time: no bcrypt
        now[0] += 15
        assert config.authorize(basic("alice", PASSWORD)) is True
    assert check.calls == 1
    # a wrong password is checked (and refused) even while the right one is cached
    assert config.authorize(basic("alice", "wrong")) is False
    assert config.authorize(basic("alice", "wrong")) is False
    assert check.calls == 3
    # the cache of alice is not bob's
    assert config.authorize(basic("bob", PASSWORD)) is True
    assert check.calls == 4
    now[0] += AUTH_CACHE_SECONDS  # expired: bcrypt again
    assert config.authorize(basic("alice", PASSWORD)) is True
    assert check.calls == 5


def test_the_cache_keeps_no_password():
    config = make_config()
    assert config.authorize(basic("alice", PASSWORD))
    cached = repr(config._cache)
    assert PASSWORD not in cached and PASSWORD.encode().hex() not in cached


def test_default_check_runs_off_the_hub(monkeypatch):
    """bcrypt in gevent's thread pool: other greenlets run while a cost-11 check (~100 ms+)
    is under way, and the check runs in another thread."""
    import gevent

    slow_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(11)).decode()
    threads: list[int] = []
    original = bcrypt.checkpw

    def checkpw(password: bytes, hashed: bytes) -> bool:
        threads.append(threading.get_ident())
        return original(password, hashed)

    from exporter import webconfig

    config = WebConfig("web.yml", None, {"alice": slow_hash})
    ticks = [0]

    def ticker():
        while True:
            ticks[0] += 1
            gevent.sleep(0.005)

    monkeypatch.setattr(webconfig.bcrypt, "checkpw", checkpw)
    t = gevent.spawn(ticker)
    gevent.sleep(0)
    assert config.authorize(basic("alice", PASSWORD)) is True
    t.kill()
    assert threads and threads[0] != threading.get_ident()
    assert ticks[0] >= 5, f"the hub was blocked: {ticks[0]} ticks during the bcrypt check"
