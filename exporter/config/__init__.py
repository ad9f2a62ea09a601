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
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .bridge import BridgeConfig, BridgeMapping
from .checks import ConfigError, Problems
from .environment import process_environment, read_environment, source, state_dir_problem
from .shard import Shard, ordinal_problem, select
from .sites import PROTOCOLS, SITE_NAME_RE, Lookup, Secret, SiteConfig, parse_sites_text
from .sources import SitesSource, SourceError, make_source, url_problem

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
    sites_url: str = ""
    sites_url_token_file: str = ""
    sites_reload_seconds: float = 30.0
    #: This replica's shard (MQTT_SHARD, or MQTT_SHARDS and the host name); None: all sites.
    shard: Shard | None = None
    shards: int = 0
    #: Sites in the document, all shards (``sites`` holds this shard's).
    sites_total: int = 0
    #: False until a sites document was read (MQTT_SITES_URL not fetched yet).
    sites_loaded: bool = True
    #: Where the sites document is read from, again at every reload.
    source: SitesSource | None = field(default=None, compare=False, repr=False)
    #: Looks up the variables sites name (password_env), again at every reload.
    lookup: Lookup | None = field(default=None, compare=False, repr=False)

    @property
    def sites_origin(self) -> str:
        """The sites file or URL (without credentials), as messages name it."""
        return self.source.origin if self.source is not None else self.sites_file


def load_settings(environ: Mapping[str, str] | None = None, cwd: str | None = None,
                  overrides: Mapping[str, str] | None = None, fetch: bool = True) -> Settings:
    """Read and validate everything; raise ConfigError listing every problem.

    environ None means os.environ plus `<cwd>/.env` (the process environment wins);
    a given mapping is used as-is. ``overrides`` (command-line flag values by variable name)
    take precedence over both. A relative MQTT_SITES_FILE is resolved against cwd;
    MQTT_STATE_DIR must be a writable directory or creatable in one (nothing is created here).
    ``fetch`` False leaves MQTT_SITES_URL unread (``sites_loaded`` False): ``run`` fetches it
    itself and, unlike ``check-config``, starts even when the endpoint is down.
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

    shard = values["shard"] = _shard(values, lookup, errors, flagged)
    if values["sites_url"] and (problem := url_problem(values["sites_url"])):
        errors.append(f"{source('MQTT_SITES_URL', flagged)}: {problem}")
        values["sites_url"] = None
    sites: tuple[SiteConfig, ...] = ()
    sites_total, loaded, sites_source = 0, False, None
    if values["sites_file"] is not None and values["sites_url"] is not None:
        values["sites_file"] = os.path.join(cwd, values["sites_file"])
        sites_source = make_source(values["sites_file"], values["sites_url"],
                                   values["sites_url_token_file"] or "")
        if fetch or not values["sites_url"]:
            all_sites, loaded = _read_sites(sites_source, lookup, values["keepalive"] or 60,
                                            errors)
            sites, sites_total = select(all_sites, shard), len(all_sites)
    web_config = None
    if values["web_config_file"]:
        from ..webconfig import read_web_config  # imports this package: not at the top
        values["web_config_file"] = os.path.join(cwd, values["web_config_file"])
        web_config = read_web_config(values["web_config_file"], errors)
    if errors:
        raise ConfigError(errors)
    listen_host, listen_port = values.pop("listen")
    return Settings(**values, listen_host=listen_host, listen_port=listen_port, sites=sites,
                    web_config=web_config, sites_total=sites_total,
                    sites_loaded=loaded, source=sites_source, lookup=lookup)


def _shard(values: dict[str, object], lookup: Lookup, errors: list[str],
           flagged: Mapping[str, str]) -> Shard | None:
    """MQTT_SHARD, or MQTT_SHARDS with the ordinal from the host name. A --shard flag wins
    over MQTT_SHARDS from the environment (``check-config --shard i/N`` in a sharded pod)."""
    shard, count = values["shard"], values["shards"]
    if isinstance(shard, Shard) and "MQTT_SHARD" in flagged and "MQTT_SHARDS" not in flagged:
        return shard
    if isinstance(shard, Shard) and count:
        errors.append(f"{source('MQTT_SHARDS', flagged)}: set MQTT_SHARD or MQTT_SHARDS, "
                      "not both")
        return None
    if isinstance(count, int) and count > 0:
        hostname = lookup("HOSTNAME") or socket.gethostname()
        shard, problem = ordinal_problem(hostname, count)
        if problem is not None:
            errors.append(f"{source('MQTT_SHARDS', flagged)}: {problem}")
    return shard if isinstance(shard, Shard) else None


def _read_sites(sites_source: SitesSource, lookup: Lookup, keepalive: int,
                errors: list[str]) -> tuple[tuple[SiteConfig, ...], bool]:
    """(every valid site of the document, whether it could be read); problems to errors."""
    try:
        text = sites_source.read(force=True)
    except SourceError as exc:
        Problems(errors, sites_source.origin).at(str(exc))
        return (), False
    return parse_sites_text(text or "", sites_source.origin, lookup, keepalive, errors), True


def reload_sites(settings: Settings, text: str) -> Settings:
    """``settings`` with the sites of a new document (``text``, read from ``settings.source``);
    raises ConfigError listing every problem, exactly as at start."""
    errors: list[str] = []
    lookup = settings.lookup or (lambda name: os.environ.get(name))
    all_sites = parse_sites_text(text, settings.sites_origin, lookup, settings.keepalive, errors)
    if errors:
        raise ConfigError(errors)
    return replace(settings, sites=select(all_sites, settings.shard), sites_total=len(all_sites),
                   sites_loaded=True)


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
    "Settings", "Shard", "SiteConfig", "SourceError", "load_settings", "reload_sites",
    "summarize_site",
]
