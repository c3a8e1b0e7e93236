"""A master alone on its database takes no lock documents; one that gets company takes them
again, and the newcomer writes nothing until it has."""

from __future__ import annotations

import asyncio

import pytest
from pymongo.errors import AutoReconnect
from twisted.internet import task

from cloudmailing.common.process_identity import ProcessIdentity
from cloudmailing.services.company import Company
from cloudmailing.services.writer_claim import MasterPresence
from cloudmailing.storage.shared_locks import SharedLocks
from cloudmailing.storage.writer_claims import MasterRegistry
from tests.helpers import aio_test


async def _master(database, clock, name: str) -> tuple[MasterPresence, SharedLocks, Company]:
    registry = MasterRegistry(database)
    presence = MasterPresence(registry, clock, ProcessIdentity(name, "b", "pid:[1]", 7, 1))
    await presence.register()
    locks = SharedLocks(lambda: database.write_locks, presence.key)
    return presence, locks, Company(registry, locks, clock)


@aio_test
async def test_a_master_alone_drops_lock_documents_and_takes_them_again_when_another_comes(database):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    alpha, alpha_locks, alpha_company = await _master(database, clock, "alpha")
    assert alpha_locks.engaged  # a master starts taking them
    assert not await alpha_company.review()
    assert not alpha_locks.engaged
    async with alpha_locks.hold(("block", 1)):
        assert await database.write_locks.count_documents({}) == 0  # alone: no lock document

    beta, beta_locks, beta_company = await _master(database, clock, "beta")
    with pytest.raises(TimeoutError):  # alpha still runs alone: beta writes nothing yet
        await asyncio.wait_for(beta_company.wait_for_company(), 0.3)

    # Alpha sees beta while a hold taken alone is under way: it says so only once that one ended.
    ended = asyncio.Event()

    async def hold_taken_alone() -> None:
        async with alpha_locks.hold(("block", 2)):
            await ended.wait()

    holding = asyncio.ensure_future(hold_taken_alone())
    await asyncio.sleep(0.05)
    reviewing = asyncio.ensure_future(alpha_company.review())
    await asyncio.sleep(0.2)
    assert not reviewing.done() and alpha_locks.engaged
    ended.set()
    assert await reviewing and await holding is None
    await asyncio.wait_for(beta_company.wait_for_company(), 5)
    async with alpha_locks.hold(("block", 1)):
        assert await database.write_locks.count_documents({}) == 1  # together: lock documents

    assert await beta_company.review() and beta_locks.engaged
    await beta.remove()
    assert not await alpha_company.review() and not alpha_locks.engaged  # alone again


@aio_test
async def test_a_master_going_solo_as_another_comes_in_keeps_its_lock_documents(database):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    alpha, alpha_locks, alpha_company = await _master(database, clock, "alpha")
    registry = MasterRegistry(database)
    said_solo = registry.set_solo
    newcomer: list[MasterPresence] = []

    async def newcomer_registers_meanwhile(key: str, solo: bool) -> None:
        await said_solo(key, solo)
        if solo and not newcomer:  # between alpha's "solo" and its second look
            newcomer.append((await _master(database, clock, "beta"))[0])

    alpha_company._registry.set_solo = newcomer_registers_meanwhile
    assert await alpha_company.review()  # it saw beta on its second look
    assert alpha_locks.engaged
    assert {entry["_id"]: entry["solo"] for entry in await registry.all()} == {alpha.key: False,
                                                                              newcomer[0].key: False}


@aio_test
async def test_a_lost_answer_to_solo_does_not_keep_a_newcomer_out(database):
    """The database wrote "solo" but its answer was lost: the master must count itself solo, or
    it never writes "not solo" again and a newcomer waits for as long as it runs."""
    clock = task.Clock()
    clock.advance(1_800_000_000)
    alpha, alpha_locks, alpha_company = await _master(database, clock, "alpha")
    set_solo = alpha_company._registry.set_solo
    lost = []

    async def answer_lost(key, solo):
        await set_solo(key, solo)
        if solo and not lost:
            lost.append(key)
            raise AutoReconnect("connection reset")  # written, the answer lost

    alpha_company._registry.set_solo = answer_lost
    try:
        await alpha_company.review()
    except AutoReconnect:
        pass  # Master._review_company logs it and tries again in a second
    beta, beta_locks, beta_company = await _master(database, clock, "beta")
    for _ in range(3):  # alpha's next reviews, one a second
        assert await alpha_company.review()
    await asyncio.wait_for(beta_company.wait_for_company(), 5)


@aio_test
async def test_a_cm_admin_command_writes_beside_the_masters_with_lock_documents(database):
    from cloudmailing.services.company import writing_beside_the_masters

    clock = task.Clock()
    clock.advance(1_800_000_000)
    alpha, alpha_locks, alpha_company = await _master(database, clock, "alpha")
    assert not await alpha_company.review()  # alone: solo
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def command() -> None:
        async with writing_beside_the_masters(database, clock):
            assert database.locks.shared is not None and database.locks.shared.engaged
            inside.set()
            await leave.wait()

    running = asyncio.ensure_future(command())
    await asyncio.sleep(0.3)
    assert not inside.is_set()  # it waits for the solo master to take lock documents again
    assert await alpha_company.review() and alpha_locks.engaged
    await asyncio.wait_for(inside.wait(), 5)
    leave.set()
    await running
    assert database.locks.shared is None
    assert [entry["_id"] for entry in await MasterRegistry(database).all()] == [alpha.key]
    assert not await alpha_company.review()  # alone again
