"""Time as the services see it: read from an injected clock (``common.clock``)."""

from __future__ import annotations

import datetime

from cloudmailing.common.clock import SecondsClock

__all__ = ["SecondsClock", "utc_now"]  # the services import the protocol from here


def utc_now(clock: SecondsClock) -> datetime.datetime:
    """Naive UTC, at the millisecond precision MongoDB stores."""
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
