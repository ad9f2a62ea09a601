"""exporter/config/sources.py: the sites file and MQTT_SITES_URL, against a real HTTP server
on 127.0.0.1 (tests/support/sites_server.py)."""
from __future__ import annotations

import os
import time
import urllib.parse

import pytest

from exporter.config.sites import SITES_FILE_MAX_BYTES
from exporter.config.sources import (
    FileSource,
    SourceError,
    UrlSource,
    make_source,
    shown_url,
    url_problem,
)
from tests.support import free_port
from tests.support.sites_server import SitesServer

DOC = '{"sites": [{"name": "a", "host": "127.0.0.1"}]}'
PASSWORD = "s3cr3t-pa55"
TOKEN = "tok-0123456789abcdef"
QUERY = "key=qu3ry-s3cret"


@pytest.fixture
def server():
    s = SitesServer()
    s.set_body(DOC)
    with s:
        yield s


# --------------------------------------------------------------------------- FileSource

def test_file_source_reads_once_then_reports_unchanged_until_the_file_changes(tmp_path):
    path = tmp_path / "sites.yml"
    path.write_text("one")
    source = FileSource(str(path))
    assert source.origin == str(path)
    assert source.read() == "one"
    assert source.read() is None
    assert source.read(force=True) == "one"
    path.write_text("two, longer")  # another size: changed whatever the clock's resolution
    assert source.read() == "two, longer"
    assert source.read() is None


def test_file_source_errors_and_recovery(tmp_path):
    path = tmp_path / "sites.yml"
    source = FileSource(str(path))
    with pytest.raises(SourceError, match="file not found"):
        source.read()
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(SourceError, match="not valid UTF-8"):
        source.read()
    path.write_text("fixed")
    assert source.read() == "fixed"


def test_make_source_prefers_the_url(tmp_path):
    assert isinstance(make_source(str(tmp_path / "s.yml"), ""), FileSource)
    source = make_source(str(tmp_path / "s.yml"), "http://127.0.0.1:1/s", "/tok", 3.0)
    assert isinstance(source, UrlSource)
    assert (source.token_file, source.timeout) == ("/tok", 3.0)


# --------------------------------------------------------------------------- URL helpers

@pytest.mark.parametrize(("url", "shown"), [
    ("http://127.0.0.1:8080/sites", "http://127.0.0.1:8080/sites"),
    (f"https://user:{PASSWORD}@example.org/a/b?{QUERY}#frag", "https://example.org/a/b"),
    (f"http://[::1]:9/x?{QUERY}", "http://[::1]:9/x"),
    ("http://host:notaport/x", "<unparsable URL>"),
])
def test_shown_url_drops_credentials_query_and_fragment(url, shown):
    assert shown_url(url) == shown


@pytest.mark.parametrize("url", ["ftp://host/x", "file:///etc/passwd", "http:///nohost",
                                 "127.0.0.1:8080/sites"])
def test_url_problem_wants_http_or_https_with_a_host(url):
    assert "http:// or https://" in url_problem(url)


def test_url_problem_never_shows_the_password():
    problem = url_problem(f"ftp://user:{PASSWORD}@host/x?{QUERY}")
    assert PASSWORD not in problem and QUERY not in problem
    assert url_problem("https://host/x") is None


# --------------------------------------------------------------------------- conditional requests

def test_200_then_304_with_if_none_match_and_if_modified_since(server):
    source = UrlSource(server.url, timeout=5)
    assert source.read() == DOC
    assert source.read() is None
    assert source.read() is None
    first, second, third = server.snapshot()
    assert first.status == 200 and first.header("If-None-Match") is None
    assert second.status == third.status == 304
    assert second.header("If-None-Match") == server.etag
    assert second.header("If-Modified-Since") is not None
    assert second.header("User-Agent").startswith("mqtt-site-exporter/")
    assert "application/json" in second.header("Accept")


def test_if_modified_since_alone_when_the_server_sends_no_etag(server):
    server.validators = ("Last-Modified",)
    source = UrlSource(server.url, timeout=5)
    assert source.read() == DOC
    assert source.read() is None
    request = server.snapshot()[-1]
    assert request.status == 304 and request.header("If-None-Match") is None
    assert request.header("If-Modified-Since")
    server.set_body(DOC.replace('"a"', '"b"'))  # Last-Modified moves on by a second or more
    assert '"b"' in source.read()


def test_force_ignores_the_validators(server):
    source = UrlSource(server.url, timeout=5)
    assert source.read() == DOC
    assert source.read(force=True) == DOC
    request = server.snapshot()[-1]
    assert request.status == 200
    assert request.header("If-None-Match") is None and request.header("If-Modified-Since") is None


def test_a_changed_document_comes_with_a_new_etag(server):
    source = UrlSource(server.url, timeout=5)
    assert source.read() == DOC
    old_etag = server.etag
    changed = DOC.replace('"a"', '"b"')
    server.set_body(changed)
    assert server.etag != old_etag
    assert source.read() == changed
    assert server.snapshot()[-1].header("If-None-Match") == old_etag
    assert source.read() is None
    assert server.snapshot()[-1].header("If-None-Match") == server.etag


def test_a_server_without_validators_still_reports_an_unchanged_body_as_unchanged(server):
    server.validators = ()
    source = UrlSource(server.url, timeout=5)
    assert source.read() == DOC
    assert source.read() is None  # same bytes: no reload every poll
    assert source.read(force=True) == DOC
    assert server.count(304) == 0
    server.set_body(DOC + "\n")
    assert source.read() == DOC + "\n"


def test_after_a_failure_the_next_read_is_a_whole_document(server):
    """The reload status must recover when the endpoint comes back with the same document:
    a 304 would leave it failed."""
    source = UrlSource(server.url, timeout=5)
    assert source.read() == DOC
    server.status = 503
    with pytest.raises(SourceError, match="HTTP 503"):
        source.read()
    server.status = None
    assert source.read() == DOC
    assert server.snapshot()[-1].header("If-None-Match") is None
    assert source.read() is None


def test_a_304_to_an_unconditional_request_is_an_error(server):
    server.status = 304
    with pytest.raises(SourceError, match="HTTP 304"):
        UrlSource(server.url, timeout=5).read()


# --------------------------------------------------------------------------- failures

@pytest.mark.parametrize(("status", "text"), [(404, "HTTP 404 Not Found"),
                                              (500, "HTTP 500 Internal Server Error"),
                                              (401, "HTTP 401 Unauthorized")])
def test_http_errors(server, status, text):
    server.status = status
    with pytest.raises(SourceError) as info:
        UrlSource(server.url, timeout=5).read()
    assert str(info.value) == text


def test_connection_refused():
    with pytest.raises(SourceError, match="cannot fetch: Connection refused"):
        UrlSource(f"http://127.0.0.1:{free_port()}/sites", timeout=5).read()


def test_a_server_that_never_answers_is_cut_at_the_deadline(server):
    server.stall = True
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"no complete answer within 0\.5 s"):
        UrlSource(server.url, timeout=0.5).read()
    assert time.monotonic() - started < 2.0


def test_a_dribbling_server_is_cut_at_the_deadline(server):
    """One byte every 50 ms keeps each socket read alive: only the overall deadline ends it."""
    server.dribble = 0.05  # the 47-byte body would take 2.4 s
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"no complete answer within 0\.6 s"):
        UrlSource(server.url, timeout=0.6).read()
    elapsed = time.monotonic() - started
    assert 0.5 < elapsed < 2.0, elapsed


def test_a_body_shorter_than_its_content_length_is_refused(server):
    server.length_extra = 10
    with pytest.raises(SourceError, match=f"ended after {len(DOC)} of {len(DOC) + 10} bytes"):
        UrlSource(server.url, timeout=5).read()


def test_an_oversized_body_is_refused(server):
    server.set_body(b" " * (SITES_FILE_MAX_BYTES + 1))
    with pytest.raises(SourceError, match=f"larger than {SITES_FILE_MAX_BYTES} bytes"):
        UrlSource(server.url, timeout=10).read()


def test_a_body_of_exactly_the_limit_is_read(server):
    server.set_body(b"#" * SITES_FILE_MAX_BYTES)
    assert len(UrlSource(server.url, timeout=10).read()) == SITES_FILE_MAX_BYTES


def test_charsets(server):
    server.set_body("# \u00fc\n".encode("latin-1") + DOC.encode())
    server.charset = "iso-8859-1"
    assert UrlSource(server.url, timeout=5).read().startswith("# \u00fc")
    server.charset = "no-such-charset"
    with pytest.raises(SourceError, match="not valid no-such-charset text"):
        UrlSource(server.url, timeout=5).read()
    server.charset = None  # UTF-8 by default
    with pytest.raises(SourceError, match="not valid utf-8 text"):
        UrlSource(server.url, timeout=5).read()


# --------------------------------------------------------------------------- credentials

def test_the_token_file_is_sent_as_a_bearer_token_and_read_again_at_every_request(server,
                                                                                  tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server.token = TOKEN
    source = UrlSource(server.url, token_file=str(token_file), timeout=5)
    assert source.read() == DOC
    assert server.snapshot()[-1].header("Authorization") == f"Bearer {TOKEN}"
    token_file.write_text("rotated-token")  # a renewed secret: no restart
    with pytest.raises(SourceError, match="HTTP 401"):
        source.read()
    server.token = "rotated-token"
    assert source.read() == DOC
    assert server.snapshot()[-1].header("Authorization") == "Bearer rotated-token"


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read the token file {path}: No such file or directory"),
    (b"", "the token file {path} is empty"),
    (b"\xff\xfe", "cannot read the token file {path}: UnicodeDecodeError"),
    (f"{TOKEN}\nX-Injected: 1".encode(), "the token file {path} does not hold one token"),
])
def test_a_bad_token_file_is_a_source_error_naming_the_file(server, tmp_path, content, problem):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_bytes(content)
    with pytest.raises(SourceError) as info:
        UrlSource(server.url, token_file=str(token_file), timeout=5).read()
    assert str(info.value).startswith(problem.format(path=token_file))
    assert TOKEN not in str(info.value)
    assert server.snapshot() == []  # nothing was sent


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode 000 file")
def test_an_unreadable_token_file(server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0)
    with pytest.raises(SourceError, match="Permission denied"):
        UrlSource(server.url, token_file=str(token_file), timeout=5).read()


def test_a_directory_as_token_file(server, tmp_path):
    with pytest.raises(SourceError, match=f"cannot read the token file {tmp_path}: Is a dir"):
        UrlSource(server.url, token_file=str(tmp_path), timeout=5).read()


def test_user_and_password_in_the_url_are_sent_as_basic_auth(server):
    password = "p@ss:w/rd " + PASSWORD
    server.basic = ("exporter", password)
    userinfo = f"exporter:{urllib.parse.quote(password, safe='')}"
    source = UrlSource(server.url_with(userinfo), timeout=5)
    assert source.origin == server.url
    assert source.read() == DOC
    request = server.snapshot()[-1]
    assert request.header("Authorization").startswith("Basic ")
    assert request.header("Host") == f"127.0.0.1:{server.port}"  # no user info in it
    server.basic = ("exporter", "other")
    with pytest.raises(SourceError, match="HTTP 401"):
        source.read(force=True)


def test_the_token_wins_over_basic_auth(server, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    server.token = TOKEN
    UrlSource(server.url_with(f"u:{PASSWORD}"), token_file=str(tmp_path / "token"),
              timeout=5).read()
    assert server.snapshot()[-1].header("Authorization") == f"Bearer {TOKEN}"


def test_redirects_are_followed_but_credentials_stay_with_the_origin(server, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    server.redirects = {"/old": server.url}
    source = UrlSource(server.url.replace("/sites", "/old"), str(tmp_path / "token"), timeout=5)
    assert source.read() == DOC
    assert [(r.path, r.status, r.header("Authorization")) for r in server.snapshot()] == [
        ("/old", 302, f"Bearer {TOKEN}"), ("/sites", 200, f"Bearer {TOKEN}")]
    with SitesServer() as other:  # another port: another origin
        other.set_body(DOC)
        server.redirects = {"/sites": other.url}
        source = UrlSource(server.url_with(f"u:{PASSWORD}"), str(tmp_path / "token"), timeout=5)
        assert source.read() == DOC
        assert server.snapshot()[-1].header("Authorization") == f"Bearer {TOKEN}"
        assert other.snapshot()[-1].header("Authorization") is None


def _failing_cases(server: SitesServer, tmp_path) -> list[tuple[str, UrlSource]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    secret_url = server.url_with(f"exporter:{PASSWORD}", QUERY)
    refused = f"http://exporter:{PASSWORD}@127.0.0.1:{free_port()}/sites?{QUERY}"
    return [
        ("refused", UrlSource(refused, str(token_file), timeout=2)),
        ("status", UrlSource(secret_url, str(token_file), timeout=2)),
        ("space in query", UrlSource(server.url_with(f"u:{PASSWORD}", QUERY + " x" + TOKEN),
                                     str(token_file), timeout=2)),
        ("stall", UrlSource(secret_url, str(token_file), timeout=0.3)),
    ]


def test_source_errors_never_show_the_password_token_or_query(server, tmp_path):
    server.status = 500
    messages = []
    for case, source in _failing_cases(server, tmp_path):
        if case == "stall":
            server.stall = True
        with pytest.raises(SourceError) as info:
            source.read()
        messages.append((case, str(info.value), source.origin))
    for case, message, origin in messages:
        for secret in (PASSWORD, TOKEN, QUERY, "qu3ry"):
            assert secret not in message, (case, message)
            assert secret not in origin, (case, origin)
    assert [m for _, m, _ in messages][:2] == ["cannot fetch: Connection refused", "HTTP 500 "
                                                "Internal Server Error"]


GEVENT_READ = """
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from exporter.config.sources import SourceError, UrlSource
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(100)])
started = time.monotonic()
try:
    UrlSource(sys.argv[1], timeout=0.5).read()
except SourceError as exc:
    print(f"{exc}|{time.monotonic() - started:.2f}|{len(ticks)}")
"""


@pytest.mark.parametrize("misbehaviour", ["stall", "dribble"])
def test_the_deadline_holds_under_gevent_without_blocking_the_hub(server, misbehaviour):
    """The exporter runs the read in a greenlet, gevent-patched: the watchdog's timer is then
    a greenlet too, and the hub keeps serving the others meanwhile."""
    import subprocess
    import sys

    from tests.support import REPO_ROOT
    server.stall, server.dribble = misbehaviour == "stall", 0.05
    out = subprocess.run([sys.executable, "-c", GEVENT_READ, server.url], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=20)
    message, elapsed, ticks = out.stdout.strip().split("|")
    assert message == "no complete answer within 0.5 s", out.stderr
    assert 0.4 < float(elapsed) < 2.0
    assert int(ticks) >= 5  # other greenlets ran during the read
