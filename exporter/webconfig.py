"""The web config file: TLS and HTTP basic auth in front of ``/metrics`` and ``/health``.

The format is the Prometheus exporter-toolkit one (``--web.config.file``), so one file can
serve node_exporter and this exporter alike::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_ca_file: ca.crt                      # optional
      client_auth_type: RequireAndVerifyClientCert  # default NoClientCert
      min_version: TLS12                          # default TLS12
      max_version: TLS13                          # optional
    basic_auth_users:
      prometheus: $2b$12$...                      # bcrypt hash

Off by default (``EXPORTER_WEB_CONFIG_FILE`` empty). The file is validated like the sites
file: every problem at once, each naming the file and the key
(``<file>: key 'tls_server_config.cert_file': ...``), in one :class:`ConfigError`. Relative
paths in the file are relative to the file's directory, as in exporter-toolkit. No message
ever contains a hash, a password or the content of a key file.

Where this differs from exporter-toolkit, it says so at load time instead of behaving
differently: ``RequestClientCert`` and ``RequireAnyClientCert`` accept a client certificate
without verifying it, which Python's ``ssl`` cannot do (it verifies every certificate it
receives), so they are rejected with the supported alternatives; the keys this exporter does
not implement (``cipher_suites``, ``client_allowed_sans``, ``http_server_config``, ...) are
rejected as unsupported rather than ignored.

Basic auth cost: a bcrypt check takes 50-250 ms of CPU by design. :meth:`WebConfig.authorize`
runs it in gevent's thread pool (bcrypt releases the GIL, so the hub keeps serving the MQTT
connections meanwhile) and remembers a successful check for :data:`AUTH_CACHE_SECONDS`: a
Prometheus scraping every 15 s pays for bcrypt about once a minute. The cache holds, per
configured user, only an HMAC of (user, password, hash) under a key made at start, compared
in constant time; failed attempts are never cached, so the cache cannot grow past the number
of users, and a wrong password always pays the full bcrypt cost.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import bcrypt
import yaml

from .config.checks import (
    INVALID,
    MAPPING,
    STRING,
    Check,
    ConfigError,
    Field,
    Problems,
    Table,
    type_name,
)
from .config.sites import _StrictLoader, yaml_problem

#: The exporter-toolkit values of ``client_auth_type``.
CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                     "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
#: The values Python's ssl can honour, and the verify mode each one means.
VERIFY_MODES: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3,
}
#: Seconds a successful basic-auth check is remembered (see the module docstring).
AUTH_CACHE_SECONDS = 60.0
#: bcrypt's modular crypt format: $2a$/$2b$/$2y$, a two-digit cost, 22 + 31 characters.
BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
#: bcrypt reads at most 72 bytes of a password; bcrypt >= 5 refuses longer ones.
BCRYPT_MAX_PASSWORD_BYTES = 72
#: Checked for an unknown user, so that a wrong user name costs as much as a wrong password.
#: A hash of a random string nobody knows; not a secret.
_DUMMY_HASH = b"$2b$10$8MGdRYrqSIIxAC32bnllSOzb5LMznKYw/8NGt1ePTvnTJOBQarf5C"

_UNSUPPORTED_AUTH = ("accepts a client certificate without verifying it, which Python's ssl "
                     "cannot do; use VerifyClientCertIfGiven or RequireAndVerifyClientCert "
                     "with client_ca_file")
_NOT_SUPPORTED = "not supported by mqtt-site-exporter"

log = logging.getLogger(__name__)


class _EncryptedKeyError(Exception):
    """Raised by the password callback: the key file wants a passphrase."""


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _EncryptedKeyError


def _resolve(path: str, base: str) -> str:
    return os.path.join(base, path)


# --- steps ----------------------------------------------------------------------------


def _readable(path: str, check: Check, what: str) -> str | None:
    """The file's text, or None after reporting why it cannot be read (never its content)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        check.fail(f"{what} {path!r} is not a PEM file (not UTF-8 text)")
    except OSError as exc:
        check.fail(f"cannot read {what} {path!r}: {exc.strerror or type(exc).__name__}")
    return None


def _certificates(what: str) -> Callable[[str, Check], Any]:
    """A check of a file of PEM certificates (``what`` names it in messages)."""
    def check_file(value: str, check: Check) -> Any:
        path = _resolve(value, check.context["base"])
        if _readable(path, check, what) is None:
            return INVALID
        try:
            ssl.create_default_context().load_verify_locations(cafile=path)
        except (ssl.SSLError, ValueError):
            return check.fail(f"{path!r} holds no valid PEM certificate")
        return path
    return check_file


_cert_file = _certificates("certificate file")
_client_ca_file = _certificates("CA file")


def _key_file(value: str, check: Check) -> Any:
    path = _resolve(value, check.context["base"])
    text = _readable(path, check, "key file")
    if text is None:
        return INVALID
    if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
        return check.fail(f"{path!r} holds no PEM private key")
    cert = check.values.get("cert_file")
    if not cert:  # its own problem is reported already
        return path
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, path, password=_no_passphrase)
    except _EncryptedKeyError:
        return check.fail(f"{path!r} is encrypted; give an unencrypted key (protect it with "
                          "file permissions)")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return check.fail(f"{path!r} does not match the certificate in cert_file")
        return check.fail(f"cannot load {path!r} with cert_file: {exc.reason or 'invalid key'}")
    return path




def _client_auth_type(value: str, check: Check) -> Any:
    if value not in VERIFY_MODES:
        return check.fail(f"{value!r} {_UNSUPPORTED_AUTH}")
    return value


def _tls_version_field(key: str, default: str | None, help_text: str) -> Field:
    return Field(key, STRING, help_text, default=default, choices=tuple(TLS_VERSIONS))


#: The keys of ``tls_server_config``.
TLS_TABLE = Table("tls_server_config", (
    Field("cert_file", STRING, "Server certificate (PEM), with any intermediates after it.",
          required=True, non_empty=True, steps=(_cert_file,)),
    Field("key_file", STRING, "The certificate's private key (PEM, unencrypted).",
          required=True, non_empty=True, steps=(_key_file,)),
    Field("client_auth_type", STRING, "Client certificates: NoClientCert, "
          "VerifyClientCertIfGiven or RequireAndVerifyClientCert.", default="NoClientCert",
          choices=CLIENT_AUTH_TYPES, steps=(_client_auth_type,)),
    Field("client_ca_file", STRING, "CA bundle (PEM) that client certificates are verified "
          "against; required by the Verify* client_auth_type values.", non_empty=True,
          steps=(_client_ca_file,)),
    _tls_version_field("min_version", "TLS12", "Oldest TLS version accepted."),
    _tls_version_field("max_version", None, "Newest TLS version accepted (default: the newest "
                       "the system supports)."),
), forbidden=dict.fromkeys((
    "cert", "key", "client_ca", "client_allowed_sans", "cipher_suites", "curve_preferences",
    "prefer_server_cipher_suites"), _NOT_SUPPORTED))


def _hash_problem(user: Any, hashed: Any) -> str | None:
    """What is wrong with one basic_auth_users entry; never echoes the value."""
    if not isinstance(user, str) or not user:
        return "user name must be a non-empty string"
    if ":" in user:
        return "user name must not contain ':' (HTTP basic auth splits on it)"
    if not isinstance(hashed, str):
        return f"expected a bcrypt hash string, got {type_name(hashed)}"
    if not BCRYPT_RE.fullmatch(hashed):
        return ("not a valid bcrypt hash (expected $2a$, $2b$ or $2y$, a cost of 04..31 and "
                "53 characters; make one with `htpasswd -nBC 10 USER` or python -c 'import "
                "bcrypt; print(bcrypt.hashpw(b\"PASSWORD\", bcrypt.gensalt()).decode())')")
    return None


#: The top level of the file.
TOP_TABLE = Table("web config", (
    Field("tls_server_config", MAPPING, "Serve HTTPS with this certificate (keys above).",
          default=None),
    Field("basic_auth_users", MAPPING, "User name -> bcrypt hash; every request needs one of "
          "them (HTTP basic auth).", default=None),
), forbidden={"http_server_config": _NOT_SUPPORTED, "rate_limit": _NOT_SUPPORTED})


# --- the result -------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSServerConfig:
    """``tls_server_config``, validated; paths are absolute or relative to the working directory."""

    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str | None = None


def _stamp(tls: TLSServerConfig) -> tuple[tuple[int, int, int], ...]:
    """(mtime, size, inode) of each file of ``tls``; raises OSError."""
    stamps = []
    for path in (tls.cert_file, tls.key_file, tls.client_ca_file):
        if path is not None:
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


class _Reloader:
    """Keeps the server context current with the files (see ``WebConfig.ssl_context``)."""

    def __init__(self, tls: TLSServerConfig,
                 build: Callable[[TLSServerConfig], ssl.SSLContext]) -> None:
        self.tls = tls
        self.build = build
        self.stamp = _stamp(tls)
        self.context = build(tls)
        self.current = self.context
        self.failed: tuple[tuple[int, int, int], ...] | None = None  # stamp that did not load
        self.stat_failed = False

    def on_client_hello(self, sock: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        try:
            stamp = _stamp(self.tls)
            if stamp != self.stamp and stamp != self.failed:
                try:
                    self.current = self.build(self.tls)
                    self.stamp, self.failed, self.stat_failed = stamp, None, False
                    log.info("Web config: reloaded the TLS certificate from %s", self.tls.cert_file)
                except (OSError, ValueError, ssl.SSLError, _EncryptedKeyError) as exc:
                    self.failed = stamp
                    log.warning("Web config: cannot load the renewed TLS files (%s); keeping the "
                                "previous ones", getattr(exc, "reason", None) or type(exc).__name__)
        except OSError as exc:
            if not self.stat_failed:
                self.stat_failed = True
                log.warning("Web config: cannot stat the TLS files (%s); keeping the loaded ones",
                            exc.strerror or type(exc).__name__)
        if self.current is not context:
            sock.context = self.current


def _bcrypt_off_hub(password: bytes, hashed: bytes) -> bool:
    """bcrypt.checkpw in gevent's thread pool: the calling greenlet waits, the hub does not."""
    import gevent
    pool = gevent.get_hub().threadpool  # type: ignore[no-untyped-call]
    return bool(pool.apply(bcrypt.checkpw, (password, hashed)))


class WebConfig:
    """A validated web config: ``ssl_context()`` for the server, ``authorize(environ)`` per
    request. Its repr names the file and the users, never a hash."""

    def __init__(
        self,
        path: str,
        tls: TLSServerConfig | None = None,
        users: Mapping[str, str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        checkpw: Callable[[bytes, bytes], bool] = _bcrypt_off_hub,
        cache_seconds: float = AUTH_CACHE_SECONDS,
    ) -> None:
        self.path = path
        self.tls = tls
        self._hashes = {user: hashed.encode("ascii") for user, hashed in (users or {}).items()}
        self._clock = clock
        self._checkpw = checkpw
        self._cache_seconds = cache_seconds
        self._cache_key = os.urandom(32)
        self._cache: dict[str, tuple[bytes, float]] = {}  # user -> (HMAC, valid until)

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(self._hashes)

    @property
    def auth_enabled(self) -> bool:
        return bool(self._hashes)

    def __repr__(self) -> str:
        return f"WebConfig({self.path!r}, tls={self.tls!r}, users={list(self.users)!r})"

    def describe(self) -> str:
        """One line for ``check-config`` and the start-up log; never a hash."""
        parts = [f"web config {self.path}:"]
        if self.tls is not None:
            parts.append(f"tls(client_auth_type={self.tls.client_auth_type}, "
                         f"min_version={self.tls.min_version})")
        if self._hashes:
            parts.append(f"basic_auth(users={','.join(self.users)})")
        return " ".join(parts)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server context for ``tls_server_config``, or None when it is absent (plain HTTP).

        Reads the certificate and key files now: call it at start (the files were checked
        at load time, but may have changed since; an ``ssl.SSLError`` or ``OSError`` then
        says so). Like exporter-toolkit, renewed files take effect without a restart: at each
        handshake the files' stat is compared with the loaded one (no read when unchanged),
        and a changed set is loaded for that connection and the next ones. A set that does
        not load (say the certificate is written, its key not yet) is logged once and the
        previous one is kept.
        """
        tls = self.tls
        if tls is None:
            return None
        reloader = _Reloader(tls, self._build_context)
        context = reloader.context
        context.sni_callback = reloader.on_client_hello
        return context

    def _build_context(self, tls: TLSServerConfig) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
        context.minimum_version = TLS_VERSIONS[tls.min_version]
        if tls.max_version is not None:
            context.maximum_version = TLS_VERSIONS[tls.max_version]
        context.verify_mode = VERIFY_MODES[tls.client_auth_type]
        if tls.client_ca_file is not None:
            context.load_verify_locations(cafile=tls.client_ca_file)
        return context


    def authorize(self, environ: Mapping[str, Any]) -> bool:
        """Whether a WSGI request may pass: always without ``basic_auth_users``; otherwise
        only with ``Authorization: Basic`` of a configured user and the right password."""
        if not self._hashes:
            return True
        credentials = _basic_credentials(environ.get("HTTP_AUTHORIZATION"))
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._hashes.get(user)
        if hashed is None or len(password) > BCRYPT_MAX_PASSWORD_BYTES:
            self._check(password[:BCRYPT_MAX_PASSWORD_BYTES], _DUMMY_HASH)  # same cost
            return False
        digest = hmac.new(self._cache_key, b"\0".join((user.encode(), password, hashed)),
                          hashlib.sha256).digest()
        now = self._clock()
        cached = self._cache.get(user)
        if cached is not None and now < cached[1] and hmac.compare_digest(cached[0], digest):
            return True
        if not self._check(password, hashed):
            return False
        self._cache[user] = (digest, now + self._cache_seconds)
        return True

    def _check(self, password: bytes, hashed: bytes) -> bool:
        try:
            return self._checkpw(password, hashed)
        except ValueError:  # bcrypt's own refusal (a password with NUL, say)
            return False


def _basic_credentials(header: Any) -> tuple[str, bytes] | None:
    """(user, password bytes) from an ``Authorization: Basic`` header, or None."""
    if not isinstance(header, str):
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    raw_user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        user = raw_user.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return user, password


# --- loading ----------------------------------------------------------------------------


def read_web_config(path: str, errors: list[str]) -> WebConfig | None:
    """The web config at ``path``, or None with every problem appended to ``errors``."""
    problems = Problems(errors, path)
    first = len(errors)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        problems.at("file not found")
        return None
    except UnicodeDecodeError:
        problems.at("cannot read file: not valid UTF-8")
        return None
    except OSError as exc:
        problems.at(f"cannot read file: {exc.strerror or type(exc).__name__}")
        return None
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        problems.at(yaml_problem(exc))
        return None
    if document is None:
        problems.at("empty: give tls_server_config, basic_auth_users or both (or unset the "
                    "web config to serve plain HTTP without auth)")
        return None
    if not isinstance(document, dict):
        problems.at(f"top level must be a mapping, got {type_name(document)}")
        return None
    top = TOP_TABLE.read(document, problems)
    tls = _read_tls(top["tls_server_config"], problems, os.path.dirname(os.path.abspath(path)))
    users = _read_users(top["basic_auth_users"], problems)
    if (top["tls_server_config"] is None and top["basic_auth_users"] is None
            and len(errors) == first):
        problems.at("neither tls_server_config nor basic_auth_users is given")
    if len(errors) > first:
        return None
    return WebConfig(path, tls, users)


def _read_tls(raw: Any, problems: Problems, base: str) -> TLSServerConfig | None:
    if raw is None or raw is INVALID:  # absent, or reported already ({} is neither)
        return None
    nested = problems.nested("tls_server_config.")
    first = len(nested)
    values = TLS_TABLE.read(raw, nested, {"base": base})
    auth, ca = values["client_auth_type"], values["client_ca_file"]
    if auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert") and "client_ca_file" not in raw:
        nested.key("client_ca_file", f"required with client_auth_type {auth}")
    if auth == "NoClientCert" and ca:
        nested.key("client_ca_file", "given without a client_auth_type that verifies client "
                   "certificates (VerifyClientCertIfGiven or RequireAndVerifyClientCert)")
    low, high = values["min_version"], values["max_version"]
    if low and high and TLS_VERSIONS[high] < TLS_VERSIONS[low]:
        nested.key("max_version", f"{high} is older than min_version {low}")
    if len(nested) > first:
        return None
    return TLSServerConfig(**values)


def _read_users(raw: Any, problems: Problems) -> dict[str, str] | None:
    if raw is None or raw is INVALID:
        return None
    nested = problems.nested("basic_auth_users.")
    if not raw:
        problems.key("basic_auth_users", "empty mapping; omit the key to turn basic auth off")
        return None
    users: dict[str, str] = {}
    for user, hashed in raw.items():
        problem = _hash_problem(user, hashed)
        if problem is not None:
            nested.key(user, problem)
        else:
            users[user] = hashed
    return users


def load_web_config(path: str) -> WebConfig:
    """The web config at ``path``; raises ConfigError listing every problem."""
    errors: list[str] = []
    config = read_web_config(path, errors)
    if config is None:
        raise ConfigError(errors)
    return config


__all__ = [
    "AUTH_CACHE_SECONDS", "CLIENT_AUTH_TYPES", "TLS_TABLE", "TLS_VERSIONS", "TOP_TABLE",
    "TLSServerConfig", "WebConfig", "load_web_config", "read_web_config",
]
