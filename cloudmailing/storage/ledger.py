"""The one path through which a block's state changes: leases, releases and status changes.

:meth:`Ledger.edit` reads a block, lets the caller change it (lease flags, status changes), and
writes, in this order:

1. the log page of this write's status changes (its numbers stay in flight: no cursor reads it);
2. the block's state, over the version it read, naming the page among its ``recent_pages``
   (another writer came first: the page is deleted, and the edit reads and decides again). The
   state names every page of its writes above the *logged floor* (every page up to it is final:
   start-up checks the pages above it only), so a committed page is never taken for an orphan;
3. the block's summary and the mailing's counts (a crash before them: start-up rebuilds them).

A page whose state write never happened (a crash between 1 and 2) is an *orphan*: the state does
not name it. A failed write leaves the page in flight until :meth:`Ledger.settle_unsure` deletes
it if it is an orphan; after a crash, :meth:`Ledger.recover` does so before the master serves
anyone. So a change is in the state and the log exactly once, whatever fails: a satellite's
repeated report finds its recipients no longer leased and records nothing new.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from cloudmailing.common.statuses import PENDING_STATUSES
from cloudmailing.storage.block_codec import from_millis, to_millis
from cloudmailing.storage.blocks import MAX_NAMED_PAGES, RECENT_PAGES, Block, BlockStore
from cloudmailing.storage.database import WriteRefused
from cloudmailing.storage.kept_messages import KeptMessages
from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.status_log import DETAIL_DEFAULTS, LogPage, StatusLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """One recipient (``slot``) moving to ``status``; ``details`` (reply, SMTP log, satellite) it
    leaves unsaid keep their last values."""

    slot: int
    status: str
    try_count: int
    first_try: datetime.datetime | None = None
    next_try: datetime.datetime | None = None
    details: Mapping[str, Any] | None = None
    kept_message: bytes | None = None


# An edit changes the block's lease in place and returns its status changes (None: write nothing).
Edit = Callable[[Block], Sequence[Change] | None]


async def recount_under_lock(blocks: BlockStore, mailings: MailingStore, mailing_id: int) -> None:
    """The mailing's counts from its blocks' summaries (the caller holds its counts' lock)."""
    counted = await blocks.counts([mailing_id])
    await mailings.replace_counts(mailing_id, counted.get(mailing_id, {}))


class Ledger:
    def __init__(self, blocks: BlockStore, status_log: StatusLog, mailings: MailingStore,
                 kept: KeptMessages) -> None:
        self.blocks = blocks
        self.status_log = status_log
        self._mailings = mailings
        self._kept = kept
        self._unsure: dict[int, LogPage] = {}  # first number -> page whose state write failed
        self._stale: dict[int, int] = {}  # block id -> mailing id: summary or counts may trail the state
        self._floor = 0  # a logged floor saved (by any master): the states forget the pages up to it

    async def edit(self, block_id: int, edit: Edit, now: datetime.datetime) -> tuple[Block, list[Change]] | None:
        """Apply ``edit`` to the block and write it; the block as written and its status changes
        (None: no such block, or nothing to write)."""
        async with self.blocks.lock(block_id):
            fresh = False  # after a conflict, or a decision on this process's view: the database's
            while True:
                cached = not fresh and self.blocks.remembers(block_id)
                block = await self.blocks.load(block_id, cached)
                if block is None:
                    return None
                before = block.columns.counts()
                was_done = block.is_done(before)
                try:
                    changes = edit(block)
                except Exception:
                    if not cached:
                        raise
                    changes = None  # another master may have changed the block since: decide again
                fresh = True
                # Nothing to write, as this process last saw the block: another master may have
                # written it since (leased it, added recipients), so the database's state decides.
                if changes is None and not cached:
                    return None
                if changes is not None and await self._write(block, list(changes), before, was_done, now):
                    return block, list(changes)

    async def _write(self, block: Block, changes: list[Change], before: dict[str, int], was_done: bool,
                     now: datetime.datetime) -> bool:
        page = await self._apply(block, changes, now) if changes else None
        try:
            saved = await self.blocks.save(block) if page is None else await self._log_then_save(page, block)
        except BaseException:
            # The database may have written the state without answering: its summary and the
            # mailing's counts are repaired from it (repair_stale).
            self._stale[block.id] = block.mailing_id
            raise
        if not saved:
            return False  # another writer came first: the caller reads and decides again
        try:
            if page is not None:
                await self._keep_messages(block, changes)
        finally:
            await self.publish(block, _deltas(before, block.columns.counts()), was_done)
        return True

    async def _log_then_save(self, page: LogPage, block: Block) -> bool:
        allocator = self.status_log.allocator
        try:
            await self.status_log.insert(page)
            saved = await self.blocks.save(block)
            if not saved:
                await self.status_log.delete_page(page.first)
        except BaseException:
            # The page, and then the state, may or may not have been written: the page stays in
            # flight (no cursor reads it) until settle_unsure asks the state whether it names it.
            self._unsure[page.first] = page
            raise
        allocator.release(page.first)
        return saved

    async def publish(self, block: Block, deltas: Mapping[str, int], was_done: bool | None = None) -> None:
        """After a state write: the block's summary and its mailing's counts, together
        (``was_done``: whether the block was done before the write, None if not known)."""
        async with self._mailings.counts_lock(block.mailing_id):
            try:
                await self.blocks.write_summary(block, was_done)
                if not block.test:  # test recipients (send_test) are not in the mailing's totals
                    await self._mailings.add_counts(block.mailing_id, deltas)
            except BaseException:
                self._stale[block.id] = block.mailing_id  # repaired by repair_stale
                raise

    async def repair_stale(self) -> None:
        """Rewrite the summaries and recount the mailings a failed write left behind."""
        for block_id, mailing_id in list(self._stale.items()):
            async with self.blocks.lock(block_id), self._mailings.counts_lock(mailing_id):
                await self.blocks.repair_summary(block_id)
                await self._recount(mailing_id)
            del self._stale[block_id]
            self.blocks.forget_free()  # a block the summary hid may be free: the next lease searches

    async def settle_summaries(self, mailing_id: int) -> None:
        """Before the mailing is decided FINISHED: rewrite each of its blocks' summaries that trails
        its state, then recount the mailing from them. A write cut between a state and its summary
        or counts (here, or on another master, or one killed) leaves them saying fewer recipients
        are pending than are; the mailing must not finish on that. One read of each block's state."""
        for summary in [summary async for summary in self.blocks.of_mailing(mailing_id)]:
            block = await self.blocks.load(summary["_id"])
            if block is not None and summary.get("sv") != block.version:
                # Without the block's lock (a killed master may hold it): the summary's version
                # guard never lets an older one replace a newer.
                await self.blocks.write_summary(block)
                self.blocks.forget_free()  # it may be free: the next lease searches again
        await self.recount([mailing_id])

    async def recount(self, mailing_ids: Sequence[int]) -> None:
        """Repair: each mailing's counts from its blocks' summaries."""
        for mailing_id in mailing_ids:
            async with self._mailings.counts_lock(mailing_id):
                await self._recount(mailing_id)

    async def _recount(self, mailing_id: int) -> None:
        await recount_under_lock(self.blocks, self._mailings, mailing_id)

    async def _apply(self, block: Block, changes: list[Change], now: datetime.datetime) -> LogPage:
        """Change the columns, and build the log page of the changes (the state names it)."""
        # Read first: a number allocated stays in flight (holding every cursor back) until the
        # page's fate is known, so nothing may fail between its allocation and the page's write.
        addresses = await self.blocks.addresses(block.id, len(block.columns))
        previous = await self._previous_details(block, [c.slot for c in changes if not _says_all(c.details)])
        await self._make_room(block)
        # Above the block's newest page: a recipient's changes are numbered in commit order, even
        # when another master, numbering from its own range, wrote the block last.
        first = await self.status_log.allocator.allocate(len(changes), above=block.newest_page())
        try:
            page = self._log_page(block, changes, first, addresses, previous, now)
        except BaseException:
            self.status_log.allocator.release(first)  # nothing was written under it
            raise
        block.name_page(first, self._floor)
        return page

    async def _make_room(self, block: Block) -> None:
        """Keep the pages the state names above the logged floor few: the floor is saved again
        when they are many (the names up to it go), and the write refused if they stay too many."""
        if block.pages_above(self._floor) < RECENT_PAGES:
            return
        await self.save_logged_floor()
        if block.pages_above(self._floor) >= MAX_NAMED_PAGES:
            raise WriteRefused(f"block {block.id}: the change log's floor is held back, please retry")

    @staticmethod
    def _log_page(block: Block, changes: list[Change], first: int, addresses: list[tuple[str, str]],
                  previous: Mapping[int, Mapping[str, Any]], now: datetime.datetime) -> LogPage:
        cols, modified = block.columns, to_millis(now)
        entries = []
        for seq, change in enumerate(changes, start=first):
            slot = change.slot
            details = {**previous.get(slot, DETAIL_DEFAULTS), **(change.details or {})}
            record = {"email": addresses[slot][1] if slot < len(addresses) else "", "status": change.status,
                      **{name: details.get(name, default) for name, default in DETAIL_DEFAULTS.items()},
                      "modified": now, "first_try": change.first_try, "next_try": change.next_try,
                      "try_count": change.try_count, "in_progress": False}
            entries.append({"q": seq, "id": addresses[slot][0] if slot < len(addresses) else "",
                            "b": block.id, "s": slot, "t": block.test, "r": record})
            cols.set_status(slot, change.status)
            cols.leased[slot] = 0
            cols.tries[slot] = min(change.try_count, 65535)
            cols.first_try[slot] = to_millis(change.first_try)
            cols.next_try[slot] = to_millis(change.next_try)
            cols.modified[slot] = modified
            cols.last_seq[slot] = seq
            cols.last_page[slot] = first
        if block.lease is not None and not block.leased_slots():
            block.lease = None
        return LogPage(first=first, mailing_id=block.mailing_id, logged_at=now, entries=entries)

    async def settle_unsure(self) -> None:
        """Keep or delete the pages whose state write failed, as the states say."""
        for first, page in list(self._unsure.items()):
            block = await self.blocks.load(page.entries[0]["b"])
            if block is None or first not in block.recent_pages:
                await self.status_log.delete_page(first)
            del self._unsure[first]
            self.status_log.allocator.release(first)

    async def save_logged_floor(self) -> None:
        """Remember that every page below the horizon is final (start-up checks only newer ones)."""
        floor = await self.status_log.allocator.readable()
        await self.blocks.set_logged_floor(floor)
        self._floor = max(self._floor, floor)  # once saved: a state may forget the pages up to it

    async def recover(self) -> int:
        """At start-up: delete the orphan pages (logged, but their state never written); their
        number. Pages up to the logged floor are known final; those from the horizon on may be
        in flight in another master (a dead one's are its recovery's: see :meth:`recover_range`)."""
        floor = await self.blocks.logged_floor()
        self._floor = max(self._floor, floor)
        return await self.recover_range(floor + 1, await self.status_log.allocator.readable())

    async def recover_range(self, first: int, last: int, fill: bool = False) -> int:
        """Delete the orphan pages among those numbered ``first`` to ``last``; their number.
        With ``fill`` (numbers nobody will write: a dead master's), fillers cover the gaps left."""
        orphans, kept = 0, []
        for page in await self.status_log.pages_between(first - 1, last):
            block = await self.blocks.load(page.entries[0]["b"])
            if block is None or page.first not in block.recent_pages:
                await self.status_log.delete_page(page.first)
                orphans += 1
            else:
                kept.append(page)
        if fill:
            for gap_first, gap_last in _gaps(first, last, kept):
                await self.status_log.insert_filler(gap_first, gap_last)
        return orphans

    async def _previous_details(self, block: Block, slots: list[int]) -> dict[int, dict[str, Any]]:
        cols = block.columns
        refs = {slot: (cols.last_page[slot], cols.last_seq[slot]) for slot in slots if cols.last_seq[slot]}
        entries = await self.status_log.entries(refs.values()) if refs else {}
        return {slot: dict(entries[seq]["r"]) for slot, (_, seq) in refs.items() if seq in entries}

    async def _keep_messages(self, block: Block, changes: list[Change]) -> None:
        for change in changes:
            if change.kept_message is not None:
                await self._kept.put(block.mailing_id, block.id, change.slot, change.kept_message)

    async def details(self, block: Block, slots: Sequence[int]) -> dict[int, dict[str, Any]]:
        """The record of each slot's last change (its defaults when never changed)."""
        found = await self._previous_details(block, list(slots))
        cols = block.columns
        records = {}
        for slot in slots:
            record = dict(found.get(slot) or DETAIL_DEFAULTS)
            record.update(status=cols.status_of(slot), try_count=int(cols.tries[slot]),
                          first_try=from_millis(cols.first_try[slot]), next_try=from_millis(cols.next_try[slot]),
                          modified=from_millis(cols.modified[slot]),
                          in_progress=bool(cols.leased[slot]) and cols.status_of(slot) in PENDING_STATUSES)
            records[slot] = record
        return records


def _gaps(first: int, last: int, pages: Sequence[LogPage]) -> list[tuple[int, int]]:
    """The runs of numbers from ``first`` to ``last`` that no page of ``pages`` covers."""
    gaps, position = [], first
    for page in sorted(pages, key=lambda page: page.first):
        if page.first > position:
            gaps.append((position, page.first - 1))
        position = max(position, page.last + 1)
    if position <= last:
        gaps.append((position, last))
    return gaps


def _says_all(details: Mapping[str, Any] | None) -> bool:
    return details is not None and set(DETAIL_DEFAULTS) <= set(details)


def _deltas(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {status: after.get(status, 0) - before.get(status, 0) for status in set(before) | set(after)
            if after.get(status, 0) != before.get(status, 0)}
