"""A running mailing's recipients straight in storage, for the storage tests."""

from __future__ import annotations

import datetime
from typing import Any

from cloudmailing.storage.ingest import NewRecipient
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
