"""Configuration: environment settings plus the YAML sites file, validated in one pass.

`load_settings()` reads the environment variables (``environment.ENV_VARS``), then the sites
file (``sites.SITE_TABLE``, ``bridge.BRIDGE_TABLE``), collects every problem and raises
`ConfigError` once with all of them. Passwords come only from environment variables or files
and are wrapped in `Secret`, which prints as '***'; no error message or summary ever contains
one. Nothing here touches the network or writes anything.

Modules: ``checks`` (the declarative field helper), ``environment``, ``sites``, ``bridge``,
``schema`` (JSON Schema of the sites file: ``python -m exporter.config.schema``) and ``docs``
(docs/configuration.md: ``python -m exporter.config.docs``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .bridge import BridgeConfig, BridgeMapping
from .checks import ConfigError
from .environment import process_environment, read_environment, source, state_dir_problem
from .sites import PROTOCOLS, SITE_NAME_RE, Secret, SiteConfig, load_sites

if TYPE_CHECKING:
    from ..webconfig import WebConfig


@dataclass(frozen=True)
class Settings:
    """Everything the service needs, validated; see ``environment.ENV_VARS`` for each field."""

    sites_file: str
    instance_id: str
    clean_session: bool = True
    lwt_enabled: bool = True
    keepalive: int = 60
    shutdown_timeout: float = 5.0
    cooldown_seconds: float = 30.0
    state_dir: str = "./state"
    listen_host: str = "0.0.0.0"
    listen_port: int = 8000
    log_level: str = "INFO"
    log_format: str = "text"
    backoff_min_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    stable_seconds: float = 10.0
    connect_timeout: float = 10.0
    bridge_max_series: int = 100_000
    presence_enabled: bool = True
    presence_interval_seconds: float = 30.0
    duplicate_cooldown_max_seconds: float = 600.0
    broker_event_window_seconds: float = 1.0
    sites: tuple[SiteConfig, ...] = ()
    web_config_file: str = ""
    web_config: WebConfig | None = None  #: None: plain HTTP, no auth
    http_max_connections: int = 64
    http_timeout_seconds: float = 10.0
    site_connect_histogram: bool = False


def load_settings(environ: Mapping[str, str] | None = None, cwd: str | None = None,
                  overrides: Mapping[str, str] | None = None) -> Settings:
    """Read and validate everything; raise ConfigError listing every problem.

    environ None means os.environ plus `<cwd>/.env` (the process environment wins);
    a given mapping is used as-is. ``overrides`` (command-line flag values by variable name)
    take precedence over both. A relative MQTT_SITES_FILE is resolved against cwd;
    MQTT_STATE_DIR must be a writable directory or creatable in one (nothing is created here).
    """
    cwd = os.getcwd() if cwd is None else cwd
    errors: list[str] = []
    base = process_environment(cwd, errors) if environ is None else environ.get
    flagged = dict(overrides or {})

    def lookup(name: str) -> str | None:
        return flagged[name] if name in flagged else base(name)

    values = read_environment(lookup, errors, flagged)
    if values["state_dir"] is not None:
        problem = state_dir_problem(values["state_dir"], cwd)
        if problem is not None:
            errors.append(f"{source('MQTT_STATE_DIR', flagged)}: {problem}")

    sites: tuple[SiteConfig, ...] = ()
    if values["sites_file"] is not None:
        values["sites_file"] = os.path.join(cwd, values["sites_file"])
        sites = load_sites(values["sites_file"], lookup, values["keepalive"] or 60, errors)
    web_config = None
    if values["web_config_file"]:
        from ..webconfig import read_web_config  # imports this package: not at the top
        values["web_config_file"] = os.path.join(cwd, values["web_config_file"])
        web_config = read_web_config(values["web_config_file"], errors)
    if errors:
        raise ConfigError(errors)
    listen_host, listen_port = values.pop("listen")
    return Settings(**values, listen_host=listen_host, listen_port=listen_port, sites=sites,
                    web_config=web_config)


def summarize_site(site: SiteConfig, instance_id: str) -> str:
    """One line describing a site for `check-config`; never the password itself."""
    parts = [
        f"{site.name}: {site.broker} {'mqtts' if site.tls else 'mqtt'} {site.protocol}",
        f"client_id={site.client_id(instance_id)}",
        f"user={site.username or '-'}",
        f"password={site.password_source or '-'}",
        f"topics={','.join(site.topics)}",
        f"keepalive={site.keepalive}",
    ]
    if site.ca_file:
        parts.append(f"ca_file={site.ca_file}")
    if site.tls is not None and site.tls.cert_file:
        parts.append(f"cert_file={site.tls.cert_file}")
    if site.tls is not None and site.tls.server_name:
        parts.append(f"server_name={site.tls.server_name}")
    if site.tls is not None and site.tls.insecure_skip_verify:
        parts.append("insecure_skip_verify")
    if site.bridge is not None:
        parts.append(f"bridge=on(prefix={site.bridge.prefix or '-'},"
                     f"max_series={site.bridge.max_series})")
    parts.append("enabled" if site.enabled else "disabled")
    return " ".join(parts)


__all__ = [
    "PROTOCOLS", "SITE_NAME_RE", "BridgeConfig", "BridgeMapping", "ConfigError", "Secret",
    "Settings", "SiteConfig", "load_settings", "summarize_site",
]
