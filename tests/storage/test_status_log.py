"""The cursor contract: every change read exactly once, in commit order, across restarts."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

from cloudmailing.storage.ledger import Change
from cloudmailing.storage.status_log import SequenceAllocator
from cloudmailing.storage.stores import open_stores
from tests.helpers import aio_test
from tests.storage.world import NOW, mailing_with

STATUSES = ["FINISHED", "WARNING", "ERROR", "GENERAL_ERROR", "TIMEOUT"]


async def _read_all(status_log, page: int, seq: int, limit: int) -> tuple[list, int, int]:
    collected: list = []
    while True:
        entries, page, seq = await status_log.read_since(page, seq, limit)
        collected.extend(entries)
        if not entries:
            return collected, page, seq


@aio_test
async def test_horizon_waits_for_the_lowest_number_in_flight(database):
    allocator = SequenceAllocator(database)
    await allocator.start()
    first, second = await allocator.allocate(1), await allocator.allocate(2)
    assert allocator.horizon == first - 1
    allocator.release(second)  # the later writer finishes first
    assert allocator.horizon == first - 1
    allocator.release(first)
    assert allocator.horizon == second + 1


@aio_test
async def test_concurrent_writers_and_a_paging_reader_see_every_change_once(database):
    rng = random.Random(7)
    stores, ids = await mailing_with(database, 40, block_recipients=8)
    places = await stores.lookup.find(ids)
    real_insert = stores.status_log.insert

    async def late_insert(page):  # writers finish in a different order than they started
        await asyncio.sleep(rng.random() * 0.02)
        await real_insert(page)

    stores.status_log.insert = late_insert
    applied: dict[str, list[str]] = defaultdict(list)
    done = asyncio.Event()

    async def writer(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(12):
            chosen = local.sample(ids, local.randint(1, 4))
            block_id = places[chosen[0]].block.id
            in_block = [rid for rid in chosen if places[rid].block.id == block_id]
            changes = [Change(places[rid].slot, local.choice(STATUSES), 1, details={"reply_code": 250})
                       for rid in in_block]
            written = await stores.ledger.edit(block_id, lambda block, changes=changes: changes, NOW)
            assert written is not None
            for change in changes:
                applied[next(rid for rid in in_block if places[rid].slot == change.slot)].append(change.status)

    collected: list = []

    async def reader() -> None:
        page = seq = 0
        while True:
            finished = done.is_set()
            entries, page, seq = await stores.status_log.read_since(page, seq, 3)
            collected.extend(entries)
            if finished and not entries:
                return
            await asyncio.sleep(0.001)

    reading = asyncio.ensure_future(reader())
    await asyncio.gather(*(writer(seed) for seed in range(5)))
    done.set()
    await reading

    seqs = [entry["q"] for entry in collected]
    assert len(seqs) == len(set(seqs)), "a change was read twice"
    assert seqs == sorted(seqs), "changes were read out of order"
    seen: dict[str, list[str]] = defaultdict(list)
    for entry in collected:
        seen[entry["id"]].append(entry["r"]["status"])
    assert seen == applied  # each recipient's changes, all of them, in the order applied
    current = {s["id"]: s["status"] for s in await _statuses(stores, list(applied))}
    assert current == {rid: statuses[-1] for rid, statuses in applied.items()}


async def _statuses(stores, ids):
    from twisted.internet.task import Clock

    from cloudmailing.services.reports import ReportService

    return await ReportService(stores, Clock()).statuses(ids, {})


@aio_test
async def test_cursor_survives_a_restart_and_old_cursors_stay_valid(database):
    stores, ids = await mailing_with(database, 6, block_recipients=3)
    places = await stores.lookup.find(ids)
    for rid in ids[:3]:
        await stores.ledger.edit(places[rid].block.id, lambda b, s=places[rid].slot: [Change(s, "FINISHED", 1)], NOW)
    seen, page, seq = await _read_all(stores.status_log, 0, 0, 2)
    assert [e["id"] for e in seen] == ids[:3]

    restarted = await open_stores(database)  # a new master process
    for rid in ids[3:]:
        await restarted.ledger.edit(places[rid].block.id, lambda b, s=places[rid].slot: [Change(s, "ERROR", 1)], NOW)
    more, _, _ = await _read_all(restarted.status_log, page, seq, 2)
    assert [e["id"] for e in more] == ids[3:]
    assert min(e["q"] for e in more) > max(e["q"] for e in seen)
    # A cursor of earlier versions names a change number only: it is found by a search.
    again, _, _ = await _read_all(restarted.status_log, 0, seen[1]["q"], 100)
    assert [e["id"] for e in again] == ids[2:]


@aio_test
async def test_an_abandoned_write_leaves_a_gap_that_readers_step_over(database):
    stores, ids = await mailing_with(database, 2, block_recipients=2)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    abandoned = await stores.status_log.allocator.allocate(5)
    stores.status_log.allocator.release(abandoned)  # its writer failed before the state was written
    await stores.ledger.edit(block_id, lambda b: [Change(1, "FINISHED", 1)], NOW)
    entries, _, _ = await _read_all(stores.status_log, 0, 0, 10)
    assert [e["id"] for e in entries] == [ids[1]]


async def _buckets(database, kind: str = "status_log") -> list[str]:
    return sorted(name for name in await database.db.list_collection_names() if name.startswith(f"{kind}_"))


@aio_test
async def test_a_forged_cursor_creates_no_collection_and_reads_from_its_number(database):
    """A cursor's page is the client's to forge: a read never creates the bucket it names."""
    stores, ids = await mailing_with(database, 2, block_recipients=2)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    await stores.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1)], NOW)
    before, remembered = await _buckets(database), set(database._indexed_buckets)
    for n in range(1, 21):
        entries, _, _ = await stores.status_log.read_since(n * 10**15, 0, 10)
        assert [e["id"] for e in entries] == [ids[0]]  # the page ignored: read from change 0
    entries, page, seq = await stores.status_log.read_since(0, 10**17, 10)  # a change number beyond the log
    assert (entries, page, seq) == ([], 0, 10**17)
    assert await stores.status_log.page(10**16) is None
    assert await stores.status_log.entries([(10**16, 10**16)]) == {}
    assert await _buckets(database) == before and database._indexed_buckets == remembered


@aio_test
async def test_deleting_a_mailing_creates_no_bucket(database):
    """Deletes find nothing where there is no bucket: they do not create it (kept_messages)."""
    stores, _ = await mailing_with(database, 3, block_recipients=2)
    await stores.delete_mailing(1)
    assert await _buckets(database, "kept_messages") == []
    assert database._indexed_buckets <= {"status_log_0"}
