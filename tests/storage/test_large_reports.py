"""A report of many outcomes at once is written (FerretDB v1 hangs on one huge update command)."""

from __future__ import annotations

import asyncio
import datetime

from cloudmailing.storage.status_log import SequenceAllocator, StatusChange, StatusLog
from tests.helpers import aio_test
from tests.storage.test_status_log import _recipients

NOW = datetime.datetime(2027, 1, 15, 12, 0, 0)


@aio_test
async def test_five_hundred_changes_in_one_apply(database):
    ids = await _recipients(database, 500)
    allocator = SequenceAllocator(database)
    await allocator.start()
    status_log = StatusLog(database, allocator)
    result = await asyncio.wait_for(status_log.apply([StatusChange(rid, "FINISHED") for rid in ids], NOW), 60)
    assert len(result.applied) == 500
    assert await database.recipients.count_documents({"status": "FINISHED"}) == 500
