"""The mailings' life cycle over time: start when scheduled, time out, finish.

``tick`` is called periodically by the master (and by ``mailing_manager_force_check``); it reads
the time from the injected clock so tests drive it with a fake one.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from typing import Any, Callable, Mapping

from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.mailings import FINISHED, PAUSED, PENDING_STATUSES, READY, REGULAR, RUNNING, totals
from cloudmailing.storage.database import Database
from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.recipients import RecipientStore
from cloudmailing.storage.status_log import StatusChange, StatusLog

log = logging.getLogger(__name__)

TIMEOUT_PAGE = 500
# A mailing whose counters say recipients are pending is checked against the recipients
# themselves this often (the counters alone could hide a drift), and never more often than
# COUNT_SPACING times the last count took: on FerretDB counting decodes every recipient.
VERIFY_PENDING_SECONDS = 60.0
COUNT_SPACING = 20.0
PURGE_SECONDS = 3600.0  # how often old status log entries are purged


def deadline(mailing: Mapping[str, Any]) -> datetime.datetime | None:
    """When the mailing's remaining recipients time out: scheduled_end or start + duration."""
    candidates = []
    if mailing.get("scheduled_end"):
        candidates.append(mailing["scheduled_end"])
    if mailing.get("scheduled_duration") and mailing.get("start_time"):
        candidates.append(mailing["start_time"] + datetime.timedelta(minutes=mailing["scheduled_duration"]))
    return min(candidates) if candidates else None


class MailingLifecycle:
    def __init__(self, database: Database, status_log: StatusLog, clock: SecondsClock,
                 log_retention_days: int = 30, timer: Callable[[], float] = time.monotonic) -> None:
        self._mailings = MailingStore(database)
        self._recipients = RecipientStore(database)
        self._status_log = status_log
        self._clock = clock
        self._retention = datetime.timedelta(days=log_retention_days)
        self._pending_verified: dict[int, float] = {}  # mailing id -> clock seconds of the last count
        self._verify_spacing: dict[int, float] = {}  # mailing id -> seconds between its counts
        self._timer = timer  # measures how long a count takes (real time, not the clock's)
        self._last_purge: float | None = None

    async def tick(self) -> None:
        now = utc_now(self._clock)
        await self._recount_interrupted()
        async for mailing in self._mailings.find({"status": {"$in": [READY, RUNNING, PAUSED]}},
                                                 {"html": 0, "plain": 0, "rfc822": 0}):
            try:
                await self._advance(mailing, now)
            except Exception:  # one broken mailing must not stop the others
                log.exception("life cycle step failed", extra={"mailing": mailing["_id"]})
        seconds = self._clock.seconds()
        if self._last_purge is None or seconds - self._last_purge >= PURGE_SECONDS:
            await self._status_log.purge_before(now - self._retention)
            self._last_purge = seconds

    async def _advance(self, mailing: dict[str, Any], now: datetime.datetime) -> None:
        mailing_id = mailing["_id"]
        if mailing["status"] == READY and (mailing.get("scheduled_start") or now) <= now:
            mailing.update(status=RUNNING, start_time=mailing.get("start_time") or now)
            await self._mailings.update(mailing_id, {"status": RUNNING, "start_time": mailing["start_time"]},
                                        only_if_status=[READY])
            log.info("mailing running", extra={"mailing": mailing_id})
        if mailing["status"] == READY:
            return
        if mailing.get("type", REGULAR) != REGULAR:
            return  # an OPENED mailing (a transactional stream) never finishes by itself
        end = deadline(mailing)
        if end is not None and end <= now:
            await self._time_out(mailing_id, now)
            await self._finish(mailing_id, now)
        elif mailing["status"] == RUNNING:
            counts = await self._verified_counts(mailing)
            if counts is not None and not totals(counts)["total_pending"]:
                # Nothing in flight: these counts are final, the totals exact when it finishes.
                await self._mailings.set_counts(mailing_id, counts)
                if sum(counts.values()) or not mailing.get("dont_close_if_empty"):
                    await self._finish(mailing_id, now)

    async def _verified_counts(self, mailing: Mapping[str, Any]) -> dict[str, int] | None:
        """The mailing's counts from its recipients (the counters may trail an interrupted
        write), only when the counters say none is pending, or once a minute: counting is a
        scan. None when it is not time to count."""
        mailing_id, seconds = mailing["_id"], self._clock.seconds()
        counted_pending = totals(mailing.get("counts") or {})["total_pending"]
        spacing = self._verify_spacing.get(mailing_id, VERIFY_PENDING_SECONDS)
        if counted_pending and seconds - self._pending_verified.get(mailing_id, -math.inf) < spacing:
            return None
        self._pending_verified[mailing_id] = seconds
        started = self._timer()
        counts = await self._recipients.count_by_status(mailing_id)
        self._verify_spacing[mailing_id] = max(VERIFY_PENDING_SECONDS, COUNT_SPACING * (self._timer() - started))
        return counts

    async def _recount(self, mailing_id: int) -> dict[str, int]:
        counts = await self._recipients.count_by_status(mailing_id)
        await self._mailings.set_counts(mailing_id, counts)
        return counts

    async def _recount_interrupted(self) -> None:
        while self._status_log.mailings_to_recount:
            mailing_id = self._status_log.mailings_to_recount.pop()
            try:
                await self._recount(mailing_id)
            except Exception:
                self._status_log.mailings_to_recount.add(mailing_id)
                raise

    async def _time_out(self, mailing_id: int, now: datetime.datetime) -> None:
        query = {"mailing_id": mailing_id, "status": {"$in": list(PENDING_STATUSES)}, "test": False}
        while True:
            page = [doc["_id"] async for doc in self._recipients.find(query, {"_id": 1}, limit=TIMEOUT_PAGE)]
            if not page:
                return
            changes = [StatusChange(rid, "TIMEOUT", {"in_progress": False, "next_try": None,
                                                     "reply_text": "mailing ended before delivery"})
                       for rid in page]
            await self._status_log.apply(changes, now)

    async def _finish(self, mailing_id: int, now: datetime.datetime) -> None:
        if await self._mailings.update(mailing_id, {"status": FINISHED, "end_time": now},
                                       only_if_status=[READY, RUNNING, PAUSED]):
            log.info("mailing finished", extra={"mailing": mailing_id})
        self._pending_verified.pop(mailing_id, None)
        self._verify_spacing.pop(mailing_id, None)

    async def close_empty_mailings(self) -> int:
        """Finish started mailings that have no recipient at all, even with dont_close_if_empty."""
        now, closed = utc_now(self._clock), 0
        async for mailing in self._mailings.find({"status": {"$in": [READY, RUNNING, PAUSED]}}, {"counts": 1}):
            if totals(mailing.get("counts") or {})["total_recipient"] == 0:
                await self._finish(mailing["_id"], now)
                closed += 1
        return closed

    async def recover(self) -> None:
        """At start-up: undo batches a crash cut, then recount every open mailing's totals."""
        for batch in await self._recipients.cut_batches():
            removed = await self._recipients.roll_back_batch(batch["_id"])
            log.warning("rolled back an unacknowledged batch of %d recipients", removed,
                        extra={"mailing": batch.get("mailing_id")})
        async for mailing in self._mailings.find({"status": {"$ne": FINISHED}}, {"_id": 1}):
            await self._recount(mailing["_id"])
