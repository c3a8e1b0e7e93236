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
