"""The ``hourly_stats`` collection: delivery tries per hour and per sending satellite."""

from __future__ import annotations

import datetime
from typing import Any, Sequence

from cloudmailing.storage.database import Database


class HourlyStatsStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def add(self, hour: datetime.datetime, sender: str, sent: int, failed: int, tries: int) -> None:
        async with self._db.locks.hold(("hourly_stats", f"{hour:%Y%m%d%H}|{sender}")):
            await self._db.hourly_stats.update_one(
                {"_id": f"{hour:%Y%m%d%H}|{sender}"},
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
        docs = await self._db.hourly_stats.find(query).to_list()
        return sorted(docs, key=lambda doc: (doc["hour"], doc["sender"]))
