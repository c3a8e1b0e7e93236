"""Opening the database: indexes, and serialized updates only where the server needs them."""

from __future__ import annotations

import asyncio

from tests.helpers import aio_test


@aio_test
async def test_updates_are_serialized_on_ferretdb_only(database):
    build = await database.client.admin.command("buildInfo")
    on_ferretdb = "ferretdbVersion" in build
    assert isinstance(database.write_lock, asyncio.Lock) == on_ferretdb
    assert database.writes_serialized == on_ferretdb
    assert database.update_chunk == (20 if on_ferretdb else 1000)


@aio_test
async def test_bulk_update_runs_every_statement_in_small_commands(database):
    from pymongo import UpdateOne

    await database.recipients.insert_many([{"_id": f"r{i}", "n": 0} for i in range(95)])
    async with database.write_lock:
        modified = await database.bulk_update(database.recipients,
                                              [UpdateOne({"_id": f"r{i}"}, {"$set": {"n": i + 1}}) for i in range(95)])
    assert modified == 95
    assert sorted([doc["n"] async for doc in database.recipients.find({})]) == list(range(1, 96))


@aio_test
async def test_every_collection_has_its_indexes(database):
    names = [index["name"] async for index in await database.recipients.list_indexes()]
    assert "mailing_id_1_status_1_next_try_1" in names and "ingest_batch_1" in names
    names = [index["name"] async for index in await database.status_log.list_indexes()]
    assert "mailing_id_1__id_1" in names
