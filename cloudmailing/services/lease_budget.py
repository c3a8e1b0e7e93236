"""How many recipients one satellite may hold at once: sized by how fast it reports back.

Every leased recipient must be delivered and reported within ``lease_seconds``. A satellite that
holds more than it can deliver in that time lets leases expire, and their mail may go out twice.
So a connected satellite may hold what it reports in half a lease's time (its recent report
rate × ``lease_seconds`` / 2), and never less than ``initial_lease_size``: what a newcomer, or a
satellite whose destinations answer slowly, starts with. Each lease call gets what is left.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

from cloudmailing.config.settings import DispatchConfig
from cloudmailing.services.clock import SecondsClock

RATE_WINDOW_SECONDS = 60.0  # the report rate is measured over this much recent time


class LeaseBudget:
    """One satellite session's allowance; time comes from the injected clock."""

    def __init__(self, clock: SecondsClock, config: DispatchConfig) -> None:
        self._clock = clock
        self._config = config
        self._started = clock.seconds()
        self._reports: deque[tuple[float, int]] = deque()  # (when, how many outcomes)
        self._held: dict[str, float] = {}  # recipient id -> when its lease expires

    def allowance(self, asked: int, held: int = 0) -> int:
        """How many of the ``asked`` recipients this lease call may hand out; ``held``: how many the
        satellite holds in all now (leases kept from its earlier links count too)."""
        now = self._clock.seconds()
        self._held = {rid: expires for rid, expires in self._held.items() if expires > now}
        return max(0, min(asked, self._config.max_lease_size, self.budget() - max(len(self._held), held)))

    @property
    def holding(self) -> int:
        """Recipients leased on this link and not reported yet (expired ones may still count)."""
        return len(self._held)

    def budget(self) -> int:
        """The most recipients the satellite may hold now."""
        by_rate = int(self.report_rate() * self._config.lease_seconds / 2)
        return max(self._config.initial_lease_size, by_rate)

    def report_rate(self) -> float:
        """Outcomes reported per second, over the last minute (or since the session began)."""
        now = self._clock.seconds()
        while self._reports and self._reports[0][0] < now - RATE_WINDOW_SECONDS:
            self._reports.popleft()
        span = min(RATE_WINDOW_SECONDS, now - self._started)
        return sum(count for _, count in self._reports) / max(span, 1.0)

    def leased(self, recipient_ids: Iterable[str]) -> None:
        expires = self._clock.seconds() + self._config.lease_seconds
        self._held.update((rid, expires) for rid in recipient_ids)

    def reported(self, recipient_ids: Iterable[str]) -> None:
        """Outcomes recorded: only those of recipients leased on this link count in the rate (an
        outbox replayed after a reconnect, or ids it never held, say nothing of how fast it sends
        now, and would let it hold far more than it can deliver)."""
        held = sum(1 for rid in recipient_ids if self._held.pop(rid, None) is not None)
        self._reports.append((self._clock.seconds(), held))
