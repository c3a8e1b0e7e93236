"""Reading the cursor's next page ahead: taken once, exact when changes arrive meanwhile, dropped
when nobody comes for it."""

from __future__ import annotations

import asyncio

from twisted.internet.task import Clock

from cloudmailing.services import read_ahead
from cloudmailing.services.read_ahead import ReadAhead
from cloudmailing.services.reports import ReportService
from tests.helpers import aio_test, set_statuses
from tests.storage.world import mailing_with


@aio_test
async def test_the_page_after_a_full_one_is_read_ahead_and_stays_exact(database):
    stores, ids = await mailing_with(database, 45, block_recipients=5)
    await set_statuses(stores, ids[:15], "FINISHED")
    reports = ReportService(stores, Clock())
    reads = []
    read_since = reports._read_since

    async def counted(*args):
        reads.append(args[0])
        return await read_since(*args)

    reports._read_since = counted  # type: ignore[method-assign]
    first = await reports.updated_since("", {}, 10, {})
    await asyncio.sleep(0.2)  # the page ahead is read: the 5 changes committed then
    assert len(first["recipients"]) == 10 and len(reads) == 2  # this page, and the next one ahead
    await set_statuses(stores, ids[15:], "ERROR")  # changes committed after it was read
    seen = [r["id"] for r in first["recipients"]]
    cursor = first["cursor"]
    while True:
        page = await reports.updated_since(cursor, {}, 10, {})
        if not page["recipients"]:
            break
        seen += [r["id"] for r in page["recipients"]]
        cursor = page["cursor"]
    assert seen == ids  # every change once, in order: the page read ahead took nothing from the later ones
    # Each page was read once (those ahead were taken), and none after the last, partial, one.
    assert len(reads) == len(set(reads)) == 6
    before = len(reads)
    await reports.updated_since("", {}, 10, {"delete_customized_content": True})
    await asyncio.sleep(0.1)
    assert len(reads) == before + 1  # reading that deletes is never done ahead
    statuses = {r["id"]: r["status"] for r in (await reports.updated_since("", {}, 1000, {}))["recipients"]}
    assert statuses == {rid: "FINISHED" if i < 15 else "ERROR" for i, rid in enumerate(ids)}


@aio_test
async def test_a_page_read_ahead_is_taken_once():
    ahead = ReadAhead(Clock())

    async def page(name):
        return name

    ahead.start("a", page("a"))
    assert await ahead.take("a") == "a"
    assert await ahead.take("a") is None  # taken once


@aio_test
async def test_a_page_nobody_takes_is_dropped():
    clock = Clock()
    ahead = ReadAhead(clock)
    started = asyncio.Event()

    async def slow():
        started.set()
        await asyncio.sleep(3600)

    ahead.start("late", slow())
    await started.wait()
    clock.advance(read_ahead.KEPT_SECONDS + 1)
    assert await ahead.take("late") is None
    for number in range(read_ahead.MAX_PAGES + 1):
        ahead.start(number, asyncio.sleep(0, result=number))
    assert await ahead.take(0) is None  # pushed out by newer readers
    assert await ahead.take(read_ahead.MAX_PAGES) == read_ahead.MAX_PAGES
