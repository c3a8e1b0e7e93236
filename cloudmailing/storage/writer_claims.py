"""The ``writer_claims`` collection: which process may write the database (one master, or one
``cm-admin storage`` command, at a time: see ``services/writer_claim.py``).

Each claim is a document numbered by its generation. Taking the claim is inserting the next
generation: ``_id`` is unique, so of two processes inserting the same number one fails, and that
holds on FerretDB too (PostgreSQL's unique index decides). Only the holder rewrites its own
document (to renew it), so no two processes ever update the same one. The collection keeps a
few documents: what it costs to read it whole stays nothing.
"""

from __future__ import annotations

import datetime
from typing import Any

from pymongo.errors import DuplicateKeyError

from cloudmailing.storage.database import Database

KEPT_GENERATIONS = 4  # older claims are deleted: only the latest one counts


class WriterClaimStore:
    def __init__(self, database: Database) -> None:
        self._claims = database.writer_claims

    async def latest(self) -> dict[str, Any] | None:
        """The claim of the highest generation, None when there never was one."""
        claims = await self._claims.find({}).to_list()
        return max(claims, key=lambda claim: claim["_id"], default=None)

    async def insert(self, generation: int, holder: dict[str, Any], until: datetime.datetime) -> bool:
        """Take generation ``generation``; False if another process took it first."""
        try:
            await self._claims.insert_one({"_id": generation, **holder, "until": until})
        except DuplicateKeyError:
            return False
        await self._claims.delete_many({"_id": {"$lte": generation - KEPT_GENERATIONS}})
        return True

    async def superseded(self, generation: int) -> bool:
        """Whether a later generation was taken."""
        return await self._claims.find_one({"_id": {"$gt": generation}}, {"_id": 1}) is not None

    async def renew(self, generation: int, until: datetime.datetime) -> None:
        await self._claims.update_one({"_id": generation}, {"$set": {"until": until}})


class MasterRegistry:
    """The ``masters`` collection: a document per running master (its identity and how long it
    counts as running): the masters recover those that stop renewing theirs, and ``cm-admin
    storage`` runs only when none runs. A master writes only its own; the one that recovers a
    dead master deletes that one's."""

    def __init__(self, database: Database) -> None:
        self._masters = database.masters
        self._locks = database.locks

    async def register(self, key: str, holder: dict[str, Any], until: datetime.datetime) -> None:
        await self._masters.insert_one({"_id": key, **holder, "until": until, "solo": False})

    async def set_solo(self, key: str, solo: bool) -> None:
        """Whether the master runs alone (``services/company.py``)."""
        async with self._locks.hold(("master", key), own_document=True):  # not at once with a renewal
            await self._masters.update_one({"_id": key}, {"$set": {"solo": solo}})

    async def renew(self, key: str, until: datetime.datetime) -> bool:
        """Move the entry's end; False if the entry is gone (recovered by another master)."""
        async with self._locks.hold(("master", key), own_document=True):
            return (await self._masters.update_one({"_id": key}, {"$set": {"until": until}})).matched_count == 1

    async def remove(self, key: str) -> None:
        await self._masters.delete_one({"_id": key})

    async def all(self) -> list[dict[str, Any]]:
        return await self._masters.find({}).to_list()
