"""The ``recipients`` collection: one document per recipient, written in journaled batches.

A batch is announced in ``ingest_batches`` before its recipients are written and forgotten once
they are all in. A batch still announced at start-up was cut by a crash: :meth:`roll_back_cut_batches`
removes its recipients, so a batch the API never acknowledged leaves nothing behind.

Each recipient also gets a ``block``: its insertion position divided by :data:`BLOCK_SIZE`.
Leases and status changes write recipients block by block (see :class:`LeaseStore`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence

from pymongo.errors import BulkWriteError

from cloudmailing.storage import counters
from cloudmailing.storage.database import Database

DUPLICATE_KEY = 11000
BLOCK_SIZE = 250
POSITION_COUNTER = "recipient_position"
LEASE_END = {"in_progress": False, "lease_owner": None, "lease_id": None, "lease_expires": None}


@dataclass
class BatchResult:
    inserted: int = 0
    errors: dict[int, str] = field(default_factory=dict)  # input index -> reason


class RecipientStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def insert_batch(self, mailing_id: int, docs: Sequence[dict[str, Any]], now: Any) -> BatchResult:
        """Insert ``docs`` (each with its ``_id``) in one bulk write; duplicates fail alone."""
        if not docs:
            return BatchResult()
        batch_id = uuid.uuid4().hex
        await self._db.ingest_batches.insert_one({"_id": batch_id, "mailing_id": mailing_id, "started": now})
        first_position = await counters.increment(self._db, POSITION_COUNTER, len(docs)) - len(docs)
        for position, doc in enumerate(docs, start=first_position):
            doc["ingest_batch"] = batch_id
            doc["block"] = position // BLOCK_SIZE
        result = BatchResult(inserted=len(docs))
        try:
            await self._db.recipients.insert_many(docs, ordered=False)
        except BulkWriteError as error:
            result = _batch_errors(error, len(docs))
        await self._db.ingest_batches.delete_one({"_id": batch_id})
        return result

    async def cut_batches(self) -> list[dict[str, Any]]:
        return [doc async for doc in self._db.ingest_batches.find({})]

    async def roll_back_batch(self, batch_id: str) -> int:
        deleted = await self._db.recipients.delete_many({"ingest_batch": batch_id})
        await self._db.ingest_batches.delete_one({"_id": batch_id})
        return deleted.deleted_count

    async def get(self, recipient_id: str) -> dict[str, Any] | None:
        return await self._db.recipients.find_one({"_id": recipient_id})

    async def get_many(self, recipient_ids: Sequence[str],
                       projection: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        cursor = self._db.recipients.find({"_id": {"$in": list(recipient_ids)}}, projection)
        return {doc["_id"]: doc async for doc in cursor}

    async def count(self, query: Mapping[str, Any]) -> int:
        return await self._db.recipients.count_documents(dict(query))

    def find(self, query: Mapping[str, Any], projection: Mapping[str, Any] | None = None,
             limit: int = 0) -> AsyncIterator[dict[str, Any]]:
        return self._db.recipients.find(dict(query), projection, limit=limit)

    async def delete_for_mailings(self, mailing_ids: Sequence[int]) -> int:
        """Delete the mailings' recipients and their status history."""
        query = {"mailing_id": {"$in": list(mailing_ids)}}
        result = await self._db.recipients.delete_many(query)
        await self._db.status_log.delete_many(query)
        return result.deleted_count

    async def count_by_status(self, mailing_id: int) -> dict[str, int]:
        """Recount a mailing's recipients per status (test recipients excluded)."""
        pipeline: list[dict[str, Any]] = [{"$match": {"mailing_id": mailing_id, "test": False}},
                    {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        cursor = await self._db.recipients.aggregate(pipeline)
        return {doc["_id"]: int(doc["n"]) async for doc in cursor}


def _batch_errors(error: BulkWriteError, total: int) -> BatchResult:
    details = error.details
    errors: dict[int, str] = {}
    for write_error in details.get("writeErrors", []):
        if write_error.get("code") != DUPLICATE_KEY:
            raise error
        errors[int(write_error["index"])] = "a recipient with this id (tracking_id) already exists"
    return BatchResult(inserted=total - len(errors), errors=errors)


class LeaseStore:
    """Leases: which satellite may deliver which recipients, until when. Not status changes.

    Lease writes, like status changes, go block by block: one update of the recipients of one
    ``block`` by ``_id``. FerretDB v1 finds the documents of any update by scanning the
    collection (no index serves its filters, ``_id`` included) and passes only equalities to
    its backend (never ``$in``): one update per recipient costs a scan each, one ``$in`` over
    all of them decodes every document, while the equality on ``block`` hands it the block's
    documents alone. MongoDB finds them by ``_id`` either way.
    """

    def __init__(self, database: Database) -> None:
        self._db = database

    async def claim(self, query: Mapping[str, Any], owner: str, expires: Any, limit: int) -> list[dict[str, Any]]:
        """Mark up to ``limit`` recipients matching ``query`` as in progress for ``owner``."""
        lease = {"in_progress": True, "lease_owner": owner, "lease_id": uuid.uuid4().hex, "lease_expires": expires}
        # Conditional on the status again: a report may have landed since the find.
        condition = {"in_progress": False, "status": query.get("status", {"$exists": True})}
        async with self._db.write_lock:
            found = await self._db.recipients.find(dict(query), limit=limit).to_list()
            modified = await set_by_block(self._db, found, condition, lease)
        if modified == len(found):
            return [{**doc, **lease} for doc in found]
        # Some changed in between (MongoDB, several writers): those not leased stay out.
        return await self._db.recipients.find({"lease_id": lease["lease_id"]}).to_list()

    async def release(self, query: Mapping[str, Any]) -> list[str]:
        """End the leases matching ``query`` (expired, or of a satellite that went away); the
        recipients released."""
        find = {"in_progress": True, **query}
        async with self._db.write_lock:
            found = await self._db.recipients.find(find, {"_id": 1, "block": 1}).to_list()
            await set_by_block(self._db, found, find, LEASE_END)
        return [doc["_id"] for doc in found]


def ids_by(pairs: Iterable[tuple[Any, str]]) -> dict[Any, list[str]]:
    """Ids grouped by their key, from (key, id) pairs, in first-seen order."""
    grouped: dict[Any, list[str]] = {}
    for key, recipient_id in pairs:
        grouped.setdefault(key, []).append(recipient_id)
    return grouped


def _in_block(block: Any, ids: list[str]) -> dict[str, Any]:
    """The filter for ``ids``, narrowed to their block when it is known."""
    return {"_id": {"$in": ids}} if block is None else {"_id": {"$in": ids}, "block": block}


async def set_by_block(database: Database, docs: Sequence[Mapping[str, Any]], condition: Mapping[str, Any],
                       changes: Mapping[str, Any]) -> int:
    """Set ``changes`` on each of ``docs`` (``_id`` and ``block``) still matching ``condition``,
    one update per block (see :class:`LeaseStore`); the number changed. The caller holds
    ``write_lock``."""
    modified = 0
    for block, ids in ids_by((doc.get("block"), doc["_id"]) for doc in docs).items():
        result = await database.recipients.update_many({**condition, **_in_block(block, ids)}, {"$set": dict(changes)})
        modified += result.modified_count
    return modified


async def find_by_block(database: Database, recipient_ids: Sequence[str], blocks: Mapping[str, Any],
                        projection: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The recipients of ``recipient_ids``, found block by block where ``blocks`` knows theirs."""
    found: dict[str, dict[str, Any]] = {}
    for block, ids in ids_by((blocks.get(rid), rid) for rid in recipient_ids).items():
        found.update({doc["_id"]: doc async for doc in database.recipients.find(_in_block(block, ids), projection)})
    return found
