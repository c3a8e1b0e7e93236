"""Time, injected: the one clock protocol of the package (the part of Twisted's IReactorTime used).

Nothing here falls back to the global reactor: whoever builds an object that reads or schedules
time passes the reactor (or ``twisted.internet.task.Clock`` in tests). ``SecondsClock`` is the
reading half of :class:`Clock`, for code that never schedules (services, the message builder);
anything that is a ``Clock`` is also a ``SecondsClock``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol


class DelayedCall(Protocol):
    """What ``callLater`` returns (Twisted's IDelayedCall, the part used)."""

    def active(self) -> bool: ...
    def cancel(self) -> None: ...
    def reset(self, seconds_from_now: float, /) -> None: ...


class SecondsClock(Protocol):
    """Reads the time: ``seconds()`` since the epoch."""

    def seconds(self) -> float: ...


class Clock(SecondsClock, Protocol):
    """Reads the time and schedules calls: the reactor, or ``task.Clock`` in tests."""

    def callLater(self, delay: float, f: Callable[..., Any], /, *args: Any) -> DelayedCall: ...


class WallClock:
    """The system's time, for processes that run no reactor (the compose workers)."""

    def seconds(self) -> float:
        return time.time()
