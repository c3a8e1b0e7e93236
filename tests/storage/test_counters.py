"""Counters: ids handed out once each, by several processes, from the counter's first use on."""

from __future__ import annotations

import asyncio

from pymongo.errors import DuplicateKeyError

from cloudmailing.storage import counters
from cloudmailing.storage.database import open_database
from tests.helpers import aio_test


@aio_test
async def test_two_processes_first_using_a_counter_both_get_values(database, mongo_url, db_name):
    other = await open_database(mongo_url, db_name)  # another master: its own connection and locks
    try:
        values = await asyncio.gather(*(counters.increment((database, other)[n % 2], "fresh") for n in range(40)))
    finally:
        await other.close()
    assert all(1 <= value <= 40 for value in values)
    if not database.is_ferretdb:  # FerretDB v1 applies $inc as a read then a write: two processes
        assert sorted(values) == list(range(1, 41))  # may draw one value (its callers allow it)


@aio_test
async def test_an_upsert_that_lost_the_race_to_create_the_counter_tries_again(database, monkeypatch):
    collection = type(database.counters)
    real = collection.find_one_and_update
    calls = []

    async def created_meanwhile(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:  # as FerretDB answers the loser of two first upserts
            await self.insert_one({"_id": "fresh", "value": 5})
            raise DuplicateKeyError("E11000 duplicate key error collection: counters")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(collection, "find_one_and_update", created_meanwhile)
    assert await counters.increment(database, "fresh") == 6
    assert len(calls) == 2


@aio_test
async def test_set_at_least_never_lowers(database):
    await counters.set_at_least(database, "floor", 10)
    await counters.set_at_least(database, "floor", 7)
    assert await counters.current(database, "floor") == 10
    await counters.set_at_least(database, "floor", 12)
    assert await counters.current(database, "floor") == 12
