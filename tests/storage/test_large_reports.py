"""Large reports and leases are written (FerretDB v1 never answers an update command of ~50 statements)."""

from __future__ import annotations

import asyncio
import datetime

from cloudmailing.storage.status_log import StatusChange
from tests.helpers import aio_test, started_status_log
from tests.storage.test_status_log import _recipients

NOW = datetime.datetime(2027, 1, 15, 12, 0, 0)


@aio_test
async def test_five_hundred_changes_in_one_apply(database):
    ids = await _recipients(database, 500)
    status_log = await started_status_log(database)
    result = await asyncio.wait_for(status_log.apply([StatusChange(rid, "FINISHED") for rid in ids], NOW), 60)
    assert len(result.applied) == 500
    assert await database.recipients.count_documents({"status": "FINISHED"}) == 500


@aio_test
async def test_a_lease_and_a_release_of_five_hundred(database):
    from cloudmailing.storage.recipients import LeaseStore

    await _recipients(database, 500)
    leases = LeaseStore(database)
    claimed = await asyncio.wait_for(leases.claim({"status": {"$in": ["READY"]}}, "sat", NOW, 500), 60)
    assert len(claimed) == 500
    assert len(await asyncio.wait_for(leases.release({"lease_owner": "sat"}), 60)) == 500
    assert await database.recipients.count_documents({"in_progress": True}) == 0
