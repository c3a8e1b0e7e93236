"""Block summaries: the searched ones hold only the work in flight, the done ones the rest."""

from __future__ import annotations

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.config.settings import DispatchConfig
from cloudmailing.master.app import build_services
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
