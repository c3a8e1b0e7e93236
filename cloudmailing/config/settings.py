"""Typed, validated configuration: one frozen object per INI section, built once at start-up.

Sources, lowest priority first: built-in defaults, the INI file given with ``--config``, then the
environment (``CM_MONGODB_URL``, ``CM_DATA_DIR``). Every program also runs with no file at all.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pymongo import uri_parser
from pymongo.errors import ConfigurationError, InvalidURI

from cloudmailing.common.embedded_db import embedded_url


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of its range: the message names the section,
    the key, what is expected and the value given."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""  # empty: the embedded FerretDB started by bin/ scripts (see README)
    name: str = "cloudmailing"
    embedded_url: str = ""  # empty: the embedded database's socket in <data_dir>/db (bin/quickstart's)
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
    dns_servers: str = ""             # IP address[:port] list, comma-separated; empty: the system's
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
        """The database URL in force: the configured one, else the embedded server's: FerretDB's
        unix socket for ``<data_dir>/db``, where bin/quickstart starts it (``bin/embedded-db url``
        prints it, by the same rule: common/embedded_db.py; quickstart also hands it to every
        program in ``CM_MONGODB_URL``)."""
        if self.database.url or self.database.embedded_url:
            return self.database.url or self.database.embedded_url
        return embedded_url(self.paths.data_path / "db")


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
    """Every field by its rule in :data:`_RULES`, then the rules that tie fields together."""
    for attr in dataclasses.fields(section):
        value = getattr(section, attr.name)
        expected = _RULES[name][attr.name](value)
        if expected is not None:
            raise ConfigError(f"[{name}] {attr.name}: {expected}, not {value!r}")
    for fields, check, expected in _CROSS_RULES.get(name, ()):
        if not check(section):
            shown = ", ".join(f"{key} = {getattr(section, key)!r}" for key in fields)
            raise ConfigError(f"[{name}] {fields[0]}: {expected} ({shown})")


# -- the rules ------------------------------------------------------------------------------
# A rule takes a field's converted value and returns None when it is valid, else what is
# expected ("must be ..."), which the error shows after the section, the key, before the value.

_Rule = Callable[[Any], str | None]


def _number(minimum: float | None = None, maximum: float | None = None, above: float | None = None) -> _Rule:
    """A finite number (NaN and infinities are refused): ``minimum`` <= it <= ``maximum``, or > ``above``."""
    def shown(bound: float) -> str:
        return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

    if above is not None:
        expected = f"must be more than {shown(above)}" + ("" if maximum is None else f" and at most {shown(maximum)}")
    elif minimum == 0 and maximum is None:
        expected = "must not be negative"
    elif maximum is None:
        expected = f"must be at least {shown(minimum or 0)}"
    else:
        expected = f"must be from {shown(minimum or 0)} to {shown(maximum)}"

    def check(value: Any) -> str | None:
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            return f"{expected} (a finite number)"
        if above is not None and not value > above:
            return expected
        if minimum is not None and value < minimum:
            return expected
        if maximum is not None and value > maximum:
            return expected
        return None
    return check


_POSITIVE = _number(above=0)         # sizes, counts, limits, durations: zero would break them
_NOT_NEGATIVE = _number(minimum=0)   # only where the code gives zero a meaning (see the field)
_FACTOR = _number(minimum=1)  # multiplies a delay: below 1 the delay would shrink
_PORT = _number(minimum=1, maximum=65535)
_LISTEN_PORT = _number(minimum=0, maximum=65535)  # 0: any free port (the master prints the one taken)


def _any(value: Any) -> str | None:
    """Free text (paths, secrets), or a bool (checked when read)."""
    return None


_TEXT = _BOOL = _any
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_MAX_SERIAL_CHARS = 100  # the master refuses a longer serial (services/satellites.py)
_MAX_TEMPLATE_CPU_SECONDS = 3600   # one message's personalization: an hour is already absurd
_MAX_COMPOSE_MEMORY_MB = 1048576   # 1 TiB of address space per compose worker


def _no_space(empty_allowed: bool) -> _Rule:
    def check(value: str) -> str | None:
        if (not value and not empty_allowed) or any(c.isspace() for c in value):
            return "must be a name without spaces" + ("" if empty_allowed else ", not empty")
        return None
    return check


def _mongodb_url(empty_allowed: bool) -> _Rule:
    def check(value: str) -> str | None:
        if value == "" and empty_allowed:
            return None
        if not value.startswith(("mongodb://", "mongodb+srv://")) or any(c.isspace() for c in value):
            return "must be a URL starting with mongodb:// or mongodb+srv://" + (" (or empty)" if empty_allowed else "")
        if value.startswith("mongodb://"):  # (a +srv URL is read by DNS at connection: not here)
            try:
                uri_parser.parse_uri(value, warn=True)  # unknown options: warnings, as the client gives
            except (InvalidURI, ValueError, ConfigurationError) as error:  # a port of 99999, a bad option...
                return f"is not a MongoDB URL that can work: {error}"
        return None
    return check


def _database_name(value: str) -> str | None:
    if not value or len(value) > 63 or any(c.isspace() or c in '/\\."$' for c in value):
        return 'must be a MongoDB database name: 1 to 63 characters, no spaces nor /\\."$'
    return None


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` from "host", "host:port", an IPv6 address alone ("2001:db8::53") or in
    brackets, with or without a port ("[2001:db8::53]:5353"); ``default_port`` when none is given.

    Raises ValueError saying what is wrong. The host is not checked further (a name or an address)."""
    text = text.strip()
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or not _is_ip(address, version=6):
            raise ValueError("brackets must hold an IPv6 address, as in [2001:db8::53]:53")
        if rest and not rest.startswith(":"):
            raise ValueError("only :port may follow ]")
        return address, _port(rest[1:]) if rest else default_port
    if text.count(":") > 1:  # an IPv6 address alone: its last group is no port
        if not _is_ip(text, version=6):
            raise ValueError("not an IPv6 address (write an IPv6 address with a port as [address]:port)")
        return text, default_port
    host, colon, port = text.partition(":")
    if not host or any(c.isspace() or c in "[]/" for c in host):
        raise ValueError("no host name or address")
    return host, _port(port) if colon else default_port


def _port(port: str) -> int:
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("the port must be from 1 to 65535")
    return int(port)


def _is_ip(text: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


def _host_port_list(value: str) -> str | None:
    """DNS servers: IP addresses only (dnspython does not resolve names: each look-up would time out)."""
    for item in value.split(","):
        if not item.strip():
            continue
        try:
            host, _ = parse_host_port(item, 53)
        except ValueError as error:
            problem = f"{item.strip()!r}: {error}"
        else:
            if _is_ip(host):
                continue
            problem = f"{host!r} is not an IP address (DNS servers are not looked up by name)"
        return ('must be IP addresses, each alone or with ":port" (IPv6: "[address]:port"), '
                f"comma-separated, or empty: {problem}")
    return None


def _host_port_or_empty(value: str) -> str | None:
    if value == "":
        return None
    try:
        parse_host_port(value, 25)
    except ValueError as error:
        return f'must be "host" or "host:port" (IPv6: "[address]:port"), port 1 to 65535, or empty: {error}'
    return None


def _fingerprint(value: str) -> str | None:
    digest = value.replace(":", "").strip()
    if value and not (len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)):
        return "must be a SHA-256 fingerprint (64 hex digits, colons allowed, as cm-master prints it), or empty"
    return None


def _serial(value: str) -> str | None:
    if len(value) > _MAX_SERIAL_CHARS or any(c.isspace() for c in value):
        return f"must be at most {_MAX_SERIAL_CHARS} characters without spaces (empty: the host name)"
    return None


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _log_level(value: str) -> str | None:
    return None if value.upper() in _LOG_LEVELS else f"must be one of {', '.join(_LOG_LEVELS)}"


_RULES: dict[str, dict[str, _Rule]] = {
    "database": {
        "url": _mongodb_url(empty_allowed=True),
        "name": _database_name,
        "embedded_url": _mongodb_url(empty_allowed=True),
        "block_recipients": _number(minimum=1, maximum=1000),
    },
    "api": {
        "host": _no_space(empty_allowed=True),  # empty: every address
        "port": _LISTEN_PORT,
        "tls_cert": _TEXT,
        "tls_key": _TEXT,
        "max_request_bytes": _number(minimum=1024),
        "max_xml_depth": _POSITIVE,
        # 0: no cache (a revoked key stops at once; every call costs a scrypt check). Bounded:
        # a revoked key keeps working this long (docs/api.md, "Authentication").
        "key_cache_seconds": _number(minimum=0, maximum=3600),
        "auth_failures_before_delay": _NOT_NEGATIVE,  # 0: the first failure already delays
        "auth_max_delay_seconds": _POSITIVE,
        "max_connections_per_source": _number(minimum=1),
    },
    "satellite_link": {
        "host": _no_space(empty_allowed=True),
        "port": _LISTEN_PORT,
        "max_awaiting_approval": _NOT_NEGATIVE,  # 0: unknown serials refused unrecorded (cm-admin satellite add)
        "max_connections_per_source": _number(minimum=1),
        "reconnect_grace_seconds": _NOT_NEGATIVE,  # 0: a satellite's leases are freed as soon as it leaves
        "max_frame_bytes": _POSITIVE,
        "max_hello_frame_bytes": _number(minimum=256),
        "hello_timeout_seconds": _POSITIVE,
        "idle_timeout_seconds": _POSITIVE,
    },
    "dispatch": {
        # Bounded above so that now + the duration stays a date (datetime arithmetic).
        "lease_seconds": _number(minimum=1, maximum=7 * 86400),
        "max_lease_size": _POSITIVE,
        "initial_lease_size": _POSITIVE,
        "max_lease_bytes": _POSITIVE,
        "retry_initial_seconds": _number(minimum=1, maximum=365 * 86400),
        "retry_factor": _FACTOR,
        "retry_max_seconds": _number(minimum=1, maximum=365 * 86400),
        "retry_max_age_hours": _number(above=0, maximum=100 * 365 * 24),
    },
    "satellite": {
        "master_host": _no_space(empty_allowed=False),
        "master_port": _PORT,
        "master_fingerprint": _fingerprint,
        "serial": _serial,
        "secret": _TEXT,
        "helo_hostname": _no_space(empty_allowed=True),  # sent in EHLO: no spaces nor line breaks
        "dns_servers": _host_port_list,
        "smtp_port": _PORT,
        "test_target": _host_port_or_empty,
        "lease_size": _POSITIVE,
        "compose_workers": _POSITIVE,
        # Bounded above: the compose workers apply both to the kernel (setrlimit, setitimer), which
        # refuses huge values; every worker would die and every recipient fail.
        "compose_memory_mb": _number(above=0, maximum=_MAX_COMPOSE_MEMORY_MB),
        "max_composed_bytes": _POSITIVE,
        "template_cpu_seconds": _number(above=0, maximum=_MAX_TEMPLATE_CPU_SECONDS),
        "template_max_output_chars": _POSITIVE,
        "template_max_value_chars": _POSITIVE,
        "max_connections": _POSITIVE,
        "max_connections_per_host": _POSITIVE,
        "connect_timeout": _POSITIVE,
        "reply_timeout": _POSITIVE,
        "max_messages_per_connection": _POSITIVE,
        "connection_idle_timeout": _NOT_NEGATIVE,  # 0: QUIT as soon as nothing is queued
        "starttls": _BOOL,
        "backoff_initial": _POSITIVE,
        "backoff_factor": _FACTOR,
        "backoff_maximum": _POSITIVE,
        "backoff_burst": _POSITIVE,
        "max_backoff_wait": _NOT_NEGATIVE,  # 0: a domain whose every MX host is paused is reported at once
    },
    "reports": {
        "status_log_retention_days": _number(minimum=1, maximum=36500),
    },
    "paths": {
        "data_dir": _not_empty,
    },
    "logging": {
        "level": _log_level,
        "file": _TEXT,  # empty: standard error
    },
}

# (fields, check, expected): the first field named is the one reported.
_CROSS_RULES: dict[str, tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...]] = {
    "api": ((("tls_cert", "tls_key"), lambda s: bool(s.tls_cert) == bool(s.tls_key),
             "tls_cert and tls_key must be set together, or neither"),),
    "satellite_link": ((("max_hello_frame_bytes", "max_frame_bytes"),
                        lambda s: s.max_hello_frame_bytes <= s.max_frame_bytes, "must be at most max_frame_bytes"),),
    "dispatch": ((("retry_max_seconds", "retry_initial_seconds"),
                  lambda s: s.retry_max_seconds >= s.retry_initial_seconds, "must be at least retry_initial_seconds"),),
    "satellite": ((("backoff_maximum", "backoff_initial"),
                   lambda s: s.backoff_maximum >= s.backoff_initial, "must be at least backoff_initial"),),
}


def load_settings(path: str | os.PathLike[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (optional) and the environment into a validated :class:`Settings`."""
    environ = os.environ if environ is None else environ
    parser = configparser.ConfigParser(interpolation=None)
    if path is not None:
        _read_ini(parser, path)
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


def _read_ini(parser: configparser.ConfigParser, path: str | os.PathLike[str]) -> None:
    """Read ``path`` into ``parser``; a file that is not UTF-8 INI text is a :class:`ConfigError`
    naming the file and the line (OSError, for a file that cannot be read, propagates)."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")  # (a byte-order mark, as some editors write, is skipped)
    except UnicodeDecodeError as error:
        lineno = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{os.fspath(path)}: line {lineno}: not UTF-8 text (byte {data[error.start]:#04x})") from None
    try:
        parser.read_string(text, source=os.fspath(path))
    except configparser.MissingSectionHeaderError as error:
        raise ConfigError(f"{error.source}: line {error.lineno}: a setting before any [section] header") from None
    except configparser.DuplicateSectionError as error:
        raise ConfigError(f"{error.source}: line {error.lineno}: [{error.section}] is given twice") from None
    except configparser.DuplicateOptionError as error:
        raise ConfigError(f"{error.source}: line {error.lineno}: [{error.section}] {error.option} "
                          "is given twice") from None
    except configparser.ParsingError as error:
        first, shown = error.errors[0]  # (the line as repr() shows it)
        raise ConfigError(f"{error.source}: line {first}: not a [section], a key = value or a comment: "
                          f"{shown}") from None
    except configparser.Error as error:
        raise ConfigError(f"{os.fspath(path)}: not a valid INI file: {' '.join(str(error).split())}") from None
