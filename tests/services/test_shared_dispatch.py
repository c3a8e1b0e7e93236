"""Two masters sharing one database: each edits a block from the state it last saw, and only the
database's decides that there is nothing to do (the other master may have leased the block, or
added recipients to it, since)."""

from __future__ import annotations

import contextlib
import datetime

from pymongo import AsyncMongoClient

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.config.settings import DispatchConfig
from cloudmailing.master.app import build_services
from cloudmailing.storage.database import Database
from cloudmailing.storage.shared_locks import SharedLocks
from cloudmailing.storage.stores import open_stores
from tests.helpers import aio_test

SATELLITE = {"serial": "sat-a", "group": "", "domain_affinity": []}


@contextlib.asynccontextmanager
async def _master(mongo_url, name, key, clock, block_recipients=4):
    """A master's services: its own connection, lock documents shared with the other."""
    client = AsyncMongoClient(mongo_url, tz_aware=False)
    database = Database(client=client, db=client[name])
    database.locks.shared = SharedLocks(lambda: database.write_locks, key)
    try:
        stores = await open_stores(database, block_recipients, writer_key=key)
        yield build_services(stores, clock, dispatch=DispatchConfig(lease_seconds=60))
    finally:
        await client.close()


def _delivered(recipient):
    return Outcome.from_wire({"recipient_id": recipient["id"], "status": "FINISHED", "reply_code": 250,
                              "reply_text": "ok", "smtp_log": [], "lease": recipient["lease"]})


async def _running(services, count, keep_open=False):
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.mailings.set_properties(mailing_id, {"dont_close_if_empty": keep_open})
    ids = [a["id"] for a in await services.recipients.add(mailing_id, [{"email": f"u{i}@example.org"}
                                                                      for i in range(count)])]
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    return mailing_id, ids


async def _statuses(services, ids):
    found = {s["id"]: s["status"] for s in await services.reports.statuses(ids, {})}
    return [found[rid] for rid in ids]


@aio_test
async def test_a_report_of_a_lease_granted_through_the_other_master_is_recorded(database, mongo_url, clock):
    async with _master(mongo_url, database.db.name, "alpha", clock) as alpha, \
            _master(mongo_url, database.db.name, "beta", clock) as beta:
        _, ids = await _running(alpha, 4)
        first = await alpha.dispatcher.lease(SATELLITE, 4)
        await alpha.dispatcher.report(SATELLITE, [_delivered(r) for r in first[:2]])
        await alpha.dispatcher.release_satellite("sat-a")  # alpha last saw the block free
        second = await beta.dispatcher.lease(SATELLITE, 4)  # the satellite came back through beta
        await alpha.dispatcher.report(SATELLITE, [_delivered(r) for r in second])  # and reports through alpha
        assert await _statuses(beta, ids) == ["FINISHED"] * 4


@aio_test
async def test_a_report_of_recipients_the_other_master_appended_is_recorded(database, mongo_url, clock):
    async with _master(mongo_url, database.db.name, "alpha", clock, 10) as alpha, \
            _master(mongo_url, database.db.name, "beta", clock, 10) as beta:
        mailing_id, _ = await _running(alpha, 2, keep_open=True)
        first = await alpha.dispatcher.lease(SATELLITE, 10)  # alpha last saw 2 recipients in the block
        more = [a["id"] for a in await beta.recipients.add(mailing_id, [{"email": f"v{i}@example.org"}
                                                                        for i in range(3)])]
        await beta.dispatcher.report(SATELLITE, [_delivered(r) for r in first])
        second = await beta.dispatcher.lease(SATELLITE, 10)
        await alpha.dispatcher.report(SATELLITE, [_delivered(r) for r in second])  # was an IndexError
        assert await _statuses(beta, more) == ["FINISHED"] * 3


@aio_test
async def test_an_expired_lease_granted_through_the_other_master_is_returned(database, mongo_url, clock):
    async with _master(mongo_url, database.db.name, "alpha", clock) as alpha, \
            _master(mongo_url, database.db.name, "beta", clock) as beta:
        _, ids = await _running(alpha, 4)
        first = await alpha.dispatcher.lease(SATELLITE, 4)
        await alpha.dispatcher.report(SATELLITE, [_delivered(r) for r in first[:2]])
        await alpha.dispatcher.release_satellite("sat-a")
        await beta.dispatcher.lease(SATELLITE, 4)  # through beta, which then stops
        clock.advance(120)
        released = await alpha.dispatcher.expire_leases()
        again = await alpha.dispatcher.lease({**SATELLITE, "serial": "sat-b"}, 4)
        assert (released, sorted(r["id"] for r in again)) == (2, sorted(ids[2:]))


@aio_test
async def test_a_deadline_times_out_recipients_the_other_master_appended(database, mongo_url, clock):
    async with _master(mongo_url, database.db.name, "alpha", clock, 10) as alpha, \
            _master(mongo_url, database.db.name, "beta", clock, 10) as beta:
        mailing_id = await alpha.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
        end = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC).replace(tzinfo=None)
        await alpha.mailings.set_properties(mailing_id, {"dont_close_if_empty": True,
                                                         "scheduled_end": end + datetime.timedelta(minutes=10)})
        await alpha.recipients.add(mailing_id, [{"email": "u0@example.org"}])
        await alpha.mailings.start(mailing_id)
        await alpha.lifecycle.tick()
        await alpha.dispatcher.report(SATELLITE, [_delivered(r) for r in await alpha.dispatcher.lease(SATELLITE, 10)])
        await beta.recipients.add(mailing_id, [{"email": f"v{i}@example.org"} for i in range(2)])  # same block
        clock.advance(11 * 60)
        await alpha.lifecycle.tick()  # the deadline: alpha times out what is left, and finishes the mailing
        listed = (await alpha.mailings.list({"id": [mailing_id]}))[0]
        assert (listed["status"], listed["total_pending"], listed["total_error"]) == ("FINISHED", 0, 2)
