"""Composing in worker processes: same messages as in-process, failures alone, dead workers replaced."""

from __future__ import annotations

import email
import email.policy
import os
import signal

import dkim
import pytest

from cloudmailing.satellite.compose_pool import CHUNK_SIZE, Composed, ComposePool, MailingSource, compose_chunk
from cloudmailing.satellite.composer import prepare
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


async def _compose_all(pool: ComposePool, mailing: MailingSource) -> Composed:
    everything = Composed()
    async for composed in pool.compose(mailing, RECIPIENTS):
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
