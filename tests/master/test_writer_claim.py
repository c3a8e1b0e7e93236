"""A master is its database's only writer, on FerretDB and MongoDB alike: a second master is
refused while it runs; one whose claim was taken over stops; ``cm-admin storage`` and a master
never run at once."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import xmlrpc.client

import pytest
from twisted.internet import task

from cloudmailing.common.process_identity import ProcessIdentity
from cloudmailing.master.app import Master
from cloudmailing.services.writer_claim import CLAIM_SECONDS, ClaimHeld, WriterClaim, running_masters
from cloudmailing.storage.writer_claims import MasterRegistry, WriterClaimStore
from tests.cli.test_storage_migrate import _config, _run
from tests.conftest import _reactor, free_port
from tests.helpers import aio_test


@aio_test
async def test_a_second_master_is_refused(running_master, settings):
    second = Master(dataclasses.replace(settings), _reactor())
    with pytest.raises(ClaimHeld, match=r"in use by a master \(pid \d+ on .*one master at a time runs"):
        await second.start()
    assert second.database is None  # nothing left open


@aio_test
async def test_cm_admin_storage_waits_for_the_master_to_stop(running_master, settings, tmp_path, database,
                                                             mongo_url, db_name):
    config = _config(tmp_path, mongo_url, db_name, free_port())
    refused = await asyncio.to_thread(_run, config, "admin", "storage", "recount")
    assert refused.returncode == 1, refused
    assert "in use by a master" in refused.stderr, refused.stderr
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
async def test_a_master_whose_claim_was_taken_over_stops(settings, database):
    master = Master(settings, _reactor())
    stopped = []
    master.on_claim_lost = lambda: stopped.append(True)
    await master.start()
    port = master.api_port
    later = task.Clock()  # the master has been frozen for longer than its claim lives
    later.advance(_reactor().seconds() + CLAIM_SECONDS + 5)
    intruder = ProcessIdentity(host="elsewhere", boot="b", pid_namespace="pid:[1]", pid=1, started=1)
    await WriterClaim(WriterClaimStore(database), later, "a master", intruder).take()
    master._renewal._loop.call.reset(0)  # its renewal loop's next turn, now: it stops the master
    for _ in range(500):
        if stopped:
            break
        await asyncio.sleep(0.01)
    assert stopped == [True]
    with pytest.raises(ConnectionRefusedError):  # it no longer listens
        await asyncio.open_connection("127.0.0.1", port)


@pytest.fixture
def as_on_mongodb(monkeypatch):
    """The master opens this test's database as if it were MongoDB, whatever the server (CI runs
    FerretDB): it must take the writer's claim there too."""
    from cloudmailing.master import app

    opened_for_real = app.open_database

    async def opened(*args, **kwargs):
        database = await opened_for_real(*args, **kwargs)
        database.is_ferretdb = False
        return database

    monkeypatch.setattr(app, "open_database", opened)


@aio_test
async def test_on_mongodb_too_a_master_takes_the_claim_and_a_second_one_is_refused(as_on_mongodb, settings,
                                                                                    database):
    """Two masters on one MongoDB would each see only their own change numbers in flight (a
    cursor read through one could skip a change the other was writing), and a starting master's
    repairs would undo the other's writes in flight: one master per database, whatever the server."""
    first, second = Master(settings, _reactor()), Master(dataclasses.replace(settings), _reactor())
    await first.start()
    try:
        assert first._claim is not None and first.database.write_guard is not None
        assert (await WriterClaimStore(database).latest())["role"] == "a master"
        with pytest.raises(ClaimHeld, match="in use by a master"):
            await second.start()
        assert second.database is None
    finally:
        await first.stop()
    await second.start()  # the claim was given back: at once
    await second.stop()


@aio_test
async def test_a_master_frozen_past_its_claim_writes_nothing_until_a_renewal_finds_the_claim_its_own(
        running_master, database):
    master, api = running_master.master, running_master.proxy()
    mailing = ("news@sender.test", "News", "Hello", "<p>Hi</p>", "Hi", "utf-8")
    master._claim._held_until -= datetime.timedelta(seconds=CLAIM_SECONDS)  # as after a long SIGSTOP
    with pytest.raises(xmlrpc.client.Fault, match="database unavailable, please retry"):
        await api.create_mailing(*mailing)
    assert await database.mailings.count_documents({}) == 0
    await master._renew_claim()  # its renewal loop's next turn: nobody took the claim meanwhile
    assert await api.create_mailing(*mailing)
    assert await database.mailings.count_documents({}) == 1


@aio_test
async def test_a_master_stopping_during_a_renewal_waits_for_it_before_withdrawing_its_entry_and_claim(
        settings, database):
    master = Master(settings, _reactor())
    await master.start()
    gate = asyncio.Event()
    renew_entry = master._presence.renew

    async def held_at_the_gate() -> None:
        await gate.wait()
        await renew_entry()

    master._presence.renew = held_at_the_gate
    master._renewal._loop.call.reset(0)  # its next renewal now
    await asyncio.sleep(0.2)
    stopping = asyncio.ensure_future(master.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done()  # it waits for the renewal under way
    gate.set()
    await stopping
    assert not await running_masters(MasterRegistry(database), _reactor())  # the entry stays withdrawn
    latest = await WriterClaimStore(database).latest()
    assert latest is None or latest["until"] < datetime.datetime(1971, 1, 1)  # and the claim given back
