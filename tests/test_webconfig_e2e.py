"""The web config end to end: the exporter as a subprocess behind TLS, client certificates and
basic auth (EXPORTER_WEB_CONFIG_FILE), and a bad web config refused before any connection."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import bcrypt
import pytest
import trustme
import yaml

from tests.support.exporter import site
from tests.support.net import HOST, wait_until

pytestmark = pytest.mark.timeout(60)

USER = "prometheus"
PASSWORD = "scrape-Pw-e2e-never-logged"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pki(ca: trustme.CA, directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf = ca.issue_cert(HOST)
    leaf.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))


def start_exporter(exporter_factory, broker, tmp_path, ca, web: dict):
    conf = tmp_path / "web"
    write_pki(ca, conf)
    (conf / "web.yml").write_text(yaml.safe_dump(web))
    return exporter_factory([site("s1", broker)],
                            env={"EXPORTER_WEB_CONFIG_FILE": str(conf / "web.yml")})


def get(url: str, context: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None,
        timeout: float = 3.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def wait_https(proc, context: ssl.SSLContext, **kwargs) -> None:
    """Until the exporter answers HTTPS at all (any status)."""
    url = f"https://{HOST}:{proc.port}/health"

    def answered():
        if not proc.running:
            raise AssertionError(f"exporter exited (rc={proc.returncode})\n{proc.log_tail()}")
        try:
            get(url, context, timeout=0.5, **kwargs)
            return True
        except (OSError, urllib.error.URLError):
            return False

    wait_until(answered, 15, interval=0.05, message=f"exporter HTTPS on {url}")


def test_tls_and_basic_auth(exporter_factory, broker, tmp_path, ca):
    proc = start_exporter(exporter_factory, broker, tmp_path, ca, {
        "tls_server_config": {"cert_file": "server.pem", "key_file": "server.key"},
        "basic_auth_users": {USER: HASH},
    })
    trusted = ssl.create_default_context(cafile=str(tmp_path / "web" / "ca.pem"))
    wait_https(proc, trusted)
    https = f"https://{HOST}:{proc.port}"

    # plain HTTP on the TLS port gets no answer
    with pytest.raises(OSError):
        get(f"http://{HOST}:{proc.port}/metrics", timeout=2)
    # a client that does not trust the CA refuses the server
    with pytest.raises(urllib.error.URLError) as info:
        get(f"{https}/metrics", ssl.create_default_context())
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)

    # basic auth: 401 without credentials, with a wrong password, or an unknown user
    for auth in (None, (USER, "wrong"), ("nobody", PASSWORD)):
        for path in ("/metrics", "/health"):
            status, headers, _ = get(https + path, trusted, auth)
            assert status == 401, (path, auth, status)
            assert headers.get("WWW-Authenticate", "").startswith("Basic"), headers
    # 200 with the right one (twice: the second from the cache)
    for _ in range(2):
        status, _, body = get(f"{https}/metrics", trusted, (USER, PASSWORD))
        assert status == 200 and b"mqtt_site_" in body
    status, _, _ = get(f"{https}/health", trusted, (USER, PASSWORD))
    assert status in (200, 503)  # health itself; auth passed

    # a renewed certificate is served without a restart (written in place, as certbot's
    # deploy hooks and cert-manager's volume updates do)
    assert served_cert(proc.port, trusted) == pem_to_der(tmp_path / "web" / "server.pem")
    leaf = ca.issue_cert(HOST)
    leaf.private_key_pem.write_to_path(str(tmp_path / "web" / "server.key"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "web" / "server.pem"))
    later = (int(time.time()) + 2) * 10**9  # file times may be coarser than this test is fast
    for name in ("server.key", "server.pem"):
        os.utime(tmp_path / "web" / name, ns=(later, later))
    assert served_cert(proc.port, trusted) == pem_to_der(tmp_path / "web" / "server.pem")
    status, _, _ = get(f"{https}/metrics", trusted, (USER, PASSWORD))
    assert status == 200

    proc.terminate()
    assert proc.wait_exit(10) == 0
    log = proc.log_text()
    assert "reloaded the TLS certificate" in log
    assert PASSWORD not in log and HASH not in log and "wrong" not in log


def pem_to_der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def served_cert(port: int, context: ssl.SSLContext) -> bytes:
    """The DER certificate the exporter presents on a fresh connection."""
    with socket.create_connection((HOST, port), timeout=3) as raw, \
            context.wrap_socket(raw, server_hostname=HOST) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_client_certificates_required(exporter_factory, broker, tmp_path, ca):
    proc = start_exporter(exporter_factory, broker, tmp_path, ca, {
        "tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                              "client_ca_file": "ca.pem",
                              "client_auth_type": "RequireAndVerifyClientCert"},
    })
    with_cert = ssl.create_default_context(cafile=str(tmp_path / "web" / "ca.pem"))
    ca.issue_cert("prometheus.example").configure_cert(with_cert)
    wait_https(proc, with_cert)
    status, _, body = get(f"https://{HOST}:{proc.port}/metrics", with_cert)
    assert status == 200 and b"mqtt_site_" in body

    without_cert = ssl.create_default_context(cafile=str(tmp_path / "web" / "ca.pem"))
    other_ca_cert = ssl.create_default_context(cafile=str(tmp_path / "web" / "ca.pem"))
    trustme.CA().issue_cert("intruder.example").configure_cert(other_ca_cert)
    for context in (without_cert, other_ca_cert):
        # TLS 1.3: the server's refusal may arrive with the first read, not the handshake
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            get(f"https://{HOST}:{proc.port}/metrics", context)


def test_bad_web_config_exits_2_before_connecting(exporter_factory, tmp_path):
    # the site points at a listener we own: any connection attempt would be queued there
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        web = tmp_path / "web.yml"
        web.write_text(yaml.safe_dump({
            "tls_server_config": {"cert_file": "missing.pem", "key_file": "missing.key",
                                  "client_auth_type": "RequireAndVerifyClientCert"},
            "basic_auth_users": {USER: "not-a-hash-" + PASSWORD},
        }))
        sites = [{"name": "s1", "host": HOST, "port": port}]
        proc = exporter_factory(sites, env={"EXPORTER_WEB_CONFIG_FILE": str(web)})
        assert proc.wait_exit(15) == 2
        log = proc.log_text()
        for key in ("tls_server_config.cert_file", "tls_server_config.key_file",
                    "tls_server_config.client_ca_file", f"basic_auth_users.{USER}"):
            assert f"{web}: key '{key}'" in log, log
        assert PASSWORD not in log
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected

        # check-config reports the same problems, exit 2
        result = subprocess.run([sys.executable, "-m", "exporter", "check-config"],
                                cwd=proc.dir, env=proc.env, capture_output=True, text=True,
                                timeout=15)
        assert result.returncode == 2, result
        assert f"{web}: key 'tls_server_config.cert_file'" in result.stderr
        assert PASSWORD not in result.stdout + result.stderr
    finally:
        listener.close()

