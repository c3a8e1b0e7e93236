"""Adding recipients when a write fails part-way, or races the mailing's deletion: a batch the
API did not acknowledge leaves nothing live behind, and never takes an acknowledged one away."""

from __future__ import annotations

import asyncio

import pytest

from cloudmailing.storage.ingest import MailingGone, NewRecipient
from tests.helpers import aio_test
from tests.storage.world import NOW, mailing_with, recipients


def _tracked(count: int) -> list[NewRecipient]:
    return [NewRecipient(f"t{i}@example.org", "example.org", {}, [], f"t-{i}") for i in range(count)]


async def _state(stores, mailing_id=1):
    """What is live: block sizes, the mailing's counts, the blocks' counts, announced batches."""
    sizes = [summary["n"] async for summary in stores.blocks.of_mailing(mailing_id)]
    counts = {k: v for k, v in (await stores.mailings.get(mailing_id))["counts"].items() if v}
    recount = (await stores.blocks.counts([mailing_id])).get(mailing_id, {})
    announced = await stores.database.ingest_batches.count_documents({})
    return sizes, counts, {k: v for k, v in recount.items() if v}, announced


@aio_test
async def test_a_batch_whose_write_fails_part_way_is_rolled_back_at_once(database):
    stores, _ = await mailing_with(database, 0, block_recipients=2)
    insert, calls = stores.blocks.insert, []

    async def second_insert_fails(block):
        calls.append(block.id)
        if len(calls) == 2:
            raise ConnectionError("connection reset")
        await insert(block)

    stores.blocks.insert = second_insert_fails
    with pytest.raises(ConnectionError):
        await stores.writer.append(1, False, _tracked(5), NOW)
    stores.blocks.insert = insert
    assert await _state(stores) == ([], {}, {}, 0)  # its first block is not left to be leased
    # The client's retry is not refused: its tracking ids were rolled back too.
    assert await stores.writer.append(1, False, _tracked(5), NOW) == [f"t-{i}" for i in range(5)]
    assert await _state(stores) == ([2, 2, 1], {"READY": 5}, {"READY": 5}, 0)



@aio_test
async def test_a_new_block_is_not_leased_before_its_batch_is_all_in(database):
    stores, _ = await mailing_with(database, 0, block_recipients=2)
    insert, calls, reached, go_on = stores.blocks.insert, [], asyncio.Event(), asyncio.Event()

    async def second_insert_waits_then_fails(block):
        calls.append(block.id)
        if len(calls) == 2:
            reached.set()
            await go_on.wait()
            raise ConnectionError("connection reset")
        await insert(block)

    stores.blocks.insert = second_insert_waits_then_fails
    adding = asyncio.ensure_future(stores.writer.append(1, False, recipients(3), NOW))
    await reached.wait()  # the first new block is in, searchable
    seen = []
    lease = asyncio.ensure_future(stores.ledger.edit(calls[0], lambda block: seen.append(len(block.columns)), NOW))
    await asyncio.sleep(0.2)
    go_on.set()
    with pytest.raises(ConnectionError):
        await adding
    assert await lease is None and seen == []  # it waited, then found the block gone

@aio_test
async def test_a_failed_write_into_the_tail_block_leaves_the_next_batch_whole(database):
    stores, first = await mailing_with(database, 2, block_recipients=10)
    save = stores.blocks.save

    async def failing_save(block):
        raise ConnectionError("connection reset")

    stores.blocks.save = failing_save  # the content is written, not the state
    with pytest.raises(ConnectionError):
        await stores.writer.append(1, False, recipients(3, "lost"), NOW)
    stores.blocks.save = save
    kept = await stores.writer.append(1, False, recipients(3, "kept"), NOW)
    await _same_after_start_up(stores, first, kept)


@aio_test
async def test_a_batch_whose_rollback_failed_too_is_rolled_back_before_the_next(database):
    stores, first = await mailing_with(database, 2, block_recipients=10)
    write_summary = stores.blocks.write_summary

    async def failing_write_summary(block, was_done=None):
        raise ConnectionError("connection reset")

    stores.blocks.write_summary = failing_write_summary  # the write and its rollback's cut both fail
    with pytest.raises(ConnectionError):
        await stores.writer.append(1, False, recipients(3, "lost"), NOW)
    stores.blocks.write_summary = write_summary
    assert (await _state(stores))[3] == 1  # left announced
    kept = await stores.writer.append(1, False, recipients(3, "kept"), NOW)
    await _same_after_start_up(stores, first, kept)


async def _same_after_start_up(stores, first, kept):
    """The acknowledged batch ``kept`` follows ``first`` in the tail block, before and after
    the start-up rollback of cut batches."""
    expected = {rid: f"u{i}@example.org" for i, rid in enumerate(first)} | \
        {rid: f"kept{i}@example.org" for i, rid in enumerate(kept)}
    for _ in range(2):
        found = await stores.lookup.find(list(expected))
        assert {rid: found[rid].email for rid in found} == expected
        assert await _state(stores) == ([5], {"READY": 5}, {"READY": 5}, 0)
        assert await stores.writer.roll_back_cut_batches(set()) == []


@pytest.mark.parametrize("test", [False, True])
@aio_test
async def test_a_batch_racing_the_mailings_deletion_stores_nothing(database, test):
    stores, _ = await mailing_with(database, 3)
    reached, go_on = asyncio.Event(), asyncio.Event()
    delete_index = stores.index.delete_mailing

    async def pause_after_the_blocks(mailing_id):
        reached.set()
        await go_on.wait()
        await delete_index(mailing_id)

    stores.index.delete_mailing = pause_after_the_blocks
    deleting = asyncio.ensure_future(stores.delete_mailing(1))
    await reached.wait()  # the blocks are gone, the ingest locks given back, the mailing still there
    try:
        with pytest.raises(MailingGone):
            await stores.writer.append(1, test, recipients(1, "late"), NOW)
    finally:
        go_on.set()
        await deleting
    assert await stores.mailings.get(1) is None
    assert [summary async for summary in stores.blocks.of_mailing(1)] == []
