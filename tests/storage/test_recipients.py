"""Recipient batches: block numbers by insertion position, and leases written block by block."""

from __future__ import annotations

import datetime

from cloudmailing.storage.recipients import BLOCK_SIZE, LeaseStore, RecipientStore
from tests.helpers import aio_test

NOW = datetime.datetime(2027, 1, 15, 12, 0, 0)


def _docs(prefix: str, count: int) -> list[dict]:
    return [{"_id": f"{prefix}{i:04d}", "mailing_id": 1, "email": f"{prefix}{i}@example.org", "status": "READY",
             "in_progress": False, "test": False} for i in range(count)]


@aio_test
async def test_blocks_follow_the_insertion_position_across_batches(database):
    store = RecipientStore(database)
    await store.insert_batch(1, _docs("a", BLOCK_SIZE - 1), NOW)
    await store.insert_batch(1, _docs("b", 3), NOW)
    blocks = {doc["_id"]: doc["block"] async for doc in database.recipients.find({}, {"block": 1})}
    first = blocks["a0000"]
    assert blocks[f"a{BLOCK_SIZE - 2:04d}"] == first
    assert blocks["b0000"] == first  # the last place of the first block
    assert blocks["b0001"] == blocks["b0002"] == first + 1


@aio_test
async def test_a_lease_spanning_blocks_takes_exactly_what_it_found(database):
    await RecipientStore(database).insert_batch(1, _docs("r", 2 * BLOCK_SIZE + 10), NOW)
    await database.recipients.update_one({"_id": "r0005"}, {"$set": {"status": "FINISHED"}})
    leases = LeaseStore(database)
    claimed = await leases.claim({"status": {"$in": ["READY"]}}, "sat", NOW, BLOCK_SIZE + 20)
    assert len(claimed) == BLOCK_SIZE + 20 and "r0005" not in {doc["_id"] for doc in claimed}
    assert await database.recipients.count_documents({"lease_owner": "sat", "in_progress": True}) == BLOCK_SIZE + 20
    assert len(await leases.release({"lease_owner": "sat"})) == BLOCK_SIZE + 20
    assert await database.recipients.count_documents({"in_progress": True}) == 0
