"""Messages as sent, kept for mailings with ``backup_customized_emails``: one document each,
``_id`` = ``<block>.<slot>``, in the bucket of their block."""

from __future__ import annotations

from typing import Iterable

import bson

from cloudmailing.storage.blocks import bucket_of
from cloudmailing.storage.database import Database


class KeptMessages:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def put(self, mailing_id: int, block_id: int, slot: int, message: bytes) -> None:
        collection = await self._db.bucket("kept_messages", bucket_of(block_id))
        await collection.replace_one({"_id": f"{block_id}.{slot}"},
                                     {"m": mailing_id, "b": block_id, "c": bson.Binary(message)}, upsert=True)

    async def get(self, places: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The kept message of each (block, slot) that has one."""
        found: dict[tuple[int, int], bytes] = {}
        for bucket, ids in _by_bucket(places).items():
            collection = self._db.existing_bucket("kept_messages", bucket)
            async for doc in collection.find({"_id": {"$in": ids}} if len(ids) > 1 else {"_id": ids[0]}):
                block, slot = doc["_id"].split(".")
                found[(int(block), int(slot))] = bytes(doc["c"])
        return found

    async def drop(self, places: Iterable[tuple[int, int]]) -> None:
        for bucket, ids in _by_bucket(places).items():
            collection = self._db.existing_bucket("kept_messages", bucket)
            await collection.delete_many({"_id": {"$in": ids}})

    async def delete_mailing(self, mailing_id: int) -> None:
        for bucket in await self._db.bucket_numbers("kept_messages"):
            await self._db.existing_bucket("kept_messages", bucket).delete_many({"m": mailing_id})


def _by_bucket(places: Iterable[tuple[int, int]]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    for block_id, slot in places:
        grouped.setdefault(bucket_of(block_id), []).append(f"{block_id}.{slot}")
    return grouped
