"""Every setting of every section is checked at load: a value that would crash or misbehave later
is refused at start with an error naming the section, the key, what is expected and the value."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cloudmailing.config import settings as settings_module
from cloudmailing.config.settings import ConfigError, Settings, load_settings
from tests.conftest import ROOT

# (section, key, value): each alone must be refused.
INVALID = [
    ("dispatch", "lease_seconds", "0"),
    ("database", "url", "mongodb://127.0.0.1:99999/"),  # a URL that can never work (exit 2, not 1)
    ("dispatch", "lease_seconds", "-300"),
    ("dispatch", "lease_seconds", "99999999999"),
    ("dispatch", "max_lease_size", "-5"),
    ("dispatch", "max_lease_size", "0"),
    ("dispatch", "initial_lease_size", "0"),
    ("dispatch", "max_lease_bytes", "0"),
    ("dispatch", "retry_initial_seconds", "0"),
    ("dispatch", "retry_factor", "0.1"),
    ("dispatch", "retry_factor", "nan"),
    ("dispatch", "retry_max_seconds", "-1"),
    ("dispatch", "retry_max_age_hours", "0"),
    ("dispatch", "retry_max_age_hours", "inf"),
    ("satellite", "master_port", "99999"),
    ("satellite", "master_port", "0"),
    ("satellite", "smtp_port", "-1"),
    ("satellite", "smtp_port", "65536"),
    ("satellite", "max_connections", "0"),
    ("satellite", "max_connections_per_host", "0"),
    ("satellite", "lease_size", "0"),
    ("satellite", "connect_timeout", "-1"),
    ("satellite", "connect_timeout", "0"),
    ("satellite", "reply_timeout", "nan"),
    ("satellite", "template_cpu_seconds", "nan"),
    ("satellite", "template_cpu_seconds", "inf"),
    ("satellite", "backoff_maximum", "nan"),
    ("satellite", "backoff_maximum", "inf"),
    ("satellite", "backoff_factor", "0.5"),
    ("satellite", "backoff_factor", "-inf"),
    ("satellite", "connection_idle_timeout", "-1"),
    ("satellite", "max_backoff_wait", "nan"),
    ("satellite", "compose_workers", "0"),
    ("satellite", "master_host", ""),
    ("satellite", "master_fingerprint", "SHA256:abc"),
    ("satellite", "serial", "x" * 101),
    ("satellite", "helo_hostname", "a b"),
    ("satellite", "dns_servers", "127.0.0.1:99999"),
    ("satellite", "dns_servers", "127.0.0.1:53,:53"),
    ("satellite", "test_target", "127.0.0.1:port"),
    # dnspython takes IP addresses only: a name would make every MX look-up time out.
    ("satellite", "dns_servers", "localhost:5353"),
    ("satellite", "dns_servers", "127.0.0.1, dns.example.test"),
    ("satellite", "dns_servers", "[localhost]:53"),
    ("satellite", "dns_servers", "[::1]x"),
    ("satellite", "dns_servers", "[::1]:0"),
    ("satellite", "dns_servers", "1::2::3"),
    ("satellite", "test_target", "[::1"),
    ("satellite", "test_target", "::1:2526x"),
    # Finite, yet more than the kernel takes (setitimer, setrlimit): every compose worker would die.
    ("satellite", "template_cpu_seconds", "1e19"),
    ("satellite", "template_cpu_seconds", "3601"),
    ("satellite", "compose_memory_mb", "10000000000000"),
    ("satellite", "compose_memory_mb", "1048577"),
    ("satellite", "max_connections", "1" + "0" * 400),  # too large for a float (math.isfinite: OverflowError)
    ("api", "port", "-1"),
    ("api", "port", "65536"),
    ("api", "key_cache_seconds", "inf"),
    ("api", "key_cache_seconds", "nan"),
    ("api", "key_cache_seconds", "3601"),
    ("api", "key_cache_seconds", "-1"),
    ("api", "max_xml_depth", "0"),
    ("api", "max_request_bytes", "1000"),
    ("api", "auth_failures_before_delay", "-1"),
    ("api", "auth_max_delay_seconds", "0"),
    ("api", "auth_max_delay_seconds", "nan"),
    ("api", "max_connections_per_source", "0"),
    ("api", "tls_cert", "/etc/cert.pem"),  # without tls_key
    ("satellite_link", "port", "70000"),
    ("satellite_link", "max_awaiting_approval", "-1"),
    ("satellite_link", "reconnect_grace_seconds", "-1"),
    ("satellite_link", "reconnect_grace_seconds", "inf"),
    ("satellite_link", "hello_timeout_seconds", "0"),
    ("satellite_link", "idle_timeout_seconds", "nan"),
    ("satellite_link", "max_frame_bytes", "0"),
    ("satellite_link", "max_hello_frame_bytes", "100"),
    ("database", "block_recipients", "0"),
    ("database", "block_recipients", "1001"),
    ("database", "name", ""),
    ("database", "name", "a.b"),
    ("database", "url", "localhost:27017"),
    ("reports", "status_log_retention_days", "-1"),
    ("reports", "status_log_retention_days", "0"),
    ("reports", "status_log_retention_days", "99999999"),
    ("paths", "data_dir", ""),
    ("logging", "level", "VERBOSE"),
    ("logging", "level", ""),
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.ini"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("section", "key", "value"), INVALID, ids=[f"{s}.{k}={v[:20]}" for s, k, v in INVALID])
def test_an_invalid_value_is_refused_naming_section_key_value_and_expectation(
        tmp_path: Path, section: str, key: str, value: str) -> None:
    path = _write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})
    message = str(refused.value)
    assert message.startswith(f"[{section}] {key}: "), message
    assert "must" in message, message  # what is expected
    shown = value.strip()
    if shown:
        assert shown in message or repr(float(shown)) in message, message  # the value given


def test_lease_seconds_zero_is_refused(tmp_path: Path) -> None:
    """A lease that expires at once would hand the same recipient to a second satellite."""
    path = _write(tmp_path, "[dispatch]\nlease_seconds = 0\n")
    with pytest.raises(ConfigError, match=re.escape("[dispatch] lease_seconds: must be from 1 to 604800, not 0")):
        load_settings(path, environ={})


@pytest.mark.parametrize("line", ["[satellite]\nmaster_port = 99999", "[logging]\nlevel = VERBOSE",
                                  "[api]\nkey_cache_seconds = inf", "[satellite]\nbackoff_maximum = nan"])
def test_the_messages_read_well(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(_write(tmp_path, line + "\n"), environ={})
    assert str(refused.value) in {
        "[satellite] master_port: must be from 1 to 65535, not 99999",
        "[logging] level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'VERBOSE'",
        "[api] key_cache_seconds: must be from 0 to 3600 (a finite number), not inf",
        "[satellite] backoff_maximum: must be more than 0 (a finite number), not nan",
    }


# Values at the edge that are valid: zero where the code gives it a meaning, 0 for a listening port.
VALID = [
    ("api", "port", "0"),                               # any free port; the master prints the one taken
    ("satellite_link", "port", "0"),
    ("api", "key_cache_seconds", "0"),                  # no cache: revocation at once
    ("api", "key_cache_seconds", "3600"),
    ("api", "auth_failures_before_delay", "0"),         # the first failure already delays
    ("satellite_link", "max_awaiting_approval", "0"),   # only registered satellites are served
    ("satellite_link", "reconnect_grace_seconds", "0"),  # leases freed as soon as the link ends
    ("satellite", "connection_idle_timeout", "0"),      # QUIT as soon as nothing is queued
    ("satellite", "max_backoff_wait", "0"),             # reported WARNING as soon as every MX is paused
    ("satellite", "master_port", "65535"),
    ("satellite", "smtp_port", "1"),
    ("satellite", "backoff_factor", "1"),
    ("dispatch", "retry_factor", "1"),
    ("dispatch", "lease_seconds", "1"),
    ("satellite", "master_fingerprint", "AB:" * 31 + "AB"),
    ("satellite", "dns_servers", "127.0.0.1:5353, 10.0.0.1"),
    ("satellite", "test_target", "127.0.0.9:2526"),
    ("satellite", "dns_servers", "::1"),
    ("satellite", "dns_servers", "[2001:db8::53]:5353, 192.0.2.1:53, 2001:db8::54"),
    ("satellite", "test_target", "[::1]:2526"),
    ("satellite", "test_target", "mx.example.test"),
    ("satellite", "template_cpu_seconds", "3600"),
    ("satellite", "compose_memory_mb", "1048576"),
    ("logging", "level", "debug"),
    ("database", "url", "mongodb+srv://user:pw@cluster.example/"),
]


@pytest.mark.parametrize(("section", "key", "value"), VALID, ids=[f"{s}.{k}={v[:20]}" for s, k, v in VALID])
def test_edge_values_with_a_meaning_are_accepted(tmp_path: Path, section: str, key: str, value: str) -> None:
    loaded = getattr(getattr(load_settings(_write(tmp_path, f"[{section}]\n{key} = {value}\n"), environ={}),
                             section), key)
    if isinstance(loaded, (int, float)):
        assert loaded == float(value)  # taken as given, not replaced by a default
    else:
        assert str(loaded).lower() == value.lower()


def test_every_field_of_every_section_has_a_rule() -> None:
    for name, cls in settings_module._SECTIONS.items():
        assert set(settings_module._RULES[name]) == {f.name for f in dataclasses.fields(cls)}, name


def test_the_defaults_are_valid() -> None:
    assert load_settings(None, environ={}) == Settings()


@pytest.mark.parametrize("sample", sorted((ROOT / "conf").glob("*.ini")), ids=lambda p: p.name)
def test_every_sample_in_conf_loads(sample: Path, tmp_path: Path) -> None:
    load_settings(sample, environ={})
    # and with every commented "#key = value" line taken at its word: the documented defaults
    uncommented = re.sub(r"(?m)^#(\w+ =.*)$", r"\1", sample.read_text())
    assert load_settings(_write(tmp_path, uncommented), environ={}) is not None


def test_the_cross_field_rules_name_both_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, "[dispatch]\nretry_initial_seconds = 600\nretry_max_seconds = 300\n")
    with pytest.raises(ConfigError, match=re.escape(
            "[dispatch] retry_max_seconds: must be at least retry_initial_seconds "
            "(retry_max_seconds = 300, retry_initial_seconds = 600)")):
        load_settings(path, environ={})


# A file that is not UTF-8 INI text: a configuration error naming the file and the line (exit 2,
# tests/cli/test_exit_codes.py), not a traceback.
@pytest.mark.parametrize(("content", "error"), [
    (b"lease_size = 10\n", "line 1: a setting before any [section] header"),
    (b"[satellite]\nlease_size = 10\nlease_size = 20\n", "line 3: [satellite] lease_size is given twice"),
    (b"[satellite]\n[satellite]\n", "line 2: [satellite] is given twice"),
    (b"[satellite]\nlease_size = 10\n  stray indented line\n[oops\n",
     "line 4: not a [section], a key = value or a comment: '[oops\\n'"),
    (b"[satellite]\nserial = sat\n[logging]\nfile = caf\xe9\n", "line 4: not UTF-8 text (byte 0xe9)"),
], ids=["no-section", "duplicate-key", "duplicate-section", "parse-error", "not-utf8"])
def test_a_malformed_file_is_a_configuration_error_naming_file_and_line(tmp_path: Path, content: bytes,
                                                                          error: str) -> None:
    path = tmp_path / "c.ini"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        load_settings(path, environ={})
    assert str(refused.value) == f"{path}: {error}"


def test_an_integer_too_large_for_a_float_is_refused_as_out_of_range(tmp_path: Path) -> None:
    huge = "1" + "0" * 400
    with pytest.raises(ConfigError, match=re.escape(
            f"[satellite] max_connections: must be more than 0 (a finite number), not {huge}")):
        load_settings(_write(tmp_path, f"[satellite]\nmax_connections = {huge}\n"), environ={})


def test_an_unknown_section_is_refused(tmp_path: Path) -> None:
    """A misspelt section must not be ignored silently (its settings would not apply)."""
    with pytest.raises(ConfigError, match=re.escape("[satelite]: unknown section")):
        load_settings(_write(tmp_path, "[satelite]\nlease_size = 10\n"), environ={})


def test_the_sample_header_names_every_section_and_says_others_are_refused() -> None:
    header = (ROOT / "conf" / "cloudmailing.ini").read_text().split("\n[", 1)[0]
    assert "sections are ignored" not in header and "other programs may share" not in header
    assert "Any other section" in header and "refused" in header
    assert "eight sections" in header and len(settings_module._SECTIONS) == 8
    assert set(re.findall(r"\[(\w+)\]", header)) >= set(settings_module._SECTIONS)
