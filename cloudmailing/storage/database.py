"""The MongoDB connection and the collections' indexes. Only ``storage`` speaks MongoDB."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

# Indexes for MongoDB, where every query the API and the dispatcher make uses one. FerretDB v1
# keeps them but never reads them (see LeaseStore in storage/recipients.py).
_INDEXES: dict[str, list[list[tuple[str, int]]]] = {
    "mailings": [[("status", ASCENDING)], [("domain_name", ASCENDING)], [("owner_guid", ASCENDING)]],
    "recipients": [
        [("mailing_id", ASCENDING), ("status", ASCENDING), ("next_try", ASCENDING)],
        [("mailing_id", ASCENDING), ("email", ASCENDING)],
        [("ingest_batch", ASCENDING)],
        [("log_group", ASCENDING)],
    ],
    "status_log": [[("mailing_id", ASCENDING), ("_id", ASCENDING)], [("logged_at", ASCENDING)],
                   [("group", ASCENDING), ("recipient_id", ASCENDING)]],
    "api_keys": [[("name", ASCENDING)]],
    "satellites": [[("serial", ASCENDING)]],
    "hourly_stats": [[("hour", ASCENDING)]],
}


@dataclass
class Database:
    """An open database: the client and typed access to each collection."""

    client: AsyncMongoClient
    db: AsyncDatabase
    # FerretDB v1 updates documents as read-modify-write outside any lock, so two concurrent
    # updates of one document can lose one (seen: a lease written over a delivery report).
    # The master is the only writer: on FerretDB it runs its updates one at a time under this
    # lock; MongoDB updates each document atomically, so there it is a lock that never waits.
    write_lock: AbstractAsyncContextManager[Any] = field(default_factory=asyncio.Lock)

    @property
    def mailings(self) -> AsyncCollection:
        return self.db["mailings"]

    @property
    def recipients(self) -> AsyncCollection:
        return self.db["recipients"]

    @property
    def status_log(self) -> AsyncCollection:
        return self.db["status_log"]

    @property
    def counters(self) -> AsyncCollection:
        return self.db["counters"]

    @property
    def ingest_batches(self) -> AsyncCollection:
        return self.db["ingest_batches"]

    @property
    def api_keys(self) -> AsyncCollection:
        return self.db["api_keys"]

    @property
    def satellites(self) -> AsyncCollection:
        return self.db["satellites"]

    @property
    def hourly_stats(self) -> AsyncCollection:
        return self.db["hourly_stats"]

    async def ensure_indexes(self) -> None:
        for collection, indexes in _INDEXES.items():
            for keys in indexes:
                await self.db[collection].create_index(keys)

    async def close(self) -> None:
        await self.client.close()


async def open_database(url: str, name: str, timeout_ms: int = 10000) -> Database:
    """Connect, check the server answers, and make sure the indexes exist."""
    client: AsyncMongoClient = AsyncMongoClient(url, tz_aware=False, serverSelectionTimeoutMS=timeout_ms,
                                                uuidRepresentation="standard")
    database = Database(client=client, db=client[name])
    build = await client.admin.command("buildInfo")
    if "ferretdbVersion" not in build:
        database.write_lock = contextlib.nullcontext()
    await database.ensure_indexes()
    return database
