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


@aio_test
async def test_no_new_lease_while_the_master_has_not_taken_the_outcomes(running_master, tmp_path):
    import asyncio

    from twisted.internet import reactor

    from cloudmailing.satellite.daemon import UNREPORTED_LEASES

    api = running_master.proxy()
    await api.cloud_add_satellite("sat-slow", {})
    mailing_id = await api.create_mailing("news@sender.test", "News", "Hi", "<p>Hi</p>", "", "utf-8")
    await api.add_recipients(mailing_id, [{"email": f"u{i}@one.test"} for i in range(3)])
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    config = SatelliteConfig(master_port=running_master.master.satellite_port, serial="sat-slow", secret="pw",
                             dns_servers="127.0.0.1:9", lease_size=2)
    satellite = SatelliteDaemon(config, tmp_path / "sat", reactor, random.Random(0))
    backlog = [f"old-{i}" for i in range(UNREPORTED_LEASES * config.lease_size)]
    for rid in backlog:  # outcomes the master has not acknowledged (the reporter is not running)
        satellite._outbox.add({"recipient_id": rid, "status": "FINISHED", "reply_code": 250})
    link = await satellite._connect()
    feeding = None
    try:
        await link.call("hello", serial="sat-slow", secret="pw", version=__version__)
        feeding = asyncio.ensure_future(satellite._feed(link))
        await asyncio.sleep(0.5)
        assert (await api.cloud_list_satellites())[0]["in_flight"] == 0
        satellite._outbox.acknowledge(backlog[:1])  # one taken: room for a lease
        for _ in range(40):
            if (await api.cloud_list_satellites())[0]["in_flight"]:
                break
            await asyncio.sleep(0.05)
        assert (await api.cloud_list_satellites())[0]["in_flight"] == 2
    finally:
        if feeding is not None:
            feeding.cancel()
        link.close()
        await satellite.stop()
