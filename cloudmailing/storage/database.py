"""The MongoDB connection, its collections and indexes, and the storage layout's version.
Only ``storage`` speaks MongoDB.

Recipients live in blocks (see ``storage.blocks``). Big per-block documents (content, state,
log pages, kept messages) are spread over *bucket* collections of a bounded number of
documents each (``block_content_7``): FerretDB v1 answers even an ``_id`` look-up by reading
every row of the collection, so a bounded collection keeps each look-up's cost bounded however
large the database grows. MongoDB finds them by ``_id`` either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from cloudmailing.storage.shared_locks import SharedLocks

LAYOUT_VERSION = 3  # 2: mailing bodies inside the mailing documents; 1: a document per recipient
MIGRATE_COMMAND = "cm-admin storage migrate"
BLOCKS_PER_BUCKET = 64  # block content, state and kept messages: at most this many blocks per collection
SEQS_PER_BUCKET = 200_000  # status log pages: a collection per this many change numbers

# Indexes for MongoDB, where every query the API and the dispatcher make uses one. FerretDB v1
# keeps them but does not read them.
_INDEXES: dict[str, list[list[tuple[str, int]]]] = {
    "mailings": [[("status", ASCENDING)], [("domain_name", ASCENDING)], [("owner_guid", ASCENDING)]],
    "blocks": [[("m", ASCENDING)], [("free", ASCENDING), ("test", ASCENDING), ("m", ASCENDING), ("_id", ASCENDING)],
               [("retry", ASCENDING), ("test", ASCENDING), ("m", ASCENDING), ("_id", ASCENDING)],
               [("owner", ASCENDING)], [("held", ASCENDING)]],
    "blocks_done": [[("m", ASCENDING)]],
    "recipient_ids": [[("m", ASCENDING)], [("batch", ASCENDING)]],
    "api_keys": [[("name", ASCENDING)]],
    "satellites": [[("serial", ASCENDING)]],
    "hourly_stats": [[("hour", ASCENDING)]],
}
_BUCKET_INDEXES: dict[str, list[list[tuple[str, int]]]] = {
    "status_log": [[("m", ASCENDING)], [("at", ASCENDING)]],
    "kept_messages": [[("m", ASCENDING)]],
}


# Writes a write guard may refuse; the claim's own collections are never refused (their
# renewals are what lets a guard allow writes again).
_WRITES = ("insert_one", "insert_many", "update_one", "update_many", "replace_one", "delete_one", "delete_many",
           "find_one_and_update", "find_one_and_replace", "find_one_and_delete", "bulk_write", "drop")
_UNGUARDED = frozenset(("writer_claims", "masters"))


class WriteRefused(PyMongoError):
    """The write guard refused a write: this process may no longer be the database's writer. A
    database error like any other to its callers (the API answers "database unavailable, please
    retry"; a satellite's report is refused and sent again)."""


class GuardedCollection(AsyncCollection):
    """A collection whose every write first asks ``guard`` why not (None: go ahead)."""

    guard: Callable[[], str | None]


def _refuse_unless_allowed(guard: Callable[[], str | None] | None) -> None:
    refusal = guard() if guard is not None else None
    if refusal is not None:
        raise WriteRefused(refusal)


def _guarded_write(name: str) -> Callable[..., Any]:
    async def write(self: GuardedCollection, *args: Any, **kwargs: Any) -> Any:
        _refuse_unless_allowed(self.guard)
        return await getattr(super(GuardedCollection, self), name)(*args, **kwargs)

    write.__name__ = write.__qualname__ = name
    return write


for _name in _WRITES:
    setattr(GuardedCollection, _name, _guarded_write(_name))


class LayoutError(RuntimeError):
    """The database was written by another storage layout; the message says what to do."""


class KeyedLocks:
    """One asyncio lock per key, alive while used: serializes this process's writes to one
    document; with ``shared`` set (a master), also every other master's (``storage.shared_locks``).

    FerretDB v1 updates a document as read-modify-write without a lock, so two concurrent updates
    of one document could lose one; different documents still go in parallel."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}
        self.shared: SharedLocks | None = None

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable, own_document: bool = False) -> AsyncIterator[None]:
        """Hold ``key``'s lock; ``own_document``: the document is this process's alone (no other
        master writes it), so this process's lock is enough."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                if self.shared is None or own_document:
                    yield
                else:
                    async with self.shared.hold(key):
                        yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class Database:
    """An open database: the client and typed access to each collection."""

    client: AsyncMongoClient
    db: AsyncDatabase
    is_ferretdb: bool = False
    locks: KeyedLocks = field(default_factory=KeyedLocks)
    # Asked before every write (but to the writer's claim's own collections): why not, or None.
    # Set while this process holds the writer's claim: no write once it may have lapsed.
    write_guard: Callable[[], str | None] | None = None
    _indexed_buckets: set[str] = field(default_factory=set)

    def __getattr__(self, name: str) -> AsyncCollection:
        """``database.mailings`` and the like: the collection of that name."""
        if name.startswith("_"):
            raise AttributeError(name)
        return self._collection(name)

    def _collection(self, name: str) -> AsyncCollection:
        if self.write_guard is None or name in _UNGUARDED:
            return self.db[name]
        guarded = GuardedCollection(self.db, name)
        guarded.guard = self.write_guard
        return guarded

    async def drop_collection(self, name: str) -> None:
        _refuse_unless_allowed(self.write_guard)
        await self.db.drop_collection(name)

    async def bucket(self, kind: str, number: int) -> AsyncCollection:
        """Bucket collection ``number`` of ``kind`` (``block_content``, ``status_log``...), to
        write documents into: indexed, so created if it does not exist yet (by its first index
        or, for a kind without one, its first insert). Only writers of new documents call it:
        the buckets it remembers as indexed are those holding (or having held) documents."""
        name = f"{kind}_{number}"
        if kind in _BUCKET_INDEXES and name not in self._indexed_buckets:
            for keys in _BUCKET_INDEXES[kind]:
                await self.db[name].create_index(keys)
            self._indexed_buckets.add(name)
        return self._collection(name)

    def existing_bucket(self, kind: str, number: int) -> AsyncCollection:
        """Bucket collection ``number`` of ``kind``, to read, update or delete documents that may
        be there: neither created nor remembered (a bucket a forged id or cursor names stays
        absent, and costs no memory)."""
        return self._collection(f"{kind}_{number}")

    async def drop_bucket(self, kind: str, number: int) -> None:
        """Drop a bucket left empty; written again later, it is indexed again."""
        name = f"{kind}_{number}"
        await self.drop_collection(name)
        self._indexed_buckets.discard(name)

    async def bucket_numbers(self, kind: str) -> list[int]:
        """The numbers of the existing bucket collections of ``kind``, ascending."""
        prefix = f"{kind}_"
        names = await self.db.list_collection_names()
        return sorted(int(name[len(prefix):]) for name in names
                      if name.startswith(prefix) and name[len(prefix):].isdigit())

    async def ensure_indexes(self) -> None:
        for collection, indexes in _INDEXES.items():
            for keys in indexes:
                await self.db[collection].create_index(keys)

    async def close(self) -> None:
        await self.client.close()


async def open_database(url: str, name: str, timeout_ms: int = 10000, check_layout: bool = True) -> Database:
    """Connect, check the server answers and the layout is ours, and make sure the indexes exist."""
    client: AsyncMongoClient = AsyncMongoClient(url, tz_aware=False, serverSelectionTimeoutMS=timeout_ms,
                                                uuidRepresentation="standard")
    build = await client.admin.command("buildInfo")
    database = Database(client=client, db=client[name], is_ferretdb="ferretdbVersion" in build)
    if check_layout:
        try:
            await check_layout_version(database)
        except LayoutError:
            await client.close()
            raise
    await database.ensure_indexes()
    return database


async def check_layout_version(database: Database) -> None:
    """Mark a new database with our layout; refuse one written by another layout."""
    marker = await database.meta.find_one({"_id": "layout"})
    if marker is not None:
        if marker.get("version") == 2:
            raise LayoutError(f"database {database.db.name!r} keeps the mailings' bodies in the layout of earlier "
                              f"CloudMailing versions (storage layout 2); stop the master and run "
                              f"`{MIGRATE_COMMAND}` to convert it")
        if marker.get("version") != LAYOUT_VERSION:
            raise LayoutError(f"database {database.db.name!r} has storage layout {marker.get('version')}, "
                              f"this CloudMailing reads layout {LAYOUT_VERSION}")
        return
    if await has_old_layout(database):
        raise LayoutError(f"database {database.db.name!r} holds recipients in the storage layout of earlier "
                          f"CloudMailing versions (one document per recipient); stop the master and run "
                          f"`{MIGRATE_COMMAND}` to convert it")
    await database.meta.update_one({"_id": "layout"}, {"$set": {"version": LAYOUT_VERSION}}, upsert=True)


async def has_old_layout(database: Database) -> bool:
    """Whether the database holds the one-document-per-recipient collections of layout 1."""
    return bool(await database.recipients.find_one({}, {"_id": 1})
                or await database.status_log.find_one({}, {"_id": 1}))
