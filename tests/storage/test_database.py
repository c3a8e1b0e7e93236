"""Opening the database: indexes, and serialized updates only where the server needs them."""

from __future__ import annotations

import asyncio

from tests.helpers import aio_test


@aio_test
async def test_updates_are_serialized_on_ferretdb_only(database):
    build = await database.client.admin.command("buildInfo")
    assert isinstance(database.write_lock, asyncio.Lock) == ("ferretdbVersion" in build)


@aio_test
async def test_every_collection_has_its_indexes(database):
    names = [index["name"] async for index in await database.recipients.list_indexes()]
    assert "mailing_id_1_status_1_next_try_1" in names and "log_group_1" in names
    names = [index["name"] async for index in await database.status_log.list_indexes()]
    assert "mailing_id_1__id_1" in names and "group_1_recipient_id_1" in names
