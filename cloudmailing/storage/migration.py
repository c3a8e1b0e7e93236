"""``cm-admin storage migrate``: from layout 1 (one document per recipient, one per change) to
the block layout, and from layout 2 (bodies inside the mailing documents) to layout 3 (bodies in
``mailing_content``, see ``storage.mailings``).

Run with the master stopped. A run can be killed at any point and run again, as often as needed,
and ends as an uninterrupted run would. Layout 1 goes in three steps:

1. write the whole new layout (blocks, index, log pages, kept messages, counts, and the bodies
   moved to ``mailing_content``), reading the old collections without changing them: a rerun
   drops what an earlier run wrote of the new layout and writes it again from them;
2. record that the new layout is complete, with the old collections still to drop (the
   ``migration`` document of ``meta``): from then on a rerun never rebuilds, it only drops;
3. drop the old collections, one at a time (each struck from the list once dropped), then stamp
   the layout marker and forget the ``migration`` document.

The layout marker stays absent until the old collections are gone: the master refuses the
database (naming this command) while the old recipients or their log hold a document, and both are
dropped last. Change numbers are kept, so cursors handed out before
the migration stay valid; leases are not (recipients in progress go back to the queue, as after a
master restart).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable

from cloudmailing.common.statuses import READY, STORED_STATUSES
from cloudmailing.storage import counters
from cloudmailing.storage.block_codec import STATUS_CODES, StateColumns, to_millis
from cloudmailing.storage.blocks import MAX_RECIPIENTS, Block
from cloudmailing.storage.database import LAYOUT_VERSION, Database, has_old_layout
from cloudmailing.storage.mailings import CONTENT_FIELDS
from cloudmailing.storage.recipient_index import Place
from cloudmailing.storage.status_log import DETAIL_DEFAULTS, STATUS_FIELDS, LogPage
from cloudmailing.storage.stores import Stores, open_stores

PAGE_ENTRIES = 500
_NEW_KINDS = ("block_content", "block_state", "status_log", "kept_messages")
# Layout 1's collections, dropped once the new layout is complete: the journal first (the master
# writes one of the same name), the recipients and their log last (while either holds a document,
# the master refuses the database).
_OLD_COLLECTIONS = ("ingest_batches", "status_log", "recipients")
MIGRATION_MARKER = "migration"  # in meta, from the new layout's completion until the old collections are dropped


@dataclass
class MigrationReport:
    recipients: int = 0
    changes: int = 0
    blocks: int = 0
    mailings: set[int] = field(default_factory=set)


async def migrate(database: Database, say: Callable[[str], None] = print) -> MigrationReport | None:
    """Convert ``database`` to the current layout; None if it needs no migration."""
    pending = await database.meta.find_one({"_id": MIGRATION_MARKER})
    if pending is not None:  # the new layout is complete: only the old collections are left to drop
        await _finish(database, list(pending.get("drop") or []), say)
        return MigrationReport()
    marker = await database.meta.find_one({"_id": "layout"})
    if marker is not None and marker.get("version") == 2:
        report = await _move_mailing_bodies(database, say)
        await _stamp_layout(database)
        say(f"storage layout {LAYOUT_VERSION}: done")
        return report
    if marker is not None or not await has_old_layout(database):
        return None
    # Step 1: the new layout, from the old collections (left as they are). What an earlier,
    # interrupted run wrote of it is dropped first; the bodies' move can simply be done again.
    await _drop_new_collections(database)
    stores = await open_stores(database)
    report = MigrationReport()
    cut = await _cut_old_batches(database)
    places = await _place_recipients(database, stores, report, cut)
    say(f"placed {report.recipients} recipients in {report.blocks} blocks")
    latest = await _convert_log(database, stores, places, report)
    say(f"converted {report.changes} status changes")
    await _write_blocks(database, stores, places, latest, cut)
    await stores.ledger.recount(sorted(report.mailings))
    # Every converted page is final (no state names them as recent writes).
    await stores.blocks.set_logged_floor(await counters.current(database, "status_seq"))
    await _move_mailing_bodies(database, say)
    # Step 2: the new layout is complete; from here on a rerun only drops what is left.
    await database.meta.replace_one({"_id": MIGRATION_MARKER}, {"drop": list(_OLD_COLLECTIONS)}, upsert=True)
    # Step 3.
    await _finish(database, list(_OLD_COLLECTIONS), say)
    return report


async def _finish(database: Database, to_drop: list[str], say: Callable[[str], None]) -> None:
    """Drop the old collections left, then stamp the layout marker and forget the migration's."""
    for done, name in enumerate(to_drop, 1):
        await database.drop_collection(name)
        await database.meta.update_one({"_id": MIGRATION_MARKER}, {"$set": {"drop": to_drop[done:]}})
    if to_drop:
        say(f"dropped the collections of the old layout: {', '.join(to_drop)}")
    await _stamp_layout(database)
    await database.meta.delete_one({"_id": MIGRATION_MARKER})
    say(f"storage layout {LAYOUT_VERSION}: done")


async def _stamp_layout(database: Database) -> None:
    await database.meta.update_one({"_id": "layout"}, {"$set": {"version": LAYOUT_VERSION}}, upsert=True)


async def _move_mailing_bodies(database: Database, say: Callable[[str], None]) -> MigrationReport:
    """Layouts 1 and 2 kept each mailing's bodies in its document: move them to mailing_content
    (content first, then taken out of the document: an interrupted run loses nothing and can be
    run again). The caller stamps the layout once everything else is done."""
    report = MigrationReport()
    async for mailing in database.mailings.find({}, {name: 1 for name in CONTENT_FIELDS}):
        bodies = {name: mailing[name] for name in CONTENT_FIELDS if name in mailing}
        if bodies:
            await database.mailing_content.update_one({"_id": mailing["_id"]}, {"$set": bodies}, upsert=True)
            await database.mailings.update_one({"_id": mailing["_id"]}, {"$unset": dict.fromkeys(bodies, "")})
            report.mailings.add(mailing["_id"])
    say(f"moved the bodies of {len(report.mailings)} mailings to mailing_content")
    return report


async def _drop_new_collections(database: Database) -> None:
    for kind in _NEW_KINDS:
        for number in await database.bucket_numbers(kind):
            await database.drop_bucket(kind, number)
    for name in ("blocks", "blocks_done", "recipient_ids"):
        await database.drop_collection(name)
    await database.counters.delete_many({"_id": {"$in": ["block_id", "logged_floor"]}})


async def _cut_old_batches(database: Database) -> list[Any]:
    """Layout 1's journal: the batches a crash cut, whose recipients were never acknowledged (left
    out of the new layout; the old collections are not changed before it is complete)."""
    return [batch["_id"] async for batch in database.ingest_batches.find({}) if "mailing_id" in batch]


def _kept(cut: list[Any]) -> dict[str, Any]:
    return {"ingest_batch": {"$nin": cut}} if cut else {}


@dataclass
class _Placed:
    place: Place
    mailing_id: int
    test: bool


async def _place_recipients(database: Database, stores: Stores, report: MigrationReport,
                            cut: list[Any]) -> dict[str, _Placed]:
    """Choose every recipient's block and slot, keeping the old order; write content and index."""
    places: dict[str, _Placed] = {}
    groups: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    async for doc in database.recipients.find(_kept(cut), {"log_group": 0}).sort([("block", 1), ("_id", 1)]):
        groups.setdefault((doc["mailing_id"], bool(doc.get("test"))), []).append(doc)
    for (mailing_id, test), docs in groups.items():
        report.mailings.add(mailing_id)
        for start in range(0, len(docs), MAX_RECIPIENTS):
            chunk = docs[start:start + MAX_RECIPIENTS]
            block_id = await stores.blocks.new_id()
            report.blocks += 1
            content = [{"id": doc["_id"], "email": doc["email"], "domain": doc["domain"],
                        "contact": doc.get("contact") or {}, "attachments": doc.get("attachments") or []}
                       for doc in chunk]
            await stores.blocks.write_content(block_id, mailing_id, content, 0)
            for slot, doc in enumerate(chunk):
                places[doc["_id"]] = _Placed(Place(block_id, slot), mailing_id, test)
            await stores.index.insert(mailing_id, [(doc["_id"], places[doc["_id"]].place) for doc in chunk],
                                      "migration")
            report.recipients += len(chunk)
    return places


async def _convert_log(database: Database, stores: Stores, places: dict[str, _Placed],
                       report: MigrationReport) -> dict[str, tuple[int, int]]:
    """Old change entries into pages (same numbers); each recipient's latest (page, number)."""
    latest: dict[str, tuple[int, int]] = {}
    pending: list[dict[str, Any]] = []
    page_key: tuple[int, int] | None = None

    async def flush() -> None:
        if pending:
            page = LogPage(first=pending[0]["q"], mailing_id=pending[0]["m"], logged_at=pending[0]["at"],
                           entries=[{k: v for k, v in e.items() if k not in ("m", "at")} for e in pending])
            await stores.status_log.insert(page)
            latest.update((entry["id"], (page.first, entry["q"])) for entry in pending)
            pending.clear()

    async for entry in database.status_log.find({}).sort("_id", 1):
        placed = places.get(entry["recipient_id"])
        if placed is None:
            continue
        key = (placed.mailing_id, placed.place.block_id)
        contiguous = pending and pending[-1]["q"] + 1 == entry["_id"]
        if key != page_key or not contiguous or len(pending) >= PAGE_ENTRIES:
            await flush()
            page_key = key
        record = {name: entry["record"].get(name, DETAIL_DEFAULTS.get(name)) for name in STATUS_FIELDS}
        pending.append({"q": entry["_id"], "id": entry["recipient_id"], "b": placed.place.block_id,
                        "s": placed.place.slot, "t": placed.test, "r": record, "m": placed.mailing_id,
                        "at": entry.get("logged_at") or record.get("modified")})
        if entry.get("customized_content") is not None:
            await stores.kept.put(placed.mailing_id, placed.place.block_id, placed.place.slot,
                                  bytes(entry["customized_content"]))
        report.changes += 1
    await flush()
    return latest


async def _write_blocks(database: Database, stores: Stores, places: dict[str, _Placed],
                        latest: dict[str, tuple[int, int]], cut: list[Any]) -> None:
    """Each block's state from its recipients' old documents."""
    blocks: dict[int, tuple[_Placed, StateColumns]] = {}
    async for doc in database.recipients.find(_kept(cut), {"contact": 0, "attachments": 0, "email": 0}):
        placed = places[doc["_id"]]
        block_id = placed.place.block_id
        if block_id not in blocks:
            blocks[block_id] = (placed, StateColumns())
        columns = blocks[block_id][1]
        slot = placed.place.slot
        if len(columns) <= slot:
            columns.extend_ready(slot + 1 - len(columns), datetime.datetime(1970, 1, 1))
        status = doc.get("status") if doc.get("status") in STORED_STATUSES else READY
        columns.status[slot] = STATUS_CODES[status]
        columns.tries[slot] = min(int(doc.get("try_count") or 0), 65535)
        columns.first_try[slot] = to_millis(doc.get("first_try"))
        columns.next_try[slot] = to_millis(doc.get("next_try"))
        columns.modified[slot] = to_millis(doc.get("modified"))
        columns.last_page[slot], columns.last_seq[slot] = latest.get(doc["_id"], (0, 0))
    for block_id, (placed, columns) in blocks.items():
        block = Block(block_id, placed.mailing_id, placed.test, 0, columns)
        await stores.blocks.insert(block)
