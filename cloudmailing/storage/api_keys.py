"""The ``api_keys`` collection: named keys, stored only as salted scrypt hashes."""

from __future__ import annotations

import datetime
from typing import Any

from cloudmailing.storage.database import Database


class ApiKeyStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def insert(self, key_id: str, name: str, secret_record: dict[str, Any], now: datetime.datetime) -> None:
        await self._db.api_keys.insert_one(
            {"_id": key_id, "name": name, "created": now, "revoked": None, **secret_record})

    async def get_active(self, key_id: str) -> dict[str, Any] | None:
        doc = await self._db.api_keys.find_one({"_id": key_id})
        return doc if doc and not doc.get("revoked") else None

    async def find_active_by_name(self, name: str) -> dict[str, Any] | None:
        return await self._db.api_keys.find_one({"name": name, "revoked": None})

    async def list(self) -> list[dict[str, Any]]:
        cursor = self._db.api_keys.find({}, {"name": 1, "created": 1, "revoked": 1}).sort("created", 1)
        return await cursor.to_list()

    async def revoke(self, name: str, now: datetime.datetime) -> int:
        result = await self._db.api_keys.update_many({"name": name, "revoked": None}, {"$set": {"revoked": now}})
        return result.modified_count
