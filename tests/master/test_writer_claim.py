"""Masters share a database, ``cm-admin storage`` runs alone on it: a second master starts
beside the first; a master whose entry among the running ones lapsed (frozen, recovered by
another) writes nothing and stops; ``cm-admin storage`` and a master never run at once."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import xmlrpc.client

import pytest

from cloudmailing.common.process_identity import ProcessIdentity
from cloudmailing.master.app import Master
from cloudmailing.services.writer_claim import CLAIM_SECONDS, ClaimHeld, WriterClaim, running_masters
from cloudmailing.storage.writer_claims import MasterRegistry, WriterClaimStore
from tests.cli.test_storage_migrate import _config, _run
from tests.conftest import _reactor, free_port
from tests.helpers import aio_test


@aio_test
async def test_a_second_master_starts_beside_the_first(running_master, settings, database):
    second = Master(dataclasses.replace(settings), _reactor())
    await second.start()
    try:
        assert len(await running_masters(MasterRegistry(database), _reactor())) == 2
        assert second.database.locks.shared is not None  # its writes take the locks the other sees
        assert await WriterClaimStore(database).latest() is None  # no master takes the claim
    finally:
        await second.stop()
    assert len(await running_masters(MasterRegistry(database), _reactor())) == 1


@aio_test
async def test_a_master_does_not_start_beside_one_of_an_earlier_version(settings, database):
    """Earlier masters took the writer's claim and believed themselves alone on the database."""
    older = ProcessIdentity(host="elsewhere", boot="b", pid_namespace="pid:[1]", pid=76, started=1)
    claim = WriterClaim(WriterClaimStore(database), _reactor(), "a master", older)
    await claim.take()
    master = Master(settings, _reactor())
    with pytest.raises(ClaimHeld, match=r"in use by a master \(pid 76 on elsewhere\).*earlier CloudMailing version"):
        await master.start()
    assert master.database is None  # nothing left open
    assert not await running_masters(MasterRegistry(database), _reactor())
    await claim.release()


@aio_test
async def test_cm_admin_storage_waits_for_the_master_to_stop(running_master, settings, tmp_path, database,
                                                             mongo_url, db_name):
    config = _config(tmp_path, mongo_url, db_name, free_port())
    refused = await asyncio.to_thread(_run, config, "admin", "storage", "recount")
    assert refused.returncode == 1, refused
    assert "a master runs on this database" in refused.stderr, refused.stderr
    assert await running_masters(MasterRegistry(database), _reactor())  # its entry is in
    await running_master.master.stop()
    assert not await running_masters(MasterRegistry(database), _reactor())  # and out
    done = await asyncio.to_thread(_run, config, "admin", "storage", "recount")
    assert done.returncode == 0 and "recounted 0 mailings" in done.stdout, done.stderr


@aio_test
async def test_a_master_does_not_start_while_cm_admin_storage_runs(settings, database):
    storage = ProcessIdentity(host="elsewhere", boot="b", pid_namespace="pid:[1]", pid=77, started=1)
    claim = WriterClaim(WriterClaimStore(database), _reactor(), "cm-admin storage migrate", storage)
    await claim.take()
    master = Master(settings, _reactor())
    refusal = r"in use by cm-admin storage migrate \(pid 77 on elsewhere\).*wait for it to end"
    with pytest.raises(ClaimHeld, match=refusal):
        await master.start()
    assert not await running_masters(MasterRegistry(database), _reactor())  # it took its entry back
    await claim.release()
    await master.start()
    await master.stop()


@aio_test
async def test_a_master_whose_entry_was_recovered_stops(settings, database):
    master = Master(settings, _reactor())
    stopped = []
    master.on_claim_lost = lambda: stopped.append(True)
    await master.start()
    port = master.api_port
    # It was frozen for longer than its entry lives: another master recovered it meanwhile.
    await MasterRegistry(database).remove(master._presence.key)
    master._renewal._loop.call.reset(0)  # its renewal loop's next turn, now: it stops the master
    for _ in range(500):
        if stopped:
            break
        await asyncio.sleep(0.01)
    assert stopped == [True]
    with pytest.raises(ConnectionRefusedError):  # it no longer listens
        await asyncio.open_connection("127.0.0.1", port)


@aio_test
async def test_a_master_whose_entry_may_lapse_writes_nothing_and_one_past_its_end_stops(running_master, database):
    master, api = running_master.master, running_master.proxy()
    mailing = ("news@sender.test", "News", "Hello", "<p>Hi</p>", "Hi", "utf-8")
    master._presence._held_until -= datetime.timedelta(seconds=CLAIM_SECONDS - 4)  # renewal late
    with pytest.raises(xmlrpc.client.Fault, match="database unavailable, please retry"):
        await api.create_mailing(*mailing)
    assert await database.mailings.count_documents({}) == 0
    assert await master._renew_presence()  # before its end: nobody may have recovered it yet
    assert await api.create_mailing(*mailing)
    assert await database.mailings.count_documents({}) == 1
    master._presence._held_until -= datetime.timedelta(seconds=CLAIM_SECONDS + 1)  # as after a long SIGSTOP
    assert not await master._renew_presence()  # past its end: another master may be recovering it
    assert master._stopped and master.database.write_guard() is not None


@aio_test
async def test_a_master_stopping_during_a_renewal_waits_for_it_before_withdrawing_its_entry(
        settings, database):
    master = Master(settings, _reactor())
    await master.start()
    gate = asyncio.Event()
    renew_entry = master._presence.renew

    async def held_at_the_gate() -> bool:
        await gate.wait()
        return await renew_entry()

    master._presence.renew = held_at_the_gate
    master._renewal._loop.call.reset(0)  # its next renewal now
    await asyncio.sleep(0.2)
    stopping = asyncio.ensure_future(master.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done()  # it waits for the renewal under way
    gate.set()
    await stopping
    assert not await running_masters(MasterRegistry(database), _reactor())  # the entry stays withdrawn


@aio_test
async def test_a_master_stops_though_a_write_keeps_a_change_number_in_flight(settings, database):
    """A write the database never answered keeps its number in flight, and a reservation waits
    behind it holding the allocator: the master still stops, its entry withdrawn."""
    master = Master(settings, _reactor())
    await master.start()
    allocator = master.stores.status_log.allocator
    allocator.release(await allocator.allocate(1))
    allocator._in_flight.add(-1)  # the unanswered write
    allocator._drained.clear()
    waiting = asyncio.ensure_future(allocator.allocate(20_000))  # more than the range holds
    await asyncio.sleep(0.1)
    assert not waiting.done()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(master.stop(), 30)
    assert asyncio.get_running_loop().time() - started < 15
    assert not await running_masters(MasterRegistry(database), _reactor())
    waiting.cancel()
