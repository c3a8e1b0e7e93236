"""The writer's claim (``cm-admin storage`` alone on a database): one holder at a time, taken
over when it expires or its holder (on this host) is gone, lost by a holder frozen too long; and
the masters' entries among the running ones, recovered by the others once they lapse."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

import pytest
from twisted.internet import task

from cloudmailing.common.process_identity import ProcessIdentity, this_process
from cloudmailing.services.writer_claim import (
    CLAIM_SECONDS,
    RENEW_SECONDS,
    ClaimHeld,
    ClaimRenewal,
    MasterPresence,
    WriterClaim,
    recoverable,
    running_masters,
)
from cloudmailing.storage.writer_claims import MasterRegistry, WriterClaimStore
from tests.helpers import aio_test, renewed

START = 1_800_000_000.0


def _elsewhere(name: str) -> ProcessIdentity:
    """A process of another host: whether it still runs cannot be told from here."""
    return ProcessIdentity(host=name, boot="another-boot", pid_namespace="pid:[1]", pid=4242, started=99)


def _claim(database, clock, holder: ProcessIdentity, role: str = "a master") -> WriterClaim:
    return WriterClaim(WriterClaimStore(database), clock, role, holder)


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(START)
    return clock


@aio_test
async def test_a_second_writer_is_refused_with_the_holder_named_while_the_claim_is_renewed(database):
    clock = _clock()
    first = _claim(database, clock, _elsewhere("alpha"))
    await first.take()
    for _ in range(4):  # 4 × 20 s: longer than a claim lives, renewed all along
        clock.advance(CLAIM_SECONDS * 2 / 3)
        assert await first.renew()
        with pytest.raises(ClaimHeld, match="in use by a master \\(pid 4242 on alpha\\)"):
            await _claim(database, clock, _elsewhere("beta")).take()


@aio_test
async def test_a_claim_left_unrenewed_is_taken_over_and_its_holder_told_to_stop(database):
    clock = _clock()
    frozen = _claim(database, clock, _elsewhere("alpha"))
    await frozen.take()
    clock.advance(CLAIM_SECONDS + 1)
    successor = _claim(database, clock, _elsewhere("beta"))
    await successor.take()
    assert successor.generation == frozen.generation + 1
    assert not await frozen.renew()  # it wakes up: the claim is no longer its own
    assert await successor.renew()
    await frozen.release()  # gives nothing back: the successor keeps it
    with pytest.raises(ClaimHeld, match="on beta"):
        await _claim(database, clock, _elsewhere("gamma")).take()


@aio_test
async def test_a_claim_of_a_killed_process_of_this_host_is_free_at_once(database):
    clock = _clock()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    me = this_process()
    dead = dataclasses.replace(me, pid=child.pid, started=_started(child.pid))
    await _claim(database, clock, dead).take()
    with pytest.raises(ClaimHeld):  # it still runs
        await _claim(database, clock, me).take()
    child.kill()
    child.wait()
    await _claim(database, clock, me).take()  # no waiting for the claim to expire


@aio_test
async def test_a_released_claim_is_free_at_once_and_old_generations_are_dropped(database):
    clock = _clock()
    for name in ("a", "b", "c", "d", "e", "f"):
        claim = _claim(database, clock, _elsewhere(name))
        await claim.take()
        await claim.release()
    generations = sorted(doc["_id"] for doc in await database.writer_claims.find({}).to_list())
    assert generations == [3, 4, 5, 6]


@aio_test
async def test_of_two_processes_taking_the_claim_at_once_one_wins(database):
    clock = _clock()
    racers = [_claim(database, clock, _elsewhere(name)) for name in ("alpha", "beta", "gamma")]
    results = await asyncio.gather(*(racer.take() for racer in racers), return_exceptions=True)
    assert sum(result is None for result in results) == 1, results
    assert all(isinstance(result, ClaimHeld) for result in results if result is not None)


def _started(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[19])


@aio_test
async def test_running_masters_are_those_renewed_lately_and_not_killed_here(database):
    clock = _clock()
    registry = MasterRegistry(database)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    here = dataclasses.replace(this_process(), pid=child.pid, started=_started(child.pid))
    away = MasterPresence(registry, clock, _elsewhere("alpha"))
    for presence in (MasterPresence(registry, clock, here), away):
        await presence.register()
    assert sorted(m.host for m in await running_masters(registry, clock)) == sorted([here.host, "alpha"])
    child.kill()
    child.wait()
    entries = {entry["host"] if entry["pid"] != child.pid else "killed": entry for entry in await registry.all()}
    assert recoverable(entries["killed"], clock) and not recoverable(entries["alpha"], clock)  # at once
    assert [m.host for m in await running_masters(registry, clock)] == ["alpha"]
    clock.advance(CLAIM_SECONDS * 2 / 3)
    assert await away.renew()
    clock.advance(CLAIM_SECONDS * 2 / 3)
    assert [m.host for m in await running_masters(registry, clock)] == ["alpha"]  # renewed: still there
    clock.advance(CLAIM_SECONDS / 3 + 1)
    assert await running_masters(registry, clock) == []  # not renewed for a claim's life
    entry = next(entry for entry in await registry.all() if entry["host"] == "alpha")
    assert not recoverable(entry, clock)  # a margin for clocks apart: the others wait a little longer
    assert not await away.renew()  # it woke up too late: it must stop, never renew
    assert away.lapsed() is not None
    clock.advance(RENEW_SECONDS)
    assert recoverable(entry, clock)


@aio_test
async def test_a_recovered_master_finds_its_entry_gone_and_stops(database):
    clock = _clock()
    registry = MasterRegistry(database)
    presence = MasterPresence(registry, clock, _elsewhere("alpha"))
    await presence.register()
    assert presence.lapsed() is None
    await registry.remove(presence.key)  # recovered by another master (say its clock runs ahead)
    assert not await presence.renew()
    assert presence.lapsed() is not None


@aio_test
async def test_checking_the_claim_is_free_takes_nothing(database):
    clock = _clock()
    holder = _claim(database, clock, _elsewhere("alpha"), role="cm-admin storage recount")
    checker = _claim(database, clock, _elsewhere("beta"))
    await checker.check_free()
    assert await database.writer_claims.count_documents({}) == 0
    await holder.take()
    with pytest.raises(ClaimHeld, match="in use by cm-admin storage recount"):
        await checker.check_free()
    await holder.release()
    await checker.check_free()


@aio_test
async def test_a_holder_may_write_only_while_its_claim_surely_stands(database):
    clock = _clock()
    claim = _claim(database, clock, _elsewhere("one"))
    assert "not held" in claim.lapsed()
    await claim.take()
    assert claim.lapsed() is None
    clock.advance(CLAIM_SECONDS - RENEW_SECONDS - 1)
    assert claim.lapsed() is None
    clock.advance(1)  # frozen, say: its claim ends within the margin
    assert "the writer's claim of a master may have lapsed (renewed until" in claim.lapsed()
    assert await claim.renew()  # nobody took it meanwhile: writes again
    assert claim.lapsed() is None
    clock.advance(CLAIM_SECONDS)
    await _claim(database, clock, _elsewhere("two")).take()  # taken over
    assert not await claim.renew()
    assert "not held" in claim.lapsed()


@aio_test
async def test_a_claim_renewed_while_its_holder_runs_outlives_a_claims_life(database):
    clock = _clock()
    claim = _claim(database, clock, _elsewhere("one"), "cm-admin storage migrate")
    await claim.take()
    renewal = ClaimRenewal(claim.renew, clock, "the writer's claim")
    renewal.start()
    try:
        store = WriterClaimStore(database)
        for _ in range(int(3 * CLAIM_SECONDS / RENEW_SECONDS)):
            ends = (await store.latest())["until"]
            clock.advance(RENEW_SECONDS)
            await renewed(store.latest, ends)
        assert claim.lapsed() is None
        with pytest.raises(ClaimHeld, match="in use by cm-admin storage migrate"):
            await _claim(database, clock, _elsewhere("two")).take()
    finally:
        await renewal.stop()
    clock.advance(CLAIM_SECONDS)  # not renewed any more: free, and its holder may not write
    await _claim(database, clock, _elsewhere("two")).take()
    assert claim.lapsed() is not None


class _GatedStore(WriterClaimStore):
    """Its renewals wait at a gate: a renewal under way, for as long as a test needs."""

    def __init__(self, database) -> None:
        super().__init__(database)
        self.gate = asyncio.Event()

    async def renew(self, generation, until) -> None:
        if until.year > 1970:  # a renewal, not the release
            await self.gate.wait()
        await super().renew(generation, until)


@aio_test
async def test_stopping_the_renewal_waits_for_one_under_way_so_a_released_claim_stays_free(database):
    clock = _clock()
    store = _GatedStore(database)
    claim = WriterClaim(store, clock, "cm-admin storage recount", _elsewhere("one"))
    await claim.take()
    renewal = ClaimRenewal(claim.renew, clock, "the writer's claim")
    renewal.start()
    clock.advance(RENEW_SECONDS)  # a renewal starts, and waits at the gate
    stopping = asyncio.ensure_future(renewal.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done()
    store.gate.set()
    await stopping
    await claim.release()
    await _claim(database, clock, _elsewhere("two")).take()  # free at once
