"""examples/sites_endpoint.py (with examples/sites.sql) as a subprocess on a loopback port:
what it serves is a sites document the exporter accepts, and it follows the table."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import urllib.request

import pytest

from exporter.config import load_settings, reload_sites
from exporter.config.sources import SourceError, UrlSource
from tests.support import HOST, REPO_ROOT, free_port, kill_proc, port_accepts, wait_until

ENDPOINT = REPO_ROOT / "examples" / "sites_endpoint.py"
SCHEMA = REPO_ROOT / "examples" / "sites.sql"
TOKEN = "example-token-0123"


@pytest.fixture
def endpoint(tmp_path):
    """(url, database path, token file) of a running examples/sites_endpoint.py."""
    database, token_file, port = tmp_path / "app.db", tmp_path / "token", free_port()
    token_file.write_text(TOKEN + "\n")
    log = (tmp_path / "endpoint.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(ENDPOINT), "--db", str(database), "--init",
                             str(SCHEMA), "--listen", f"{HOST}:{port}", "--token-file",
                             str(token_file)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is None and port_accepts(HOST, port), 10,
                   message=f"sites endpoint on {port}: {(tmp_path / 'endpoint.log').read_text()}")
        yield f"http://{HOST}:{port}/sites", database, token_file
    finally:
        kill_proc(proc)
        log.close()
    assert TOKEN not in (tmp_path / "endpoint.log").read_text()


def etag(url: str) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["ETag"]


def test_the_example_endpoint_serves_a_document_the_exporter_accepts(endpoint, tmp_path):
    url, database, token_file = endpoint
    environ = {"MQTT_SITES_URL": url, "MQTT_SITES_URL_TOKEN_FILE": str(token_file),
               "MQTT_INSTANCE_ID": "example", "MQTT_STATE_DIR": str(tmp_path / "state"),
               "SITE_42_MQTT_PASSWORD": "pw"}
    settings = load_settings(environ, cwd=str(tmp_path))
    assert [(s.name, s.port, s.protocol) for s in settings.sites] == [
        ("site_42", 18830, "5"), ("site_88", 18830, "3.1.1")]
    [site_42] = [s for s in settings.sites if s.name == "site_42"]
    assert site_42.topics == ("site_42/sensors/#",) and site_42.username == "exporter"

    source = UrlSource(url, str(token_file), timeout=5)
    first = source.read()
    assert source.read() is None  # 304: the table did not change
    first_etag = etag(url)
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO mqtt_connection (name, host, port, enabled) "
                   "VALUES ('site_7', '127.0.0.1', 1884, 0)")
    second = source.read()
    assert second is not None and second != first and etag(url) != first_etag
    new = reload_sites(settings, second)
    assert [(s.name, s.enabled) for s in new.sites] == [
        ("site_42", True), ("site_7", False), ("site_88", True)]
    assert source.read() is None


def test_the_example_endpoint_wants_the_token(endpoint, tmp_path):
    url, _, _ = endpoint
    with pytest.raises(SourceError, match="HTTP 401"):
        UrlSource(url, timeout=5).read()
    (tmp_path / "wrong").write_text("wrong-token")
    with pytest.raises(SourceError, match="HTTP 401"):
        UrlSource(url, str(tmp_path / "wrong"), timeout=5).read()
    with pytest.raises(SourceError, match="HTTP 404"):
        UrlSource(url.replace("/sites", "/other"), str(tmp_path / "token"), timeout=5).read()
