"""The mailings' life cycle over time: start when scheduled, time out, finish.

``tick`` is called periodically by the master (and by ``mailing_manager_force_check``); it reads
the time from the injected clock so tests drive it with a fake one. ``settle`` takes the same
step at once for the mailings a report gave final statuses to: a mailing is FINISHED as soon as
its last outcome is recorded. A mailing finishes on its counts, which every recipient change
moves in the same step (see ``storage.ledger``): the life cycle never counts recipients and never
writes counts. :meth:`MailingLifecycle.recover` repairs
what a crash may have left behind, before the master serves anyone.
"""

from __future__ import annotations

import datetime
import logging
from typing import AbstractSet, Any, Callable, Mapping

from cloudmailing.common.statuses import MAILING_READY, PENDING_STATUSES, RUNNING, TIMEOUT
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.mailings import REGULAR, totals
from cloudmailing.storage.block_codec import from_millis
from cloudmailing.storage.blocks import Block
from cloudmailing.storage.ledger import Change
from cloudmailing.storage.stores import Stores

log = logging.getLogger(__name__)

PURGE_SECONDS = 3600.0  # how often old status log pages are purged
ENDED_BEFORE_DELIVERY = {"reply_text": "mailing ended before delivery"}


def _done(mailing: Mapping[str, Any]) -> bool:
    """A running regular mailing with nothing left pending; never one with dont_close_if_empty,
    which a client fills in batches while it sends (as the original server: only its deadline, a
    delete or the client closes it)."""
    if mailing["status"] != RUNNING or mailing.get("type", REGULAR) != REGULAR or mailing.get("dont_close_if_empty"):
        return False
    return not totals(mailing.get("counts") or {})["total_pending"]


def _empty_regular(mailing: Mapping[str, Any]) -> bool:
    """Whether force_purge_empty_mailings closes it: a regular mailing (not an OPENED stream
    between two messages), not kept open by ``dont_close_if_empty``, with no recipient at all."""
    return (mailing.get("type", REGULAR) == REGULAR and not mailing.get("dont_close_if_empty")
            and totals(mailing.get("counts") or {})["total_recipient"] == 0)


def deadline(mailing: Mapping[str, Any]) -> datetime.datetime | None:
    """When the mailing's remaining recipients time out: scheduled_end or start + duration."""
    candidates = []
    if mailing.get("scheduled_end"):
        candidates.append(mailing["scheduled_end"])
    if mailing.get("scheduled_duration") and mailing.get("start_time"):
        try:
            candidates.append(mailing["start_time"] + datetime.timedelta(minutes=mailing["scheduled_duration"]))
        except OverflowError:  # past year 9999 (a database written before the cap): no deadline
            pass
    return min(candidates) if candidates else None


class MailingLifecycle:
    def __init__(self, stores: Stores, clock: SecondsClock, log_retention_days: int = 30,
                 work_available: Callable[[], None] = lambda: None) -> None:
        self._stores = stores
        self._work_available = work_available  # a mailing started: satellites may lease now
        self._mailings = stores.mailings
        self._clock = clock
        self._retention = datetime.timedelta(days=log_retention_days)
        self._last_purge: float | None = None

    async def tick(self) -> None:
        now = utc_now(self._clock)
        await self._stores.ledger.settle_unsure()
        await self._stores.ledger.repair_stale()
        async for mailing in self._mailings.open_mailings():
            try:
                await self._advance(mailing, now)
            except Exception:  # one broken mailing must not stop the others
                log.exception("life cycle step failed", extra={"mailing": mailing["_id"]})
        await self._stores.ledger.save_logged_floor()
        seconds = self._clock.seconds()
        if self._last_purge is None or seconds - self._last_purge >= PURGE_SECONDS:
            referenced = await self._stores.blocks.referenced_pages()
            await self._stores.status_log.purge_before(now - self._retention, referenced)
            self._last_purge = seconds

    async def settle(self, mailing_ids: set[int]) -> None:
        """After a report: the life cycle's step for these mailings now (FINISHED when nothing is
        left pending), rather than at the next tick."""
        now = utc_now(self._clock)
        for mailing_id in sorted(mailing_ids):
            await self._finish_if_done(mailing_id, now, await self._mailings.get(mailing_id))

    async def _advance(self, mailing: dict[str, Any], now: datetime.datetime) -> None:
        mailing_id = mailing["_id"]
        if mailing["status"] == MAILING_READY and (mailing.get("scheduled_start") or now) <= now:
            mailing.update(status=RUNNING, start_time=mailing.get("start_time") or now)
            await self._mailings.update(mailing_id, {"status": RUNNING, "start_time": mailing["start_time"]},
                                        only_if_status=[MAILING_READY])
            log.info("mailing running", extra={"mailing": mailing_id})
            self._work_available()
        if mailing["status"] == MAILING_READY or mailing.get("type", REGULAR) != REGULAR:
            return  # an OPENED mailing (a transactional stream) never finishes by itself
        end = deadline(mailing)
        if end is not None and end <= now:
            await self._stores.ledger.settle_summaries(mailing_id)  # _time_out goes by the summaries
            await self._time_out(mailing_id, now)
            await self._finish(mailing_id, now)
            await self._time_out(mailing_id, now)  # recipients added in between (none after FINISHED)
        elif mailing["status"] == RUNNING:
            await self._finish_if_done(mailing_id, now, mailing)

    async def _time_out(self, mailing_id: int, now: datetime.datetime) -> None:
        """Every recipient of the mailing not delivered yet becomes TIMEOUT."""

        def time_out(block: Block) -> list[Change] | None:
            cols = block.columns
            return [Change(slot, TIMEOUT, int(cols.tries[slot]), first_try=from_millis(cols.first_try[slot]),
                           details=ENDED_BEFORE_DELIVERY) for slot in cols.slots_with(PENDING_STATUSES)] or None

        async for summary in self._stores.blocks.of_mailing(mailing_id):
            if summary.get("open") and not summary.get("test"):  # tests are not timed out with it
                await self._stores.ledger.edit(summary["_id"], time_out, now)

    async def _finish_if_done(self, mailing_id: int, now: datetime.datetime, mailing: Mapping[str, Any] | None) -> None:
        """FINISHED if nothing is left pending: first by the counts as read (``mailing``), then
        with its summaries and counts settled from the blocks' states, under the counts' lock."""
        if mailing is None or not _done(mailing):
            return
        await self._stores.ledger.settle_summaries(mailing_id)
        await self._finish(mailing_id, now, when=_done)

    async def _finish(self, mailing_id: int, now: datetime.datetime,
                      when: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        """FINISHED now; with ``when``, only if it says so of the mailing as read under the counts'
        lock (``_done``: recipients this process adds meanwhile are never left in a finished mailing)."""
        if await self._mailings.finish(mailing_id, now, when):
            log.info("mailing finished", extra={"mailing": mailing_id})

    async def close_empty_mailings(self) -> int:
        """Finish started regular mailings that have no recipient at all; not an OPENED one (a
        transactional stream between two messages) nor one with dont_close_if_empty."""
        now, closed = utc_now(self._clock), 0
        async for mailing in self._mailings.open_mailings():
            # Read again under the counts' lock by finish: recipients added since the listing
            # keep it open.
            if _empty_regular(mailing) and await self._mailings.finish(mailing["_id"], now, _empty_regular):
                log.info("empty mailing closed", extra={"mailing": mailing["_id"]})
                closed += 1
        return closed

    async def recover(self, running: AbstractSet[str] = frozenset(), me: str | None = None) -> None:
        """At start-up of master ``me``: undo batches a crash cut (of no master in ``running``),
        delete log pages whose state was never written (only when no other master runs: a page
        of another one that its block no longer names may be committed; dead masters' ranges
        are their recovery's), repair the summaries the dispatcher searches (done ones leave),
        rewrite the block summaries that trail their state, and recount every unfinished
        mailing. Each under the locks its writers take: other masters may be writing."""
        await self._stores.writer.roll_back_cut_batches(running)
        alone = not set(running) - {me}
        orphans = await self._stores.ledger.recover() if alone else 0
        if orphans:
            log.warning("%d log pages of writes a crash cut were deleted", orphans)
        await self._stores.ledger.save_logged_floor()  # the next start-up scans only what follows
        repaired = await self._stores.blocks.repair_searched()
        moved = sum(1 for block in repaired if block.is_done())
        if moved:
            log.info("%d summaries of done blocks moved out of those the dispatcher searches", moved)
        repaired_ids = {block.id for block in repaired}
        mailing_ids = [mailing["_id"] async for mailing in self._mailings.unfinished()]
        for mailing_id in mailing_ids:
            async for summary in self._stores.blocks.of_mailing(mailing_id):
                if summary["_id"] not in repaired_ids:  # repaired just above
                    async with self._stores.blocks.lock(summary["_id"]):
                        await self._stores.blocks.repair_summary(summary["_id"])
        await self.recount(mailing_ids)

    async def recount(self, mailing_ids: list[int]) -> None:
        """Repair: set the mailings' counts from their blocks."""
        await self._stores.ledger.recount(mailing_ids)
