"""A site's ``tls:`` block: ``true``/``false`` or a mapping with the Prometheus ``tls_config``
names (:data:`TLS_TABLE`).

``tls: true`` verifies the broker against the system CAs. A mapping may name a CA bundle
(``ca_file``), a client certificate and key for mutual TLS (``cert_file``, ``key_file``), the
name to verify the broker's certificate against (``server_name``, also sent as SNI) and
``insecure_skip_verify`` (no verification at all: warned about at start and by check-config).

The files are checked the way the connection will load them (``ssl`` with OpenSSL): a CA
bundle must hold a PEM certificate, a certificate file a PEM certificate, and the key must be
readable, unencrypted and match the certificate. No message ever quotes a file's content.

The site-level ``ca_file`` key (before ``tls:`` took a mapping) is a deprecated alias of
``tls.ca_file``: it still works with ``tls: true`` and check-config warns about it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from .checks import BOOLEAN, INVALID, STRING, Check, Field, Problems, Table, type_name


@dataclass(frozen=True)
class TlsConfig:
    """A site's TLS settings; ``SiteConfig.tls`` is None for a plain connection."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False


def _os_problem(what: str, path: str, exc: OSError) -> str:
    return f"cannot read {what} {path!r}: {exc.strerror or type(exc).__name__}"


def ca_file_problem(path: str) -> str | None:
    """What is wrong with a CA bundle (as the connection loads it), or None."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError:
        return f"{path!r} holds no valid PEM certificate"
    except OSError as exc:
        return _os_problem("CA file", path, exc)
    return None


def _ca_file(path: str, check: Check) -> Any:
    problem = ca_file_problem(path)
    return check.fail(problem) if problem else path


def _cert_file(path: str, check: Check) -> Any:
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("ascii", "replace")
    except OSError as exc:
        return check.fail(_os_problem("certificate file", path, exc))
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    try:
        if start < 0 or stop < 0:
            raise ValueError
        ssl.PEM_cert_to_DER_cert(text[start:stop + len(end)])
    except ValueError:
        return check.fail(f"{path!r} holds no PEM certificate")
    return path


def key_problem(cert_file: str, key_file: str | None) -> str | None:
    """Load the pair as the connection will; what is wrong (never the content), or None."""
    asked: list[bool] = []

    def password() -> bytes:
        asked.append(True)
        return b""

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_file, key_file, password)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            if asked:
                return "the private key is encrypted; only unencrypted keys are supported"
            if "KEY_VALUES_MISMATCH" in str(exc.reason):
                return "the private key does not match tls.cert_file"
            if key_file is None:
                return "holds no private key; set tls.key_file"
            return f"{key_file!r} holds no valid PEM private key"
        return _os_problem("key file", key_file or cert_file, exc)
    return None


def _key_file(path: str, check: Check) -> Any:
    cert = check.values.get("cert_file")
    if cert is None:
        return check.fail("only with tls.cert_file")
    if cert is not INVALID and (problem := key_problem(cert, path)):
        return check.fail(problem)
    return path


def _server_name(name: str, check: Check) -> Any:
    if any(c.isspace() or not c.isprintable() for c in name) or len(name) > 253:
        return check.fail("a host name or IP address of at most 253 characters, "
                          "no whitespace or control characters")
    return name


#: The keys of a ``tls:`` mapping (the names of Prometheus' ``tls_config``).
TLS_TABLE = Table("tls", (
    Field("ca_file", STRING, "CA bundle (PEM) to verify the broker's certificate with, instead "
          "of the system CAs.", non_empty=True, steps=(_ca_file,)),
    Field("cert_file", STRING, "Client certificate (PEM) for mutual TLS (AWS IoT Core and many "
          "managed brokers require one). May also hold the key.", non_empty=True,
          steps=(_cert_file,)),
    Field("key_file", STRING, "Private key (PEM, unencrypted) of cert_file; only with "
          "cert_file.", non_empty=True, steps=(_key_file,)),
    Field("server_name", STRING, "Name to verify the broker's certificate against and to send "
          "as SNI, when it differs from host (e.g. connecting by IP address).", non_empty=True,
          steps=(_server_name,)),
    Field("insecure_skip_verify", BOOLEAN, "Do not verify the broker's certificate at all "
          "(testing only: anyone in the path can read the traffic). Logged as a warning at "
          "start.", default=False),
), schema={"dependencies": {"key_file": ["cert_file"]}})

INSECURE_WARNING = ("tls.insecure_skip_verify is true: the broker's certificate is not "
                    "verified; anyone in the path can read and change the traffic")
CA_FILE_DEPRECATED = "deprecated; use tls: {ca_file: ...} (still works with tls: true)"


def parse_tls(raw: Any, problems: Problems) -> Any:
    """``tls:`` of a site: None (plain), a :class:`TlsConfig`, or INVALID (reported)."""
    if isinstance(raw, bool):
        return TlsConfig() if raw else None
    if not isinstance(raw, dict):
        problems.key("tls", f"expected boolean or mapping, got {type_name(raw)}")
        return INVALID
    first = len(problems)
    values = TLS_TABLE.read(raw, problems.nested("tls."))
    if len(problems) > first:
        return INVALID
    tls = TlsConfig(**values)
    if (tls.cert_file is not None and tls.key_file is None
            and (problem := key_problem(tls.cert_file, None))):
        problems.key("tls.cert_file", problem)
        return INVALID
    return tls


def tls_step(raw: Any, check: Check) -> Any:
    """The site table's step for ``tls``."""
    return parse_tls(raw, check.problems)


def site_ca_file_step(path: str, check: Check) -> Any:
    """The site table's step for the deprecated site-level ``ca_file``."""
    tls = check.values.get("tls")
    if tls is INVALID:
        return INVALID
    if not isinstance(tls, TlsConfig):
        return check.fail("only allowed with tls: true (deprecated: use tls: {ca_file: ...})")
    if tls.ca_file is not None:
        return check.fail("also given as tls.ca_file; keep only tls.ca_file")
    return _ca_file(path, check)


__all__ = ["CA_FILE_DEPRECATED", "INSECURE_WARNING", "TLS_TABLE", "TlsConfig", "ca_file_problem",
           "key_problem", "parse_tls", "site_ca_file_step", "tls_step"]
