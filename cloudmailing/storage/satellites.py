"""The ``satellites`` collection: the registry of sending hosts the master will serve."""

from __future__ import annotations

from typing import Any, Mapping

from cloudmailing.storage import counters
from cloudmailing.storage.database import Database

SATELLITE_ID_COUNTER = "satellite_id"


class SatelliteStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def insert(self, fields: Mapping[str, Any]) -> int:
        satellite_id = await counters.increment(self._db, SATELLITE_ID_COUNTER)
        await self._db.satellites.insert_one({"_id": satellite_id, **fields})
        return satellite_id

    async def get(self, satellite_id: int) -> dict[str, Any] | None:
        return await self._db.satellites.find_one({"_id": satellite_id})

    async def get_by_serial(self, serial: str) -> dict[str, Any] | None:
        return await self._db.satellites.find_one({"serial": serial})

    async def list(self) -> list[dict[str, Any]]:
        return await self._db.satellites.find({}).sort("_id", 1).to_list()

    async def count(self) -> int:
        return await self._db.satellites.count_documents({})

    async def count_awaiting_approval(self) -> int:
        return await self._db.satellites.count_documents({"paired": False})

    async def update(self, satellite_id: int, fields: Mapping[str, Any]) -> bool:
        result = await self._db.satellites.update_one({"_id": satellite_id}, {"$set": dict(fields)})
        return result.matched_count == 1

    async def delete(self, satellite_id: int) -> bool:
        return (await self._db.satellites.delete_one({"_id": satellite_id})).deleted_count == 1
