"""The configuration: the sample file's commented values are the defaults; bad satellite limits are refused."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cloudmailing.config.settings import ConfigError, SatelliteConfig, load_settings
from cloudmailing.satellite.daemon import delivery_config
from cloudmailing.satellite.delivery import DeliveryConfig
from tests.conftest import ROOT


def test_the_sample_satellite_section_shows_the_defaults(tmp_path: Path) -> None:
    sample = (ROOT / "conf" / "cloudmailing.ini").read_text()
    section = sample[sample.index("[satellite]\n"):]
    section = section[:section.index("\n[", 1)]
    # Every "#key = value" line taken at its word gives the built-in defaults.
    uncommented = re.sub(r"(?m)^#(\w+ =.*)$", r"\1", section)
    (tmp_path / "sample.ini").write_text(uncommented)
    assert load_settings(tmp_path / "sample.ini", environ={}).satellite == SatelliteConfig()


@pytest.mark.parametrize("setting", ["compose_workers = 0", "template_cpu_seconds = 0", "compose_memory_mb = -1",
                                     "max_composed_bytes = 0", "template_max_output_chars = 0",
                                     "template_max_value_chars = 0", "max_messages_per_connection = 0",
                                     "backoff_initial = 0", "backoff_burst = 0"])
def test_satellite_limits_must_be_positive(tmp_path: Path, setting: str) -> None:
    (tmp_path / "bad.ini").write_text(f"[satellite]\n{setting}\n")
    with pytest.raises(ConfigError, match=f"\\[satellite\\] {setting.split()[0]}: must be more than 0"):
        load_settings(tmp_path / "bad.ini", environ={})


@pytest.mark.parametrize(("setting", "error"), [
    ("connection_idle_timeout = -1", "connection_idle_timeout: must not be negative"),
    ("max_backoff_wait = -0.5", "max_backoff_wait: must not be negative"),
    ("backoff_factor = 0.5", "backoff_factor: must be at least 1"),
    ("backoff_initial = 10\nbackoff_maximum = 5", "backoff_maximum: must be at least backoff_initial"),
    ("starttls = maybe", "starttls: 'maybe' is not a valid bool"),
])
def test_bad_delivery_settings_are_refused(tmp_path: Path, setting: str, error: str) -> None:
    (tmp_path / "bad.ini").write_text(f"[satellite]\n{setting}\n")
    with pytest.raises(ConfigError, match=re.escape(f"[satellite] {error}")):
        load_settings(tmp_path / "bad.ini", environ={})


def test_every_satellite_setting_is_in_the_sample() -> None:
    sample = (ROOT / "conf" / "cloudmailing.ini").read_text()
    section = sample[sample.index("[satellite]\n"):]
    section = section[:section.index("\n[", 1)]
    shown = set(re.findall(r"(?m)^#(\w+) =", section))
    assert shown == {f.name for f in dataclasses.fields(SatelliteConfig)}


def test_every_delivery_setting_comes_from_the_satellite_section(tmp_path: Path) -> None:
    (tmp_path / "custom.ini").write_text(
        "[satellite]\nhelo_hostname = out.example.test\nsmtp_port = 2525\ntest_target = 127.0.0.9:2526\n"
        "max_connections = 7\nmax_connections_per_host = 2\nconnect_timeout = 3\nreply_timeout = 4\n"
        "max_messages_per_connection = 9\nconnection_idle_timeout = 0.5\nstarttls = no\n"
        "backoff_initial = 1.5\nbackoff_factor = 3\nbackoff_maximum = 90\nbackoff_burst = 2\nmax_backoff_wait = 7\n")
    config = delivery_config(load_settings(tmp_path / "custom.ini", environ={}).satellite)
    assert config == DeliveryConfig(
        helo_hostname="out.example.test", smtp_port=2525, test_target=("127.0.0.9", 2526), max_connections=7,
        max_connections_per_host=2, max_messages_per_connection=9, connect_timeout=3.0, reply_timeout=4.0,
        idle_timeout=0.5, starttls=False, backoff_initial=1.5, backoff_factor=3.0, backoff_maximum=90.0,
        backoff_burst=2, max_backoff_wait=7.0)
    defaults = DeliveryConfig()
    assert all(getattr(config, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(DeliveryConfig))
