"""The configuration: the sample file's commented values are the defaults; bad satellite limits are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cloudmailing.config.settings import ConfigError, SatelliteConfig, load_settings
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
                                     "template_max_value_chars = 0"])
def test_satellite_limits_must_be_positive(tmp_path: Path, setting: str) -> None:
    (tmp_path / "bad.ini").write_text(f"[satellite]\n{setting}\n")
    with pytest.raises(ConfigError, match=f"\\[satellite\\] {setting.split()[0]}: must be more than 0"):
        load_settings(tmp_path / "bad.ini", environ={})
