"""Two masters on one database, each with its own connection and its own process locks: their
writes to one block never lose an update, a reader through either never skips a change the
other is writing, and a dead master's half-done writes are recovered by the other."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from twisted.internet import task

from cloudmailing.common.process_identity import ProcessIdentity
from cloudmailing.services.master_recovery import MasterRecovery
from cloudmailing.services.writer_claim import CLAIM_SECONDS, RENEW_SECONDS, MasterPresence
from cloudmailing.storage.ledger import Change
from cloudmailing.storage.status_log import LogPage, writer_floors
from cloudmailing.storage.stores import Stores, open_stores
from cloudmailing.storage.writer_claims import MasterRegistry
from tests.helpers import aio_test
from tests.storage.world import NOW, mailing_with, master_stores


async def _read_all(stores: Stores) -> list:
    collected: list = []
    page = seq = 0
    while True:
        entries, page, seq = await stores.status_log.read_since(page, seq, 50)
        if not entries:
            return collected
        collected.extend(entries)


@aio_test
async def test_two_masters_racing_on_one_block_lose_no_update(database, mongo_url):
    setup, ids = await mailing_with(database, 40, block_recipients=40)
    block_id = (await setup.lookup.find(ids[:1]))[ids[0]].block.id
    async with master_stores(mongo_url, database.db.name, "alpha") as alpha, \
            master_stores(mongo_url, database.db.name, "beta") as beta:

        async def change(stores: Stores, slot: int) -> None:
            await stores.ledger.edit(block_id, lambda block: [Change(slot, "FINISHED", 1)], NOW)

        # Twenty edits from each master at once, each of its own recipient.
        await asyncio.gather(*(change(alpha if slot % 2 else beta, slot) for slot in range(40)))
        block = await alpha.blocks.load(block_id)
        assert [block.columns.status_of(slot) for slot in range(40)] == ["FINISHED"] * 40
        assert block.version == 40  # every edit wrote once, over the one before it
        assert (await alpha.mailings.get(1))["counts"] == {"READY": 0, "FINISHED": 40}
        for master in (alpha, beta):  # the floors' next turn: each gives up the rest of its range
            await master.status_log.allocator.publish(others_running=True)
        for reader in (alpha, beta):
            assert sorted(entry["s"] for entry in await _read_all(reader)) == list(range(40))
        assert await database.write_locks.count_documents({}) == 0  # every lock given back


@aio_test
async def test_a_reader_never_passes_a_change_another_master_is_writing(database, mongo_url):
    setup, ids = await mailing_with(database, 4, block_recipients=2)
    blocks = [(await setup.lookup.find([rid]))[rid].block.id for rid in ids[::2]]
    async with master_stores(mongo_url, database.db.name, "alpha") as alpha, \
            master_stores(mongo_url, database.db.name, "beta") as beta:
        in_flight = await alpha.status_log.allocator.allocate(1)  # alpha is writing change `in_flight`
        await beta.ledger.edit(blocks[1], lambda block: [Change(0, "FINISHED", 1)], NOW)
        assert await _read_all(beta) == []  # beta's own change is numbered after alpha's range
        assert await beta.status_log.allocator.readable() < in_flight
        alpha.status_log.allocator.release(in_flight)  # written (here: given up) ...
        assert await _read_all(beta) == []  # ... but alpha has not said so yet
        await alpha.status_log.allocator.publish(others_running=True)  # its next turn
        assert [entry["s"] for entry in await _read_all(beta)] == [0]
        assert [floor["_id"] for floor in await writer_floors(beta.database)] == ["beta"]
        assert [entry["s"] for entry in await _read_all(alpha)] == []  # beta's floor: as when it reserved
        await beta.status_log.allocator.publish(others_running=True)
        assert [entry["s"] for entry in await _read_all(alpha)] == [0]
        # Each gave up the rest of its range: an empty page covers it, read past without a search.
        fillers = [page async for page in (await alpha.database.bucket("status_log", 0)).find({"m": 0})]
        assert [page["_id"] for page in fillers][:1] == [in_flight + 1] and len(fillers) == 2


@aio_test
async def test_a_dead_masters_locks_orphan_pages_and_floor_are_recovered(database, mongo_url):
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    setup, ids = await mailing_with(database, 4, block_recipients=4)
    block_id = (await setup.lookup.find(ids[:1]))[ids[0]].block.id
    registry = MasterRegistry(database)
    dead = MasterPresence(registry, clock, ProcessIdentity("elsewhere", "b", "pid:[1]", 7, 1))
    await dead.register()
    async with master_stores(mongo_url, database.db.name, dead.key) as alpha, \
            master_stores(mongo_url, database.db.name, "beta") as beta:
        await alpha.ledger.edit(block_id, lambda block: [Change(0, "FINISHED", 1)], NOW)
        # Alpha dies in its next edit: the lock taken, the page logged, the state never written.
        await alpha.database.write_locks.insert_one({"_id": f"block:{block_id}", "holder": dead.key})
        first = await alpha.status_log.allocator.allocate(1)
        await alpha.status_log.insert(LogPage(first, 1, NOW, [{"q": first, "id": ids[1], "b": block_id, "s": 1,
                                                               "t": False, "r": {"status": "ERROR"}}]))
        await alpha.database.mailings.update_one({"_id": 1}, {"$inc": {"counts.ERROR": 1}})  # counted, not written

        with pytest.raises(TimeoutError):  # beta waits for the dead master's lock
            await asyncio.wait_for(beta.ledger.edit(block_id, lambda block: [Change(2, "ERROR", 1)], NOW), 0.3)
        assert [entry["s"] for entry in await _read_all(beta)] == []  # and for its floor

        dead_floor = (await writer_floors(database))[0]
        recovery = MasterRecovery(beta, clock, "beta")
        assert await recovery.recover_dead() == []  # its entry has not lapsed yet
        clock.advance(CLAIM_SECONDS + RENEW_SECONDS + 1)
        assert await recovery.recover_dead() == [dead.key]
        assert await database.write_locks.count_documents({}) == 0
        assert await writer_floors(database) == []
        assert await registry.all() == []
        fillers = [(page["_id"], page["last"]) async for page in
                   (await database.bucket("status_log", 0)).find({"m": 0})]
        assert fillers == [(first, dead_floor["end"])]  # the orphan's number on: nobody writes them
        assert (await beta.mailings.get(1))["counts"] == {"READY": 3, "FINISHED": 1, "ERROR": 0}  # recounted
        assert [(entry["s"], entry["r"]["status"]) for entry in await _read_all(beta)] == [(0, "FINISHED")]
        await beta.ledger.edit(block_id, lambda block: [Change(2, "ERROR", 1)], NOW)  # no longer waits
        assert [entry["s"] for entry in await _read_all(beta)] == [0, 2]
        assert await recovery.recover_dead() == []


@aio_test
async def test_a_reader_never_passes_the_range_its_own_master_is_reserving(database, monkeypatch):
    """The counter counts a new range before the allocator has taken it as its own: a reader of
    the same master in between must stop below it (a test of two masters with a master killed
    showed a cursor jumping over the first change of a new range)."""
    from cloudmailing.storage import counters

    stores = await open_stores(database, writer_key="alpha")
    allocator = stores.status_log.allocator
    seen = []
    add_held = counters.add_held

    async def read_meanwhile(*args, **kwargs):
        end = await add_held(*args, **kwargs)
        seen.append(await allocator.readable())  # a cursor read served while the range is taken
        return end

    monkeypatch.setattr(counters, "add_held", read_meanwhile)
    first = await allocator.allocate(1)
    assert seen == [first - 1]


@aio_test
async def test_a_master_dead_while_reserving_numbers_never_has_them_given_again(database, mongo_url):
    """It died holding the counter's lock, its floor written and the counter not raised yet: the
    recovery must keep the counter's lock until the counter is past that range (a two-master
    test once lost 2,149 changes under fillers over another master's numbers)."""
    from cloudmailing.storage import counters
    from cloudmailing.storage.status_log import SEQUENCE_COUNTER

    clock = task.Clock()
    clock.advance(NOW.timestamp())
    setup, ids = await mailing_with(database, 2, block_recipients=2)
    block_id = (await setup.lookup.find(ids[:1]))[ids[0]].block.id
    dead = MasterPresence(MasterRegistry(database), clock, ProcessIdentity("elsewhere", "b", "pid:[1]", 7, 1))
    await dead.register()
    start = await counters.current(database, SEQUENCE_COUNTER) + 1
    await database.log_writers.insert_one({"_id": dead.key, "floor": start, "end": start + 9_999})
    await database.write_locks.insert_one({"_id": f"counter:{SEQUENCE_COUNTER}", "holder": dead.key})
    clock.advance(CLAIM_SECONDS + RENEW_SECONDS + 1)
    async with master_stores(mongo_url, database.db.name, "beta") as beta:
        edit = asyncio.ensure_future(beta.ledger.edit(block_id, lambda block: [Change(0, "FINISHED", 1)], NOW))
        await asyncio.sleep(0.2)  # beta waits for the counter's lock to reserve numbers
        assert not edit.done()
        assert await MasterRecovery(beta, clock, "beta").recover_dead() == [dead.key]
        await edit
        entries = await _read_all(beta)
        assert [(entry["s"], entry["r"]["status"]) for entry in entries] == [(0, "FINISHED")]
        assert entries[0]["q"] > start + 9_999  # the dead one's numbers were never given again
        assert await database.write_locks.count_documents({}) == 0


@aio_test
async def test_a_master_starting_beside_a_live_one_deletes_none_of_its_pages(database, mongo_url):
    """A block written more than its state remembers pages for (64), while a dead master's floor
    held the logged floor down: a start-up scan would take the older pages for orphans. With a
    master running, the starting one scans nothing (dead masters' ranges are their recovery's)."""
    from cloudmailing.master.app import build_services

    clock = task.Clock()
    clock.advance(NOW.timestamp())
    setup, ids = await mailing_with(database, 4, block_recipients=4)
    block_id = (await setup.lookup.find(ids[:1]))[ids[0]].block.id
    registry = MasterRegistry(database)
    alive = MasterPresence(registry, clock, ProcessIdentity("elsewhere", "b", "pid:[1]", 8, 1))
    await alive.register()
    async with master_stores(mongo_url, database.db.name, alive.key, 4) as alpha, \
            master_stores(mongo_url, database.db.name, "gamma", 4) as gamma:
        for attempt in range(1, 71):
            await alpha.ledger.edit(block_id, lambda block, n=attempt: [Change(0, "WARNING", n)], NOW)
        await alpha.status_log.allocator.publish(others_running=True)
        services = build_services(gamma, clock)
        recovery = MasterRecovery(gamma, clock, "gamma")
        await services.lifecycle.recover(await recovery.running(), "gamma")
        assert [entry["r"]["try_count"] for entry in await _read_all(gamma)] == list(range(1, 71))


@aio_test
async def test_a_batch_another_master_rolled_back_meanwhile_is_not_cut_again(database, mongo_url):
    """A starting master lists a dead master's cut batch and waits for its lock; another master
    rolls it back, a third adds an acknowledged batch to the same block: the first must not cut
    that block back again."""
    from tests.storage.world import recipients

    setup, ids = await mailing_with(database, 2, block_recipients=10)
    tail = (await setup.lookup.find(ids[:1]))[ids[0]].block.id
    # A dead master's batch, cut before it wrote anything (the tail block held 2).
    await database.ingest_batches.insert_one({"_id": "cut", "m": 1, "at": NOW, "blocks": [{"b": tail, "before": 2}],
                                              "holder": "dead"})
    async with master_stores(mongo_url, database.db.name, "alpha", 10) as alpha, \
            master_stores(mongo_url, database.db.name, "beta", 10) as beta, \
            master_stores(mongo_url, database.db.name, "gamma", 10) as gamma:
        running = {"alpha", "beta", "gamma"}
        go = asyncio.Event()
        hold = gamma.database.locks.hold
        waited = []

        @contextlib.asynccontextmanager
        async def hold_after_the_others(key, own_document=False):
            if not waited:  # gamma's first lock: it waits while beta recovers and alpha adds
                waited.append(key)
                await go.wait()
            async with hold(key, own_document):
                yield

        gamma.database.locks.hold = hold_after_the_others
        starting = asyncio.ensure_future(gamma.writer.roll_back_cut_batches(running))  # gamma's start-up
        await asyncio.sleep(0.2)
        assert waited  # gamma listed the batch and waits for its lock
        assert await beta.writer.roll_back_cut_batches(running) == [1]  # beta's recovery of the dead master
        added = await alpha.writer.append(1, False, recipients(3, prefix="late"), NOW)  # acknowledged to its client
        assert all(added)
        go.set()
        await starting
        block = await alpha.blocks.load(tail)
        content = await alpha.blocks.content(tail)
        assert len(block.columns) == 5 and len(content) == 5, (len(block.columns), len(content))


@aio_test
async def test_no_number_is_handed_out_while_a_stopping_master_gives_up_its_range(database):
    """A report still being written while the master stops would otherwise get a number the
    filler page covers: its page refused (or, before, silently dropped), its change lost."""
    stores = await open_stores(database, writer_key="alpha")
    allocator = stores.status_log.allocator
    allocator.release(await allocator.allocate(1))  # a range held, its floor published
    fill, allocations = allocator.fill, []

    async def fill_while_a_report_comes(first: int, last: int) -> None:
        allocations.append(asyncio.ensure_future(allocator.allocate(1)))
        await asyncio.sleep(0.05)
        assert not allocations[0].done()  # it waits for the give-up to end
        await fill(first, last)
        allocations.append(last)

    allocator.fill = fill_while_a_report_comes
    await allocator.withdraw()
    allocator.fill = fill
    assert await allocations[0] > allocations[1]  # a number past the filler's


@aio_test
async def test_a_recipients_changes_through_two_masters_are_read_in_commit_order(database, mongo_url):
    """Each master numbers from its own range: a change written through the one of the lower range
    after one written through the other was numbered below it, and read first."""
    setup, ids = await mailing_with(database, 3)
    block_id = (await setup.lookup.find(ids[:1]))[ids[0]].block.id
    async with master_stores(mongo_url, database.db.name, "alpha") as alpha, \
            master_stores(mongo_url, database.db.name, "beta") as beta:
        await alpha.ledger.edit(block_id, lambda b: [Change(1, "FINISHED", 1)], NOW)  # alpha's range first
        await beta.ledger.edit(block_id, lambda b: [Change(2, "FINISHED", 1)], NOW)  # then beta's, above it
        await beta.ledger.edit(block_id, lambda b: [Change(0, "WARNING", 1)], NOW)  # a soft bounce, then
        await alpha.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 2)], NOW)  # the delivery
        for stores in (alpha, beta):
            await stores.status_log.allocator.publish(others_running=True)
        for reader in (alpha, beta):
            read = await _read_all(reader)
            assert len(read) == 4 and [e["r"]["status"] for e in read if e["s"] == 0] == ["WARNING", "FINISHED"]
