"""Composing in worker processes: same messages as in-process, failures alone, dead workers replaced."""

from __future__ import annotations

import asyncio
import email
import email.policy
import errno
import multiprocessing.context
import os
import signal

import dkim
import pytest

from cloudmailing.common.cpu_limit import KILLED_BY
from cloudmailing.satellite.compose_pool import CHUNK_SIZE, Composed, ComposePool, MailingSource, compose_chunk
from cloudmailing.satellite.composer import prepare
from cloudmailing.satellite.templates import TemplateLimits
from tests.helpers import aio_test
from tests.satellite.test_composer import CONTENT, _txt

RECIPIENTS = [{"id": f"r{i}", "email": f"user{i}@one.test", "domain": "one.test", "contact": {"name": f"N{i}", "n": i}}
              for i in range(2 * CHUNK_SIZE + 7)]
BROKEN = {"r0", "r60"}  # n == 0 and n == 60 make the subject template fail


@pytest.fixture
def pool():
    pool = ComposePool(2)
    yield pool
    pool.close()


def _mailing() -> MailingSource:
    return MailingSource.from_content(dict(CONTENT, subject="Hi {{ name }} {{ 1 // (n % 60) }}"))


async def _compose_all(pool: ComposePool, mailing: MailingSource, recipients: list[dict] = RECIPIENTS) -> Composed:
    everything = Composed()
    async for composed in pool.compose(mailing, recipients):
        everything.jobs += composed.jobs
        everything.failures += composed.failures
    return everything


def _check(composed: Composed) -> None:
    assert {failure["recipient_id"] for failure in composed.failures} == BROKEN
    assert all(failure["status"] == "GENERAL_ERROR" for failure in composed.failures)
    assert sorted(job.recipient_id for job in composed.jobs) == sorted(r["id"] for r in RECIPIENTS
                                                                       if r["id"] not in BROKEN)
    for job in composed.jobs:
        message = email.message_from_bytes(job.data, policy=email.policy.default)
        index = int(job.recipient_id[1:])
        assert message["Subject"] == f"Hi N{index} {1 // (index % 60)}"
        assert message["To"] == f"user{index}@one.test"
        assert dkim.verify(job.data, dnsfunc=_txt)


@aio_test
async def test_workers_compose_every_message_and_fail_the_broken_ones_alone(pool):
    _check(await _compose_all(pool, _mailing()))
    assert len(pool.worker_pids()) == 2


def test_in_process_composing_gives_the_same_messages():
    _check(compose_chunk(prepare(_mailing().content), RECIPIENTS))


@aio_test
async def test_a_killed_worker_is_replaced_and_its_messages_still_made(pool):
    mailing = _mailing()
    await _compose_all(pool, mailing)  # the workers are up
    killed = pool.worker_pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    _check(await _compose_all(pool, mailing))  # composed here, and new workers started
    _check(await _compose_all(pool, mailing))  # by the new workers
    assert len(pool.worker_pids()) == 2 and not set(pool.worker_pids()) & set(killed)


NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


async def _compose_each(pool: ComposePool, mailing: MailingSource, recipients: list[dict]) -> Composed:
    everything = Composed()
    async for composed in pool.compose(mailing, recipients):
        everything.jobs += composed.jobs
        everything.failures += composed.failures
    return everything


@pytest.mark.parametrize(("subject", "limits", "wall_seconds", "reason"), [
    # the sandbox's own count of CPU time
    (NESTED_LOOPS, TemplateLimits(cpu_seconds=0.5), None, "template over its limits: CPU time over 0.5 s"),
    # one Python operation the sandbox cannot interrupt: the worker's CPU timer ends it
    ("{{ 7 ** 30000000 }}", TemplateLimits(cpu_seconds=0.5, max_int_bits=10**10), 60.0,
     "template over its limits: CPU time over the limit, the compose worker was stopped"),
    # the worker's RLIMIT_AS
    ("{{ 'x' * 2000000000 }}", TemplateLimits(max_value_chars=10**12), None,
     "template over its limits: memory over 64 MiB"),
    # the daemon's watchdog, when a message takes too long however it does
    (NESTED_LOOPS, TemplateLimits(cpu_seconds=60), 2.0, "template over its limits: composing took over 2 s"),
])
@aio_test
async def test_a_template_over_a_limit_fails_its_mailing_while_another_is_composed(subject, limits, wall_seconds,
                                                                                 reason):
    pool = ComposePool(2, limits, memory_mb=64, wall_seconds=wall_seconds)
    try:
        hostile = MailingSource.from_content(dict(CONTENT, id=8, subject=subject))
        started = asyncio.get_running_loop().time()
        bad, good = await asyncio.gather(_compose_each(pool, hostile, RECIPIENTS[:60]), _compose_all(pool, _mailing()))
        assert asyncio.get_running_loop().time() - started < 30
        _check(good)
        assert not bad.jobs and len(bad.failures) == 60
        assert {f["status"] for f in bad.failures} == {"GENERAL_ERROR"}
        # Each worker that was given some of them went over the limit once, at most; the others were not tried.
        over = [f for f in bad.failures if f["reply_text"] == reason]
        assert 1 <= len(over) <= pool.workers
        short = reason.removeprefix("template over its limits: ")
        assert {f["reply_text"] for f in bad.failures if f not in over} == {
            f"not composed: another message of this mailing went over the limits ({short})"}
        _check(await _compose_all(pool, _mailing()))  # the pool still works, lost workers replaced
        assert len(pool.worker_pids()) == 2
    finally:
        pool.close()


@aio_test
async def test_a_worker_ended_once_by_its_cpu_timer_fails_nobody(pool):
    """One death by the CPU timer may be a false alarm (a limit counted wrong, a signal from
    elsewhere): the messages it was making are tried again, and the mailing goes on."""
    slow_subject = "Hi {{ name }}{% for i in range(20000) %}{% endfor %}"
    slow = MailingSource.from_content(dict(CONTENT, id=9, subject=slow_subject))
    recipients = RECIPIENTS[:CHUNK_SIZE]  # one chunk: one worker busy on it for a few tenths of a second
    everything, killed = Composed(), False
    async for composed in pool.compose(slow, recipients):
        everything.jobs += composed.jobs
        everything.failures += composed.failures
        if not killed:  # its first messages are back: the worker is in the middle of the chunk
            for pid in pool.worker_pids():
                os.kill(pid, KILLED_BY)
            killed = True
    assert not everything.failures, everything.failures[:2]
    assert sorted(job.recipient_id for job in everything.jobs) == sorted(r["id"] for r in recipients)


@aio_test
async def test_closing_the_pool_kills_a_worker_busy_on_a_template():
    pool = ComposePool(1, TemplateLimits(cpu_seconds=60))
    busy = MailingSource.from_content(dict(CONTENT, subject=NESTED_LOOPS))
    composing = asyncio.ensure_future(_compose_each(pool, busy, RECIPIENTS[:3]))
    while not pool.worker_pids():
        await asyncio.sleep(0.05)
    (pid,) = pool.worker_pids()
    await asyncio.sleep(1.0)  # busy on the first message
    pool.close()
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()
    await asyncio.wait_for(composing, 5)  # the caller is not left waiting either


def _blocked_in(pid: int) -> str:
    """The system call a sleeping process waits in ('read', 'write'), or '' while it runs."""
    with open(f"/proc/{pid}/stat") as stat:
        if stat.read().rsplit(")", 1)[1].split()[0] != "S":
            return ""
    with open(f"/proc/{pid}/syscall") as syscall:
        return {"0": "read", "1": "write"}.get(syscall.read().split()[0], "")


@aio_test
async def test_a_worker_goes_on_composing_while_the_daemon_does_not_read_its_results():
    """Its finished batches wait in its socket (more than the default buffer of ~208 KB): the
    worker ends the chunk and waits for the next, rather than block in a write."""
    from cloudmailing.satellite import compose_pool

    worker = compose_pool._Worker(TemplateLimits(), 512)
    try:
        await worker.started()
        big = MailingSource.from_content(dict(CONTENT, html="<p>Dear {{ name }}</p>" + "<p>filler</p>\n" * 1500))
        worker.send(big, RECIPIENTS[:30], one_by_one=False)  # ~30 × 22 KB of results, none read
        deadline = asyncio.get_running_loop().time() + 30
        while (waits := _blocked_in(worker.process.pid)) != "read":
            assert waits != "write", "the worker is blocked writing its results"
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        batches = [await worker.receive(5.0)]
        while sum(len(batch) for batch in batches) < 30:
            batches.append(await worker.receive(5.0))
        assert sum(len(result.data) for batch in batches for result, _ in batch) > 3 * 212992 // 2
    finally:
        worker.kill()


@aio_test
async def test_a_message_larger_than_the_pipe_holds_arrives_whole(pool):
    """The daemon wakes at the first bytes of a batch and reads it whole, though the rest is still
    on its way (uvloop leaves a descriptor it watched non-blocking: the read must not stop short)."""
    huge = MailingSource.from_content(dict(CONTENT, html="<p>Dear {{ name }}</p>" + "<p>filler</p>\n" * 130_000))
    composed = await _compose_all(pool, huge, RECIPIENTS[:2])
    assert composed.failures == [], composed.failures[0]["reply_text"]
    assert sorted(job.recipient_id for job in composed.jobs) == ["r0", "r1"]
    assert all(len(job.data) > 1_500_000 for job in composed.jobs)


def _refuse_starts(monkeypatch: pytest.MonkeyPatch, times: int | None) -> None:
    """Starting a worker process fails as fork/exec does on a host out of processes or memory
    (EAGAIN), ``times`` times (None: always)."""
    real = multiprocessing.context.SpawnProcess.start
    left = [times]

    def start(process: multiprocessing.context.SpawnProcess) -> None:
        if left[0] is None or left[0] > 0:
            left[0] = None if left[0] is None else left[0] - 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        real(process)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)


async def _worker_killed(pool: ComposePool, monkeypatch, refusals: int | None) -> MailingSource:
    """Compose once (the worker is up), kill the worker, and refuse the next ``refusals`` process
    starts (None: all of them); the mailing composed."""
    mailing = _mailing()
    await _compose_all(pool, mailing, RECIPIENTS[1:4])
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    _refuse_starts(monkeypatch, refusals)
    return mailing


async def _composed_ids_and_workers(pool: ComposePool, mailing: MailingSource) -> tuple[list[str], int]:
    """The ids of r1-r3's messages composed now (none may fail), and the pool's workers after."""
    composed = await asyncio.wait_for(_compose_all(pool, mailing, RECIPIENTS[1:4]), 60)
    assert not composed.failures, composed.failures
    return sorted(job.recipient_id for job in composed.jobs), len(pool.worker_pids())


@aio_test
async def test_a_dead_worker_whose_replacement_cannot_start_at_once_still_gets_its_chunk_composed(monkeypatch):
    pool = ComposePool(1)
    try:
        mailing = await _worker_killed(pool, monkeypatch, 2)  # the replacement, and the next try, refused
        assert await _composed_ids_and_workers(pool, mailing) == (["r1", "r2", "r3"], 1)
    finally:
        pool.close()


@aio_test
async def test_when_no_worker_can_start_the_chunk_fails_with_the_reason_and_the_pool_is_used_again(monkeypatch):
    pool = ComposePool(1)
    try:
        mailing = await _worker_killed(pool, monkeypatch, None)
        composed = await asyncio.wait_for(_compose_all(pool, mailing, RECIPIENTS[1:4]), 60)
        assert not composed.jobs and sorted(f["recipient_id"] for f in composed.failures) == ["r1", "r2", "r3"]
        assert all(f["status"] == "GENERAL_ERROR" and "no compose worker could be started" in f["reply_text"]
                   and "Resource temporarily unavailable" in f["reply_text"] for f in composed.failures)
        assert pool.worker_pids() == []
        monkeypatch.undo()  # the host has processes to spare again: the next chunk starts a worker
        assert await _composed_ids_and_workers(pool, mailing) == (["r1", "r2", "r3"], 1)
    finally:
        pool.close()


@aio_test
async def test_a_pool_started_when_no_worker_can_start_composes_once_one_can(monkeypatch):
    pool = ComposePool(2)
    try:
        _refuse_starts(monkeypatch, None)
        pool.start()  # no exception: each slot tries again at its next use
        assert pool.worker_pids() == []
        monkeypatch.undo()
        _check(await asyncio.wait_for(_compose_all(pool, _mailing()), 60))
        assert len(pool.worker_pids()) == 2
    finally:
        pool.close()


@aio_test
async def test_a_chunk_cancelled_on_the_worker_that_replaced_a_lost_one_leaves_no_stray_worker():
    pool = ComposePool(1)
    try:
        mailing = _mailing()
        await _compose_all(pool, mailing, RECIPIENTS[1:4])  # the worker is up
        first = pool.worker_pids()[0]
        messages = pool.compose(mailing, RECIPIENTS[1:CHUNK_SIZE + 1])  # one chunk
        await messages.__anext__()
        os.kill(first, signal.SIGKILL)  # the rest of the chunk goes to a replacement
        while first in pool.worker_pids() or not pool.worker_pids():
            await asyncio.sleep(0.01)
        await messages.__anext__()  # composed by the replacement
        await messages.aclose()  # the chunk is cancelled while the replacement composes it
        await asyncio.sleep(0.1)
        assert len(pool.worker_pids()) == 1  # the replacement was replaced, not the dead one again
        assert await _composed_ids_and_workers(pool, mailing) == (["r1", "r2", "r3"], 1)
    finally:
        pool.close()
