"""The block write path: database work per block, concurrent writers, crashes between writes."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.config.settings import DispatchConfig
from cloudmailing.master.app import build_services
from cloudmailing.storage.blocks import RECENT_PAGES
from cloudmailing.storage.database import Database, WriteRefused
from cloudmailing.storage.ledger import Change
from cloudmailing.storage.shared_locks import SharedLocks
from cloudmailing.storage.stores import open_stores
from tests.helpers import CommandWatcher, aio_test
from tests.storage.world import NOW, mailing_with

SATELLITE = {"serial": "sat-a", "group": "", "domain_affinity": []}


class _Commands(CommandWatcher):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in ("endSessions", "ismaster", "hello"):
            self.names.append(event.command_name)


async def _report_with_answer_lost(stores, block_id, owner, name):
    """A FINISHED report of slot 0 whose ``owner.name`` write the database does, then the
    connection resets before the answer: the edit fails with ConnectionError."""
    write = getattr(owner, name)

    async def written_but_unanswered(*args):
        await write(*args)
        raise ConnectionError("connection reset")

    setattr(owner, name, written_but_unanswered)
    try:
        with pytest.raises(ConnectionError):
            await stores.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1)], NOW)
    finally:
        setattr(owner, name, write)


class _Clock:
    def seconds(self) -> float:
        return (NOW - datetime.datetime(1970, 1, 1)).total_seconds()


async def _commands_for_one_block(mongo_url: str, db_name: str, block_size: int) -> tuple[list[str], list[str]]:
    """The database commands of leasing, then reporting, one block of ``block_size`` recipients."""
    listener = _Commands()
    client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=False, event_listeners=[listener])
    database = Database(client=client, db=client[db_name])
    database.locks.shared = SharedLocks(lambda: database.write_locks, "a master")  # as a master's
    try:
        # One recipient more, in a second block: the report does not finish the mailing (its
        # finish, once a mailing, reads every block's state).
        stores, _ = await mailing_with(database, block_size + 1, block_recipients=block_size)
        services = build_services(stores, _Clock(), dispatch=DispatchConfig(max_lease_size=5000))
        await database.bucket("status_log", 0)  # the log's bucket and its indexes exist before counting
        stores.status_log.allocator.release(await stores.status_log.allocator.allocate(1))  # numbers reserved
        listener.names.clear()
        leased = await services.dispatcher.lease(SATELLITE, block_size)
        lease_commands = list(listener.names)
        listener.names.clear()
        replies = [Outcome(r["id"], "FINISHED", 250, "", f"ok {i}", [f"< 250 queued as {i}"])
                   for i, r in enumerate(leased)]
        await services.dispatcher.report(SATELLITE, replies)
        assert len(leased) == block_size
        assert (await stores.mailings.get(1))["counts"] == {"READY": 1, "FINISHED": block_size}
        return lease_commands, list(listener.names)
    finally:
        await client.drop_database(db_name)
        await client.close()


@aio_test
async def test_database_commands_per_lease_and_report_do_not_grow_with_the_block(mongo_url, db_name):
    small = await _commands_for_one_block(mongo_url, db_name + "s", 10)
    large = await _commands_for_one_block(mongo_url, db_name + "l", 400)
    assert small == large
    lease, report = small
    # Each includes taking and giving back the locks other masters see (an insert and a delete
    # each): the block's and its mailing's.
    assert len(lease) <= 12 and len(report) <= 12, (lease, report)


@aio_test
async def test_a_report_racing_a_lease_expiry_and_another_report_loses_nothing(database):
    stores, ids = await mailing_with(database, 6, block_recipients=6)
    services = build_services(stores, _Clock(), dispatch=DispatchConfig(lease_seconds=60))
    leased = await services.dispatcher.lease(SATELLITE, 6)
    first = [Outcome(r["id"], "FINISHED", None, "", "") for r in leased[:3]]
    second = [Outcome(r["id"], "ERROR", 550, "", "") for r in leased[3:]]
    await asyncio.gather(services.dispatcher.report(SATELLITE, first), services.dispatcher.expire_leases(),
                         services.dispatcher.report(SATELLITE, second), services.dispatcher.expire_leases())
    statuses = {s["id"]: s["status"] for s in await services.reports.statuses(ids, {})}
    assert [statuses[rid] for rid in ids] == ["FINISHED"] * 3 + ["ERROR"] * 3
    assert (await stores.mailings.get(1))["counts"] == {"READY": 0, "FINISHED": 3, "ERROR": 3}


@aio_test
async def test_two_masters_writing_one_block_never_lose_an_update(database, mongo_url):
    stores, ids = await mailing_with(database, 4, block_recipients=4)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    other_client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=False)
    other = await open_stores(Database(client=other_client, db=other_client[database.db.name]))
    real_load = stores.blocks.load
    interleaved = []

    async def load_then_let_the_other_master_write(wanted, cached=False):
        block = await real_load(wanted, cached)
        if not interleaved:  # between this master's read and write, the other one writes the block
            interleaved.append(True)
            await other.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1)], NOW)
        return block

    stores.blocks.load = load_then_let_the_other_master_write
    try:
        await stores.ledger.edit(block_id, lambda b: [Change(1, "ERROR", 1)], NOW)
    finally:
        await other_client.close()
    block = await real_load(block_id)
    assert [block.columns.status_of(slot) for slot in range(4)] == ["FINISHED", "ERROR", "READY", "READY"]
    assert block.version == 2
    counts = (await stores.mailings.get(1))["counts"]
    assert (counts["FINISHED"], counts["ERROR"], counts["READY"]) == (1, 1, 2)


async def written_behind_its_back(database: Any, mongo_url: str, status: str) -> tuple[Any, int]:
    """Stores whose master remembers a block at v1, and the block's id: another master (its own
    client) then gives recipient 1 ``status`` (v2, unseen by the first)."""
    stores, ids = await mailing_with(database, 3, block_recipients=3)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    await stores.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1)], NOW)
    other_client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=False)
    try:
        other = await open_stores(Database(client=other_client, db=other_client[database.db.name]))
        await other.ledger.edit(block_id, lambda b: [Change(1, status, 1)], NOW)
    finally:
        await other_client.close()
    return stores, block_id


@aio_test
async def test_an_edit_from_a_state_another_master_wrote_over_reads_it_again(database, mongo_url):
    stores, block_id = await written_behind_its_back(database, mongo_url, "ERROR")
    seen = []

    def record(block):
        seen.append(block.version)
        return [Change(2, "WARNING", 1)]

    await stores.ledger.edit(block_id, record, NOW)
    assert seen == [1, 2]  # its own v1 first: the save refused it, then the database's v2
    block = await stores.blocks.load(block_id)
    assert [block.columns.status_of(slot) for slot in range(3)] == ["FINISHED", "ERROR", "WARNING"]
    assert block.version == 3


@aio_test
async def test_a_page_whose_state_write_was_cut_is_deleted_at_start_up(database):
    stores, ids = await mailing_with(database, 3, block_recipients=3)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    await stores.ledger.edit(block_id, lambda b: [Change(1, "WARNING", 1)], NOW)
    await stores.ledger.save_logged_floor()

    async def killed(block):
        raise ConnectionError("master killed")

    stores.blocks.save = killed
    with pytest.raises(ConnectionError):
        await stores.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1), Change(2, "ERROR", 1)], NOW)
    restarted = await open_stores(database)  # a new master process on the same database
    assert await restarted.ledger.recover() == 1
    assert await restarted.ledger.recover() == 0
    entries, _, _ = await restarted.status_log.read_since(0, 0, 100)
    assert [(e["id"], e["r"]["status"]) for e in entries] == [(ids[1], "WARNING")]
    # The satellite reports again: recorded once.
    await restarted.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1), Change(2, "ERROR", 1)], NOW)
    entries, _, _ = await restarted.status_log.read_since(0, 0, 100)
    assert [e["r"]["status"] for e in entries] == ["WARNING", "FINISHED", "ERROR"]


@aio_test
async def test_a_state_write_that_failed_unseen_is_settled_by_the_state(database):
    stores, ids = await mailing_with(database, 2, block_recipients=2)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    await _report_with_answer_lost(stores, block_id, stores.blocks, "save")
    assert (await stores.status_log.read_since(0, 0, 10))[0] == []  # in flight: not read yet
    assert (await stores.mailings.get(1))["counts"] == {"READY": 2}  # trails the state
    await stores.ledger.settle_unsure()
    entries, _, _ = await stores.status_log.read_since(0, 0, 10)
    assert [(e["id"], e["r"]["status"]) for e in entries] == [(ids[0], "FINISHED")]
    await stores.ledger.repair_stale()  # as the next life-cycle tick does
    assert (await stores.mailings.get(1))["counts"] == {"READY": 1, "FINISHED": 1}
    assert await stores.blocks.counts([1]) == {1: {"READY": 1, "FINISHED": 1}}


@aio_test
async def test_a_log_page_written_but_unanswered_is_never_read_and_is_settled_away(database):
    """The database wrote the page and died before answering (CI saw a whole report's FINISHED
    twice in the cursor): the page stays in flight until the state says it is not named."""
    stores, ids = await mailing_with(database, 2, block_recipients=2)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    await _report_with_answer_lost(stores, block_id, stores.status_log, "insert")
    # The satellite reports again, before the life-cycle tick: recorded, once.
    await stores.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1)], NOW)
    assert [e["r"]["status"] for e in (await stores.status_log.read_since(0, 0, 10))[0]] == []  # one in flight
    await stores.ledger.settle_unsure()
    await stores.ledger.save_logged_floor()
    entries, _, _ = await stores.status_log.read_since(0, 0, 10)
    assert [(e["id"], e["r"]["status"]) for e in entries] == [(ids[0], "FINISHED")]
    assert await (await open_stores(database)).ledger.recover() == 0  # no orphan left for a restart


@aio_test
async def test_a_read_failing_before_the_page_is_built_holds_no_cursor_back(database):
    """The block's addresses could not be read (a connection reset): no change number may stay
    in flight, or every cursor would stop there until the master restarts."""
    stores, ids = await mailing_with(database, 2, block_recipients=2)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    stores.blocks._addresses.clear()
    read = stores.blocks.addresses
    failures = [ConnectionError("connection reset")]

    async def addresses_once_failing(block_id: int, count: int = 0) -> list[tuple[str, str]]:
        if failures:
            raise failures.pop()
        return await read(block_id, count)

    stores.blocks.addresses = addresses_once_failing  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await stores.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1)], NOW)
    await stores.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1), Change(1, "ERROR", 1)], NOW)
    entries, _, _ = await stores.status_log.read_since(0, 0, 10)
    assert [(e["id"], e["r"]["status"]) for e in entries] == [(ids[0], "FINISHED"), (ids[1], "ERROR")]


@aio_test
async def test_a_mailing_deleted_while_a_lease_is_written_leaves_no_summary_behind(database):
    """The delete waits for the lease under way: its summary is not written back afterwards,
    pointing at nothing, held by a satellite for ever."""
    from cloudmailing.storage.blocks import Lease

    stores, ids = await mailing_with(database, 3)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    save, saved, go_on = stores.blocks.save, asyncio.Event(), asyncio.Event()

    async def save_then_wait(block):
        written = await save(block)
        saved.set()
        await go_on.wait()  # the delete starts here
        return written

    stores.blocks.save = save_then_wait  # type: ignore[method-assign]

    def take(block):
        block.lease = Lease("L1", "sat-a", NOW + datetime.timedelta(minutes=5))
        block.columns.leased[0] = 1
        return []

    lease = asyncio.ensure_future(stores.ledger.edit(block_id, take, NOW))
    await saved.wait()
    delete = asyncio.ensure_future(stores.delete_mailing(1))
    await asyncio.sleep(0.2)
    go_on.set()
    await asyncio.gather(lease, delete)
    assert await database.blocks.find_one({"_id": block_id}) is None
    assert await database.blocks_done.find_one({"_id": block_id}) is None
    assert await stores.blocks.held_by("sat-a") == []


@aio_test
async def test_start_up_keeps_the_committed_pages_of_a_block_written_more_than_64_times(database):
    """More writes to one block than its state named pages between two saves of the logged floor
    (no life-cycle tick between them): start-up took the oldest for orphans and deleted them."""
    stores, ids = await mailing_with(database, 100, block_recipients=500)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    await stores.ledger.edit(block_id, lambda b: [Change(0, "FINISHED", 1, details={"reply_text": "250 first"})],
                             NOW)
    for slot in range(1, 100):
        await stores.ledger.edit(block_id, lambda b, slot=slot: [Change(slot, "FINISHED", 1)], NOW)
    assert len((await stores.blocks.load(block_id)).recent_pages) <= RECENT_PAGES  # the state stays small
    restarted = await open_stores(database)  # a restart, clean or not: the floor saved at no tick
    orphans = await restarted.ledger.recover()
    read, _, _ = await restarted.status_log.read_since(0, 0, 1000)
    details = await restarted.ledger.details(await restarted.blocks.load(block_id), [0])
    assert (orphans, len(read), details[0]["reply_text"]) == (0, 100, "250 first")


@aio_test
async def test_an_edit_with_nothing_to_write_on_this_masters_view_asks_the_database(database, mongo_url):
    stores, block_id = await written_behind_its_back(database, mongo_url, "WARNING")

    def give_up_the_warnings(block):  # nothing to do in v1; in v2, recipient 1
        slots = [slot for slot in range(len(block.columns)) if block.columns.status_of(slot) == "WARNING"]
        return [Change(slot, "ERROR", 2) for slot in slots] or None

    written = await stores.ledger.edit(block_id, give_up_the_warnings, NOW)
    assert written is not None and [c.slot for c in written[1]] == [1]
    block = await stores.blocks.load(block_id)
    assert [block.columns.status_of(slot) for slot in range(3)] == ["FINISHED", "ERROR", "READY"]


@aio_test
async def test_a_block_written_while_the_logged_floor_is_held_back_is_refused_past_the_bound(database, monkeypatch):
    """Its state names every page above the floor: while a write in flight holds the floor back,
    the names grow to the bound, then writes are refused (to be retried), not names dropped."""
    monkeypatch.setattr("cloudmailing.storage.ledger.MAX_NAMED_PAGES", RECENT_PAGES + 2)
    stores, ids = await mailing_with(database, 100, block_recipients=500)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    in_flight = await stores.status_log.allocator.allocate(1)  # another block's write, not ended
    for slot in range(RECENT_PAGES + 2):
        await stores.ledger.edit(block_id, lambda b, slot=slot: [Change(slot, "FINISHED", 1)], NOW)
    with pytest.raises(WriteRefused):
        await stores.ledger.edit(block_id, lambda b: [Change(99, "FINISHED", 1)], NOW)
    stores.status_log.allocator.release(in_flight)
    await stores.ledger.edit(block_id, lambda b: [Change(99, "FINISHED", 1)], NOW)
    assert (await stores.blocks.load(block_id)).recent_pages == [in_flight + RECENT_PAGES + 3]
    restarted = await open_stores(database)
    assert await restarted.ledger.recover() == 0
