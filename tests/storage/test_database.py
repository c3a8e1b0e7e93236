"""Opening the database: indexes, bucket collections, and the storage layout's version."""

from __future__ import annotations

import pytest

from cloudmailing.storage.database import LAYOUT_VERSION, MIGRATE_COMMAND, LayoutError, open_database
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
