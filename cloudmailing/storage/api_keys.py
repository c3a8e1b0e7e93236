"""The ``api_keys`` collection: named keys, stored only as salted scrypt hashes.

One active key per name: ``api_key_names`` holds a document per active name (its ``_id``), taken
by inserting it (unique ``_id``) after the key, which is deleted again when the name was taken,
and given back when the name's keys are revoked. Two ``cm-admin api-key create`` of one name at
once, from any process, keep one key; a crash between the two writes leaves a key without its
name document, which still counts as the name's active key.
"""

from __future__ import annotations

import datetime
from typing import Any

from pymongo.errors import DuplicateKeyError

from cloudmailing.storage.database import Database


class NameTaken(Exception):
    """An active key already has this name."""


class ApiKeyStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def insert(self, key_id: str, name: str, secret_record: dict[str, Any], now: datetime.datetime) -> None:
        """Store an active key named ``name``; NameTaken if one is (a key from before the name
        documents counts too)."""
        if await self.find_active_by_name(name):
            raise NameTaken(name)
        await self._db.api_keys.insert_one(
            {"_id": key_id, "name": name, "created": now, "revoked": None, **secret_record})
        try:
            await self._db.api_key_names.insert_one({"_id": name, "key": key_id})
        except DuplicateKeyError:
            await self._db.api_keys.delete_one({"_id": key_id})  # another create of this name won
            raise NameTaken(name) from None

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
        await self._db.api_key_names.delete_one({"_id": name})  # the name is free again
        return result.modified_count
