"""Monotonic counters kept in the ``counters`` collection (mailing ids, status sequence blocks)."""

from __future__ import annotations

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from cloudmailing.storage.database import Database


async def increment(database: Database, name: str, by: int = 1) -> int:
    """Atomically add ``by`` to counter ``name`` and return its new value (first value: ``by``)."""
    async with database.locks.hold(("counter", name)):
        try:
            doc = await _upsert_increment(database, name, by)
        except DuplicateKeyError:  # another process created the counter first: it exists now
            doc = await _upsert_increment(database, name, by)
    assert doc is not None  # upsert always returns the document
    return int(doc["value"])


async def _upsert_increment(database: Database, name: str, by: int) -> dict | None:
    # Two first upserts racing: one inserts, the other may fail on the _id (FerretDB does not
    # retry it as MongoDB does), then finds the document on its second try.
    return await database.counters.find_one_and_update(
        {"_id": name}, {"$inc": {"value": by}}, upsert=True, return_document=ReturnDocument.AFTER)


async def current(database: Database, name: str) -> int:
    doc = await database.counters.find_one({"_id": name})
    return int(doc["value"]) if doc else 0


async def set_at_least(database: Database, name: str, value: int) -> None:
    """Raise counter ``name`` to ``value`` (never lowers it)."""
    async with database.locks.hold(("counter", name)):
        if await current(database, name) < value:
            try:
                await database.counters.update_one({"_id": name}, {"$max": {"value": value}}, upsert=True)
            except DuplicateKeyError:  # created meanwhile by another process
                await database.counters.update_one({"_id": name}, {"$max": {"value": value}})
