"""Adding recipients: a batch goes into the mailing's newest block while it has room, then into
new blocks, all or nothing.

A batch is announced in ``ingest_batches`` (with each block's recipient count before it) before
any of it is written, and forgotten once it is all in. A write that fails part-way rolls the batch
back at once, under the locks it still holds (its blocks are locked from the start: a lease of
one waits, then finds it gone). A batch still announced later was cut by a crash, or its rollback
failed too: the next batch into the mailing rolls it back first (under the ingest lock no other
batch of it is under way), or start-up does (:meth:`RecipientWriter.roll_back_cut_batches`). So a
batch the API never acknowledged leaves nothing behind, and never cuts an acknowledged one away.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import uuid
from dataclasses import dataclass
from typing import AbstractSet, Any, AsyncIterator, Sequence

import bson

from cloudmailing.common.statuses import MAILING_FINISHED, READY
from cloudmailing.storage.block_codec import VOID, StateColumns
from cloudmailing.storage.blocks import MAX_BYTES, MAX_RECIPIENTS, Block, BlockStore
from cloudmailing.storage.database import Database
from cloudmailing.storage.ledger import recount_under_lock
from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.recipient_index import Place, RecipientIndex, generated_id

log = logging.getLogger(__name__)


# Set on a mailing being deleted, under its ingest locks (see Stores.delete_mailing).
DELETING = "deleting"


class MailingFinished(Exception):
    """The mailing became FINISHED before the batch could be stored: nothing was written."""


class MailingGone(MailingFinished):
    """The mailing was deleted, or is being deleted, before the batch could be stored: nothing
    was written. (A MailingFinished, so a caller that knows only that one still refuses.)"""


@dataclass
class NewRecipient:
    """A validated recipient; ``client_id`` is the client's tracking_id, if it gave one."""

    email: str
    domain: str
    contact: dict[str, Any]
    attachments: list[dict[str, Any]]
    client_id: str | None = None


@dataclass
class _Fill:
    """Recipients going into one block, after its ``before`` existing ones."""

    block_id: int
    before: int
    existing: list[dict[str, Any]]
    added: list[dict[str, Any]]


class RecipientWriter:
    def __init__(self, database: Database, blocks: BlockStore, index: RecipientIndex,
                 mailings: MailingStore, block_recipients: int = MAX_RECIPIENTS) -> None:
        self._db = database
        self._block_recipients = block_recipients
        # (mailing, test) -> its newest block and how many it holds: a batch finds where to go
        # without a search (several masters: a stale entry only fills an older block).
        self._tails: dict[tuple[int, bool], tuple[int, int]] = {}
        self._blocks = blocks
        self._index = index
        self._mailings = mailings

    async def append(self, mailing_id: int, test: bool, recipients: Sequence[NewRecipient],
                     now: datetime.datetime) -> list[str | None]:
        """Store ``recipients``; the id of each, or None where its client id already exists."""
        if not recipients:
            return []
        async with self._db.locks.hold(("ingest", mailing_id, test)):
            await self._roll_back_leftovers(mailing_id, test)
            fills = await self._place(mailing_id, test, recipients)
            # Lock order: blocks (ascending), then their mailing's counts (as the ledger takes them).
            async with self._hold_blocks(fills), self._mailings.counts_lock(mailing_id):
                await self._check_open(mailing_id, test)
                return await self._store(mailing_id, test, recipients, fills, now)

    @contextlib.asynccontextmanager
    async def _hold_blocks(self, fills: list[_Fill]) -> AsyncIterator[None]:
        """Every block of the batch, the new ones too: a new block is searchable once its summary
        is in, and a lease of it must wait until the batch is all in or rolled back."""
        async with contextlib.AsyncExitStack() as stack:
            for block_id in sorted(fill.block_id for fill in fills):
                await stack.enter_async_context(self._blocks.lock(block_id))
            yield

    async def _check_open(self, mailing_id: int, test: bool) -> None:
        """Under the lock that finishing a mailing takes too: a mailing finished since the caller
        looked gets nothing (its READY recipients would never be sent); and under the ingest lock,
        which deleting it takes to mark it: one being deleted gets nothing either (test batches
        included), for its blocks are deleted already or about to be."""
        mailing = await self._mailings.get(mailing_id)
        if mailing is None or mailing.get(DELETING):
            raise MailingGone(mailing_id)
        if not test and mailing["status"] == MAILING_FINISHED:
            raise MailingFinished(mailing_id)

    async def _store(self, mailing_id: int, test: bool, recipients: Sequence[NewRecipient], fills: list[_Fill],
                     now: datetime.datetime) -> list[str | None]:
        holder = self._db.locks.shared.holder if self._db.locks.shared is not None else None
        cuts = [{"b": fill.block_id, "before": fill.before} for fill in fills]
        batch: dict[str, Any] = {"_id": uuid.uuid4().hex, "m": mailing_id, "test": test, "at": now,
                                 "holder": holder, "blocks": cuts}
        places = [(entry["id"], Place(fill.block_id, fill.before + slot))
                  for fill in fills for slot, entry in enumerate(fill.added)]
        client = [(i, place) for i, (place, recipient) in enumerate(zip(places, recipients, strict=True))
                  if recipient.client_id is not None]
        try:
            await self._db.ingest_batches.insert_one(batch)
            duplicates = await self._index.insert(mailing_id, [place for _, place in client], batch["_id"])
            void = {client[position][0] for position in duplicates}
            await self._write(mailing_id, test, fills, void, now)
            if not test:  # test recipients (send_test) are not in the mailing's totals
                await self._mailings.add_counts(mailing_id, {READY: len(recipients) - len(void)})
            await self._db.ingest_batches.delete_one({"_id": batch["_id"]})
        except BaseException:
            await self._roll_back_failed(batch)
            raise
        return [None if i in void else rid for i, (rid, _) in enumerate(places)]

    async def _roll_back_failed(self, batch: dict[str, Any]) -> None:
        """Undo a batch whose write failed, at once (the caller holds all its locks): its blocks
        would otherwise be leased and delivered uncounted, and the client's retry refused. If
        this fails too, the batch stays announced for the next batch or start-up."""
        try:
            await self._undo(batch, locked=True)
            if not batch["test"]:
                await self._recount(batch["m"])  # its counts may or may not have been added
        except Exception:
            log.exception("a failed batch of recipients could not be rolled back yet",
                          extra={"mailing": batch["m"]})

    async def _roll_back_leftovers(self, mailing_id: int, test: bool) -> None:
        """Batches of this mailing and kind still announced: under their ingest lock none is
        under way, so each was cut (its rollback failed, or its master died). Rolled back
        before this batch goes in: a later rollback would cut the tail block under it."""
        for batch in await self._db.ingest_batches.find({"m": mailing_id, "test": test}).to_list():
            await self._undo(batch, locked=False)
            if not test:
                async with self._mailings.counts_lock(mailing_id):
                    await self._recount(mailing_id)
            log.warning("rolled back an unacknowledged batch of recipients", extra={"mailing": mailing_id})

    async def _recount(self, mailing_id: int) -> None:
        await recount_under_lock(self._blocks, self._mailings, mailing_id)

    async def _tail(self, mailing_id: int, test: bool) -> tuple[int, int] | None:
        """The mailing's newest block of this kind and its size, remembered from the last batch."""
        if (mailing_id, test) not in self._tails:
            summary = await self._blocks.tail(mailing_id, test)
            if summary is None:
                return None
            self._tails[(mailing_id, test)] = (summary["_id"], summary["n"])
        return self._tails[(mailing_id, test)]

    async def _place(self, mailing_id: int, test: bool, recipients: Sequence[NewRecipient]) -> list[_Fill]:
        """Which block and slot each recipient goes to; their ids."""
        fills: list[_Fill] = []
        tail = await self._tail(mailing_id, test)
        current: _Fill | None = None
        size = 0
        if tail is not None and tail[1] < self._block_recipients:
            existing = await self._blocks.content(tail[0])
            current = _Fill(tail[0], len(existing), existing, [])
            size = len(bson.encode({"r": existing}))
            fills.append(current)
        for recipient in recipients:
            entry = {"email": recipient.email, "domain": recipient.domain, "contact": recipient.contact,
                     "attachments": recipient.attachments}
            entry_size = len(bson.encode(entry)) + 100
            full = current is None or current.before + len(current.added) >= self._block_recipients
            if full or (size + entry_size > MAX_BYTES and current is not None and current.before + len(current.added)):
                current = _Fill(await self._blocks.new_id(), 0, [], [])
                fills.append(current)
                size = 0
            assert current is not None
            slot = current.before + len(current.added)
            current.added.append({"id": recipient.client_id or generated_id(current.block_id, slot), **entry})
            size += entry_size
        return [fill for fill in fills if fill.added]

    async def _write(self, mailing_id: int, test: bool, fills: list[_Fill], void: set[int],
                     now: datetime.datetime) -> None:
        position = 0
        for fill in fills:
            void_slots = [fill.before + i for i in range(len(fill.added)) if position + i in void]
            position += len(fill.added)
            if not await self._blocks.write_content(fill.block_id, mailing_id, fill.existing + fill.added,
                                                    fill.before):
                raise RuntimeError(f"block {fill.block_id} changed while recipients were added to it")
            if fill.before == 0:
                columns = StateColumns()
                _extend(columns, len(fill.added), void_slots, now)
                await self._blocks.insert(Block(fill.block_id, mailing_id, test, 0, columns))
            else:
                await self._blocks.write_summary(await self._extend_state(fill, void_slots, now))
            self._tails[(mailing_id, test)] = (fill.block_id, fill.before + len(fill.added))

    async def _extend_state(self, fill: _Fill, void_slots: list[int], now: datetime.datetime) -> Block:
        """The tail block's state with the new recipients (the caller holds its lock)."""
        cached = True  # as this process last wrote it; after a conflict, as the database has it
        while True:
            block = await self._blocks.load(fill.block_id, cached)
            cached = False
            assert block is not None
            block.columns.truncate(fill.before)  # a cut write of this batch may have left some
            _extend(block.columns, len(fill.added), void_slots, now)
            if await self._blocks.save(block):
                return block

    async def roll_back_cut_batches(self, running: AbstractSet[str],
                                    only: AbstractSet[str] | None = None) -> list[int]:
        """Undo the batches a crash cut, those of no master in ``running`` (holder None: of a
        process that did not share the database), or with ``only``, of those masters alone; the
        mailings they touched, to recount. Under the locks their writers take: other masters
        write meanwhile."""
        touched = []
        for batch in await self._db.ingest_batches.find({}).to_list():
            if batch.get("holder") in running or (only is not None and batch.get("holder") not in only):
                continue
            mailing_id = batch["m"]
            async with self._db.locks.hold(("ingest", mailing_id, False)), \
                    self._db.locks.hold(("ingest", mailing_id, True)):
                if await self._db.ingest_batches.find_one({"_id": batch["_id"]}, {"_id": 1}) is None:
                    continue  # rolled back by another master meanwhile (its blocks may have grown since)
                await self._undo(batch, locked=False)
                log.warning("rolled back an unacknowledged batch of recipients", extra={"mailing": mailing_id})
                touched.append(mailing_id)
        return touched

    async def _undo(self, batch: dict[str, Any], locked: bool) -> None:
        """Cut the batch's blocks back, drop its index entries, then forget it (last: a crash on
        the way leaves it to be undone again). The caller holds its ingest lock; with ``locked``,
        also its blocks' and its mailing's counts' locks."""
        mailing_id = batch["m"]
        for cut in batch["blocks"]:
            if locked:
                await self._cut_block(mailing_id, cut["b"], cut["before"])
            else:
                async with self._blocks.lock(cut["b"]), self._mailings.counts_lock(mailing_id):
                    await self._cut_block(mailing_id, cut["b"], cut["before"])
        await self._index.roll_back_batch(batch["_id"])
        await self._db.ingest_batches.delete_one({"_id": batch["_id"]})

    async def _cut_block(self, mailing_id: int, block_id: int, before: int) -> None:
        self._tails.clear()
        if before == 0:
            await self._blocks.delete(block_id)
            return
        content = await self._blocks.content(block_id)
        if len(content) > before:  # none: the block was deleted with its mailing, or never grew
            await self._blocks.write_content(block_id, mailing_id, content[:before], len(content))
        block = await self._blocks.load(block_id)
        while block is not None and len(block.columns) > before:
            block.columns.truncate(before)
            if await self._blocks.save(block):
                break
            block = await self._blocks.load(block_id)
        if block is not None:  # also when an earlier try cut the state, then failed on its summary
            await self._blocks.write_summary(block)


def _extend(columns: StateColumns, count: int, void_slots: list[int], now: datetime.datetime) -> None:
    columns.extend_ready(count, now)
    for slot in void_slots:
        columns.status[slot] = VOID
