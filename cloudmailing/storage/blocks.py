"""Recipients stored in blocks: the unit of storage, leasing and reporting.

A mailing's recipients are kept in blocks of up to :data:`MAX_RECIPIENTS` (and about
:data:`MAX_BYTES` of data). Each block has three documents, all found by ``_id``:

- its *content* (``block_content_<bucket>``): every recipient's id, address, personalization
  data and attachments, written at ingest and read when the block is leased;
- its *state* (``block_state_<bucket>``): the delivery state of each recipient (status, lease
  flag, tries, times, where its last change is logged), the block's lease, and a ``version``
  that every write checks and increments (optimistic concurrency: a write that finds another
  version re-reads and tries again);
- its *summary*: a few numbers derived from the state (how many are ready, when the next retry
  is due, who holds the lease until when, counts per status). This small document is all the
  dispatcher searches, so finding work never reads recipients. It lives in ``blocks`` while the
  block has recipients to deliver or a lease, in ``blocks_done`` once it has neither: what the
  dispatcher searches stays the size of the work in flight, not of every mailing ever sent (on
  FerretDB v1, which reads a whole collection for any search, that is what a search costs).

The state is the truth; the summary is rewritten after it, and rebuilt from it at start-up
when a crash came between the two (:meth:`BlockStore.repair_summary`). A summary carries the
version of the state it was made from (``sv``) and no write replaces or deletes a newer one, so
another master's late write cannot put an older summary back. A crash while a summary moves
between the two collections may leave it in both: readers keep the newer.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Sequence

import bson
from pymongo.errors import DuplicateKeyError

from cloudmailing.common.recent import keep_recent
from cloudmailing.common.statuses import PENDING_STATUSES, READY, WARNING
from cloudmailing.storage import counters
from cloudmailing.storage.block_codec import (
    STATUS_CODES,
    StateColumns,
    decode_content,
    decode_state,
    encode_content,
    encode_state,
    from_millis,
    to_millis,
)
from cloudmailing.storage.database import BLOCKS_PER_BUCKET, Database

MAX_RECIPIENTS = 500
MAX_BYTES = 4 * 1024 * 1024
BLOCK_ID_COUNTER = "block_id"
# A state names the log pages of its writes above the logged floor (start-up checks those only,
# so it must find every committed one named). Past RECENT_PAGES of them the floor is saved again
# first; past MAX_NAMED_PAGES (the floor held back: a write in flight, a dead master not yet
# recovered) the write is refused, to be retried: the state stays small.
RECENT_PAGES = 64
MAX_NAMED_PAGES = 1024
LOGGED_FLOOR_COUNTER = "logged_floor"  # every log page numbered up to this is in the log
_BATCH = 8  # summaries per batch of the search for due retries
_FREE_KEPT = 4096  # free block ids one search leaves for the next leases of its scope
_FREE_SECONDS = 30  # ... for at most this long: blocks freed since are found by the next search
_FREE_SCOPES = 16  # scopes (mailings, test or not) whose free blocks are kept
_ADDRESS_CACHE_BLOCKS = 32  # blocks whose (id, email) the master keeps: more than a few leases in flight
_STATE_CACHE_BLOCKS = 64  # block states this master last wrote or read, kept to edit them again


@dataclass
class Lease:
    id: str
    owner: str
    until: datetime.datetime


@dataclass
class Block:
    """A block's state as read, to be changed and saved."""

    id: int
    mailing_id: int
    test: bool
    version: int
    columns: StateColumns
    lease: Lease | None = None
    recent_pages: list[int] = field(default_factory=list)  # the log pages of its last writes

    def name_page(self, first: int, floor: int) -> None:
        """This write logs page ``first``: start-up tells it from an orphan (see storage.ledger).
        Pages up to ``floor`` (a logged floor saved) are final: their names go."""
        self.recent_pages = [*(page for page in self.recent_pages if page > floor), first]

    def pages_above(self, floor: int) -> int:
        return sum(1 for page in self.recent_pages if page > floor)

    def newest_page(self) -> int:
        """The number of its last write's page (0: none named)."""
        return max(self.recent_pages, default=0)

    def leased_slots(self) -> list[int]:
        return [slot for slot, flag in enumerate(self.columns.leased) if flag]

    def deliverable(self, now: datetime.datetime) -> list[int]:
        """Slots that may be leased now: READY, or WARNING whose retry is due; none leased."""
        cols, due = self.columns, to_millis(now)
        return [slot for slot in range(len(cols)) if not cols.leased[slot]
                and (cols.status_of(slot) == READY or (cols.status_of(slot) == WARNING and cols.next_try[slot] <= due))]

    def is_done(self, counts: Mapping[str, int] | None = None) -> bool:
        """Nothing left to deliver and no lease: its summary is with the done ones. ``counts``:
        its columns' counts, when the caller has them."""
        counts = self.columns.counts() if counts is None else counts
        return self.lease is None and not any(counts.get(status) for status in PENDING_STATUSES)

    def summary(self) -> dict[str, Any]:
        cols = self.columns
        leased = cols.leased.tobytes().count(1)
        free = [slot for slot, flag in enumerate(cols.leased) if not flag] if leased else range(len(cols))
        ready_code, warning_code = STATUS_CODES[READY], STATUS_CODES[WARNING]
        ready = sum(1 for slot in free if cols.status[slot] == ready_code)
        due = min((cols.next_try[slot] for slot in free if cols.status[slot] == warning_code), default=0)
        counts = cols.counts()
        held = self.lease is not None
        # Booleans for what the dispatcher searches: FerretDB hands equalities to PostgreSQL.
        return {"_id": self.id, "m": self.mailing_id, "test": self.test, "n": len(cols), "sv": self.version,
                "open": any(counts.get(status) for status in PENDING_STATUSES), "ready": ready,
                "free": bool(ready) and not held, "retry": bool(due), "held": held,
                "due": from_millis(due), "leased": leased, "owner": self.lease.owner if self.lease else None,
                "until": self.lease.until if self.lease else None, "counts": counts}


def bucket_of(block_id: int) -> int:
    return block_id // BLOCKS_PER_BUCKET


class BlockStore:
    """Reads and writes blocks; callers that change one hold :meth:`lock` for it."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._addresses: OrderedDict[int, list[tuple[str, str]]] = OrderedDict()
        # The state documents this process last saw, by block id: an edit starts from one without
        # reading it again. If another master wrote since, the save's version check fails, or the
        # edit finds nothing to write (or fails) on it, and it reads the database (load without
        # ``cached``) and decides again; a failed write forgets the block.
        self._states: OrderedDict[int, dict[str, Any]] = OrderedDict()
        # Free blocks found by the last search of each scope, not tried yet, when it ran and
        # whether it found any. On FerretDB every search sends every free block of the scope (it
        # pushes no limit down), so searching at each lease cost a time quadratic in the size.
        self._free: OrderedDict[tuple[tuple[int, ...] | None, bool], _FreeBlocks] = OrderedDict()

    def lock(self, block_id: int) -> Any:
        return self._db.locks.hold(("block", block_id))

    async def new_id(self) -> int:
        return await counters.increment(self._db, BLOCK_ID_COUNTER)

    # -- content ------------------------------------------------------------------------------

    async def write_content(self, block_id: int, mailing_id: int, recipients: list[dict[str, Any]],
                            previous_count: int) -> bool:
        """Write the block's content (all of it); False if its count is no longer ``previous_count``."""
        collection = await self._db.bucket("block_content", bucket_of(block_id))
        doc = {"m": mailing_id, "n": len(recipients), "z": bson.Binary(encode_content(recipients))}
        self._addresses.pop(block_id, None)
        if previous_count == 0:
            await collection.insert_one({"_id": block_id, **doc})
            return True
        result = await collection.update_one({"_id": block_id, "n": previous_count}, {"$set": doc})
        return result.matched_count == 1

    async def content(self, block_id: int) -> list[dict[str, Any]]:
        """Every recipient of the block: ``id``, ``email``, ``domain``, ``contact``, ``attachments``."""
        collection = self._db.existing_bucket("block_content", bucket_of(block_id))
        doc = await collection.find_one({"_id": block_id})
        recipients = decode_content(doc["z"]) if doc else []
        self._remember_addresses(block_id, recipients)
        return recipients

    async def addresses(self, block_id: int, count: int = 0) -> list[tuple[str, str]]:
        """(id, email) of every recipient of the block, from a small cache of recent blocks (read
        again if it has fewer than ``count``: another master added recipients since)."""
        if block_id in self._addresses and len(self._addresses[block_id]) >= count:
            self._addresses.move_to_end(block_id)
            return self._addresses[block_id]
        await self.content(block_id)
        return self._addresses.get(block_id, [])

    def _remember_addresses(self, block_id: int, recipients: list[dict[str, Any]]) -> None:
        keep_recent(self._addresses, block_id, [(r["id"], r["email"]) for r in recipients], _ADDRESS_CACHE_BLOCKS)

    # -- state --------------------------------------------------------------------------------

    async def load(self, block_id: int, cached: bool = False) -> Block | None:
        """The block's state, from the database; with ``cached``, as this process last saw it if it
        still remembers (for an edit: its save checks the version)."""
        doc = self._states.get(block_id) if cached else None
        if doc is None:
            collection = self._db.existing_bucket("block_state", bucket_of(block_id))
            doc = await collection.find_one({"_id": block_id})
            if doc is None:
                return None
            self._remember_state(doc)
        return _block(doc)

    def remembers(self, block_id: int) -> bool:
        """Whether ``load(block_id, cached=True)`` would not read the database."""
        return block_id in self._states

    def _remember_state(self, doc: dict[str, Any]) -> None:
        keep_recent(self._states, doc["_id"], doc, _STATE_CACHE_BLOCKS)

    async def insert(self, block: Block) -> None:
        """A new block's state and summary (inserts: on FerretDB an update first reads the collection)."""
        collection = await self._db.bucket("block_state", bucket_of(block.id))
        doc = {"_id": block.id, **_state_fields(block)}
        await collection.insert_one(doc)
        self._remember_state(doc)
        summary = block.summary()
        await self._summaries(block.is_done(summary["counts"]))[0].insert_one(summary)

    async def save(self, block: Block) -> bool:
        """Write ``block``'s state over the version it was read at; False if another write came
        first. On success its version is the new one; its summary is the caller's to write."""
        collection = self._db.existing_bucket("block_state", bucket_of(block.id))
        fields = _state_fields(block)
        fields["v"] = block.version + 1
        self._states.pop(block.id, None)  # until the database said what it did
        result = await collection.update_one({"_id": block.id, "v": block.version}, {"$set": fields})
        if result.matched_count != 1:
            return False
        block.version += 1
        self._remember_state({"_id": block.id, **fields})
        return True

    async def write_summary(self, block: Block, was_done: bool | None = None) -> None:
        """Write the block's summary where it belongs; ``was_done``: where it was before (None:
        not known, so it is also deleted from the other collection). Each write is guarded by the
        summary's version (``sv``, the state's): a late writer (another master that saved an
        older state) never puts back an older summary, nor deletes a newer one."""
        summary = block.summary()
        done = block.is_done(summary["counts"])
        where, other = self._summaries(done)
        try:
            inserted = (await where.replace_one(_older_than(block), summary, upsert=True)).upserted_id is not None
        except DuplicateKeyError:
            inserted = False  # a summary of this version or a newer one is already there
        if was_done is None or was_done != done:  # after the write: a crash leaves two, never none
            if (await other.delete_one(_misplaced_or_older(block))).deleted_count:
                return  # the old copy moved here
        if inserted and await other.find_one(_newer_than(block), {"_id": 1}):
            # Another master moved the summary there since: the one just written is a stale copy.
            await where.delete_one({"_id": block.id, "sv": block.version})

    def _summaries(self, done: bool) -> tuple[Any, Any]:
        """The collection of summaries done or not, and the other one."""
        return (self._db.blocks_done, self._db.blocks) if done else (self._db.blocks, self._db.blocks_done)

    async def delete(self, block_id: int) -> None:
        for kind in ("block_content", "block_state", "kept_messages"):
            collection = self._db.existing_bucket(kind, bucket_of(block_id))
            await collection.delete_many({"_id": block_id} if kind != "kept_messages" else {"b": block_id})
        await self._db.blocks.delete_one({"_id": block_id})
        await self._db.blocks_done.delete_one({"_id": block_id})
        self._addresses.pop(block_id, None)
        self._states.pop(block_id, None)

    # -- summaries: what the dispatcher and the counts search ------------------------------

    async def leasable(self, mailing_ids: Sequence[int] | None, test: bool, now: datetime.datetime,
                       ) -> AsyncIterator[int]:
        """Ids of blocks (of ``mailing_ids``; None: of any mailing) of test recipients or not,
        likely to have recipients to deliver now and no lease held (the lease's own edit checks):
        due retries first (oldest block first), then free ones, each handed out once from the
        last search of this scope until it is used up or ``_FREE_SECONDS`` old. A caller that
        has enough stops."""
        scope: dict[str, Any] = {"test": test}
        if mailing_ids is not None:
            if not mailing_ids:
                return
            scope["m"] = mailing_ids[0] if len(mailing_ids) == 1 else {"$in": list(mailing_ids)}
        async for doc in self._db.blocks.find({"retry": True, **scope}).sort("_id", 1).batch_size(_BATCH):
            if doc["due"] <= now and (not doc["owner"] or doc["until"] < now):
                yield doc["_id"]
        key = (None if mailing_ids is None else tuple(sorted(mailing_ids)), test)
        searched = self._free.get(key)
        if searched is None or searched.used_up() or now - searched.at > datetime.timedelta(seconds=_FREE_SECONDS):
            found = [doc["_id"] async for doc in self._db.blocks.find({"free": True, **scope}, {"_id": 1})]
            searched = _FreeBlocks(now, deque(found[:_FREE_KEPT]), bool(found))
            keep_recent(self._free, key, searched, _FREE_SCOPES)
        free = searched.ids
        while free:
            yield free.popleft()

    def put_back(self, mailing_ids: Sequence[int] | None, test: bool, block_ids: Sequence[int]) -> None:
        """Hand ``block_ids`` (from :meth:`leasable` of this scope, in that order) out again, first:
        the caller took nothing from them (its domain affinity) and they are still free for others."""
        searched = self._free.get((None if mailing_ids is None else tuple(sorted(mailing_ids)), test))
        if searched is not None:
            searched.ids.extendleft(reversed(block_ids))

    def forget_free(self) -> None:
        """Blocks may have become free (recipients added, a mailing started, leases returned):
        the next lease searches again."""
        self._free.clear()

    async def held_by(self, owner: str) -> list[dict[str, Any]]:
        return await self._db.blocks.find({"owner": owner}).to_list()

    async def lease_expired(self, now: datetime.datetime) -> list[dict[str, Any]]:
        return [doc async for doc in self._db.blocks.find({"held": True}) if doc["until"] < now]

    async def of_mailing(self, mailing_id: int) -> AsyncIterator[dict[str, Any]]:
        """The summaries of the mailing's blocks, done or not, in block order."""
        for summary in await self._both({"m": mailing_id}):
            yield summary

    async def tail(self, mailing_id: int, test: bool) -> dict[str, Any] | None:
        """The summary of the mailing's newest block of this kind."""
        newest = [doc for collection in (self._db.blocks, self._db.blocks_done)
                  for doc in await collection.find({"m": mailing_id, "test": test}).sort("_id", -1).limit(1).to_list()]
        return max(newest, key=lambda doc: (doc["_id"], doc.get("sv", 0)), default=None)

    async def counts(self, mailing_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """Per-status recipient counts of each mailing, summed over its blocks' summaries (the
        repair's recount: the mailing documents keep them up to date); test blocks left out."""
        query = {"m": {"$in": list(mailing_ids)}, "test": False}
        totals: dict[int, dict[str, int]] = {}
        for doc in await self._both(query, {"m": 1, "counts": 1, "sv": 1}):
            mailing = totals.setdefault(doc["m"], {})
            for status, count in (doc.get("counts") or {}).items():
                mailing[status] = mailing.get(status, 0) + count
        return totals

    async def _both(self, query: dict[str, Any], fields: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """Summaries matching ``query`` in both collections, by block id; of a block found in
        both (a crash while it moved), the newer."""
        found: dict[int, dict[str, Any]] = {}
        for collection in (self._db.blocks, self._db.blocks_done):
            async for doc in collection.find(query, fields):
                kept = found.get(doc["_id"])
                if kept is None or doc.get("sv", 0) > kept.get("sv", 0):
                    found[doc["_id"]] = doc
        return [found[block_id] for block_id in sorted(found)]

    async def leased_count(self, owner: str) -> int:
        return sum(doc.get("leased", 0) for doc in await self.held_by(owner))

    # -- recovery and repair --------------------------------------------------------------

    async def all_states(self) -> AsyncIterator[Block]:
        for bucket in await self._db.bucket_numbers("block_state"):
            async for doc in self._db.existing_bucket("block_state", bucket).find({}):
                yield _block(doc)

    async def repair_summary(self, block_id: int) -> Block | None:
        """Rewrite the block's summary if it trails its state, and drop a copy left in the other
        collection; the state."""
        block = await self.load(block_id)
        if block is not None:
            await self.write_summary(block)  # a current summary stays; the other copy goes
        return block

    async def repair_searched(self) -> list[Block]:
        """Repair every summary among the searched ones (the work in flight: start-up's cost stays
        that small): done ones written before there were two collections, or left there by a crash
        while they moved, go to the done ones. The blocks repaired."""
        repaired = []
        for block_id in [doc["_id"] async for doc in self._db.blocks.find({}, {"_id": 1})]:
            async with self.lock(block_id):  # other masters may be writing it
                block = await self.repair_summary(block_id)
            if block is not None:
                repaired.append(block)
        return repaired

    async def logged_floor(self) -> int:
        return await counters.current(self._db, LOGGED_FLOOR_COUNTER)

    async def set_logged_floor(self, floor: int) -> None:
        await counters.set_at_least(self._db, LOGGED_FLOOR_COUNTER, floor)

    async def referenced_pages(self) -> set[int]:
        """Every log page a recipient's latest details are on."""
        pages: set[int] = set()
        async for block in self.all_states():
            pages.update(page for page in block.columns.last_page if page)
        return pages


@dataclass
class _FreeBlocks:
    """What a search for free blocks found (``ids``: those not handed out yet)."""

    at: datetime.datetime
    ids: deque[int]
    found_any: bool  # none found: nothing to search for until forget_free or _FREE_SECONDS

    def used_up(self) -> bool:
        return self.found_any and not self.ids


def _older_than(block: Block) -> dict[str, Any]:
    """The block's summary if it is older than ``block``'s state."""
    return {"_id": block.id, "sv": {"$lt": block.version}}


def _newer_than(block: Block) -> dict[str, Any]:
    return {"_id": block.id, "sv": {"$gt": block.version}}


def _misplaced_or_older(block: Block) -> dict[str, Any]:
    """A copy of the summary in the other collection that ``block``'s overrides: older, or of
    the same version (its place is decided by the state, so that copy is in the wrong one)."""
    return {"_id": block.id, "sv": {"$lte": block.version}}


def _state_fields(block: Block) -> dict[str, Any]:
    lease = None if block.lease is None else {"id": block.lease.id, "owner": block.lease.owner,
                                              "until": block.lease.until}
    return {"m": block.mailing_id, "test": block.test, "n": len(block.columns), "v": block.version,
            "lease": lease, "pages": block.recent_pages, "z": bson.Binary(encode_state(block.columns))}


def _block(doc: Mapping[str, Any]) -> Block:
    lease = doc.get("lease")
    return Block(id=doc["_id"], mailing_id=doc["m"], test=bool(doc.get("test")), version=doc["v"],
                 columns=decode_state(doc["z"], doc["n"]),
                 lease=Lease(lease["id"], lease["owner"], lease["until"]) if lease else None,
                 recent_pages=list(doc.get("pages") or []))
