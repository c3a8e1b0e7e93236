"""Time as the services see it: read from an injected clock (Twisted's IReactorTime)."""

from __future__ import annotations

import datetime
from typing import Protocol


class SecondsClock(Protocol):
    def seconds(self) -> float: ...


def utc_now(clock: SecondsClock) -> datetime.datetime:
    """Naive UTC, at the millisecond precision MongoDB stores."""
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
