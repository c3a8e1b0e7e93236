"""The satellite trusts only its master's certificate: pinned, or trusted on first use."""

from __future__ import annotations

import asyncio
import random

from cloudmailing.config.settings import SatelliteConfig
from cloudmailing.satellite.daemon import SatelliteDaemon
from cloudmailing.satellite.master_identity import normalize
from tests.helpers import aio_test


async def _run_for(satellite: SatelliteDaemon, seconds: float) -> None:
    running = asyncio.ensure_future(satellite.run())
    await asyncio.sleep(seconds)
    await satellite.stop()
    running.cancel()


def _satellite(master, tmp_path, fingerprint: str) -> SatelliteDaemon:
    from twisted.internet import reactor

    config = SatelliteConfig(master_port=master.satellite_port, serial="pinned", secret="pw",
                             master_fingerprint=fingerprint, dns_servers="127.0.0.1:9")
    return SatelliteDaemon(config, tmp_path / "sat", reactor, random.Random(0))


@aio_test
async def test_the_right_fingerprint_connects_and_a_wrong_one_never_says_hello(running_master, tmp_path):
    api = running_master.proxy()
    await api.cloud_add_satellite("pinned", {})
    master = running_master.master
    wrong = _satellite(master, tmp_path / "wrong", "AB" * 32)
    await _run_for(wrong, 1.0)
    assert wrong.sessions == 0
    assert (await api.cloud_list_satellites())[0]["last_seen"] == ""  # the secret was never sent
    right = _satellite(master, tmp_path / "right", master.tls.fingerprint_sha256())
    await _run_for(right, 1.0)
    assert right.sessions == 1


@aio_test
async def test_first_use_remembers_the_master(running_master, tmp_path):
    await running_master.proxy().cloud_add_satellite("pinned", {})
    satellite = _satellite(running_master.master, tmp_path, "")
    await _run_for(satellite, 1.0)
    assert satellite.sessions == 1
    remembered = (tmp_path / "sat" / "master.fingerprint").read_text().strip()
    assert remembered == normalize(running_master.master.tls.fingerprint_sha256())
