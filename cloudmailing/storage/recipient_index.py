"""Where each recipient is: its block and slot, from its id.

Ids the master generates say it themselves (``b<block>s<slot>-<random>``), so they need no index.
A client's own ids (``tracking_id``) get a document in ``recipient_ids`` (``_id`` = the id), whose
unique ``_id`` is also what refuses a second recipient with the same id, atomically.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Sequence

from pymongo.errors import BulkWriteError

from cloudmailing.storage.database import Database

DUPLICATE_KEY = 11000
_GENERATED = re.compile(r"b(\d{1,15})s(\d{1,6})-[0-9a-f]{6}")
# With more ids than this, one $in query beats one equality query per id on FerretDB.
_EQUALITY_QUERIES = 4


@dataclass(frozen=True)
class Place:
    block_id: int
    slot: int


def generated_id(block_id: int, slot: int) -> str:
    return f"b{block_id}s{slot}-{secrets.token_hex(3)}"


def is_generated(recipient_id: str) -> bool:
    return _GENERATED.fullmatch(recipient_id) is not None


class RecipientIndex:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def insert(self, mailing_id: int, places: Sequence[tuple[str, Place]], batch: str) -> set[int]:
        """Index the client ids of ``places``; the positions whose id already exists."""
        if not places:
            return set()
        docs = [{"_id": rid, "m": mailing_id, "b": place.block_id, "s": place.slot, "batch": batch}
                for rid, place in places]
        try:
            await self._db.recipient_ids.insert_many(docs, ordered=False)
        except BulkWriteError as error:
            return _duplicates(error)
        return set()

    async def locate(self, recipient_ids: Sequence[str]) -> dict[str, Place]:
        """The place of each id found; generated ids unchecked (the caller compares the id stored
        in the block's content)."""
        places: dict[str, Place] = {}
        indexed: list[str] = []
        for rid in dict.fromkeys(recipient_ids):
            match = _GENERATED.fullmatch(rid)
            if match:
                places[rid] = Place(int(match.group(1)), int(match.group(2)))
            else:
                indexed.append(rid)
        if len(indexed) <= _EQUALITY_QUERIES:
            docs = [doc for rid in indexed if (doc := await self._db.recipient_ids.find_one({"_id": rid}))]
        else:
            docs = await self._db.recipient_ids.find({"_id": {"$in": indexed}}).to_list()
        places.update((doc["_id"], Place(doc["b"], doc["s"])) for doc in docs)
        return places

    async def delete_mailing(self, mailing_id: int) -> None:
        await self._db.recipient_ids.delete_many({"m": mailing_id})

    async def roll_back_batch(self, batch: str) -> None:
        await self._db.recipient_ids.delete_many({"batch": batch})


def _duplicates(error: BulkWriteError) -> set[int]:
    found: set[int] = set()
    for write_error in error.details.get("writeErrors", []):
        if write_error.get("code") != DUPLICATE_KEY:
            raise error
        found.add(int(write_error["index"]))
    return found
