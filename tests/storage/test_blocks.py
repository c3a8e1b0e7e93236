"""Block summaries: the searched ones hold only the work in flight, the done ones the rest."""

from __future__ import annotations

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.config.settings import DispatchConfig
from cloudmailing.master.app import build_services
from cloudmailing.storage import counters
from cloudmailing.storage.blocks import BLOCK_ID_COUNTER
from cloudmailing.storage.database import BLOCKS_PER_BUCKET
from cloudmailing.storage.recipient_index import generated_id
from tests.helpers import aio_test
from tests.storage.test_ledger import SATELLITE, _Clock
from tests.storage.world import mailing_with


async def _ids(collection) -> list[int]:
    return sorted([doc["_id"] async for doc in collection.find({}, {"_id": 1})])


async def _deliver_all(services, count: int, status: str = "FINISHED") -> None:
    leased = await services.dispatcher.lease(SATELLITE, count)
    await services.dispatcher.report(SATELLITE, [Outcome(r["id"], status, 250, "", "ok") for r in leased])


@aio_test
async def test_a_block_moves_to_the_done_summaries_when_its_last_recipient_ends_and_back_on_reset(database):
    stores, ids = await mailing_with(database, 6, block_recipients=3)  # two blocks
    services = build_services(stores, _Clock(), dispatch=DispatchConfig(max_lease_size=10))
    first, second = await _ids(database.blocks)
    assert await _ids(database.blocks_done) == []

    await _deliver_all(services, 3)  # the first block, whole
    assert (await _ids(database.blocks), await _ids(database.blocks_done)) == ([second], [first])
    assert [summary["_id"] async for summary in stores.blocks.of_mailing(1)] == [first, second]
    assert (await stores.blocks.counts([1]))[1] == {"READY": 3, "FINISHED": 3}

    await services.recipients.reset(ids[:1])  # a recipient of the first block is due again
    assert (await _ids(database.blocks), await _ids(database.blocks_done)) == ([first, second], [])
    leased = await services.dispatcher.lease(SATELLITE, 4)  # at once: the reset said there is work
    assert ids[0] in [r["id"] for r in leased] and len(leased) == 4
    await services.dispatcher.report(SATELLITE, [Outcome(r["id"], "FINISHED", 250, "", "ok") for r in leased])
    assert (await _ids(database.blocks), await _ids(database.blocks_done)) == ([], [first, second])
    assert (await stores.blocks.counts([1]))[1] == {"FINISHED": 6}


@aio_test
async def test_a_leased_block_stays_searched_until_its_lease_ends(database):
    stores, _ = await mailing_with(database, 2, block_recipients=2)
    services = build_services(stores, _Clock(), dispatch=DispatchConfig(max_lease_size=2))
    [block] = await _ids(database.blocks)
    leased = await services.dispatcher.lease(SATELLITE, 2)
    await services.dispatcher.report(SATELLITE, [Outcome(leased[0]["id"], "FINISHED", 250, "", "ok")])
    assert await _ids(database.blocks) == [block]  # one recipient still leased
    await services.dispatcher.report(SATELLITE, [Outcome(leased[1]["id"], "ERROR", 550, "", "no")])
    assert (await _ids(database.blocks), await _ids(database.blocks_done)) == ([], [block])


@aio_test
async def test_a_summary_left_in_both_by_a_crash_counts_once_and_is_repaired(database):
    """A crash between writing a moved summary and deleting its old copy leaves both: readers
    keep the newer, and the start-up repair deletes the other."""
    stores, _ = await mailing_with(database, 2, block_recipients=2)
    services = build_services(stores, _Clock(), dispatch=DispatchConfig(max_lease_size=2))
    [block] = await _ids(database.blocks)
    stale = await database.blocks.find_one({"_id": block})
    await _deliver_all(services, 2)
    await database.blocks.insert_one(stale)  # the old copy, as the crash left it

    assert [s["_id"] async for s in stores.blocks.of_mailing(1)] == [block]
    assert (await stores.blocks.counts([1]))[1] == {"FINISHED": 2}
    assert (await stores.blocks.tail(1, False))["open"] is False
    await services.lifecycle.recover()
    assert (await _ids(database.blocks), await _ids(database.blocks_done)) == ([], [block])


@aio_test
async def test_done_summaries_written_before_the_split_are_moved_at_start_up(database):
    stores, _ = await mailing_with(database, 4, block_recipients=2)
    services = build_services(stores, _Clock(), dispatch=DispatchConfig(max_lease_size=2))
    await _deliver_all(services, 2)
    [done] = await _ids(database.blocks_done)
    summary = await database.blocks_done.find_one({"_id": done})
    await database.blocks_done.delete_one({"_id": done})
    await database.blocks.insert_one(summary)  # where an earlier version kept it

    await services.lifecycle.recover()
    assert await _ids(database.blocks_done) == [done] and done not in await _ids(database.blocks)
    assert (await stores.blocks.counts([1]))[1] == {"READY": 2, "FINISHED": 2}


async def _summary_versions(database, block_id: int) -> tuple[list[int], list[int]]:
    """The versions of the block's summary in the searched and in the done collection."""
    searched = [doc["sv"] async for doc in database.blocks.find({"_id": block_id})]
    done = [doc["sv"] async for doc in database.blocks_done.find({"_id": block_id})]
    return searched, done


@aio_test
async def test_a_late_summary_from_another_master_never_replaces_a_newer_one(database):
    """Two masters save a block one after the other; the first one's summary write comes last."""
    stores, _ = await mailing_with(database, 4, block_recipients=4)
    [block_id] = await _ids(database.blocks)
    late = await stores.blocks.load(block_id)
    late.columns.set_status(0, "FINISHED")  # this master's edit: saved, its summary delayed
    assert await stores.blocks.save(late)
    newer = await stores.blocks.load(block_id)
    newer.columns.set_status(1, "ERROR")  # the other master's edit, on top
    assert await stores.blocks.save(newer)
    await stores.blocks.write_summary(newer, was_done=False)

    await stores.blocks.write_summary(late, was_done=False)
    assert await _summary_versions(database, block_id) == ([newer.version], [])
    assert (await stores.blocks.counts([1]))[1] == {"READY": 2, "FINISHED": 1, "ERROR": 1}


@aio_test
async def test_a_late_summary_neither_lingers_beside_a_moved_newer_one_nor_deletes_it(database):
    stores, _ = await mailing_with(database, 2, block_recipients=2)
    [block_id] = await _ids(database.blocks)
    late = await stores.blocks.load(block_id)
    late.columns.set_status(0, "FINISHED")  # one recipient left to deliver: still searched
    assert await stores.blocks.save(late)
    done = await stores.blocks.load(block_id)
    done.columns.set_status(1, "FINISHED")  # the other master ends the block: it moves
    assert await stores.blocks.save(done)
    await stores.blocks.write_summary(done, was_done=False)

    await stores.blocks.write_summary(late, was_done=False)  # would land in the searched ones
    assert await _summary_versions(database, block_id) == ([], [done.version])

    reopened = await stores.blocks.load(block_id)
    reopened.columns.set_status(1, "READY")  # a reset moves it back...
    assert await stores.blocks.save(reopened)
    await stores.blocks.write_summary(reopened, was_done=True)
    await stores.blocks.write_summary(done, was_done=False)  # ... and a late "done" must not delete it
    assert await _summary_versions(database, block_id) == ([reopened.version], [])


@aio_test
async def test_unknown_generated_ids_read_nothing_and_leave_nothing_behind(database):
    """Ids of the master's forms name a block: forged ones are found nowhere, cost no memory and
    create no collection; those naming a block above the block counter are not even read."""
    stores, ids = await mailing_with(database, 3)
    collections, remembered = sorted(await database.db.list_collection_names()), set(database._indexed_buckets)
    loads = 0
    real_load = stores.blocks.load

    async def counted_load(block_id, cached=False):
        nonlocal loads
        loads += 1
        return await real_load(block_id, cached)

    stores.blocks.load = counted_load
    above = [generated_id(10**12 + n * BLOCKS_PER_BUCKET, 0) for n in range(300)] + ["b999999999999s1-abcdef"]
    assert await stores.lookup.find(above) == {}
    assert loads == 0
    # Below the counter, in buckets that do not exist: read, found absent, forgotten.
    await counters.set_at_least(database, BLOCK_ID_COUNTER, 100 * BLOCKS_PER_BUCKET)
    below = [generated_id(n * BLOCKS_PER_BUCKET, 0) for n in range(1, 100)]
    assert await stores.lookup.find(below) == {}
    assert loads == 99
    assert sorted(await database.db.list_collection_names()) == collections
    assert database._indexed_buckets == remembered
    assert list(await stores.lookup.find(ids[:1])) == ids[:1]  # the real ones are still found
