"""The link's limits as settings: read from the INI file, checked, and documented with their defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloudmailing.config.settings import ConfigError, SatelliteLinkConfig, load_settings

SAMPLE = Path(__file__).resolve().parents[2] / "conf" / "cloudmailing.ini"


def _load(tmp_path: Path, lines: str) -> SatelliteLinkConfig:
    path = tmp_path / "c.ini"
    path.write_text("[satellite_link]\n" + lines)
    return load_settings(path, environ={}).satellite_link


def test_link_limits_are_read_and_checked(tmp_path: Path) -> None:
    link = _load(tmp_path, "max_hello_frame_bytes = 8192\nhello_timeout_seconds = 5\nidle_timeout_seconds = 60\n")
    assert (link.max_hello_frame_bytes, link.hello_timeout_seconds, link.idle_timeout_seconds) == (8192, 5.0, 60.0)
    for bad in ("max_hello_frame_bytes = 10", "max_hello_frame_bytes = 100000000", "hello_timeout_seconds = 0",
                "idle_timeout_seconds = -1"):
        with pytest.raises(ConfigError):
            _load(tmp_path, bad + "\n")


def test_the_sample_file_shows_the_defaults() -> None:
    text = SAMPLE.read_text()
    defaults = SatelliteLinkConfig()
    for name in ("max_frame_bytes", "max_hello_frame_bytes", "hello_timeout_seconds", "idle_timeout_seconds"):
        shown = re.search(rf"^#{name} = (.+)$", text, re.MULTILINE)
        assert shown is not None and float(shown.group(1)) == getattr(defaults, name), name
