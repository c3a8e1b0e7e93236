"""Templates that would exhaust a satellite: their recipients fail with GENERAL_ERROR, in bounded time,
while another mailing is delivered. A real master, a satellite daemon with compose workers, a DNS
server and an SMTP server, all on loopback.

These templates pass create_mailing's check: with no recipient data they do nothing; each
recipient's own data (``n``, ``width``...) makes them hostile.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from cloudmailing.config.settings import SatelliteConfig
from cloudmailing.satellite.daemon import SatelliteDaemon
from tests.helpers import aio_test
from tests.satellite.dns_server import DnsTestServer
from tests.satellite.smtp_servers import Behaviour, start_servers

HOSTILE = {
    # tens of seconds of CPU: the sandbox's CPU count stops it
    "nested loops": ("{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}", {"n": 100000},
                     "CPU time over 1 s"),
    # a gigabyte at once: refused before it is allocated
    "ljust": ("{{ ''.ljust(width) }}", {"width": 10**9}, "ljust() larger than 1000000"),
    # a string that grows tenfold at each step
    "replace chain": ("{{ word.replace('x', word).replace('x', word).replace('x', word) }}", {"word": "x" * 200},
                      "replace() larger than 1000000"),
    # a huge integer power
    "power": ("{{ base ** exponent }}", {"base": 7, "exponent": 10**8}, "integer result of '*' or '**' over"),
}


@pytest.fixture
def dns():
    with DnsTestServer() as server:
        server.add_mail_domain("ok.test", "127.0.0.2")
        yield server


async def _mailing(api, body: str, contact: dict, count: int) -> tuple[int, list[str]]:
    mailing_id = await api.create_mailing("news@sender.test", "S", "Hello {{ name }}", "", body, "utf-8")
    answer = await api.add_recipients(mailing_id, [{"email": f"u{i}@ok.test", "name": f"N{i}", **contact}
                                                   for i in range(count)])
    assert await api.start_mailing(mailing_id) == "READY"
    return mailing_id, [a["id"] for a in answer]


async def _all_finished(api, mailing_ids: list[int], seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        await api.mailing_manager_force_check()
        mailings = await api.list_mailings({"id": mailing_ids})
        if all(m["status"] == "FINISHED" for m in mailings):
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"not finished in {seconds} s: {mailings}")


@aio_test
async def test_hostile_templates_fail_their_recipients_and_a_good_mailing_is_delivered(running_master, dns,
                                                                                       tmp_path: Path):
    from twisted.internet import reactor

    servers, smtp_port = start_servers({"127.0.0.2": Behaviour()})
    api = running_master.proxy()
    hostile = {name: await _mailing(api, body, contact, 4) for name, (body, contact, _) in HOSTILE.items()}
    good_id, _ = await _mailing(api, "Dear {{ name }}", {}, 12)
    await api.cloud_add_satellite("sat-limits", {})
    config = SatelliteConfig(master_port=running_master.master.satellite_port, serial="sat-limits", secret="s",
                             helo_hostname="sat.test", dns_servers=dns.nameserver, smtp_port=smtp_port,
                             lease_size=40, connect_timeout=5, reply_timeout=5, compose_workers=2,
                             template_cpu_seconds=1.0)
    satellite = SatelliteDaemon(config, tmp_path / "satellite", reactor, random.Random(1))
    running = asyncio.ensure_future(satellite.run())
    try:
        await _all_finished(api, [good_id] + [mailing_id for mailing_id, _ in hostile.values()], 60)
    finally:
        await satellite.stop()
        running.cancel()
        for server in servers.values():
            await server.stop()

    received = sorted(rcpt for message in servers["127.0.0.2"].messages for rcpt in message.rcpt_to)
    assert received == sorted(f"u{i}@ok.test" for i in range(12))  # the good mailing, and only it
    for name, (_, ids) in hostile.items():
        statuses = await api.get_recipients_status(ids, {})
        assert {s["status"] for s in statuses} == {"GENERAL_ERROR"}, name
        limit = HOSTILE[name][2]
        assert all(limit in s["reply_text"] for s in statuses), (name, [s["reply_text"] for s in statuses])
