"""Composing just ahead of sending: the composed-unsent bytes stay under the bound (+ one message)."""

from __future__ import annotations

import asyncio

from cloudmailing.satellite.compose_ahead import ComposeAhead
from cloudmailing.satellite.compose_pool import ComposePool, MailingSource
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
        if not ahead.composing:
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
