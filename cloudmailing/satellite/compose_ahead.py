"""Composing just ahead of sending: leased recipients wait uncomposed until there is room.

A lease of big messages must not become a lease's worth of composed bytes in memory. Leased
recipients wait here as the master sent them (small); they are composed, a chunk at a time, only
while the bytes composed and not yet sent stay under ``max_bytes``. Each message leaves the count
when its delivery ends (``sent``).

A mailing's next messages are reckoned at the largest of its messages composed so far; while that
is unknown (its first message), one message of it is composed at a time. So the composed-unsent
bytes stay under ``max_bytes`` plus one message (when one message alone is larger than the room
left, it is still composed once nothing else is held: a mailing is never stuck).

A recipient whose turn comes too late (``late``: its lease is over, the daemon decides) is not
composed: it goes to ``not_composed``, which gives it its outcome.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable

from cloudmailing.satellite.compose_pool import CHUNK_SIZE, ComposePool, MailingSource
from cloudmailing.satellite.delivery import DeliveryJob

log = logging.getLogger(__name__)

_MAX_ESTIMATES = 256  # mailings whose message size is remembered


class ComposeAhead:
    """Leased recipients composed by ``pool`` when room allows; messages to ``submit``, failures to ``failed``."""

    def __init__(self, pool: ComposePool, submit: Callable[[DeliveryJob], None],
                 failed: Callable[[dict[str, Any], int], None], max_bytes: int,
                 late: Callable[[str], bool] | None = None,
                 not_composed: Callable[[list[dict[str, Any]], int], None] | None = None) -> None:
        self._pool = pool
        self._submit = submit
        self._failed = failed
        self._late = late  # asked of each recipient (by id) just before it is composed
        self._not_composed = not_composed  # given those ``late`` refused, with their mailing id
        self.max_bytes = max_bytes
        self.composed_bytes = 0  # composed, handed to delivery, delivery not ended yet
        self.peak_bytes = 0      # the most composed_bytes has been (for tests and benchmarks)
        self._waiting: deque[tuple[MailingSource, dict[str, Any]]] = deque()
        self._estimates: dict[str, int] = {}  # digest → largest message composed
        self._reserved = 0   # bytes reckoned for messages being composed
        self._probing = False  # a message of a mailing whose size is unknown is being composed
        self._composing = 0  # recipients being composed
        self._tasks: set[asyncio.Future[None]] = set()
        self._wake = asyncio.Event()
        self._short_of_room = False  # the last dispatch left recipients waiting for room

    @property
    def pending(self) -> int:
        """Leased recipients not composed yet (waiting or being composed)."""
        return len(self._waiting) + self._composing

    @property
    def composing(self) -> int:
        """Recipients being composed now."""
        return self._composing

    def add(self, mailing: MailingSource, recipients: list[dict[str, Any]]) -> None:
        """Queue leased recipients of ``mailing`` for composing."""
        self._waiting.extend((mailing, recipient) for recipient in recipients)
        self._wake.set()

    def sent(self, job: DeliveryJob) -> None:
        """The delivery of ``job`` ended: its bytes make room (the dispatch is woken only when
        room was what held it: once a message, that wake-up would cost the daemon more than the
        rest of this bookkeeping)."""
        self.composed_bytes -= len(job.data)
        if self._short_of_room:
            self._wake.set()

    async def run(self) -> None:
        """Compose waiting recipients as room allows, until cancelled."""
        try:
            while True:
                self._wake.clear()
                self._dispatch()
                await self._wake.wait()
        finally:
            for task in self._tasks:
                task.cancel()

    def _dispatch(self) -> None:
        self._short_of_room = False
        while self._waiting and len(self._tasks) < 2 * self._pool.workers:
            mailing = self._waiting[0][0]
            count, reserve, probe = self._room_for(mailing)
            if not count:
                self._short_of_room = True
                return
            chunk = [self._waiting.popleft()[1] for _ in range(count)]
            if self._late is not None:
                chunk, reserve = self._drop_late(mailing, chunk, reserve, probe)
                if not chunk:
                    continue
                count = len(chunk)
            self._reserved += reserve
            self._composing += count
            task = asyncio.ensure_future(self._compose(mailing, chunk, reserve // count, probe))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _drop_late(self, mailing: MailingSource, chunk: list[dict[str, Any]], reserve: int,
                   probe: bool) -> tuple[list[dict[str, Any]], int]:
        """The chunk's recipients still on time and the bytes they reserve; the late ones go to
        ``not_composed`` (out of the counts already: ``pending`` no longer counts them)."""
        assert self._late is not None
        on_time: list[dict[str, Any]] = []
        late: list[dict[str, Any]] = []
        for recipient in chunk:
            (late if self._late(recipient["id"]) else on_time).append(recipient)
        if not late:
            return chunk, reserve
        if probe and not on_time:
            self._probing = False  # no probe after all: the next chunk of the mailing is one
        if self._not_composed is not None:
            self._not_composed(late, mailing.mailing_id)
        return on_time, reserve // len(chunk) * len(on_time)

    def _room_for(self, mailing: MailingSource) -> tuple[int, int, bool]:
        """How many of ``mailing``'s waiting recipients to compose now, the bytes they reserve, and
        whether they are the probe of a mailing of unknown size (then ``_probing`` is set here, and
        cleared by that chunk's ``_compose`` whatever the estimates have become meanwhile)."""
        held = self.composed_bytes + self._reserved
        estimate = self._estimates.get(mailing.digest)
        if estimate is None:
            if self._probing or (held and held >= self.max_bytes):
                return 0, 0, False
            self._probing = True
            return 1, 0, True
        same = 0
        for waiting, _ in self._waiting:
            if waiting.digest != mailing.digest or same == CHUNK_SIZE:
                break
            same += 1
        count = min(same, (self.max_bytes - held) // max(estimate, 1))
        if count <= 0 and not held:
            count = 1  # larger than the whole room: alone, then
        return max(count, 0), max(count, 0) * estimate, False

    async def _compose(self, mailing: MailingSource, chunk: list[dict[str, Any]], estimate: int,
                       probe: bool) -> None:
        left = len(chunk)
        try:
            async for composed in self._pool.compose(mailing, chunk):
                left -= 1
                self._reserved -= estimate
                self._composing -= 1
                for job in composed.jobs:
                    self._note_size(mailing.digest, len(job.data))
                    self.composed_bytes += len(job.data)
                    self.peak_bytes = max(self.peak_bytes, self.composed_bytes)
                    self._submit(job)
                for failure in composed.failures:
                    self._failed(failure, mailing.mailing_id)
        finally:  # what was not composed (pool closed, cancelled) leaves the counts too
            self._reserved -= left * estimate
            self._composing -= left
            if probe:
                self._probing = False
            self._wake.set()

    def _note_size(self, digest: str, size: int) -> None:
        """Remember ``digest``'s largest message; the mailing used least recently is forgotten
        first (an updated entry moves to the most recent end)."""
        known = self._estimates.pop(digest, None)
        if known is None and len(self._estimates) >= _MAX_ESTIMATES:
            self._estimates.pop(next(iter(self._estimates)))
        self._estimates[digest] = max(size, known or 0)

    def _done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        # The chunk's own wake-up may have been handled before it left the count (two chunks
        # ending in one turn): the dispatch looks again now that it has.
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("composing failed: %r", task.exception())
