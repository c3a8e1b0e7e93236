"""Per-source throttling of credential checks, shared by the API and the satellite link.

Each source address gets one check at a time: its attempts wait in line, however many it sends
in parallel (over many connections, or many hellos on one link). After ``free_failures`` failures
in a row, its next attempt also waits 1 s, then 2 s, 4 s... (at most ``max_delay``) after the
last failure, so guesses from one address come at most one per ``max_delay`` seconds, and use at
most one scrypt at a time. A success forgives the address.

Memory is bounded: at most ``max_sources`` addresses are remembered (the least recently seen are
forgotten first), and failures older than ``forget_after`` seconds are forgiven.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from twisted.internet.task import deferLater

from cloudmailing.common.aio import wait_deferred
from cloudmailing.common.recent import keep_recent

MAX_SOURCES = 10000
FORGET_AFTER_SECONDS = 900.0


@dataclass
class _Source:
    failures: int = 0           # in a row, since the last success
    not_before: float = 0.0     # the next attempt waits until then
    last_failure: float = 0.0
    in_line: int = 0            # attempts waiting or being checked
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)


class Attempt:
    """One check having its turn; the caller says how it went (saying nothing, as on an error,
    neither forgives nor counts)."""

    def __init__(self, throttle: SourceThrottle, entry: _Source) -> None:
        self._throttle = throttle
        self._entry = entry

    def failed(self) -> None:
        self._throttle._charge(self._entry)

    def succeeded(self) -> None:
        self._entry.failures, self._entry.not_before = 0, 0.0


class SourceThrottle:
    def __init__(self, reactor: Any, free_failures: int = 5, max_delay: float = 30.0,
                 forget_after: float = FORGET_AFTER_SECONDS, max_sources: int = MAX_SOURCES) -> None:
        self._reactor = reactor  # IReactorTime: seconds() and callLater()
        self._free = free_failures
        self._max_delay = max_delay
        self._forget_after = forget_after
        self._max_sources = max_sources
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def failures(self, source: str) -> int:
        """Failures in a row that ``source`` is charged with now."""
        entry = self._sources.get(source)
        return 0 if entry is None else self._fresh(entry).failures

    def wait(self, source: str) -> float:
        """Seconds the next attempt of ``source`` would wait for its turn, were the line empty."""
        entry = self._sources.get(source)
        return 0.0 if entry is None else self._wait(entry)

    def in_line(self, source: str) -> int:
        """Attempts of ``source`` waiting for their turn or being checked."""
        entry = self._sources.get(source)
        return 0 if entry is None else entry.in_line

    @asynccontextmanager
    async def attempt(self, source: str) -> AsyncIterator[Attempt]:
        """Wait for ``source``'s turn, then let the body check its credentials.

        The body calls :meth:`Attempt.failed` or :meth:`Attempt.succeeded`."""
        entry = self._entry(source)
        entry.in_line += 1
        try:
            async with entry.turn:
                delay = self._wait(entry)
                if delay > 0:
                    await wait_deferred(deferLater(self._reactor, delay, lambda: None))
                yield Attempt(self, entry)
        finally:  # a caller whose client left cancels its attempt: it leaves the line
            entry.in_line -= 1

    def _wait(self, entry: _Source) -> float:
        return max(0.0, self._fresh(entry).not_before - self._reactor.seconds())

    def _charge(self, entry: _Source) -> None:
        now = self._reactor.seconds()
        entry.failures += 1
        entry.last_failure = now
        if entry.failures >= self._free:
            entry.not_before = now + min(2.0 ** (entry.failures - self._free), self._max_delay)

    def _fresh(self, entry: _Source) -> _Source:
        if entry.failures and self._reactor.seconds() - entry.last_failure > self._forget_after:
            entry.failures, entry.not_before = 0, 0.0
        return entry

    def _entry(self, source: str) -> _Source:
        entry = self._sources.get(source) or _Source()
        keep_recent(self._sources, source, entry, self._max_sources)  # the most recently seen last
        return entry
