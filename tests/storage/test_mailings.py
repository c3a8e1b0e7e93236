"""The mailings collection's counters."""

from __future__ import annotations

from cloudmailing.storage.mailings import MailingStore
from tests.helpers import aio_test


@aio_test
async def test_replace_counts_replaces_counts_even_when_only_the_statuses_change(database):
    # FerretDB v1 once took this for "nothing to change": same values, other keys.
    await database.mailings.insert_one({"_id": 1, "counts": {"READY": 2}})
    store = MailingStore(database)
    async with store.counts_lock(1):
        await store.replace_counts(1, {"FINISHED": 2})
    assert (await store.get(1))["counts"] == {"FINISHED": 2, "READY": 0}
    async with store.counts_lock(1):
        await store.add_counts(1, {"FINISHED": -1, "ERROR": 1})
        await store.replace_counts(1, {"ERROR": 1, "FINISHED": 1})
    assert (await store.get(1))["counts"] == {"ERROR": 1, "FINISHED": 1, "READY": 0}
