"""Monotonic counters kept in the ``counters`` collection (mailing ids, status sequence blocks)."""

from __future__ import annotations

from typing import Awaitable, Callable, TypeVar

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from cloudmailing.storage.database import Database

T = TypeVar("T")


async def increment(database: Database, name: str, by: int = 1) -> int:
    """Atomically add ``by`` to counter ``name`` and return its new value (first value: ``by``)."""
    async with database.locks.hold(("counter", name)):
        return await add_held(database, name, by)


async def add_held(database: Database, name: str, by: int) -> int:
    """:func:`increment`, for a caller that holds the counter's lock (``("counter", name)``)."""
    doc = await _upsert(lambda: database.counters.find_one_and_update(
        {"_id": name}, {"$inc": {"value": by}}, upsert=True, return_document=ReturnDocument.AFTER))
    assert doc is not None  # upsert always returns the document
    return int(doc["value"])


async def _upsert(write: Callable[[], Awaitable[T]]) -> T:
    """``write``, an upsert, tried once more if another process created the document first: of two
    first upserts racing, FerretDB fails the loser on the _id (MongoDB retries it itself)."""
    try:
        return await write()
    except DuplicateKeyError:  # the document exists now
        return await write()


async def current(database: Database, name: str) -> int:
    doc = await database.counters.find_one({"_id": name})
    return int(doc["value"]) if doc else 0


async def set_at_least(database: Database, name: str, value: int) -> None:
    """Raise counter ``name`` to ``value`` (never lowers it)."""
    async with database.locks.hold(("counter", name)):
        await raise_held(database, name, value)


async def raise_held(database: Database, name: str, value: int) -> None:
    """:func:`set_at_least`, for a caller that holds the counter's lock."""
    if await current(database, name) < value:
        await _upsert(lambda: database.counters.update_one({"_id": name}, {"$max": {"value": value}}, upsert=True))
