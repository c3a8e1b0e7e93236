"""Opening the database: indexes, bucket collections, and the storage layout's version."""

from __future__ import annotations

import pytest

from cloudmailing.storage.database import LAYOUT_VERSION, MIGRATE_COMMAND, LayoutError, WriteRefused, open_database
from tests.helpers import aio_test


@aio_test
async def test_every_collection_has_its_indexes(database):
    names = [index["name"] async for index in await database.blocks.list_indexes()]
    assert "free_1_test_1_m_1__id_1" in names and "held_1" in names
    log = await database.bucket("status_log", 3)
    names = [index["name"] async for index in await log.list_indexes()]
    assert "m_1" in names and "at_1" in names
    assert await database.bucket_numbers("status_log") == [3]


@aio_test
async def test_a_new_database_is_marked_and_an_old_layout_refused(database, mongo_url, db_name):
    assert (await database.meta.find_one({"_id": "layout"}))["version"] == LAYOUT_VERSION
    old_name = db_name + "_old"
    old = database.client[old_name]
    await old.recipients.insert_one({"_id": "r1", "mailing_id": 1, "email": "a@example.org"})
    try:
        with pytest.raises(LayoutError) as refused:
            await open_database(mongo_url, old_name)
        assert MIGRATE_COMMAND in str(refused.value)
    finally:
        await database.client.drop_database(old_name)


@aio_test
async def test_a_write_guard_refuses_every_write_but_the_writer_claims(database):
    await database.notes.insert_one({"_id": 1, "n": 1})

    database.write_guard = lambda: "refused by the guard"
    try:
        notes = database.notes
        writes = [notes.insert_one({"_id": 2}), notes.insert_many([{"_id": 3}]),
                  notes.update_one({"_id": 1}, {"$set": {"n": 2}}), notes.update_many({}, {"$set": {"n": 2}}),
                  notes.replace_one({"_id": 1}, {"n": 2}), notes.delete_one({"_id": 1}), notes.delete_many({}),
                  notes.find_one_and_update({"_id": 1}, {"$set": {"n": 2}}),
                  notes.find_one_and_replace({"_id": 1}, {"n": 2}), notes.find_one_and_delete({"_id": 1}),
                  notes.bulk_write([]), notes.drop(), database.drop_collection("notes"),
                  (await database.bucket("block_state", 0)).insert_one({"_id": 1})]
        for write in writes:
            with pytest.raises(WriteRefused, match="refused by the guard"):
                await write
        assert await notes.find_one({"_id": 1}) == {"_id": 1, "n": 1}  # reads go on; nothing moved
        await database.writer_claims.insert_one({"_id": 1})  # the claim's own renewals go through
        await database.masters.insert_one({"_id": "m"})
    finally:
        database.write_guard = None
    assert await database.notes.count_documents({}) == 1
    assert await database.db["block_state_0"].count_documents({}) == 0
