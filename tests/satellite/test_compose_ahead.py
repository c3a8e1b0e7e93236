"""Composing just ahead of sending: the composed-unsent bytes stay under the bound (+ one message)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from cloudmailing.satellite import compose_ahead
from cloudmailing.satellite.compose_ahead import ComposeAhead
from cloudmailing.satellite.compose_pool import CHUNK_SIZE, Composed, ComposePool, MailingSource
from cloudmailing.satellite.delivery import DeliveryJob
from tests.helpers import aio_test
from tests.satellite.test_composer import CONTENT

BOUND = 1_000_000
RECIPIENTS = [{"id": f"r{i}", "email": f"user{i}@one.test", "domain": "one.test", "contact": {"name": f"N{i}"}}
              for i in range(60)]


async def _settled(ahead: ComposeAhead) -> None:
    """Until composing stops, for want of room or of recipients."""
    for _ in range(600):
        await asyncio.sleep(0.05)
        if not ahead.composing and not ahead._wake.is_set():  # and the dispatch has looked since
            return
    raise AssertionError("still composing")


@aio_test
async def test_composing_stops_at_the_byte_bound_and_goes_on_as_messages_are_sent():
    pool = ComposePool(2)
    held: list[DeliveryJob] = []  # composed, not sent: what a scheduler would hold
    failures: list[dict] = []
    ahead = ComposeAhead(pool, held.append, lambda failure, mailing_id: failures.append(failure), BOUND)
    running = asyncio.ensure_future(ahead.run())
    big = MailingSource.from_content(dict(CONTENT, html="", plain="Dear {{ name }}\n" + "y" * 150_000))
    try:
        ahead.add(big, RECIPIENTS)
        sent = 0
        while sent < len(RECIPIENTS):
            await _settled(ahead)
            largest = max(len(job.data) for job in held)
            assert ahead.composed_bytes == sum(len(job.data) for job in held)
            assert ahead.composed_bytes <= BOUND + largest
            # It composed as far as the bound allows, not the whole lease.
            assert ahead.composed_bytes + largest > BOUND or sent + len(held) == len(RECIPIENTS)
            assert ahead.pending == len(RECIPIENTS) - sent - len(held)
            for job in held[:3]:  # three deliveries end: room for about three more
                ahead.sent(job)
            sent += len(held[:3])
            del held[:3]
        assert not failures and ahead.composed_bytes == 0 and ahead.pending == 0
        assert BOUND - largest < ahead.peak_bytes <= BOUND + largest
    finally:
        running.cancel()
        pool.close()


@aio_test
async def test_a_message_larger_than_the_bound_is_still_composed_alone():
    pool = ComposePool(1)
    held: list[DeliveryJob] = []
    ahead = ComposeAhead(pool, held.append, lambda failure, mailing_id: None, 10_000)
    running = asyncio.ensure_future(ahead.run())
    try:
        ahead.add(MailingSource.from_content(dict(CONTENT, html="", plain="{{ name }}" + "y" * 50_000)),
                  RECIPIENTS[:3])
        for expected in range(1, 4):
            await _settled(ahead)
            assert len(held) == 1  # one at a time
            ahead.sent(held.pop())
            assert ahead.pending == 3 - expected
    finally:
        running.cancel()
        pool.close()


class _GatedPool:
    """Stands in for the worker processes where the order of events must be chosen: each message
    is made when the test opens its gate (in the order the test picks)."""

    workers = 1

    def __init__(self) -> None:
        self.gates: list[asyncio.Event] = []

    async def compose(self, mailing: MailingSource, chunk: list[dict]) -> AsyncIterator[Composed]:
        for recipient in chunk:
            gate = asyncio.Event()
            self.gates.append(gate)
            await gate.wait()
            yield Composed(jobs=[DeliveryJob(recipient["id"], "one.test", "f@x.test", "a@one.test", b"x" * 100)])


async def _turns() -> None:
    await asyncio.sleep(0.02)


@aio_test
async def test_a_probe_whose_mailing_size_became_known_meanwhile_still_ends_the_probe(monkeypatch):
    # A's estimate is evicted while a chunk of A is being composed; A's next recipients are sent as
    # a probe, and the chunk's message lands (A known again) before the probe starts: the probe
    # must still end, or no mailing of unknown size is ever composed again.
    monkeypatch.setattr(compose_ahead, "_MAX_ESTIMATES", 1)
    pool, submitted = _GatedPool(), []
    ahead = ComposeAhead(pool, submitted.append, lambda failure, mailing_id: None, 10_000)  # type: ignore[arg-type]
    running = asyncio.ensure_future(ahead.run())
    a, b, c = (MailingSource.from_content(dict(CONTENT, subject=s)) for s in ("A", "B", "C"))
    try:
        ahead.add(a, [{"id": "a1"}, {"id": "a2"}, {"id": "a3"}])
        await _turns()
        pool.gates[-1].set()  # a1, the probe of A: A's size known, a2 and a3 go as a chunk
        await _turns()
        a_chunk = pool.gates[-1]
        ahead.add(b, [{"id": "b1"}])
        await _turns()
        pool.gates[-1].set()  # b1 noted: A forgotten
        await _turns()
        ahead.add(a, [{"id": "a4"}])  # dispatched as a probe of A ...
        a_chunk.set()  # ... and a2 arrives before that probe starts
        for _ in range(3):
            await _turns()
            for gate in pool.gates:
                gate.set()
        ahead.add(c, [{"id": "c1"}])  # a mailing of unknown size
        for _ in range(3):
            await _turns()
            for gate in pool.gates:
                gate.set()
        assert sorted(job.recipient_id for job in submitted) == ["a1", "a2", "a3", "a4", "b1", "c1"]
        assert ahead.pending == 0
    finally:
        running.cancel()


@aio_test
async def test_the_size_forgotten_first_is_that_of_the_mailing_used_least_recently(monkeypatch):
    monkeypatch.setattr(compose_ahead, "_MAX_ESTIMATES", 2)
    pool = ComposePool(1)
    held: list[DeliveryJob] = []
    ahead = ComposeAhead(pool, held.append, lambda failure, mailing_id: None, BOUND)
    running = asyncio.ensure_future(ahead.run())
    a, b, c = (MailingSource.from_content(dict(CONTENT, subject=s + " {{ name }}")) for s in ("A", "B", "C"))
    try:
        for mailing, recipients in ((a, RECIPIENTS[:1]), (b, RECIPIENTS[1:2]), (a, RECIPIENTS[2:3]),
                                    (c, RECIPIENTS[3:4])):
            ahead.add(mailing, recipients)
            await _settled(ahead)
        assert len(held) == 4
        # A, still in use, is remembered; B, used before A's last message, is the one forgotten.
        assert set(ahead._estimates) == {a.digest, c.digest}
    finally:
        running.cancel()
        pool.close()


@aio_test
async def test_chunks_ending_in_the_same_turn_let_the_next_ones_start():
    """Both chunks a worker may have under way end at once: the dispatch must run again once
    they have left its count (a two-master test's satellite stopped composing for good here)."""
    pool, submitted = _GatedPool(), []
    ahead = ComposeAhead(pool, submitted.append, lambda failure, mailing_id: None, 10_000_000)  # type: ignore[arg-type]
    running = asyncio.ensure_future(ahead.run())
    count = 1 + 6 * CHUNK_SIZE
    mailing = MailingSource.from_content(CONTENT)
    try:
        ahead.add(mailing, [{"id": "r0"}])  # its size is learnt from this one
        await _turns()
        pool.gates[-1].set()
        await _turns()
        ahead.add(mailing, [{"id": f"r{i}"} for i in range(1, count)])  # two chunks start at once
        for _ in range(20 * CHUNK_SIZE):
            for gate in pool.gates:  # every message under way is made in the same turn
                gate.set()
            await asyncio.sleep(0)
            if len(submitted) == count:
                break
        assert len(submitted) == count and ahead.pending == 0
    finally:
        running.cancel()
