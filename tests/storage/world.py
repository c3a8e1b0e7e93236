"""A running mailing's recipients straight in storage, for the storage tests."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator
from typing import Any

from pymongo import AsyncMongoClient

from cloudmailing.storage.database import Database
from cloudmailing.storage.ingest import NewRecipient
from cloudmailing.storage.shared_locks import SharedLocks
from cloudmailing.storage.stores import Stores, open_stores

NOW = datetime.datetime(2027, 1, 15, 12, 0, 0)


def recipients(count: int, prefix: str = "u", **extra: Any) -> list[NewRecipient]:
    return [NewRecipient(email=f"{prefix}{i}@example.org", domain="example.org", contact={"n": i}, attachments=[],
                         **extra) for i in range(count)]


async def mailing_with(database: Any, count: int, block_recipients: int = 500, mailing_id: int = 1,
                       ) -> tuple[Stores, list[str]]:
    """Stores on ``database`` and the ids of ``count`` recipients of a RUNNING mailing."""
    stores = await open_stores(database, block_recipients=block_recipients)
    await stores.mailings.insert(mailing_id, {"status": "RUNNING", "satellite_group": "", "type": "REGULAR"})
    ids = await stores.writer.append(mailing_id, False, recipients(count), NOW)
    return stores, [rid for rid in ids if rid is not None]


@contextlib.asynccontextmanager
async def master_stores(mongo_url: str, name: str, key: str, block_recipients: int = 500) -> AsyncIterator[Stores]:
    """The stores of a master named ``key``: its own connection, locks shared with the others."""
    client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=False)
    database = Database(client=client, db=client[name])
    database.locks.shared = SharedLocks(lambda: database.write_locks, key)
    try:
        yield await open_stores(database, block_recipients, writer_key=key)
    finally:
        await client.close()
