"""Recipient status changes: the one write path, and the change log that cursors read.

Every status change gets a sequence number and an entry in ``status_log`` (``_id`` = sequence).
Writers run concurrently and may finish out of order, so a reader must never move its cursor
past a number that is still being written: :class:`SequenceAllocator` tracks the numbers in
flight and exposes the *horizon*, the highest number below which every change is committed
(or abandoned). Readers only read up to the horizon, so a cursor never skips a late commit.

Numbers are reserved from the database in blocks, so they only grow, across restarts too:
a cursor handed out before a restart stays valid after it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from pymongo import UpdateOne

from cloudmailing.storage import counters
from cloudmailing.storage.database import Database
from cloudmailing.storage.mailings import MailingStore

log = logging.getLogger(__name__)

SEQUENCE_COUNTER = "status_seq"

# The fields of a recipient that a status report shows (API.md, "recipient status struct").
STATUS_FIELDS = ("email", "status", "reply_code", "reply_enhanced_code", "reply_text", "smtp_log",
                 "modified", "first_try", "next_try", "try_count", "in_progress", "cloud_client")


class SequenceAllocator:
    """Hands out change numbers and knows the horizon below which all are committed."""

    def __init__(self, database: Database, block_size: int = 1000) -> None:
        self._db = database
        self._block_size = block_size
        self._next = 1
        self._reserved_end = 0  # last number of the block reserved in the database
        self._in_flight: set[int] = set()
        self._reserve_lock = asyncio.Lock()

    async def start(self) -> None:
        """Continue after every number any earlier process may have handed out."""
        self._reserved_end = await counters.current(self._db, SEQUENCE_COUNTER)
        self._next = self._reserved_end + 1

    async def allocate(self, count: int) -> list[int]:
        async with self._reserve_lock:
            if self._next + count - 1 > self._reserved_end:
                # A new block; the old block's unused tail is simply skipped (gaps are harmless).
                wanted = max(self._block_size, count)
                self._reserved_end = await counters.increment(self._db, SEQUENCE_COUNTER, wanted)
                self._next = self._reserved_end - wanted + 1
            numbers = list(range(self._next, self._next + count))
            self._next += count
            self._in_flight.update(numbers)
            return numbers

    def release(self, numbers: Iterable[int]) -> None:
        self._in_flight.difference_update(numbers)

    @property
    def horizon(self) -> int:
        """Every change numbered up to this is committed or abandoned."""
        return (min(self._in_flight) if self._in_flight else self._next) - 1


@dataclass(frozen=True)
class StatusChange:
    """One recipient moving to ``status``; ``fields`` are other fields to set (status fields are logged)."""

    recipient_id: str
    status: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ApplyResult:
    applied: list[str] = field(default_factory=list)   # recipient ids changed
    unknown: list[str] = field(default_factory=list)   # recipient ids not in the database


class _RecipientClaims:
    """Serializes changes to one recipient; changes to different recipients run in parallel."""

    def __init__(self) -> None:
        self._busy: dict[str, asyncio.Future[None]] = {}

    async def claim(self, recipient_ids: Sequence[str]) -> None:
        loop = asyncio.get_running_loop()
        for recipient_id in sorted(set(recipient_ids)):  # sorted: no deadlock between batches
            while recipient_id in self._busy:
                await asyncio.shield(self._busy[recipient_id])
            self._busy[recipient_id] = loop.create_future()

    def release(self, recipient_ids: Sequence[str]) -> None:
        for recipient_id in set(recipient_ids):
            waiter = self._busy.pop(recipient_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class StatusLog:
    """The single path through which recipient statuses change, and the cursor reads."""

    def __init__(self, database: Database, allocator: SequenceAllocator,
                 before_write: Callable[[], Awaitable[None]] | None = None) -> None:
        self._db = database
        self._allocator = allocator
        self._before_write = before_write  # a test seam: lets writers finish out of order
        self._mailings = MailingStore(database)
        self._claims = _RecipientClaims()
        self.mailings_to_recount: set[int] = set()

    async def apply(self, changes: Sequence[StatusChange], now: datetime.datetime) -> ApplyResult:
        """Apply ``changes`` (at most one per recipient) and log each one."""
        by_id = {change.recipient_id: change for change in changes}
        return await self.apply_decided(list(by_id), lambda current: by_id[current["_id"]], now)

    async def apply_decided(self, recipient_ids: Sequence[str], decide: Callable[[dict[str, Any]], StatusChange],
                            now: datetime.datetime, likely: Mapping[str, Any] | None = None) -> ApplyResult:
        """Apply the change ``decide`` makes of each recipient's current state (read once, here).
        ``likely``: an equality filter most of the recipients match (e.g. their lease owner),
        which lets FerretDB find them without decoding the whole collection."""
        await self._claims.claim(recipient_ids)
        try:
            return await self._apply_claimed(recipient_ids, decide, now, likely or {})
        finally:
            self._claims.release(recipient_ids)

    async def _apply_claimed(self, recipient_ids: Sequence[str], decide: Callable[[dict[str, Any]], StatusChange],
                             now: datetime.datetime, likely: Mapping[str, Any]) -> ApplyResult:
        current = await self._load(recipient_ids, likely)
        known = [decide(current[rid]) for rid in recipient_ids if rid in current]
        result = ApplyResult(unknown=[rid for rid in recipient_ids if rid not in current])
        if not known:
            return result
        numbers = await self._allocator.allocate(len(known))
        try:
            if self._before_write is not None:
                await self._before_write()
            entries = [_log_entry(seq, change, current[change.recipient_id], now)
                       for seq, change in zip(numbers, known, strict=True)]
            # The log first: a crash between the two writes repeats a change, never loses one.
            await self._db.status_log.insert_many(entries, ordered=True)
            updates = [UpdateOne({"_id": e["recipient_id"]}, {"$set": _recipient_update(e, change)})
                       for e, change in zip(entries, known, strict=True)]
            async with self._db.write_lock:
                await self._db.bulk_update(self._db.recipients, updates)
            await self._move_counts(known, current)
        except BaseException:
            # Some of the writes may have happened: the counts are recounted from the recipients.
            self.mailings_to_recount.update(doc["mailing_id"] for doc in current.values())
            raise
        finally:
            self._allocator.release(numbers)
        result.applied = [change.recipient_id for change in known]
        return result

    async def _load(self, recipient_ids: Iterable[str], likely: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        projection = {name: 1 for name in (*STATUS_FIELDS, "mailing_id", "test")}
        wanted = list(recipient_ids)
        found: dict[str, dict[str, Any]] = {}
        for scope in ([likely] if likely else []) + [{}]:
            cursor = self._db.recipients.find({**scope, "_id": {"$in": wanted}}, projection)
            found.update({doc["_id"]: doc async for doc in cursor})
            wanted = [rid for rid in wanted if rid not in found]
            if not wanted:
                break
        return found

    async def _move_counts(self, changes: Sequence[StatusChange], current: Mapping[str, dict[str, Any]]) -> None:
        per_mailing: dict[int, dict[str, int]] = {}
        for change in changes:
            old = current[change.recipient_id]
            if old.get("test") or old.get("status") == change.status:
                continue
            deltas = per_mailing.setdefault(old["mailing_id"], {})
            deltas[old["status"]] = deltas.get(old["status"], 0) - 1
            deltas[change.status] = deltas.get(change.status, 0) + 1
        for mailing_id, deltas in per_mailing.items():
            await self._mailings.add_counts(mailing_id, deltas)

    async def read_since(self, after: int, query: Mapping[str, Any], limit: int,
                         ) -> tuple[list[dict[str, Any]], int]:
        """Changes numbered after ``after`` matching ``query``, oldest first, and the next cursor."""
        horizon = self._allocator.horizon
        if after >= horizon:
            return [], max(after, 0)
        find = {"_id": {"$gt": after, "$lte": horizon}, **query}
        entries = await self._db.status_log.find(find).sort("_id", 1).limit(limit).to_list()
        next_cursor = entries[-1]["_id"] if len(entries) == limit else horizon
        return entries, next_cursor

    async def purge_before(self, cutoff: datetime.datetime) -> int:
        result = await self._db.status_log.delete_many({"logged_at": {"$lt": cutoff}})
        return result.deleted_count


def _log_entry(seq: int, change: StatusChange, old: Mapping[str, Any], now: datetime.datetime) -> dict[str, Any]:
    record = {name: change.fields.get(name, old.get(name)) for name in STATUS_FIELDS}
    record["status"] = change.status
    record["modified"] = now
    return {"_id": seq, "recipient_id": change.recipient_id, "mailing_id": old["mailing_id"],
            "test": bool(old.get("test")), "status": change.status, "logged_at": now, "record": record}


def _recipient_update(entry: Mapping[str, Any], change: StatusChange) -> dict[str, Any]:
    """The logged status fields, plus the change's other fields (e.g. ending a lease)."""
    update = {**change.fields, **entry["record"]}
    update.pop("email", None)
    update["seq"] = entry["_id"]
    return update
