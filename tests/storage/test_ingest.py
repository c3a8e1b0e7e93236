"""Recipients stored in blocks: placement, ids, duplicates, byte bounds, the state codec."""

from __future__ import annotations

import datetime
import re
import uuid

import hypothesis.strategies as st
import pytest
from hypothesis import given

from cloudmailing.common.statuses import STORED_STATUSES
from cloudmailing.storage.block_codec import VOID, StateColumns, decode_state, encode_state
from cloudmailing.storage.blocks import MAX_BYTES
from cloudmailing.storage.ingest import NewRecipient
from cloudmailing.storage.recipient_index import BLOCK_BITS, SLOT_BITS, Place, generated_id, is_generated, place_of
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
    assert all(uuid.UUID(rid).version == 8 for rid in ids + more)
    found = await stores.lookup.find(ids + more)
    assert all(place_of(rid) == Place(found[rid].block.id, found[rid].slot) for rid in ids + more)
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
    forged = "00000000-0000" + ids[0][13:]  # the same block and slot, other random bits
    assert forged != ids[0] and place_of(forged) == place_of(ids[0])
    absent = [generated_id(999, 0), "b999s0-abcdef", "b1s0-abcdef"]
    assert set(await stores.lookup.find([forged, ids[1], *absent])) == {ids[1]}


@pytest.mark.parametrize(("block_id", "slot"), [(0, 0), (1, 0), (12, 34), (2**31, 999),
                                                (2**BLOCK_BITS - 1, 2**SLOT_BITS - 1)])
def test_a_generated_id_is_a_version_8_uuid_naming_its_block_and_slot(block_id, slot):
    rid = generated_id(block_id, slot)
    parsed = uuid.UUID(rid)
    assert str(parsed) == rid and parsed.version == 8 and parsed.variant == uuid.RFC_4122
    assert place_of(rid) == Place(block_id, slot) and is_generated(rid)
    assert len({generated_id(block_id, slot) for _ in range(100)}) == 100  # random bits


@pytest.mark.parametrize(("block_id", "slot"), [(2**BLOCK_BITS, 0), (-1, 0), (1, 2**SLOT_BITS), (1, -1)])
def test_a_block_or_slot_too_large_for_an_id_fails_loudly(block_id, slot):
    with pytest.raises(ValueError, match="does not fit"):
        generated_id(block_id, slot)


@aio_test
async def test_ids_of_the_old_form_are_still_found(database):
    stores, ids = await mailing_with(database, 3)
    block_id = (await stores.lookup.find(ids[:1]))[ids[0]].block.id
    content = await stores.blocks.content(block_id)  # as an earlier version wrote it
    old = [f"b{block_id}s{slot}-{slot:06x}" for slot in range(len(content))]
    for entry, rid in zip(content, old, strict=True):
        entry["id"] = rid
    assert await stores.blocks.write_content(block_id, 1, content, len(content))
    assert all(is_generated(rid) for rid in old)
    found = await stores.lookup.find([*old, ids[0], f"b{block_id}s1-000000"])
    assert {rid: (f.email, f.slot) for rid, f in found.items()} == \
        {rid: (f"u{slot}@example.org", slot) for slot, rid in enumerate(old)}


@aio_test
async def test_a_tracking_id_is_kept_as_given(database):
    stores, _ = await mailing_with(database, 0)
    given_ids = ["t-1", str(uuid.uuid4()), generated_id(1, 0).upper(), "b1s0-ABCDEF", "b٣s0-abcdef"]
    assert not any(is_generated(rid) for rid in given_ids)  # the API accepts them as tracking_ids
    batch = [NewRecipient(f"c{i}@example.org", "example.org", {}, [], rid) for i, rid in enumerate(given_ids)]
    assert await stores.writer.append(1, False, batch, NOW) == given_ids
    found = await stores.lookup.find(given_ids)
    assert {rid: f.email for rid, f in found.items()} == {rid: f"c{i}@example.org" for i, rid in enumerate(given_ids)}
    # A UUIDv8 in canonical text is the master's form whatever it holds: the API refuses it as a
    # tracking_id, so it is never looked up in the index, and names only the block and slot it says.
    assert is_generated(str(uuid.UUID(int=(uuid.uuid4().int & ~(0xF << 76)) | (8 << 76))))


def _canonical_v8(text: str) -> uuid.UUID | None:
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        return None
    return parsed if str(parsed) == text and parsed.version == 8 else None


_HEX = "[0-9a-fA-F]"
_ID_TEXTS = st.one_of(
    st.text(max_size=60),
    st.from_regex(rf"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}", fullmatch=True),
    st.integers(0, 2**128 - 1).map(lambda n: str(uuid.UUID(int=(n & ~(0xF << 76) & ~(0b11 << 62)) | (8 << 76)
                                                            | (0b10 << 62)))),
    st.uuids().map(str),
    st.from_regex(r"b[0-9]{1,16}s[0-9]{1,7}-[0-9a-fA-F]{5,7}", fullmatch=True),
    st.builds(generated_id, st.integers(0, 2**BLOCK_BITS - 1), st.integers(0, 2**SLOT_BITS - 1)),
)


@given(_ID_TEXTS)
def test_any_text_names_the_place_it_encodes_or_is_a_client_id(text):
    place = place_of(text)  # never raises
    assert is_generated(text) == (place is not None)
    old = re.fullmatch(r"b([0-9]{1,15})s([0-9]{1,6})-[0-9a-f]{6}", text)
    new = _canonical_v8(text)
    if old:
        assert place == Place(int(old[1]), int(old[2]))
    elif new is not None:
        custom = ((new.int >> 80) << 74) | (((new.int >> 64) & 0xFFF) << 62) | (new.int & (2**62 - 1))
        assert place == Place((custom >> SLOT_BITS) % 2**BLOCK_BITS, custom % 2**SLOT_BITS)
    else:
        assert place is None  # a client id: found through the index, never by its text


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
