"""Recipient status changes: the one write path, and the change log that cursors read.

Every status change gets a sequence number and an entry in ``status_log`` (``_id`` = sequence).
Writers run concurrently and may finish out of order, so a reader must never move its cursor
past a number that is still being written: :class:`SequenceAllocator` tracks the numbers in
flight and exposes the *horizon*, the highest number below which every change is committed
(or abandoned). Readers only read up to the horizon, so a cursor never skips a late commit.

Numbers are reserved from the database in blocks, so they only grow, across restarts too:
a cursor handed out before a restart stays valid after it.

A change's *details* (the reply, the SMTP log, the message as sent) differ for every recipient
and are kept in its log entry only. The recipient document keeps what the dispatcher and the
counts need (status, tries, lease) and ``log_group``, the group of log entries its last change
belongs to, where :meth:`StatusLog.details` finds the rest. So the changes of one apply that
share those fields are one update per block of recipients (see ``storage.recipients``) whatever
their replies, and a group's entries outlive the log's retention while a recipient points at them.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from cloudmailing.storage import counters
from cloudmailing.storage.database import Database
from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.recipients import find_by_block, ids_by, set_by_block

log = logging.getLogger(__name__)

SEQUENCE_COUNTER = "status_seq"

# The fields of a recipient that a status report shows (API.md, "recipient status struct").
STATUS_FIELDS = ("email", "status", "reply_code", "reply_enhanced_code", "reply_text", "smtp_log",
                 "modified", "first_try", "next_try", "try_count", "in_progress", "cloud_client")
# Those kept in the log entry only, with their values before any delivery attempt.
DETAIL_DEFAULTS: dict[str, Any] = {"reply_code": None, "reply_enhanced_code": "", "reply_text": "", "smtp_log": ""}
CONTENT = "customized_content"  # the message as sent, when the mailing keeps them
PURGE_CHUNK = 500  # log groups deleted per command


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
                            now: datetime.datetime, blocks: Mapping[str, Any] | None = None) -> ApplyResult:
        """Apply the change ``decide`` makes of each recipient's current state (read once, here).
        ``blocks``: the block of the recipients whose block the caller knows (they are found
        faster, see ``storage.recipients``)."""
        await self._claims.claim(recipient_ids)
        try:
            return await self._apply_claimed(recipient_ids, decide, now, blocks or {})
        finally:
            self._claims.release(recipient_ids)

    async def _apply_claimed(self, recipient_ids: Sequence[str], decide: Callable[[dict[str, Any]], StatusChange],
                             now: datetime.datetime, blocks: Mapping[str, Any]) -> ApplyResult:
        projection = {name: 1 for name in (*STATUS_FIELDS, "mailing_id", "test", "block", "log_group")}
        current = await find_by_block(self._db, recipient_ids, blocks, projection)
        known = [decide(current[rid]) for rid in recipient_ids if rid in current]
        result = ApplyResult(unknown=[rid for rid in recipient_ids if rid not in current])
        if not known:
            return result
        numbers = await self._allocator.allocate(len(known))
        try:
            if self._before_write is not None:
                await self._before_write()
            # A change that leaves some details unsaid keeps the recipient's current ones.
            partial = [current[c.recipient_id] for c in known if not set(DETAIL_DEFAULTS) <= set(c.fields)]
            previous = await self.details(partial) if partial else {}
            entries = [_log_entry(seq, c, {**current[c.recipient_id], **previous.get(c.recipient_id, {})},
                                  now, group=numbers[0]) for seq, c in zip(numbers, known, strict=True)]
            # The log first: a crash between the two writes repeats a change, never loses one.
            await self._db.status_log.insert_many(entries, ordered=True)
            await self._update_recipients(entries, known, current)
            await self._move_counts(known, current)
        except BaseException:
            # Some of the writes may have happened: the counts are recounted from the recipients.
            self.mailings_to_recount.update(doc["mailing_id"] for doc in current.values())
            raise
        finally:
            self._allocator.release(numbers)
        result.applied = [change.recipient_id for change in known]
        return result

    async def _update_recipients(self, entries: Sequence[Mapping[str, Any]], changes: Sequence[StatusChange],
                                 current: Mapping[str, dict[str, Any]]) -> None:
        """One update per set of recipients given the same fields, block by block."""
        groups: dict[tuple[Any, ...], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for entry, change in zip(entries, changes, strict=True):
            update = _recipient_update(entry, change)
            key = tuple(sorted((name, repr(value)) for name, value in update.items()))
            groups.setdefault(key, (update, []))[1].append(current[change.recipient_id])
        async with self._db.write_lock:
            for update, docs in groups.values():
                await set_by_block(self._db, docs, {}, update)

    async def details(self, recipients: Iterable[Mapping[str, Any]], with_content: bool = False,
                      ) -> dict[str, dict[str, Any]]:
        """Each recipient's details (reply, SMTP log; its stored message with ``with_content``)
        as its last change logged them; ``recipients`` are documents with ``_id`` and ``log_group``."""
        docs = list(recipients)
        # Recipients never changed have no group: the defaults (or what older versions kept on them).
        found = {doc["_id"]: {name: doc.get(name, default) for name, default in DETAIL_DEFAULTS.items()}
                 for doc in docs}
        projection = {"recipient_id": 1, "record": 1, **({CONTENT: 1} if with_content else {})}
        for group, ids in _ids_by_log_group(docs).items():
            async for entry in self._db.status_log.find({"group": group, "recipient_id": {"$in": ids}}, projection):
                found[entry["recipient_id"]] = {name: entry["record"].get(name, default)
                                                for name, default in DETAIL_DEFAULTS.items()}
                if entry.get(CONTENT) is not None:
                    found[entry["recipient_id"]][CONTENT] = entry[CONTENT]
        return found

    async def drop_customized_content(self, recipients: Iterable[Mapping[str, Any]]) -> None:
        """Forget the stored messages of these recipients (delete_customized_content)."""
        async with self._db.write_lock:
            for group, ids in _ids_by_log_group(recipients).items():
                await self._db.status_log.update_many({"group": group, "recipient_id": {"$in": ids}},
                                                      {"$unset": {CONTENT: ""}})

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
        entries = await self._db.status_log.find(find, {CONTENT: 0}).sort("_id", 1).limit(limit).to_list()
        next_cursor = entries[-1]["_id"] if len(entries) == limit else horizon
        return entries, next_cursor

    async def purge_before(self, cutoff: datetime.datetime) -> int:
        """Delete the log groups older than ``cutoff`` that no recipient's details point at."""
        # Entries of versions that kept the details on the recipients have no group.
        deleted = (await self._db.status_log.delete_many({"logged_at": {"$lt": cutoff},
                                                          "group": {"$exists": False}})).deleted_count
        old_groups = set(await self._db.status_log.distinct("group", {"logged_at": {"$lt": cutoff}}))
        if not old_groups:
            return deleted
        unused = sorted(old_groups - set(await self._db.recipients.distinct("log_group")))
        for start in range(0, len(unused), PURGE_CHUNK):
            result = await self._db.status_log.delete_many({"group": {"$in": unused[start:start + PURGE_CHUNK]}})
            deleted += result.deleted_count
        return deleted


def _ids_by_log_group(recipients: Iterable[Mapping[str, Any]]) -> dict[Any, list[str]]:
    """The recipients that have a log group (a change logged), by group."""
    return ids_by((doc["log_group"], doc["_id"]) for doc in recipients if doc.get("log_group"))


def _log_entry(seq: int, change: StatusChange, old: Mapping[str, Any], now: datetime.datetime,
               group: int) -> dict[str, Any]:
    record = {name: change.fields.get(name, old.get(name, DETAIL_DEFAULTS.get(name))) for name in STATUS_FIELDS}
    record["status"] = change.status
    record["modified"] = now
    entry = {"_id": seq, "recipient_id": change.recipient_id, "mailing_id": old["mailing_id"], "group": group,
             "test": bool(old.get("test")), "status": change.status, "logged_at": now, "record": record}
    if change.fields.get(CONTENT) is not None:
        entry[CONTENT] = change.fields[CONTENT]
    return entry


def _recipient_update(entry: Mapping[str, Any], change: StatusChange) -> dict[str, Any]:
    """The logged fields the recipient keeps, plus the change's other fields (e.g. ending a lease)."""
    update = {**change.fields, **entry["record"], "log_group": entry["group"]}
    for name in ("email", CONTENT, *DETAIL_DEFAULTS):
        update.pop(name, None)
    return update
