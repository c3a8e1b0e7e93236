"""The change log that cursors read: every recipient status change, numbered, in pages.

Every change gets a sequence number. The changes one write makes to one block are one *page*
(``_id`` = its first number, ``last`` = its last; the entries themselves one compressed blob),
so a report of hundreds of recipients is one log write. A page also holds each change's
*details* (reply, SMTP log): a recipient's state points at the page of its last change, where
:meth:`StatusLog.entries` finds them.

Writers run concurrently and may finish out of order, so a reader must never move its cursor
past a number that is still being written: :class:`SequenceAllocator` tracks the numbers in
flight and exposes the *horizon*, the highest number below which every change is committed
(or abandoned). Readers only read up to the horizon, so a cursor never skips a late commit.
Numbers are reserved from the database, contiguously, so they only grow, across restarts too:
a cursor handed out before a restart stays valid after it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import bson
from pymongo.errors import DuplicateKeyError

from cloudmailing.common.recent import keep_recent
from cloudmailing.storage import counters
from cloudmailing.storage.database import SEQS_PER_BUCKET, Database

log = logging.getLogger(__name__)

SEQUENCE_COUNTER = "status_seq"
RESERVE = 10_000  # numbers reserved from the database at a time
NO_LIMIT = 2**62
_PAGES_KEPT = 4  # decoded pages kept: a cursor reads the rest of its last page, the read ahead the same

# The fields of a recipient that a status report shows (API.md, "recipient status struct").
STATUS_FIELDS = ("email", "status", "reply_code", "reply_enhanced_code", "reply_text", "smtp_log",
                 "modified", "first_try", "next_try", "try_count", "in_progress", "cloud_client")
# The details a change may leave unsaid (then the last ones stay), with their values before any try.
DETAIL_DEFAULTS: dict[str, Any] = {"reply_code": None, "reply_enhanced_code": "", "reply_text": "",
                                   "smtp_log": "", "cloud_client": ""}


class PageTaken(RuntimeError):
    """A page was to be written where another one is (a bug: numbers are handed out once)."""


class SequenceAllocator:
    """Hands out change numbers and knows the horizon below which all are committed.

    Several masters may write one log. Each reserves a range of numbers at a time, and a master
    with a ``writer_key`` keeps a *floor* document in ``log_writers``: its range, and the lowest
    number it may still write. Another master's reader stops below every floor, and below the
    counter as read before the floors (a range reserved after that lies above it). A floor is
    written before its range is reserved, raised by :meth:`publish` as writes end; a master
    with nothing in flight while others run gives up the rest of its range (an empty *filler*
    page covers it, so readers step over it without a search) and withdraws its floor. A dead
    master's floor stays until the master that recovers it has deleted its orphan pages.
    """

    def __init__(self, database: Database, writer_key: str | None = None) -> None:
        self._db = database
        self.writer_key = writer_key  # None: the only writer (cm-admin storage, tests): no floor
        self._next = 1
        self._range_start = 1
        self._reserved_end = 0  # last number reserved in the database
        self._in_flight: set[int] = set()  # first number of each range being written
        self._drained = asyncio.Event()  # set whenever nothing is in flight
        self._drained.set()
        self._reserve_lock = asyncio.Lock()
        self._published: tuple[int, int] | None = None  # (floor, end) as last written
        self._reserving_from: int | None = None  # the first number of a range being reserved
        # Covers numbers given up with an empty page (set by the StatusLog of this allocator).
        self.fill: Callable[[int, int], Awaitable[None]] | None = None

    async def start(self) -> None:
        """Continue after every number any earlier process may have handed out."""
        self._reserved_end = await counters.current(self._db, SEQUENCE_COUNTER)
        self._next = self._range_start = self._reserved_end + 1

    async def allocate(self, count: int, above: int = 0) -> int:
        """The first of ``count`` consecutive numbers, all above ``above``, in flight until
        :meth:`release`. ``above``: the newest page of the block written, maybe numbered in
        another master's range, above this one's. Then the rest of this range is given up for a
        new one, above every range reserved so far: a block's pages follow its commit order."""
        async with self._reserve_lock:
            if self._next + count - 1 > self._reserved_end or self._next <= above:
                await self._reserve(count)
            first = self._next
            self._next += count
            self._in_flight.add(first)
            self._drained.clear()
            return first

    async def _reserve(self, count: int) -> None:
        """A new range; the numbers in flight end first, so a floor covers one range only (what
        a recovery checks lies in it, never in another master's)."""
        await self._drained.wait()
        await self._give_up_rest()
        wanted = max(RESERVE, count)
        try:
            async with self._db.locks.hold(("counter", SEQUENCE_COUNTER)):
                start = await counters.current(self._db, SEQUENCE_COUNTER) + 1
                self._reserving_from = start  # this process's readers stop below it from now on
                await self._write_floor(start, start + wanted - 1)
                end = await counters.add_held(self._db, SEQUENCE_COUNTER, wanted)
            self._next = self._range_start = end - wanted + 1
            self._reserved_end = end
        finally:
            self._reserving_from = None

    def release(self, first: int) -> None:
        self._in_flight.discard(first)
        if not self._in_flight:
            self._drained.set()

    async def _give_up_rest(self) -> None:
        """The numbers left in the range will not be used: a filler page covers them."""
        if self._next <= self._reserved_end and self.fill is not None:
            await self.fill(self._next, self._reserved_end)
        self._next = self._range_start = self._reserved_end + 1

    @property
    def horizon(self) -> int:
        """Every change this process numbered up to this is committed or abandoned (holding no
        range, it writes nothing below the counter's next value: no limit of its own)."""
        if self._in_flight:
            return min(self._in_flight) - 1
        if self._next <= self._reserved_end:
            return self._next - 1
        # Reserving: the counter may already count the new range, not yet ours to hand out.
        return NO_LIMIT if self._reserving_from is None else self._reserving_from - 1

    async def readable(self) -> int:
        """The horizon across every master: where a reader stops."""
        counted = await counters.current(self._db, SEQUENCE_COUNTER)  # first: see the class
        floors = [doc["floor"] for doc in await writer_floors(self._db) if doc["_id"] != self.writer_key]
        return min([self.horizon, counted, *(floor - 1 for floor in floors)])

    async def publish(self, others_running: bool) -> None:
        """Raise this master's floor to what it still may write; with ``others_running`` and
        nothing in flight, give up the rest of the range (their readers wait for it)."""
        if self.writer_key is None:
            return
        async with self._reserve_lock:
            if others_running and not self._in_flight and self._published is not None:
                await self._give_up_range()
                return
            floor = min(self._in_flight) if self._in_flight else self._next
            if self._published is not None and self._published[0] != floor:
                await self._write_floor(floor, self._reserved_end)

    async def _write_floor(self, floor: int, end: int) -> None:
        if self.writer_key is not None:
            await self._db.log_writers.replace_one({"_id": self.writer_key}, {"floor": floor, "end": end},
                                                   upsert=True)
            self._published = (floor, end)

    async def withdraw(self) -> None:
        """At a clean stop, nothing in flight: the rest of the range is given up, the floor goes
        (under the reservation's lock: no number is handed out meanwhile)."""
        async with self._reserve_lock:
            if self.writer_key is not None and self._published is not None and not self._in_flight:
                await self._give_up_range()

    async def _give_up_range(self) -> None:
        """Nothing in flight: the rest of the range under a filler, then no floor (the caller
        holds the reservation's lock)."""
        assert self.writer_key is not None
        await self._give_up_rest()
        await drop_floor(self._db, self.writer_key)
        self._published = None


async def writer_floors(database: Database) -> list[dict[str, Any]]:
    """Every floor document: ``_id`` (the writer's key), ``floor`` and ``end``."""
    return await database.log_writers.find({}).to_list()


async def drop_floor(database: Database, writer_key: str) -> None:
    await database.log_writers.delete_one({"_id": writer_key})


@dataclass(frozen=True)
class LogPage:
    """One write's changes: ``entries`` are dicts with ``q`` (number), ``id``, ``b``/``s`` (block,
    slot), ``t`` (test) and ``r`` (the status record)."""

    first: int
    mailing_id: int
    logged_at: datetime.datetime
    entries: Sequence[Mapping[str, Any]]
    end: int | None = None  # a filler's last number (it has no entries)

    @property
    def last(self) -> int:
        return self.end if self.end is not None else self.first + len(self.entries) - 1

    def document(self) -> dict[str, Any]:
        blob = zlib.compress(bson.encode({"e": list(self.entries)}), 1)
        return {"_id": self.first, "last": self.last, "m": self.mailing_id, "at": self.logged_at,
                "z": bson.Binary(blob)}

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> LogPage:
        entries = bson.decode(zlib.decompress(doc["z"]))["e"]
        return cls(first=doc["_id"], mailing_id=doc["m"], logged_at=doc["at"], entries=entries,
                   end=None if entries else doc["last"])


async def _pages(documents: Any) -> Any:
    async for doc in documents:
        yield LogPage.from_document(doc)


def bucket_of(seq: int) -> int:
    return seq // SEQS_PER_BUCKET


class StatusLog:
    """Writes log pages and reads them back for cursors and details."""

    def __init__(self, database: Database, allocator: SequenceAllocator) -> None:
        self._db = database
        self.allocator = allocator
        allocator.fill = self.insert_filler
        # The last pages read, decoded (a page does not change once written; deleted ones leave).
        self._recent: OrderedDict[int, LogPage] = OrderedDict()

    async def insert(self, page: LogPage) -> None:
        """Write ``page`` (again after a crash: the same page already there is left as it is;
        another one there, a filler say, is an error: the change would be lost)."""
        collection = await self._db.bucket("status_log", bucket_of(page.first))
        try:
            await collection.insert_one(page.document())
        except DuplicateKeyError:
            there = await collection.find_one({"_id": page.first}, {"last": 1, "m": 1})
            if there is None or (there["last"], there["m"]) != (page.last, page.mailing_id):
                raise PageTaken(f"change number {page.first} is already another page's: {there}") from None

    async def insert_filler(self, first: int, last: int) -> None:
        """An empty page over numbers no change will have: readers step over it."""
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        try:
            await self.insert(LogPage(first=first, mailing_id=0, logged_at=now, entries=[], end=last))
        except PageTaken:
            there = await self._db.existing_bucket("status_log", bucket_of(first)).find_one({"_id": first}, {"m": 1})
            if there is None or there["m"] != 0:
                raise
            # Another filler starts there (a recovery's, over a range its master had given up part of).

    async def delete_page(self, first: int) -> None:
        self._recent.pop(first, None)
        collection = self._db.existing_bucket("status_log", bucket_of(first))
        await collection.delete_one({"_id": first})

    async def pages_between(self, floor: int, ceiling: int) -> list[LogPage]:
        """The pages of changes numbered above ``floor`` up to ``ceiling``, fillers left out (a
        search: at start-up and in a dead master's recovery only)."""
        found = []
        for bucket in await self._db.bucket_numbers("status_log"):
            if bucket_of(floor) <= bucket <= bucket_of(ceiling):
                collection = self._db.existing_bucket("status_log", bucket)
                query = {"_id": {"$gt": floor, "$lte": ceiling}}
                found += [page async for page in _pages(collection.find(query)) if page.entries]
        return found

    async def page(self, first: int) -> LogPage | None:
        if first in self._recent:
            self._recent.move_to_end(first)
            return self._recent[first]
        collection = self._db.existing_bucket("status_log", bucket_of(first))  # never created by a read
        doc = await collection.find_one({"_id": first})
        if doc is None:
            return None
        page = LogPage.from_document(doc)
        keep_recent(self._recent, first, page, _PAGES_KEPT)
        return page

    async def entries(self, refs: Iterable[tuple[int, int]]) -> dict[int, Mapping[str, Any]]:
        """The entries numbered ``seq`` of pages ``page`` for each (page, seq), by number."""
        wanted: dict[int, set[int]] = {}
        for page_id, seq in refs:
            wanted.setdefault(page_id, set()).add(seq)
        found: dict[int, Mapping[str, Any]] = {}
        for page_id, seqs in wanted.items():
            page = await self.page(page_id)
            if page is not None:
                found.update((entry["q"], entry) for entry in page.entries if entry["q"] in seqs)
        return found

    async def read_since(self, page_id: int, after: int, limit: int, mailing_ids: set[int] | None = None,
                         accept: Callable[[Mapping[str, Any]], bool] | None = None,
                         ) -> tuple[list[Mapping[str, Any]], int, int]:
        """Entries numbered after ``after`` (found from page ``page_id``, 0: unknown), oldest
        first, of ``mailing_ids`` (None: all) that ``accept`` takes, at most ``limit``; with the
        (page, number) to continue from."""
        horizon = await self.allocator.readable()
        found: list[Mapping[str, Any]] = []
        position = after
        while position < horizon:
            page = await self._page_after(page_id, position, horizon)
            if page is None:
                return found, 0, horizon
            page_id = page.first
            if mailing_ids is not None and page.mailing_id not in mailing_ids:
                position = page.last
                continue
            for entry in page.entries:
                if entry["q"] > position:
                    position = entry["q"]
                    if accept is not None and not accept(entry):
                        continue
                    found.append(entry)
                    if len(found) == limit:
                        return found, page_id, position
            position = page.last
        return found, page_id, max(position, 0)

    async def _page_after(self, page_id: int, position: int, horizon: int) -> LogPage | None:
        """The page holding number ``position + 1``, or the first committed one after it."""
        if 0 < page_id <= horizon:  # a cursor's page above the horizon is none we handed out
            current = await self.page(page_id)
            if current is not None and current.last > position:
                return current
        following = await self.page(position + 1)
        if following is not None:
            return following
        return await self._first_page_holding_or_after(position + 1, horizon)

    async def _first_page_holding_or_after(self, seq: int, horizon: int) -> LogPage | None:
        """Past a gap (an abandoned write, or a cursor from before pages): a search, rare."""
        for bucket in range(max(bucket_of(seq) - 1, 0), bucket_of(horizon) + 1):
            collection = self._db.existing_bucket("status_log", bucket)
            holding = await collection.find_one({"_id": {"$lt": seq}, "last": {"$gte": seq}})
            if holding is None:
                holding = await collection.find_one({"_id": {"$gte": seq, "$lte": horizon}}, sort=[("_id", 1)])
            if holding is not None:
                return LogPage.from_document(holding)
        return None

    async def delete_mailing(self, mailing_id: int) -> None:
        self._recent.clear()
        for bucket in await self._db.bucket_numbers("status_log"):
            await self._db.existing_bucket("status_log", bucket).delete_many({"m": mailing_id})

    async def purge_before(self, cutoff: datetime.datetime, referenced: set[int]) -> int:
        """Delete the pages logged before ``cutoff`` that no recipient's details point at
        (``referenced``: page ids); drop buckets left empty."""
        deleted = 0
        self._recent.clear()
        for bucket in await self._db.bucket_numbers("status_log"):
            collection = self._db.existing_bucket("status_log", bucket)
            old = [doc["_id"] async for doc in collection.find({"at": {"$lt": cutoff}}, {"_id": 1})]
            unused = [page_id for page_id in old if page_id not in referenced]
            for start in range(0, len(unused), 500):
                deleted += (await collection.delete_many({"_id": {"$in": unused[start:start + 500]}})).deleted_count
            if bucket < bucket_of(await self.allocator.readable()) and not await collection.find_one({}, {"_id": 1}):
                await self._db.drop_bucket("status_log", bucket)
        return deleted
