"""Typed, validated configuration: one frozen object per INI section, built once at start-up.

Sources, lowest priority first: built-in defaults, the INI file given with ``--config``, then the
environment (``CM_MONGODB_URL``, ``CM_DATA_DIR``). Every program also runs with no file at all.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A setting is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""  # empty: the embedded FerretDB started by bin/ scripts (see README)
    name: str = "cloudmailing"
    embedded_url: str = "mongodb://127.0.0.1:27117/"
    block_recipients: int = 500  # most recipients stored (and leased) together as one block


@dataclass(frozen=True)
class ApiConfig:
    host: str = "0.0.0.0"
    port: int = 33610
    tls_cert: str = ""  # PEM certificate; empty: a self-signed one in data_dir
    tls_key: str = ""
    max_request_bytes: int = 32 * 1024 * 1024
    max_xml_depth: int = 64
    key_cache_seconds: float = 30.0
    auth_failures_before_delay: int = 5
    auth_max_delay_seconds: float = 30.0
    max_connections_per_source: int = 64  # open at once from one address; more are closed at once


@dataclass(frozen=True)
class SatelliteLinkConfig:
    host: str = "0.0.0.0"
    port: int = 33620
    max_awaiting_approval: int = 100  # unknown satellites recorded for approval; more are refused
    max_connections_per_source: int = 8  # open at once from one address; more are closed at once
    reconnect_grace_seconds: float = 10.0  # a satellite that left keeps its leases this long
    max_frame_bytes: int = 64 * 1024 * 1024   # largest frame from an authenticated satellite
    max_hello_frame_bytes: int = 4096         # largest frame before hello succeeded
    hello_timeout_seconds: float = 30.0       # a connection that has not said hello by then is closed
    idle_timeout_seconds: float = 900.0       # no frame either way for this long (nothing pending): closed


@dataclass(frozen=True)
class DispatchConfig:
    lease_seconds: int = 300          # a lease not reported within this goes back to the queue
    max_lease_size: int = 1000        # most recipients one lease call hands out
    initial_lease_size: int = 100     # what a satellite may hold before its report rate is known
    max_lease_bytes: int = 16 * 1024 * 1024  # one lease answer carries at most this much attachment data
    retry_initial_seconds: int = 300  # first retry after a soft bounce; doubles each try
    retry_factor: float = 2.0
    retry_max_seconds: int = 14400
    retry_max_age_hours: float = 48.0  # soft-bouncing longer than this since the first try: TIMEOUT


@dataclass(frozen=True)
class SatelliteConfig:
    """The ``cm-satellite`` program's own settings."""

    master_host: str = "127.0.0.1"
    master_port: int = 33620
    master_fingerprint: str = ""      # SHA-256 of the master's certificate; empty: the first one seen
    serial: str = ""                  # empty: the host name
    secret: str = ""                  # empty: one generated and kept in data_dir
    helo_hostname: str = ""           # empty: the host's FQDN
    dns_servers: str = ""             # host:port list, comma-separated; empty: the system's
    smtp_port: int = 25
    test_target: str = ""             # host:port receiving every message of `testing` mailings
    lease_size: int = 200
    compose_workers: int = 1          # processes personalizing and signing (templates never run in the daemon)
    compose_memory_mb: int = 512      # address space a compose worker may add to its start (RLIMIT_AS)
    max_composed_bytes: int = 32 * 1024 * 1024  # composed messages not yet sent, at most (+ one message)
    template_cpu_seconds: float = 2.0  # CPU time to personalize one message
    template_max_output_chars: int = 2_000_000  # one rendered template (subject, text or HTML part)
    template_max_value_chars: int = 1_000_000   # any one string or list a template makes while rendering
    max_connections: int = 200
    max_connections_per_host: int = 4
    connect_timeout: float = 30.0
    reply_timeout: float = 120.0
    max_messages_per_connection: int = 100  # then QUIT and reconnect
    connection_idle_timeout: float = 2.0  # an SMTP connection with nothing to send lingers this long
    starttls: bool = True             # opportunistic STARTTLS when the server offers it
    backoff_initial: float = 5.0      # first pause of an MX address after a 421 or a burst of failures
    backoff_factor: float = 2.0       # each further pause, times this
    backoff_maximum: float = 600.0    # longest pause
    backoff_burst: int = 5            # temporary failures in a row that pause an MX address
    max_backoff_wait: float = 60.0    # every MX host paused longer than this: queued jobs reported WARNING


@dataclass(frozen=True)
class ReportsConfig:
    status_log_retention_days: int = 30


@dataclass(frozen=True)
class PathsConfig:
    data_dir: str = "~/.local/share/cloudmailing"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    file: str = ""  # empty: standard error


@dataclass(frozen=True)
class Settings:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    satellite_link: SatelliteLinkConfig = field(default_factory=SatelliteLinkConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    satellite: SatelliteConfig = field(default_factory=SatelliteConfig)
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def mongodb_url(self) -> str:
        """The database URL in force: the configured one, else the embedded server's."""
        return self.database.url or self.database.embedded_url


_SECTIONS: dict[str, type] = {
    "database": DatabaseConfig,
    "api": ApiConfig,
    "satellite_link": SatelliteLinkConfig,
    "dispatch": DispatchConfig,
    "satellite": SatelliteConfig,
    "reports": ReportsConfig,
    "paths": PathsConfig,
    "logging": LoggingConfig,
}


def _convert(section: str, key: str, raw: str, kind: Any) -> Any:
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(f"[{section}] {key}: {raw!r} is not a valid {kind}") from None
    return raw


def _build_section(name: str, values: Mapping[str, str]) -> Any:
    cls = _SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"[{name}] {key}: unknown setting")
        kwargs[key] = _convert(name, key, raw, fields[key].type)
    section = cls(**kwargs)
    _validate(name, section)
    return section


def _validate(name: str, section: Any) -> None:
    for attr in ("port",):
        port = getattr(section, attr, None)
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"[{name}] {attr}: {port} is not a TCP port")
    if isinstance(section, ApiConfig) and section.max_request_bytes < 1024:
        raise ConfigError("[api] max_request_bytes: must be at least 1024")
    if isinstance(section, (ApiConfig, SatelliteLinkConfig)) and section.max_connections_per_source < 1:
        raise ConfigError(f"[{name}] max_connections_per_source: must be at least 1")
    if isinstance(section, DatabaseConfig) and not 1 <= section.block_recipients <= 1000:
        raise ConfigError("[database] block_recipients: from 1 to 1000")
    if isinstance(section, SatelliteLinkConfig):
        if not 256 <= section.max_hello_frame_bytes <= section.max_frame_bytes:
            raise ConfigError("[satellite_link] max_hello_frame_bytes: 256 to max_frame_bytes")
        if section.hello_timeout_seconds <= 0 or section.idle_timeout_seconds <= 0:
            raise ConfigError("[satellite_link] hello_timeout_seconds, idle_timeout_seconds: must be positive")
        if section.reconnect_grace_seconds < 0:
            raise ConfigError("[satellite_link] reconnect_grace_seconds: must not be negative")
    if isinstance(section, SatelliteConfig):
        _validate_satellite(section)


def _validate_satellite(section: SatelliteConfig) -> None:
    for attr in _POSITIVE_SATELLITE_SETTINGS:
        if getattr(section, attr) <= 0:
            raise ConfigError(f"[satellite] {attr}: must be more than 0")
    for attr in ("connection_idle_timeout", "max_backoff_wait"):
        if getattr(section, attr) < 0:
            raise ConfigError(f"[satellite] {attr}: must not be negative")
    if section.backoff_factor < 1:
        raise ConfigError("[satellite] backoff_factor: must be at least 1")
    if section.backoff_maximum < section.backoff_initial:
        raise ConfigError("[satellite] backoff_maximum: must be at least backoff_initial")


_POSITIVE_SATELLITE_SETTINGS = ("compose_workers", "compose_memory_mb", "max_composed_bytes", "template_cpu_seconds",
                                "template_max_output_chars", "template_max_value_chars",
                                "max_messages_per_connection", "backoff_initial", "backoff_burst")


def load_settings(path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (optional) and the environment into a validated :class:`Settings`."""
    environ = os.environ if environ is None else environ
    parser = configparser.ConfigParser(interpolation=None)
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    sections: dict[str, dict[str, str]] = {name: {} for name in _SECTIONS}
    for name in parser.sections():
        if name not in _SECTIONS:
            raise ConfigError(f"[{name}]: unknown section")
        sections[name].update(parser[name])
    if environ.get("CM_MONGODB_URL"):
        sections["database"]["url"] = environ["CM_MONGODB_URL"]
    if environ.get("CM_DATA_DIR"):
        sections["paths"]["data_dir"] = environ["CM_DATA_DIR"]
    built = {name: _build_section(name, values) for name, values in sections.items()}
    return Settings(**built)
