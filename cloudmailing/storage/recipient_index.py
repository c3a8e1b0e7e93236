"""Where each recipient is: its block and slot, from its id.

Ids the master generates say it themselves, so they need no index: a UUID (RFC 9562, version 8,
canonical lowercase text) that carries the block and slot (see :func:`generated_id`); databases
written by earlier versions also hold ids of the old form ``b<block>s<slot>-<6 random hex digits>``.
Both forms are the master's own: a client's ``tracking_id`` of either form is refused (the API
asks :func:`is_generated`), so an id of these forms is never looked up in the index.
A client's own ids (``tracking_id``) get a document in ``recipient_ids`` (``_id`` = the id), whose
unique ``_id`` is also what refuses a second recipient with the same id, atomically.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Sequence

from pymongo.errors import BulkWriteError

from cloudmailing.storage import counters
from cloudmailing.storage.blocks import BLOCK_ID_COUNTER
from cloudmailing.storage.database import Database

DUPLICATE_KEY = 11000
# Ids of earlier versions (ASCII digits only: ``\d`` would take other scripts' digits too).
_OLD_GENERATED = re.compile(r"b([0-9]{1,15})s([0-9]{1,6})-[0-9a-f]{6}")
# A version 8 UUID (variant bits 10) in canonical text: 8-4-4-4-12 lowercase hex digits.
_UUID_V8 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
# The 122 custom bits of a generated id, from the most significant: RANDOM_BITS random bits (all
# of custom_a), then the block id and the slot (custom_b and custom_c). 48 random bits: an id
# cannot be guessed from another's block and slot (the old form had 24).
RANDOM_BITS = 48
# Block ids come from an int64 counter (counters.increment): 63 bits hold every one it can give.
BLOCK_BITS = 63
# A block holds at most [database] block_recipients (at most 1000) or blocks.MAX_RECIPIENTS.
SLOT_BITS = 11
assert RANDOM_BITS + BLOCK_BITS + SLOT_BITS == 122
# With more ids than this, one $in query beats one equality query per id on FerretDB.
_EQUALITY_QUERIES = 4


@dataclass(frozen=True)
class Place:
    block_id: int
    slot: int


def generated_id(block_id: int, slot: int) -> str:
    """A new id for the recipient at ``slot`` of block ``block_id``: a version 8 UUID."""
    if not 0 <= block_id < 1 << BLOCK_BITS:
        raise ValueError(f"block id {block_id} does not fit in a recipient id ({BLOCK_BITS} bits)")
    if not 0 <= slot < 1 << SLOT_BITS:
        raise ValueError(f"slot {slot} does not fit in a recipient id ({SLOT_BITS} bits)")
    custom = (secrets.randbits(RANDOM_BITS) << (BLOCK_BITS + SLOT_BITS)) | (block_id << SLOT_BITS) | slot
    # custom_a (48 bits), version 8, custom_b (12 bits), variant 10, custom_c (62 bits)
    value = ((custom >> 74) << 80) | (8 << 76) | (((custom >> 62) & 0xFFF) << 64) | (0b10 << 62) \
        | (custom & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def place_of(recipient_id: str) -> Place | None:
    """The block and slot a generated id (of either form) names; None for any other id."""
    match = _OLD_GENERATED.fullmatch(recipient_id)
    if match:
        return Place(int(match.group(1)), int(match.group(2)))
    if _UUID_V8.fullmatch(recipient_id) is None:
        return None
    value = int(recipient_id.replace("-", ""), 16)
    custom_bc = (((value >> 64) & 0xFFF) << 62) | (value & ((1 << 62) - 1))  # block and slot
    return Place(custom_bc >> SLOT_BITS, custom_bc & ((1 << SLOT_BITS) - 1))


def is_generated(recipient_id: str) -> bool:
    """Whether ``recipient_id`` has a form the master generates (a client may not use it)."""
    return place_of(recipient_id) is not None


class RecipientIndex:
    def __init__(self, database: Database) -> None:
        self._db = database
        # The block counter as last read: no block above it existed then. Block ids only grow,
        # so it is read again only for an id naming a block above it.
        self._blocks_counted = 0

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
        in the block's content), but for those naming a block above the block counter, left out
        before anything is read: no such block exists."""
        places: dict[str, Place] = {}
        indexed: list[str] = []
        for rid in dict.fromkeys(recipient_ids):
            place = place_of(rid)
            if place is not None:
                places[rid] = place
            else:
                indexed.append(rid)
        if places and max(place.block_id for place in places.values()) > self._blocks_counted:
            self._blocks_counted = max(self._blocks_counted, await counters.current(self._db, BLOCK_ID_COUNTER))
            places = {rid: place for rid, place in places.items() if place.block_id <= self._blocks_counted}
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
