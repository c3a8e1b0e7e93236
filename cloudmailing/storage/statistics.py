"""The ``hourly_stats`` collection: delivery tries per hour and per sending satellite.

Each master adds to documents of its own (``<hour>|<sender>|<master>``): no other master writes
them, so adding takes no lock shared with the others; a query sums them per hour and sender."""

from __future__ import annotations

import datetime
from typing import Any, Sequence

from cloudmailing.storage.database import Database


class HourlyStatsStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, hour: datetime.datetime, sender: str, sent: int, failed: int, tries: int) -> None:
        shared = self._db.locks.shared
        key = f"{hour:%Y%m%d%H}|{sender}" + (f"|{shared.holder}" if shared is not None else "")
        async with self._db.locks.hold(("hourly_stats", key), own_document=True):
            await self._db.hourly_stats.update_one(
                {"_id": key},
                {"$inc": {"sent": sent, "failed": failed, "tries": tries},
                 "$set": {"hour": hour, "sender": sender}},
                upsert=True)

    async def between(self, start: datetime.datetime | None, end: datetime.datetime | None,
                      senders: Sequence[str]) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        hour_range: dict[str, Any] = {}
        if start is not None:
            hour_range["$gte"] = start
        if end is not None:
            hour_range["$lte"] = end
        if hour_range:
            query["hour"] = hour_range
        if senders:
            query["sender"] = {"$in": list(senders)}
        summed: dict[tuple[datetime.datetime, str], dict[str, Any]] = {}
        for doc in await self._db.hourly_stats.find(query).to_list():
            total = summed.setdefault((doc["hour"], doc["sender"]), {"hour": doc["hour"], "sender": doc["sender"],
                                                                      "sent": 0, "failed": 0, "tries": 0})
            for name in ("sent", "failed", "tries"):
                total[name] += doc.get(name, 0)
        return [summed[key] for key in sorted(summed)]
