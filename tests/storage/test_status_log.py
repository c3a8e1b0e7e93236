"""The cursor contract: every change read exactly once, in commit order, across restarts."""

from __future__ import annotations

import asyncio
import datetime
import random
from collections import defaultdict

from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.recipients import RecipientStore
from cloudmailing.storage.status_log import SequenceAllocator, StatusChange, StatusLog
from tests.helpers import aio_test, started_status_log

NOW = datetime.datetime(2027, 1, 15, 12, 0, 0)  # every change shares this one timestamp
STATUSES = ["FINISHED", "WARNING", "ERROR", "GENERAL_ERROR", "TIMEOUT"]


async def _recipients(database, count: int, mailing_id: int = 1) -> list[str]:
    await MailingStore(database).insert(mailing_id, {"status": "RUNNING"})
    docs = [{"_id": f"r{i:04d}", "mailing_id": mailing_id, "email": f"u{i}@example.org", "status": "READY",
             "in_progress": False,
             "test": False} for i in range(count)]
    await RecipientStore(database).insert_batch(mailing_id, docs, NOW)
    await MailingStore(database).add_counts(mailing_id, {"READY": count})
    return [doc["_id"] for doc in docs]


async def _read_all(status_log: StatusLog, cursor: int, limit: int) -> tuple[list[dict], int]:
    collected = []
    while True:
        entries, cursor = await status_log.read_since(cursor, {}, limit)
        collected.extend(entries)
        if not entries:
            return collected, cursor


@aio_test
async def test_horizon_waits_for_the_lowest_number_in_flight(database):
    allocator = SequenceAllocator(database, block_size=10)
    await allocator.start()
    first, second = await allocator.allocate(1), await allocator.allocate(2)
    assert allocator.horizon == first[0] - 1
    allocator.release(second)  # the later writer finishes first
    assert allocator.horizon == first[0] - 1
    allocator.release(first)
    assert allocator.horizon == second[-1]


@aio_test
async def test_concurrent_writers_and_a_paging_reader_see_every_change_once(database):
    rng = random.Random(7)
    ids = await _recipients(database, 40)

    async def jitter() -> None:  # writers finish in a different order than they started
        await asyncio.sleep(rng.random() * 0.02)

    allocator = SequenceAllocator(database, block_size=16)
    await allocator.start()
    status_log = StatusLog(database, allocator, before_write=jitter)
    writers_log: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def writer(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(12):
            chosen = local.sample(ids, local.randint(1, 4))
            changes = [StatusChange(rid, local.choice(STATUSES), {"reply_code": local.randint(200, 599)})
                       for rid in chosen]
            result = await status_log.apply(changes, NOW)
            assert not result.unknown
            writers_log.extend((c.recipient_id, c.status) for c in changes)

    collected: list[dict] = []

    async def reader() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            entries, cursor = await status_log.read_since(cursor, {}, 3)
            collected.extend(entries)
            if finished and not entries:
                return
            await asyncio.sleep(0.001)

    reading = asyncio.ensure_future(reader())
    await asyncio.gather(*(writer(seed) for seed in range(5)))
    done.set()
    await reading

    seqs = [entry["_id"] for entry in collected]
    assert len(seqs) == len(set(seqs)), "a change was read twice"
    assert seqs == sorted(seqs), "changes were read out of order"
    assert sorted((e["recipient_id"], e["status"]) for e in collected) == sorted(writers_log)
    # Per recipient, the reader saw the changes in the order they were applied.
    applied, seen = defaultdict(list), defaultdict(list)
    for rid, status in writers_log:
        applied[rid].append(status)
    for entry in collected:
        seen[entry["recipient_id"]].append(entry["status"])
    assert seen == applied
    # And each recipient's stored status is its last change.
    stored = await RecipientStore(database).get_many(ids)
    assert {rid: doc["status"] for rid, doc in stored.items() if rid in applied} == \
        {rid: statuses[-1] for rid, statuses in applied.items()}


@aio_test
async def test_cursor_survives_a_restart(database):
    ids = await _recipients(database, 6)
    first_log = StatusLog(database, allocator := SequenceAllocator(database, block_size=4))
    await allocator.start()
    await first_log.apply([StatusChange(rid, "FINISHED") for rid in ids[:3]], NOW)
    seen, cursor = await _read_all(first_log, 0, 2)
    assert [e["recipient_id"] for e in seen] == ids[:3]

    restarted_allocator = SequenceAllocator(database, block_size=4)  # a new master process
    await restarted_allocator.start()
    restarted = StatusLog(database, restarted_allocator)
    await restarted.apply([StatusChange(rid, "ERROR") for rid in ids[3:]], NOW)
    more, _ = await _read_all(restarted, cursor, 2)
    assert [e["recipient_id"] for e in more] == ids[3:]
    assert min(e["_id"] for e in more) > max(e["_id"] for e in seen)


@aio_test
async def test_counts_follow_status_changes_and_unknown_ids_are_reported(database):
    ids = await _recipients(database, 3)
    status_log = await started_status_log(database)
    result = await status_log.apply([StatusChange(ids[0], "FINISHED"), StatusChange("nope", "ERROR"),
                                     StatusChange(ids[1], "WARNING")], NOW)
    assert result.unknown == ["nope"] and sorted(result.applied) == sorted(ids[:2])
    mailing = await MailingStore(database).get(1)
    assert mailing["counts"] == {"READY": 1, "FINISHED": 1, "WARNING": 1}


@aio_test
async def test_filters_apply_to_the_log(database):
    ids = await _recipients(database, 4)
    allocator = SequenceAllocator(database)
    await allocator.start()
    status_log = StatusLog(database, allocator)
    await status_log.apply([StatusChange(ids[0], "FINISHED"), StatusChange(ids[1], "ERROR")], NOW)
    entries, cursor = await status_log.read_since(0, {"status": {"$in": ["ERROR"]}}, 10)
    assert [e["recipient_id"] for e in entries] == [ids[1]]
    assert cursor == allocator.horizon
