"""The ``mailings`` collection: one document per mailing, with per-status recipient counts.

The counts move only by increments, in the same step as the recipient changes they count (see
``storage.ledger``); a recount from the blocks is a repair, run when nothing else writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Sequence

from cloudmailing.common.statuses import FILLING, MAILING_FINISHED, MAILING_READY, PAUSED, RUNNING
from cloudmailing.storage import counters
from cloudmailing.storage.database import Database

MAILING_ID_COUNTER = "mailing_id"
OPEN_STATUSES = (MAILING_READY, RUNNING, PAUSED)
_CONTENT_FIELDS = {"html": 0, "plain": 0, "rfc822": 0}


@dataclass(frozen=True)
class MailingFilter:
    """Which mailings: each given list narrows the choice (None: any)."""

    ids: Sequence[int] | None = None
    domains: Sequence[str] | None = None
    statuses: Sequence[str] | None = None
    owners: Sequence[str] | None = None
    groups: Sequence[str] | None = None

    def query(self) -> dict[str, Any]:
        query: dict[str, Any] = {}
        for field_name, wanted in (("_id", self.ids), ("domain_name", self.domains), ("status", self.statuses),
                                   ("owner_guid", self.owners), ("satellite_group", self.groups)):
            if wanted is not None:
                query[field_name] = {"$in": list(wanted)}
        return query


class MailingStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def next_id(self) -> int:
        return await counters.increment(self._db, MAILING_ID_COUNTER)

    async def insert(self, mailing_id: int, fields: Mapping[str, Any]) -> None:
        await self._db.mailings.insert_one({"_id": mailing_id, "counts": {}, **fields})

    async def get(self, mailing_id: int, with_content: bool = True) -> dict[str, Any] | None:
        projection = None if with_content else _CONTENT_FIELDS
        return await self._db.mailings.find_one({"_id": mailing_id}, projection)

    async def update(self, mailing_id: int, fields: Mapping[str, Any],
                     only_if_status: Sequence[str] | None = None) -> bool:
        """Set ``fields``; with ``only_if_status``, only while the mailing is in one of them."""
        query: dict[str, Any] = {"_id": mailing_id}
        if only_if_status is not None:
            query["status"] = {"$in": list(only_if_status)}
        async with self._db.locks.hold(("mailing", mailing_id)):
            result = await self._db.mailings.update_one(query, {"$set": dict(fields)})
        return result.matched_count == 1

    async def delete(self, mailing_id: int) -> bool:
        result = await self._db.mailings.delete_one({"_id": mailing_id})
        return result.deleted_count == 1

    def find(self, which: MailingFilter, with_content: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Mailings matching ``which``, by id ascending, streamed."""
        return self._db.mailings.find(which.query(), None if with_content else _CONTENT_FIELDS).sort("_id", 1)

    def open_mailings(self) -> AsyncIterator[dict[str, Any]]:
        """Started mailings not finished yet (READY, RUNNING, PAUSED), without their content."""
        return self.find(MailingFilter(statuses=OPEN_STATUSES))

    def unfinished(self) -> AsyncIterator[dict[str, Any]]:
        return self.find(MailingFilter(statuses=(FILLING, *OPEN_STATUSES)))

    async def ids(self, which: MailingFilter) -> list[int]:
        return [doc["_id"] async for doc in self._db.mailings.find(which.query(), {"_id": 1})]

    async def running_for_groups(self, groups: Sequence[str]) -> list[int]:
        return await self.ids(MailingFilter(statuses=[RUNNING], groups=groups))

    async def count(self, which: MailingFilter) -> int:
        return await self._db.mailings.count_documents(which.query())

    def counts_lock(self, mailing_id: int) -> Any:
        """Held around every change of the mailing's counts, with the block summary it counts:
        so a recount never interleaves with an increment. Take a block's lock before this one."""
        return self._db.locks.hold(("mailing", mailing_id))

    async def add_counts(self, mailing_id: int, deltas: Mapping[str, int]) -> None:
        """Move recipients between per-status counts (``{"READY": -1, "FINISHED": 1}``); the
        caller holds :meth:`counts_lock`."""
        inc = {f"counts.{status}": delta for status, delta in deltas.items() if delta}
        if inc:
            await self._db.mailings.update_one({"_id": mailing_id}, {"$inc": inc})

    async def replace_counts(self, mailing_id: int, counts: Mapping[str, int]) -> None:
        """Repair: set the per-status counts (statuses no longer counted become 0); the caller
        holds :meth:`counts_lock`."""
        current = await self._db.mailings.find_one({"_id": mailing_id}, {"counts": 1}) or {}
        statuses = set(current.get("counts") or {}) | set(counts)
        # One field per status: FerretDB v1 takes {"counts": {A: 2}} over {B: 2} for "no change"
        # (it compares the embedded documents' values, not their keys).
        fields = {f"counts.{status}": int(counts.get(status, 0)) for status in sorted(statuses)}
        if fields:
            await self._db.mailings.update_one({"_id": mailing_id}, {"$set": fields})

    async def finish(self, mailing_id: int, now: Any) -> bool:
        """FINISHED now, unless it already is; whether this call finished it."""
        return await self.update(mailing_id, {"status": MAILING_FINISHED, "end_time": now},
                                 only_if_status=OPEN_STATUSES)
