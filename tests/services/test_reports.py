"""Counting recipients reads the mailings' own counts, never a block."""

from __future__ import annotations

from pymongo import AsyncMongoClient, monitoring

from cloudmailing.master.app import build_services
from cloudmailing.storage.database import Database
from cloudmailing.storage.stores import open_stores
from tests.helpers import CommandWatcher, aio_test


class _Collections(CommandWatcher):
    """The collections the database is asked about, from the moment ``on`` is set."""

    def __init__(self) -> None:
        self.on, self.seen = False, []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.on:
            self.seen.append(event.command.get(event.command_name))


@aio_test
async def test_counting_recipients_reads_only_the_mailing_documents(mongo_url, db_name, clock):
    listener = _Collections()
    client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=False, event_listeners=[listener])
    try:
        services = build_services(await open_stores(Database(client=client, db=client[db_name]), 4), clock)
        first = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
        second = await services.mailings.create("b@example.org", "B", "S", "<p>x</p>", "", "utf-8")
        await services.recipients.add(first, [{"email": f"a{i}@example.org"} for i in range(10)])  # three blocks
        await services.recipients.add(second, [{"email": "b@example.org"}])
        listener.on = True
        assert await services.reports.count({}) == 11
        assert await services.reports.count({"mailings": [first], "status": ["READY"]}) == 10
        assert await services.reports.count({"mailings": [second], "status": ["FINISHED"]}) == 0
        assert set(listener.seen) == {"mailings"}, listener.seen
    finally:
        await client.close()
