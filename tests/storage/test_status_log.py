"""The cursor contract: every change read exactly once, in commit order, across restarts."""

from __future__ import annotations

import asyncio
import datetime
import random
from collections import defaultdict

from pymongo import AsyncMongoClient, monitoring

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


class _UpdateCounter(monitoring.CommandListener):
    """Counts the update commands a client sends."""

    def __init__(self) -> None:
        self.updates = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.updates += event.command_name == "update"

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@aio_test
async def test_a_report_of_many_different_replies_is_one_update_per_block(database, mongo_url):
    from cloudmailing.storage.database import Database
    from cloudmailing.storage.recipients import BLOCK_SIZE

    ids = await _recipients(database, BLOCK_SIZE + 50)
    blocks = {doc["block"] async for doc in database.recipients.find({}, {"block": 1})}
    counter = _UpdateCounter()
    client = AsyncMongoClient(mongo_url, tz_aware=False, event_listeners=[counter])
    watched = Database(client=client, db=client[database.db.name], write_lock=database.write_lock)
    status_log = await started_status_log(watched)
    changes = [StatusChange(rid, "FINISHED", {"reply_code": 250, "reply_enhanced_code": "2.0.0",
                                              "reply_text": f"queued as {rid}", "smtp_log": f"> RCPT TO:<{rid}>"})
               for rid in ids]
    await status_log.apply(changes, NOW)
    await client.close()
    recipient_updates = counter.updates - 1  # the other one moves the mailing's counts
    assert recipient_updates == len(blocks) >= 2
    docs = (await RecipientStore(database).get_many(ids)).values()
    details = await StatusLog(database, SequenceAllocator(database)).details(docs)
    assert {rid: d["reply_text"] for rid, d in details.items()} == {rid: f"queued as {rid}" for rid in ids}
    assert all(doc["status"] == "FINISHED" and "reply_text" not in doc for doc in docs)


@aio_test
async def test_a_change_that_leaves_details_unsaid_keeps_the_last_ones(database):
    ids = await _recipients(database, 2)
    status_log = await started_status_log(database)
    await status_log.apply([StatusChange(ids[0], "WARNING", {"reply_code": 451, "reply_enhanced_code": "4.7.1",
                                                             "reply_text": "greylisted", "smtp_log": "< 451"})], NOW)
    await status_log.apply([StatusChange(ids[0], "TIMEOUT", {"reply_text": "mailing ended"}),
                            StatusChange(ids[1], "TIMEOUT", {"reply_text": "mailing ended"})], NOW)
    docs = (await RecipientStore(database).get_many(ids)).values()
    details = await status_log.details(docs)
    assert details[ids[0]] == {"reply_code": 451, "reply_enhanced_code": "4.7.1", "reply_text": "mailing ended",
                               "smtp_log": "< 451"}
    assert details[ids[1]] == {"reply_code": None, "reply_enhanced_code": "", "reply_text": "mailing ended",
                               "smtp_log": ""}
    entries = await database.status_log.find({"status": "TIMEOUT"}).sort("_id", 1).to_list()
    assert entries[0]["record"]["reply_code"] == 451 and entries[1]["record"]["reply_code"] is None
