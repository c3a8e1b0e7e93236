"""Who the master serves: strangers wait for approval, but cannot fill the registry."""

from __future__ import annotations

import asyncio

import pytest

from cloudmailing.services.clock import utc_now
from cloudmailing.services.errors import BadRequest
from cloudmailing.services.satellites import SatelliteRefused, SatelliteService
from cloudmailing.storage.database import open_database
from cloudmailing.storage.satellites import ORPHAN_PLACE_SECONDS
from cloudmailing.storage.shared_locks import SharedLocks
from cloudmailing.storage.stores import open_stores
from tests.helpers import aio_test


async def _refusal(service: SatelliteService, serial: str, secret: str = "pw") -> str:
    with pytest.raises(SatelliteRefused) as refused:
        await service.authenticate(serial, secret, "1.0")
    return str(refused.value)


@aio_test
async def test_at_most_max_awaiting_approval_strangers_are_recorded(database, clock):
    service = SatelliteService(await open_stores(database), clock, max_awaiting_approval=2)
    for serial in ("stranger-1", "stranger-2"):
        assert "waiting for an administrator" in await _refusal(service, serial)
    assert "not registered" in await _refusal(service, "stranger-3")
    assert "not registered" in await _refusal(service, "x" * 101)
    listed = await service.list()
    assert [(s["serial"], s["paired"]) for s in listed] == [("stranger-1", False), ("stranger-2", False)]

    # Approving one makes room for the next stranger, and the approved one is served.
    await service.set_properties(listed[0]["id"], {"paired": True})
    assert (await service.authenticate("stranger-1", "pw", "1.0"))["serial"] == "stranger-1"
    assert "waiting for an administrator" in await _refusal(service, "stranger-3")
    assert await service.count() == 3


@aio_test
async def test_the_cap_holds_for_two_masters_recording_at_once(database, mongo_url, db_name, clock):
    other = await open_database(mongo_url, db_name)  # another master's connection (and its own locks)
    try:
        services = [SatelliteService(await open_stores(db), clock, max_awaiting_approval=10)
                    for db in (database, other)]
        refusals = await asyncio.gather(*(_refusal(services[n % 2], f"s-{n}") for n in range(30)))
        assert sum("waiting for an administrator" in refusal for refusal in refusals) == 10
        assert await services[0].count() == 10
    finally:
        await other.close()


@aio_test
async def test_places_of_deleted_and_never_recorded_strangers_are_freed(database, clock):
    stores = await open_stores(database)
    service = SatelliteService(stores, clock, max_awaiting_approval=1)
    assert "waiting for an administrator" in await _refusal(service, "first")
    await service.delete((await service.list())[0]["id"])
    assert "waiting for an administrator" in await _refusal(service, "second")  # the deleted one's place
    await service.delete((await service.list())[0]["id"])
    # A master died between taking a place and recording its stranger: the place is freed later.
    assert await stores.satellites.take_awaiting_place("ghost", 1, utc_now(clock))
    assert "not registered" in await _refusal(service, "third")
    clock.advance(ORPHAN_PLACE_SECONDS + 1)
    assert "waiting for an administrator" in await _refusal(service, "third")


@aio_test
async def test_two_first_hellos_of_one_serial_at_once_keep_one_secret(database, clock):
    """A satellite registered without a secret keeps the first one it presents: of two hellos at
    once with different secrets, one is served and the other refused, whatever their order."""
    service = SatelliteService(await open_stores(database), clock)
    await service.add("fresh", {})
    first, second = await asyncio.gather(service.authenticate("fresh", "one", "1.0"),
                                         service.authenticate("fresh", "two", "1.0"), return_exceptions=True)
    assert isinstance(first, dict) and isinstance(second, SatelliteRefused) and second.code == "unauthorized"
    assert (await service.authenticate("fresh", "one", "1.0"))["serial"] == "fresh"


@aio_test
async def test_two_strangers_with_one_serial_at_once_make_one_record(database, clock):
    service = SatelliteService(await open_stores(database), clock)
    refusals = await asyncio.gather(*(service.authenticate("newbox", secret, "1.0") for secret in ("a", "b")),
                                    return_exceptions=True)
    assert all(isinstance(r, SatelliteRefused) and r.code in ("not_paired", "unauthorized") for r in refusals)
    assert [s["serial"] for s in await service.list()] == ["newbox"]


@aio_test
async def test_concurrent_adds_of_one_serial_register_it_once(database, clock):
    """An existing serial is refused (Fault 400): also when the adds come at once."""
    service = SatelliteService(await open_stores(database), clock)
    results = await asyncio.gather(*(service.add("dup-serial", {}) for _ in range(8)), return_exceptions=True)
    assert sum(isinstance(r, int) for r in results) == 1
    assert sum(isinstance(r, BadRequest) for r in results) == 7, results
    assert [s["serial"] for s in await service.list()] == ["dup-serial"]


@aio_test
async def test_adds_of_one_serial_on_two_masters_at_once_register_it_once(database, mongo_url, db_name, clock):
    other = await open_database(mongo_url, db_name)  # another master's connection, its own locks
    try:
        for db, key in ((database, "master-a"), (other, "master-b")):
            db.locks.shared = SharedLocks(lambda db=db: db.write_locks, key)
        services = [SatelliteService(await open_stores(db), clock) for db in (database, other)]
        results = await asyncio.gather(*(services[n % 2].add("dup-serial", {}) for n in range(8)),
                                       return_exceptions=True)
        assert sum(isinstance(r, int) for r in results) == 1, results
        assert [s["serial"] for s in await services[1].list()] == ["dup-serial"]
        assert await database.write_locks.count_documents({}) == 0  # every lock document given back
    finally:
        await other.close()
