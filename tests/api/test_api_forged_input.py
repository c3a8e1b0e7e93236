"""What a client may forge (cursors, recipient ids) or send at once (adds of one serial) over
HTTPS: nothing created, nothing kept in memory, one registration per serial."""

from __future__ import annotations

import asyncio
import xmlrpc.client

from cloudmailing.storage.recipient_index import generated_id
from tests.helpers import aio_test


@aio_test
async def test_concurrent_adds_of_one_serial_register_it_once(running_master):
    proxies = [running_master.proxy() for _ in range(8)]
    await running_master.proxy().cloud_get_satellites_count()  # the key is cached: no auth line

    async def add(api):
        try:
            return await api.cloud_add_satellite("dup-serial")
        except xmlrpc.client.Fault as fault:
            return fault.faultCode

    results = await asyncio.gather(*(add(api) for api in proxies))
    serials = [s["serial"] for s in await running_master.proxy().cloud_list_satellites()]
    assert serials.count("dup-serial") == 1, (results, serials)
    assert sorted(results).count(400) == len(results) - 1, results


@aio_test
async def test_forged_cursor_pages_create_no_collections(running_master, database):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "N", "S", "<p>x</p>", "", "utf-8")
    added = await api.add_recipients(mailing_id, [{"email": "u@example.org"}])
    await api.reset_recipients_status([added[0]["id"]])  # one logged change: the horizon moves past 0
    first = await api.get_recipients_status_updated_since("", {"status": ["READY"]}, 10)
    assert len(first["recipients"]) == 1

    async def buckets():
        return sorted(n for n in await database.db.list_collection_names() if n.startswith("status_log_"))

    before = await buckets()
    for i in range(1, 21):
        answer = await api.get_recipients_status_updated_since(f"c2:{i * 10**15}.0", {"status": ["READY"]}, 10)
        assert len(answer["recipients"]) == 1  # the forged page ignored: read from change 0
    assert await buckets() == before


@aio_test
async def test_unknown_generated_ids_leave_nothing_behind(running_master, database):
    api = running_master.proxy()
    master_database = running_master.master.database
    collections = sorted(await database.db.list_collection_names())
    remembered = set(master_database._indexed_buckets)
    forged = [generated_id(10**12 + i * 64, 0) for i in range(3000)]  # a block bucket each
    assert await api.get_recipients_status(forged, {}) == []  # unknown ids are left out
    assert await api.reset_recipients_status(forged) == 0
    assert master_database._indexed_buckets == remembered
    assert sorted(await database.db.list_collection_names()) == collections
