"""The ``mailings`` collection: one small document per mailing, with per-status recipient counts;
its bodies (``html``, ``plain``, ``rfc822``) in ``mailing_content``, by the same ``_id``.

The mailing document is read on every lease and rewritten on every count change: FerretDB v1
decodes and re-encodes a whole document for each, so the bodies (tens of KB) are kept apart and
read only when asked for (``with_content``). Storage layout 3; ``storage.migration`` moves them
out of layout 2's mailing documents.

The counts move only by increments, in the same step as the recipient changes they count (see
``storage.ledger``); a recount from the blocks is a repair, run when nothing else writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

from cloudmailing.common.statuses import FILLING, MAILING_FINISHED, MAILING_READY, PAUSED, RUNNING
from cloudmailing.storage import counters
from cloudmailing.storage.database import Database

MAILING_ID_COUNTER = "mailing_id"
OPEN_STATUSES = (MAILING_READY, RUNNING, PAUSED)
CONTENT_FIELDS = ("html", "plain", "rfc822")  # kept in mailing_content


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
        content, rest = _split(fields)
        await self._db.mailing_content.replace_one({"_id": mailing_id}, content, upsert=True)
        await self._db.mailings.insert_one({"_id": mailing_id, "counts": {}, **rest})

    async def get(self, mailing_id: int, with_content: bool = False) -> dict[str, Any] | None:
        mailing = await self._db.mailings.find_one({"_id": mailing_id})
        if mailing is not None and with_content:
            await self._add_content(mailing)
        return mailing

    async def _add_content(self, mailing: dict[str, Any]) -> None:
        content = await self._db.mailing_content.find_one({"_id": mailing["_id"]}) or {}
        mailing.update((name, content.get(name)) for name in CONTENT_FIELDS)

    async def update(self, mailing_id: int, fields: Mapping[str, Any],
                     only_if_status: Sequence[str] | None = None, new_content: bool = False) -> bool:
        """Set ``fields``; with ``only_if_status``, only while the mailing is in one of them. With
        ``new_content``, the mailing's ``content_version`` moves too (satellites fetch it again)."""
        query: dict[str, Any] = {"_id": mailing_id}
        if only_if_status is not None:
            query["status"] = {"$in": list(only_if_status)}
        async with self._db.locks.hold(("mailing", mailing_id)):
            return await self._update(query, fields, new_content)

    async def _update(self, query: dict[str, Any], fields: Mapping[str, Any], new_content: bool = False) -> bool:
        content, rest = _split(fields)
        if rest or new_content:
            change: dict[str, Any] = {"$set": rest} if rest else {}
            if new_content:
                change["$inc"] = {"content_version": 1}
            matched = (await self._db.mailings.update_one(query, change)).matched_count == 1
        else:
            matched = await self._db.mailings.find_one(query, {"_id": 1}) is not None
        if content and matched:
            await self._db.mailing_content.update_one({"_id": query["_id"]}, {"$set": content}, upsert=True)
        return matched

    async def delete(self, mailing_id: int) -> bool:
        result = await self._db.mailings.delete_one({"_id": mailing_id})
        await self._db.mailing_content.delete_one({"_id": mailing_id})
        return result.deleted_count == 1

    def find(self, which: MailingFilter) -> AsyncIterator[dict[str, Any]]:
        """Mailings matching ``which``, by id ascending, streamed (without their bodies)."""
        return self._db.mailings.find(which.query()).sort("_id", 1)

    def open_mailings(self) -> AsyncIterator[dict[str, Any]]:
        """Started mailings not finished yet (READY, RUNNING, PAUSED), without their content."""
        return self.find(MailingFilter(statuses=OPEN_STATUSES))

    def unfinished(self) -> AsyncIterator[dict[str, Any]]:
        return self.find(MailingFilter(statuses=(FILLING, *OPEN_STATUSES)))

    async def ids(self, which: MailingFilter) -> list[int]:
        return [doc["_id"] async for doc in self._db.mailings.find(which.query(), {"_id": 1})]

    async def running_for_groups(self, groups: Sequence[str]) -> list[int]:
        return await self.ids(MailingFilter(statuses=[RUNNING], groups=groups))

    async def counts(self, mailing_ids: Sequence[int] | None = None) -> dict[int, dict[str, int]]:
        """Per-status recipient counts of each mailing (None: every mailing), from the mailing
        documents alone: no block is read."""
        found = self._db.mailings.find(MailingFilter(ids=mailing_ids).query(), {"counts": 1})
        return {doc["_id"]: dict(doc.get("counts") or {}) async for doc in found}

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

    async def finish(self, mailing_id: int, now: Any,
                     when: Callable[[dict[str, Any]], bool] | None = None) -> bool:
        """FINISHED now, unless it already is (or ``when`` says no of the mailing as read under
        the counts' lock: counts this process moves meanwhile wait); whether this call finished it."""
        query = {"_id": mailing_id, "status": {"$in": list(OPEN_STATUSES)}}
        async with self.counts_lock(mailing_id):
            if when is not None:
                mailing = await self._db.mailings.find_one(query)
                if mailing is None or not when(mailing):
                    return False
            return await self._update(query, {"status": MAILING_FINISHED, "end_time": now})


def _split(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the bodies, the rest) of a mailing's fields."""
    content = {name: value for name, value in fields.items() if name in CONTENT_FIELDS}
    return content, {name: value for name, value in fields.items() if name not in CONTENT_FIELDS}
