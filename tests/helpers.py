"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Coroutine, TypeVar

import pytest_twisted
from twisted.internet.defer import Deferred

T = TypeVar("T")


def aio_test(function: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an ``async def`` test (asyncio code) on the test reactor; fixtures work as usual."""

    @pytest_twisted.ensureDeferred
    @functools.wraps(function)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await Deferred.fromFuture(asyncio.ensure_future(function(*args, **kwargs)))

    return wrapper


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an asyncio coroutine from a fixture (not from a test body: use ``aio_test``)."""
    return pytest_twisted.blockon(Deferred.fromFuture(asyncio.ensure_future(coro)))  # type: ignore[no-any-return]


async def running_mailing(api: Any, count: int, domain: str = "example.org") -> int:
    """Through the API: a mailing of ``count`` recipients (u0@domain, ...), started and RUNNING."""
    mailing_id: int = await api.create_mailing("news@sender.test", "News", "Hi", "<p>Hi</p>", "", "utf-8")
    await api.add_recipients(mailing_id, [{"email": f"u{i}@{domain}"} for i in range(count)])
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    return mailing_id


async def started_status_log(database: Any) -> Any:
    """A StatusLog on ``database`` whose sequence continues after any earlier process's."""
    from cloudmailing.storage.status_log import SequenceAllocator, StatusLog

    allocator = SequenceAllocator(database)
    await allocator.start()
    return StatusLog(database, allocator)
