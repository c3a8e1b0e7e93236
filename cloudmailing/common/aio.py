"""Bridges between Twisted Deferreds and asyncio coroutines (both run on the asyncio reactor)."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


def as_deferred(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    """Run an asyncio coroutine as a Deferred, for Twisted call sites."""
    return Deferred.fromFuture(asyncio.ensure_future(coro))


async def wait_deferred(deferred: Deferred[T]) -> T:
    """Await a Deferred from asyncio code."""
    return await deferred.asFuture(asyncio.get_running_loop())
