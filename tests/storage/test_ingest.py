"""Recipients stored in blocks: placement, ids, duplicates, byte bounds, the state codec."""

from __future__ import annotations

import datetime

import hypothesis.strategies as st
from hypothesis import given

from cloudmailing.common.statuses import STORED_STATUSES
from cloudmailing.storage.block_codec import VOID, StateColumns, decode_state, encode_state
from cloudmailing.storage.blocks import MAX_BYTES
from cloudmailing.storage.ingest import NewRecipient
from cloudmailing.storage.recipient_index import is_generated
from tests.helpers import aio_test
from tests.storage.world import NOW, mailing_with, recipients


async def _sizes(stores, mailing_id=1):
    return [summary["n"] async for summary in stores.blocks.of_mailing(mailing_id)]


@aio_test
async def test_batches_fill_the_newest_block_then_open_new_ones(database):
    stores, ids = await mailing_with(database, 7, block_recipients=5)
    assert await _sizes(stores) == [5, 2]
    more = await stores.writer.append(1, False, recipients(4, "v"), NOW)
    assert await _sizes(stores) == [5, 5, 1]
    assert all(rid is not None and is_generated(rid) for rid in ids + more)
    found = await stores.lookup.find(ids + more)
    assert [found[rid].email for rid in ids + more] == [f"u{i}@example.org" for i in range(7)] + \
        [f"v{i}@example.org" for i in range(4)]
    assert (await stores.mailings.get(1))["counts"] == {"READY": 11}


@aio_test
async def test_test_recipients_get_blocks_of_their_own(database):
    stores, _ = await mailing_with(database, 3, block_recipients=5)
    await stores.writer.append(1, True, recipients(1, "qa"), NOW)
    assert [(s["n"], s["test"]) async for s in stores.blocks.of_mailing(1)] == [(3, False), (1, True)]


@aio_test
async def test_a_client_id_is_unique_and_a_duplicate_fails_alone(database):
    stores, _ = await mailing_with(database, 0, block_recipients=3)
    first = await stores.writer.append(1, False, [NewRecipient("a@example.org", "example.org", {}, [], "t-1")], NOW)
    assert first == ["t-1"]
    batch = [NewRecipient(f"b{i}@example.org", "example.org", {}, [], f"t-{i}") for i in range(4)]
    assert await stores.writer.append(1, False, batch, NOW) == ["t-0", None, "t-2", "t-3"]
    found = await stores.lookup.find(["t-0", "t-1", "t-2", "t-3"])
    assert found["t-1"].email == "a@example.org"  # the first one stays
    assert (await stores.mailings.get(1))["counts"] == {"READY": 4}
    assert await stores.blocks.counts([1]) == {1: {"READY": 4}}  # the refused one's slot counts nowhere


@aio_test
async def test_generated_ids_only_find_their_own_slot(database):
    stores, ids = await mailing_with(database, 2)
    forged = ids[0][:-6] + "000000"
    assert set(await stores.lookup.find([forged, ids[1], "b999s0-abcdef"])) == {ids[1]}


@aio_test
async def test_a_mailing_larger_than_a_block_with_attachments_near_the_byte_bound(database):
    stores, _ = await mailing_with(database, 0)
    attachment = {"filename": "a.bin", "content_type": "application/octet-stream", "content": b"\x01" * 700_000}
    batch = [NewRecipient(f"a{i}@example.org", "example.org", {}, [attachment]) for i in range(14)]
    ids = await stores.writer.append(1, False, batch, NOW)
    sizes = await _sizes(stores)
    assert sizes == [5, 5, 4] and MAX_BYTES // 700_000 == 5  # bounded in bytes, far below 16 MiB
    content = await stores.blocks.content(next(iter((await stores.lookup.find(ids[-1:])).values())).block.id)
    assert content[-1]["attachments"][0]["content"] == attachment["content"]


@given(st.lists(st.tuples(st.sampled_from(range(len(STORED_STATUSES))), st.integers(0, 65535),
                          st.integers(0, 2**62), st.integers(0, 2**62), st.booleans()), max_size=40))
def test_the_state_columns_round_trip(slots):
    columns = StateColumns()
    columns.extend_ready(len(slots), datetime.datetime(2027, 1, 1))
    for slot, (status, tries, first, seq, leased) in enumerate(slots):
        columns.status[slot], columns.tries[slot], columns.first_try[slot] = status, tries, first
        columns.last_seq[slot], columns.leased[slot] = seq, int(leased)
    if slots:
        columns.status[0] = VOID
    decoded = decode_state(encode_state(columns), len(slots))
    assert decoded == columns
    assert sum(decoded.counts().values()) == max(len(slots) - 1, 0)
