"""The configuration: the sample file's commented values are the defaults; bad satellite limits are refused."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from cloudmailing.config.settings import ConfigError, SatelliteConfig, load_settings
from cloudmailing.satellite.compose_pool import ComposePool
from cloudmailing.satellite.daemon import delivery_config, host_port, template_limits
from cloudmailing.satellite.delivery import DeliveryConfig
from tests.conftest import ROOT
from tests.helpers import aio_test
from tests.satellite.test_compose_pool import RECIPIENTS, _compose_all, _mailing


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


@pytest.mark.parametrize(("item", "default", "expected"), [
    ("127.0.0.1", 53, ("127.0.0.1", 53)),
    (" 127.0.0.1:5353 ", 53, ("127.0.0.1", 5353)),
    ("::1", 53, ("::1", 53)),                       # not host ":" port 1
    ("2001:db8::53", 53, ("2001:db8::53", 53)),     # not host "2001:db8:" port 53
    ("[2001:db8::53]", 53, ("2001:db8::53", 53)),
    ("[::1]:5353", 53, ("::1", 5353)),
    ("mx.example.test", 25, ("mx.example.test", 25)),
    ("mx.example.test:2525", 25, ("mx.example.test", 2525)),
])
def test_host_port_reads_ipv6_addresses_whole(item: str, default: int, expected: tuple[str, int]) -> None:
    assert host_port(item, default) == expected


def test_the_dns_servers_reach_the_daemon_as_written(tmp_path: Path) -> None:
    (tmp_path / "c.ini").write_text("[satellite]\ndns_servers = ::1, [2001:db8::53]:5353, 192.0.2.1\n"
                                    "test_target = [::1]:2526\n")
    config = load_settings(tmp_path / "c.ini", environ={}).satellite
    # As SatelliteDaemon.__init__ and delivery_config read them:
    assert [host_port(s, 53) for s in config.dns_servers.split(",") if s.strip()] == [
        ("::1", 53), ("2001:db8::53", 5353), ("192.0.2.1", 53)]
    assert delivery_config(config).test_target == ("::1", 2526)


@pytest.mark.parametrize("item", ["localhost", "localhost:5353", "dns.example.test"])
def test_a_dns_server_given_by_name_is_refused(tmp_path: Path, item: str) -> None:
    """dnspython takes IP addresses only: a name made every MX look-up time out, with no error at start."""
    (tmp_path / "c.ini").write_text(f"[satellite]\ndns_servers = 127.0.0.1, {item}\n")
    with pytest.raises(ConfigError, match=re.escape(f"'{item.split(':')[0]}' is not an IP address")):
        load_settings(tmp_path / "c.ini", environ={})


@pytest.mark.parametrize(("setting", "error"), [
    ("template_cpu_seconds = 1e19", "template_cpu_seconds: must be more than 0 and at most 3600, not 1e+19"),
    ("compose_memory_mb = 10000000000000",
     "compose_memory_mb: must be more than 0 and at most 1048576, not 10000000000000"),
])
def test_limits_the_compose_workers_cannot_apply_are_refused(tmp_path: Path, setting: str, error: str) -> None:
    """setitimer and setrlimit refuse such values (OverflowError): every worker died, every recipient failed."""
    (tmp_path / "bad.ini").write_text(f"[satellite]\n{setting}\n")
    with pytest.raises(ConfigError, match=re.escape(f"[satellite] {error}")):
        load_settings(tmp_path / "bad.ini", environ={})


@aio_test
async def test_the_largest_accepted_limits_compose_messages(tmp_path: Path) -> None:
    (tmp_path / "c.ini").write_text("[satellite]\ntemplate_cpu_seconds = 3600\ncompose_memory_mb = 1048576\n")
    config = load_settings(tmp_path / "c.ini", environ={}).satellite
    pool = ComposePool(1, template_limits(config), config.compose_memory_mb)
    try:
        composed = await _compose_all(pool, _mailing(), RECIPIENTS[1:3])
    finally:
        pool.close()
    assert composed.failures == []
    assert len(composed.jobs) == 2


@pytest.mark.parametrize("layout", ["short", "long", "symlink"])
def test_the_default_database_url_is_where_bin_embedded_db_listens(tmp_path: Path, layout: str) -> None:
    """No database URL configured: the programs look for the embedded database where
    ``bin/embedded-db`` puts its socket, also when ``<data_dir>/db/socket/ferretdb.sock`` is too
    long for a socket (then /tmp/cm-ferretdb-UID-HASH/) and when the data directory is a symlink."""
    data = tmp_path / ".cm"
    if layout == "long":
        data = tmp_path / "a-checkout-under-a-rather-long-directory-name" / "projects" / "cloudmailing-main" / ".cm"
    if layout == "symlink":
        (tmp_path / "real").mkdir()
        data.symlink_to(tmp_path / "real")
    printed = subprocess.run([str(ROOT / "bin" / "embedded-db"), "url", str(data / "db")],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    if layout == "long":
        assert "/cm-ferretdb-" in urllib.parse.unquote(printed)
    assert load_settings(None, environ={"CM_DATA_DIR": str(data)}).mongodb_url == printed
