"""A write cut between a block's state and its summary or its mailing's counts (a database
error, a master killed) leaves them saying fewer recipients are pending than the state holds.
The mailing must still never finish with a recipient left READY: neither by the report of its
other recipients, nor at its deadline reached by another master."""

from __future__ import annotations

import asyncio
import contextlib

import pymongo.errors
import pytest

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.common.process_identity import ProcessIdentity
from cloudmailing.master.app import build_services
from cloudmailing.services.clock import utc_now
from cloudmailing.services.master_recovery import MasterRecovery
from cloudmailing.services.writer_claim import CLAIM_SECONDS, RENEW_SECONDS, MasterPresence
from cloudmailing.storage.stores import open_stores
from cloudmailing.storage.writer_claims import MasterRegistry
from tests.helpers import aio_test, set_statuses
from tests.storage.world import master_stores

SATELLITE = {"serial": "sat-a", "group": ""}


async def _two_blocks(services, stores, clock, duration=0):
    """A running mailing of two blocks of one recipient: the first delivered, the second READY."""
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    if duration:
        await services.mailings.set_properties(mailing_id, {"scheduled_duration": duration})
    answer = await services.recipients.add(mailing_id, [{"email": "a@example.org"}, {"email": "b@example.org"}])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    ids = [entry["id"] for entry in answer]
    await set_statuses(stores, ids[:1], "FINISHED", now=utc_now(clock))
    await services.lifecycle.tick()
    return mailing_id, ids


async def _reset_cut_after_the_state(services, monkeypatch, target, recipient_id):
    """reset_recipients_status whose write of ``target`` (a bound store method) fails once,
    after the block's state was written."""
    real = getattr(target.__self__, target.__name__)

    async def lost(*args, **kwargs):
        monkeypatch.undo()
        raise pymongo.errors.AutoReconnect("connection lost")

    monkeypatch.setattr(target.__self__, target.__name__, lost)
    with pytest.raises(pymongo.errors.AutoReconnect):
        await services.recipients.reset([recipient_id])
    assert getattr(target.__self__, target.__name__) == real


async def _mailing(services, mailing_id):
    return (await services.mailings.list({"id": [mailing_id]}))[0]


async def _status_of(services, recipient_id):
    return (await services.reports.statuses([recipient_id], None))[0]["status"]


@pytest.mark.parametrize("cut", ["summary", "counts"])
@aio_test
async def test_a_report_does_not_finish_a_mailing_whose_reset_was_cut(database, clock, monkeypatch, cut):
    stores = await open_stores(database, block_recipients=1)
    services = build_services(stores, clock)
    mailing_id, (reset, other) = await _two_blocks(services, stores, clock)
    target = stores.blocks.write_summary if cut == "summary" else stores.mailings.add_counts
    await _reset_cut_after_the_state(services, monkeypatch, target, reset)

    leased = {r["id"]: r for r in await services.dispatcher.lease(SATELLITE, 1)}
    leased.update({r["id"]: r for r in await services.dispatcher.lease(SATELLITE, 1)})
    await services.dispatcher.report(SATELLITE, [Outcome(other, "FINISHED", 250, "", "ok",
                                                         lease=leased[other]["lease"])])
    mailing = await _mailing(services, mailing_id)
    assert (mailing["status"], mailing["total_pending"]) == ("RUNNING", 1)

    await services.lifecycle.tick()
    leased.update({r["id"]: r for r in await services.dispatcher.lease(SATELLITE, 10)})
    await services.dispatcher.report(SATELLITE, [Outcome(reset, "FINISHED", 250, "", "ok",
                                                         lease=leased[reset]["lease"])])
    mailing = await _mailing(services, mailing_id)
    assert (mailing["status"], mailing["total_sent"], mailing["total_pending"]) == ("FINISHED", 2, 0)


@contextlib.asynccontextmanager
async def _two_masters(database, mongo_url, clock, alpha_key="alpha"):
    async with master_stores(mongo_url, database.db.name, alpha_key, block_recipients=1) as alpha, \
            master_stores(mongo_url, database.db.name, "beta", block_recipients=1) as beta:
        yield (build_services(alpha, clock), alpha), (build_services(beta, clock), beta)


@aio_test
async def test_a_deadline_another_master_reaches_times_out_what_a_cut_reset_left_ready(database, mongo_url, clock,
                                                                                        monkeypatch):
    async with _two_masters(database, mongo_url, clock) as ((alpha, alpha_stores), (beta, _)):
        mailing_id, (reset, _) = await _two_blocks(alpha, alpha_stores, clock, duration=1)
        await _reset_cut_after_the_state(alpha, monkeypatch, alpha_stores.blocks.write_summary, reset)
        clock.advance(61)
        await beta.lifecycle.tick()  # beta knows nothing of alpha's failed write
        assert await _status_of(beta, reset) == "TIMEOUT"
        mailing = await _mailing(beta, mailing_id)
        assert (mailing["status"], mailing["total_pending"], mailing["total_error"]) == ("FINISHED", 0, 2)


@aio_test
async def test_a_deadline_waits_for_the_block_a_killed_master_was_writing(database, mongo_url, clock, monkeypatch):
    registry = MasterRegistry(database)
    dead = MasterPresence(registry, clock, ProcessIdentity("elsewhere", "b", "pid:[1]", 7, 1))
    await dead.register()
    async with _two_masters(database, mongo_url, clock, alpha_key=dead.key) as ((alpha, alpha_stores),
                                                                                   (beta, beta_stores)):
        mailing_id, (reset, _) = await _two_blocks(alpha, alpha_stores, clock, duration=1)
        await _reset_cut_after_the_state(alpha, monkeypatch, alpha_stores.blocks.write_summary, reset)
        block_id = (await alpha_stores.lookup.find([reset]))[reset].block.id
        # Alpha is killed there: the lock document of the block stays behind.
        await database.write_locks.insert_one({"_id": f"block:{block_id}", "holder": dead.key})
        clock.advance(61)
        tick = asyncio.ensure_future(beta.lifecycle.tick())
        await asyncio.sleep(0.3)
        assert not tick.done()  # the deadline waits for the block...
        assert (await _mailing(beta, mailing_id))["status"] == "RUNNING"  # ...and finishes nothing meanwhile
        clock.advance(CLAIM_SECONDS + RENEW_SECONDS + 1)
        assert await MasterRecovery(beta_stores, clock, "beta").recover_dead() == [dead.key]
        await tick
        assert await _status_of(beta, reset) == "TIMEOUT"
        mailing = await _mailing(beta, mailing_id)
        assert (mailing["status"], mailing["total_pending"], mailing["total_error"]) == ("FINISHED", 0, 2)
