"""The ``mailings`` collection: one document per mailing, with per-status recipient counts."""

from __future__ import annotations

from typing import Any, AsyncIterator, Mapping

from cloudmailing.storage import counters
from cloudmailing.storage.database import Database

MAILING_ID_COUNTER = "mailing_id"


class MailingStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def next_id(self) -> int:
        return await counters.increment(self._db, MAILING_ID_COUNTER)

    async def insert(self, mailing_id: int, fields: Mapping[str, Any]) -> None:
        await self._db.mailings.insert_one({"_id": mailing_id, "counts": {}, **fields})

    async def get(self, mailing_id: int) -> dict[str, Any] | None:
        return await self._db.mailings.find_one({"_id": mailing_id})

    async def update(self, mailing_id: int, fields: Mapping[str, Any],
                     only_if_status: list[str] | None = None) -> bool:
        """Set ``fields``; with ``only_if_status``, only while the mailing is in one of them."""
        query: dict[str, Any] = {"_id": mailing_id}
        if only_if_status is not None:
            query["status"] = {"$in": only_if_status}
        async with self._db.write_lock:  # a $set racing an $inc would write the counts back
            result = await self._db.mailings.update_one(query, {"$set": dict(fields)})
        return result.matched_count == 1

    async def delete(self, mailing_id: int) -> bool:
        result = await self._db.mailings.delete_one({"_id": mailing_id})
        return result.deleted_count == 1

    def find(self, query: Mapping[str, Any], projection: Mapping[str, Any] | None = None,
             ) -> AsyncIterator[dict[str, Any]]:
        """Mailings matching ``query``, by id ascending, streamed."""
        return self._db.mailings.find(dict(query), projection).sort("_id", 1)

    async def ids(self, query: Mapping[str, Any]) -> list[int]:
        return [doc["_id"] async for doc in self._db.mailings.find(dict(query), {"_id": 1})]

    async def count(self, query: Mapping[str, Any]) -> int:
        return await self._db.mailings.count_documents(dict(query))

    async def add_counts(self, mailing_id: int, deltas: Mapping[str, int]) -> None:
        """Move recipients between per-status counts (``{"READY": -1, "FINISHED": 1}``)."""
        inc = {f"counts.{status}": delta for status, delta in deltas.items() if delta}
        if inc:
            async with self._db.write_lock:
                await self._db.mailings.update_one({"_id": mailing_id}, {"$inc": inc})

    async def set_counts(self, mailing_id: int, counts: Mapping[str, int]) -> None:
        """Replace the per-status counts (statuses no longer counted become 0)."""
        async with self._db.write_lock:
            current = await self._db.mailings.find_one({"_id": mailing_id}, {"counts": 1}) or {}
            statuses = set(current.get("counts") or {}) | set(counts)
            # One field per status: FerretDB v1 takes {"counts": {A: 2}} over {B: 2} for "no change"
            # (it compares the embedded documents' values, not their keys).
            fields = {f"counts.{status}": int(counts.get(status, 0)) for status in sorted(statuses)}
            if fields:
                await self._db.mailings.update_one({"_id": mailing_id}, {"$set": fields})
