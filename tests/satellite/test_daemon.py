"""The satellite daemon's own decisions, against a real master over the real link."""

from __future__ import annotations

import random

from cloudmailing import __version__
from cloudmailing.config.settings import SatelliteConfig
from cloudmailing.satellite.daemon import SatelliteDaemon
from tests.helpers import aio_test


@aio_test
async def test_recipients_of_a_mailing_deleted_since_their_lease_are_dropped(running_master, tmp_path):
    from twisted.internet import reactor

    api = running_master.proxy()
    await api.cloud_add_satellite("sat-gone", {})
    mailing_id = await api.create_mailing("news@sender.test", "News", "Hi", "<p>Hi</p>", "", "utf-8")
    await api.add_recipients(mailing_id, [{"email": f"u{i}@one.test"} for i in range(3)])
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    config = SatelliteConfig(master_port=running_master.master.satellite_port, serial="sat-gone", secret="pw",
                             dns_servers="127.0.0.1:9")
    satellite = SatelliteDaemon(config, tmp_path / "sat", reactor, random.Random(0))
    link = await satellite._connect()
    try:
        await link.call("hello", serial="sat-gone", secret="pw", version=__version__)
        leased = (await link.call("lease", max_recipients=10))["recipients"]
        assert len(leased) == 3
        await api.delete_mailing(mailing_id)
        await satellite._submit(link, mailing_id, leased)  # neither waits forever nor fails the link
        assert satellite._scheduler.pending == 0 and not satellite._outbox.batch(10)
        assert not link.closed_future.done()
    finally:
        link.close()
        await satellite.stop()
