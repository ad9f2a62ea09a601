"""TLS end to end (issue #9): a real Mosquitto with TLS, mutual-TLS and plain listeners, the
exporter as a real subprocess, and one site per failure of the fault matrix.

Certificates come from ``trustme``: a CA, a server certificate for ``localhost`` only (so
connecting to 127.0.0.1 without ``server_name`` is a name mismatch), a client certificate
from the same CA, and a client certificate from another CA (rejected by the mTLS listener).

One broker and one exporter serve every test of the module (each test checks its site in
verbose /health and in the log), which keeps the file to a few seconds. What each failure
looks like on the wire (Mosquitto 2.0.11, OpenSSL 3) is documented at
:func:`exporter.connection.describe_failure`.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys

import pytest
import trustme

from exporter.config import SiteConfig
from exporter.config.tls import TlsConfig
from exporter.connection import describe_end, describe_failure
from exporter.reconnect import ConnectionEnd
from exporter.state import CONNECTION_LOST, KEEPALIVE_TIMEOUT, TAKEOVER
from tests.support import HOST, Broker, ExporterProcess, find_mosquitto, free_port, wait_until

pytestmark = pytest.mark.timeout(60)

PASSWORD = "tls-Pw-81zq-never-shown"
USER = "meter"


class Pki:
    def __init__(self, directory) -> None:
        self.dir = directory
        ca, other = trustme.CA(), trustme.CA()
        server = ca.issue_cert("localhost")
        client, stranger = ca.issue_cert("client.example"), other.issue_cert("client.example")
        self.ca = self._write("ca.pem", ca.cert_pem.bytes())
        self.other_ca = self._write("other-ca.pem", other.cert_pem.bytes())
        self.server_cert = self._write("server.crt", b"".join(p.bytes() for p in server.cert_chain_pems))
        self.server_key = self._write("server.key", server.private_key_pem.bytes())
        self.client_cert = self._write("client.crt", client.cert_chain_pems[0].bytes())
        self.client_key = self._write("client.key", client.private_key_pem.bytes())
        self.stranger_cert = self._write("stranger.crt", stranger.cert_chain_pems[0].bytes())
        self.stranger_key = self._write("stranger.key", stranger.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki, tmp_path_factory):
    """Mosquitto: main port TLS (server cert for localhost), ``mtls`` port TLS with
    ``require_certificate``, ``plain`` port plain MQTT; all with a password."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto not installed", pytrace=False)
    mtls, plain = free_port(), free_port()
    server = [f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}"]
    extra = "\n".join([*server, f"listener {mtls} {HOST}", *server, "require_certificate true",
                       f"listener {plain} {HOST}"])
    broker = Broker(tmp_path_factory.mktemp("broker"), users={USER: PASSWORD}, extra_conf=extra)
    broker.mtls_port, broker.plain_port = mtls, plain
    broker.start()
    yield broker
    broker.cleanup()


def _site(name: str, port: int, tls, **extra) -> dict:
    site = {"name": name, "host": HOST, "port": port, "username": USER,
            "password_env": "SITE_PW", **extra}
    if tls is not None:
        site["tls"] = tls
    return site


@pytest.fixture(scope="module")
def silent_port():
    """A port whose kernel accepts TCP connections that nobody ever answers."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def exporter(pki, tls_broker, silent_port, tmp_path_factory):
    b = tls_broker
    ok = {"ca_file": pki.ca, "server_name": "localhost"}
    mtls = {**ok, "cert_file": pki.client_cert, "key_file": pki.client_key}
    sites = [
        _site("ok", b.port, ok),
        _site("mtls_ok", b.mtls_port, mtls),
        _site("insecure", b.port, {"insecure_skip_verify": True}),
        _site("alias", b.port, True, ca_file=pki.ca, host="localhost"),
        _site("unknown_ca", b.port, {"ca_file": pki.other_ca, "server_name": "localhost"}),
        _site("name_mismatch", b.port, {"ca_file": pki.ca}),
        _site("cert_required", b.mtls_port, ok),
        _site("cert_rejected", b.mtls_port, {**ok, "cert_file": pki.stranger_cert,
                                             "key_file": pki.stranger_key}),
        _site("plain_on_tls", b.port, None),
        _site("tls_on_plain", b.plain_port, ok),
        _site("not_authorised", b.plain_port, None, password_env="WRONG_PW"),
        _site("refused", free_port(), None),
        _site("silent", silent_port, None),
    ]
    env = {"SITE_PW": PASSWORD, "WRONG_PW": "wrong-" + PASSWORD[::-1],
           "MQTT_BACKOFF_MIN_SECONDS": "0.2", "MQTT_BACKOFF_MAX_SECONDS": "0.5",
           "MQTT_CONNECT_TIMEOUT": "1", "MQTT_SHUTDOWN_TIMEOUT": "2"}
    proc = ExporterProcess(tmp_path_factory.mktemp("exporter"), sites, env=env).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.cleanup()


def _report(exporter, name: str) -> dict:
    _, body = exporter.health(verbose=True)
    return next(s for s in body["sites"] if s["name"] == name)


def _wait_error(exporter, name: str, attempts: int = 1) -> dict:
    """The site's verbose report once it failed ``attempts`` times (reconnects counted)."""
    def failed():
        site = _report(exporter, name)
        return site if site["last_error"] and site["reconnects"] >= attempts else None
    return wait_until(failed, 20, interval=0.05, message=f"{name}: last_error\n{exporter.log_tail()}")


def _wait_connected(exporter, name: str) -> dict:
    return wait_until(lambda: (s := _report(exporter, name))["connected"] and s, 20,
                      interval=0.05, message=f"{name} connected\n{exporter.log_tail()}")


# --- working TLS: server_name, mTLS, skip-verify, the deprecated site-level ca_file ------


@pytest.mark.parametrize("name", ["ok", "mtls_ok", "insecure", "alias"])
def test_tls_sites_connect(exporter, tls_broker, name):
    site = _wait_connected(exporter, name)
    assert site["last_error"] is None
    assert tls_broker.connects(f"{name}_itest") >= 1


def test_insecure_skip_verify_warns_at_start(exporter):
    exporter.wait_log(r"WARNING .*insecure.*tls\.insecure_skip_verify is true: the broker's "
                      r"certificate is not verified", 10)


def test_deprecated_ca_file_warns_at_start(exporter):
    exporter.wait_log(r"WARNING .*key 'ca_file': deprecated; use tls: \{ca_file: \.\.\.\}", 10)


# --- the fault matrix: every failure named in verbose /health and in the log -------------

FAULTS = {
    "unknown_ca": "tls: unknown CA",
    "name_mismatch": f"tls: certificate name mismatch (expected {HOST})",
    "cert_required": "tls: client certificate required",
    "cert_rejected": "tls: client certificate rejected",
    "plain_on_tls": "tls: plain MQTT on a TLS port?",
    "tls_on_plain": "tls: TLS client on a plain port?",
    "not_authorised": "refused: not authorised",
    "refused": "connection refused",
}


@pytest.mark.parametrize("name, expected", FAULTS.items(), ids=FAULTS.keys())
def test_fault_is_named_in_health_and_log_once(exporter, name, expected):
    site = _wait_error(exporter, name, attempts=3)
    assert site["last_error"] == expected
    assert isinstance(site["last_error_at"], float) and not site["connected"]
    lines = re.findall(rf"^.*\b{name}\b.*Connection to .* failed: (.*)$", exporter.log_text(), re.M)
    assert lines == [expected], lines  # logged once per change, not once per attempt


def test_no_connack_is_a_timeout(exporter):
    site = _wait_error(exporter, "silent")
    assert site["last_error"] == "timeout waiting for CONNACK"


def test_secrets_never_in_health_metrics_or_log(exporter):
    _wait_error(exporter, "not_authorised")
    _, body = exporter.health(verbose=True)
    for text in (str(body), exporter.metrics_text(), exporter.log_text()):
        assert PASSWORD not in text and PASSWORD[::-1] not in text


# --- check-config validates the TLS files and prints the warnings -------------------------


def _check_config(tmp_path, sites) -> subprocess.CompletedProcess:
    proc = ExporterProcess(tmp_path / "check", sites,
                           command=[sys.executable, "-m", "exporter", "check-config"])
    return subprocess.run(proc.command, cwd=proc.dir, env=proc.env, capture_output=True,
                          text=True, timeout=30)


def test_check_config_warns_about_alias_and_skip_verify(tmp_path, pki):
    sites = [{"name": "a", "host": "h", "tls": True, "ca_file": pki.ca},
             {"name": "b", "host": "h", "tls": {"insecure_skip_verify": True}},
             {"name": "c", "host": "h", "tls": {"cert_file": pki.client_cert,
                                                "key_file": pki.client_key,
                                                "server_name": "mqtt.example"}}]
    done = _check_config(tmp_path, sites)
    assert done.returncode == 0, done.stderr
    a, b, c = done.stdout.splitlines()[:3]
    assert "mqtts 3.1.1" in a and f"ca_file={pki.ca}" in a and "insecure_skip_verify" in b
    assert f"cert_file={pki.client_cert} server_name=mqtt.example" in c
    assert "WARNING" not in done.stdout and "site 'c'" not in done.stderr
    assert "site 'a' (#1): key 'ca_file': deprecated" in done.stderr
    assert "site 'b' (#2): key 'tls.insecure_skip_verify': tls.insecure_skip_verify is true" in (
        done.stderr)


def test_check_config_rejects_a_key_of_another_certificate(tmp_path, pki):
    sites = [{"name": "a", "host": "h",
              "tls": {"cert_file": pki.client_cert, "key_file": pki.stranger_key}}]
    done = _check_config(tmp_path, sites)
    assert done.returncode == 2
    assert "site 'a' (#1): key 'tls.key_file': the private key does not match tls.cert_file" in (
        done.stderr + done.stdout)
    assert "PRIVATE KEY" not in done.stderr + done.stdout


# --- the classifier on errors a test cannot provoke on loopback ---------------------------


def test_describe_failure_without_a_broker():
    plain = SiteConfig(name="s", host="broker.invalid", port=1883)
    tls = SiteConfig(name="s", host="10.0.0.1", port=8883, tls=TlsConfig(server_name="mqtt.example"))
    assert describe_failure(socket.gaierror(-2, "Name or service not known"), plain,
                            handshake=True) == "dns: cannot resolve host"
    assert describe_failure(TimeoutError(), plain, handshake=True) == "timeout connecting"
    assert describe_failure(None, plain, handshake=False) == "closed by the broker before CONNACK"
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code, mismatch.verify_message = 62, "Hostname mismatch"
    assert describe_failure(mismatch, tls, handshake=True) == (
        "tls: certificate name mismatch (expected mqtt.example)")
    required = ssl.SSLError(1, "alert")
    required.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert describe_failure(required, tls, handshake=False) == "tls: client certificate required"
    lost = ConnectionEnd(connected=True, uptime=60.0)
    assert describe_end(CONNECTION_LOST, lost, None) == "connection lost: closed by the broker"
    assert describe_end(CONNECTION_LOST, lost, ConnectionResetError(104, "Connection reset by peer")
                        ) == "connection lost: connection reset by peer"
    assert describe_end(KEEPALIVE_TIMEOUT, lost, None) == "keepalive timeout"
    assert describe_end(TAKEOVER, lost, None).startswith("takeover: ")
