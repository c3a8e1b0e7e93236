"""Several dead masters are recovered at once: one may hold a lock another's recovery needs (a
review showed recoveries one master at a time waiting for good), or have died recovering the
others."""
from __future__ import annotations

import asyncio

from twisted.internet import task

from cloudmailing.common.process_identity import ProcessIdentity
from cloudmailing.services.master_recovery import MasterRecovery
from cloudmailing.services.writer_claim import CLAIM_SECONDS, RENEW_SECONDS, MasterPresence
from cloudmailing.storage import counters
from cloudmailing.storage.status_log import SEQUENCE_COUNTER
from cloudmailing.storage.writer_claims import MasterRegistry
from tests.helpers import aio_test
from tests.storage.world import NOW, mailing_with
from tests.storage.world import master_stores as master


async def _dead(database, clock, host):
    dead = MasterPresence(MasterRegistry(database), clock, ProcessIdentity(host, "b", "pid:[1]", 7, 1))
    await dead.register()
    return dead


def _ordered(first, second):
    return (first, second) if first.key < second.key else (second, first)


@aio_test
async def test_recovery_of_two_dead_masters_one_holding_an_ingest_lock(database, mongo_url):
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    await mailing_with(database, 4, block_recipients=4)
    d1, d2 = _ordered(await _dead(database, clock, "host-a"), await _dead(database, clock, "host-b"))
    # d2 (recovered second) died while adding a batch to mailing 1: it held the ingest lock.
    await database.ingest_batches.insert_one({"_id": "cut", "m": 1, "at": NOW, "blocks": [], "holder": d2.key})
    await database.write_locks.insert_one({"_id": "ingest:1:False", "holder": d2.key})
    clock.advance(CLAIM_SECONDS + RENEW_SECONDS + 1)
    async with master(mongo_url, database.db.name, "beta") as beta:
        recovery = MasterRecovery(beta, clock, "beta")
        # Recovering both takes a few database commands: 20 s is far more than enough.
        assert await asyncio.wait_for(recovery.recover_dead(), 20) == sorted([d1.key, d2.key])


@aio_test
async def test_recovery_of_a_master_that_died_recovering_another(database, mongo_url):
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    d, a = await _dead(database, clock, "host-d"), await _dead(database, clock, "host-a")
    if a.key < d.key:  # the dead recoverer sorts after the master it was recovering
        d, a = a, d
    # a died in the middle of recovering d: it held the recovery's lock.
    await database.write_locks.insert_one({"_id": "recovery", "holder": a.key})
    clock.advance(CLAIM_SECONDS + RENEW_SECONDS + 1)
    async with master(mongo_url, database.db.name, "beta") as beta:
        recovery = MasterRecovery(beta, clock, "beta")
        assert await asyncio.wait_for(recovery.recover_dead(), 20) == sorted([d.key, a.key])
        assert await database.write_locks.count_documents({}) == 0  # the takeover's lock given back too


@aio_test
async def test_recovery_of_two_dead_masters_one_died_reserving_numbers(database, mongo_url):
    clock = task.Clock()
    clock.advance(NOW.timestamp())
    d1, d2 = _ordered(await _dead(database, clock, "host-a"), await _dead(database, clock, "host-b"))
    start = await counters.current(database, SEQUENCE_COUNTER) + 1
    # d1 held a range (its floor); d2 died inside its reservation, holding the counter's lock.
    await database.log_writers.insert_one({"_id": d1.key, "floor": start, "end": start + 9_999})
    await database.log_writers.insert_one({"_id": d2.key, "floor": start + 10_000, "end": start + 19_999})
    await database.write_locks.insert_one({"_id": f"counter:{SEQUENCE_COUNTER}", "holder": d2.key})
    clock.advance(CLAIM_SECONDS + RENEW_SECONDS + 1)
    async with master(mongo_url, database.db.name, "beta") as beta:
        recovery = MasterRecovery(beta, clock, "beta")
        assert await asyncio.wait_for(recovery.recover_dead(), 20) == sorted([d1.key, d2.key])
