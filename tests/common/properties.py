"""Running Hypothesis property tests next to the test reactor.

Test bodies run on the reactor's loop, which must keep turning while a property test makes its
examples (a real master answers on it). So the property test, a plain synchronous function, runs
in a worker thread, and hands coroutines to the loop with :func:`on_loop`."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")


async def run_property(test: Callable[[], None]) -> None:
    """Run a ``@given`` test in a worker thread; its failure (with Hypothesis' report) is raised here."""
    await asyncio.to_thread(test)


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    """From the worker thread: run ``coro`` on the reactor's loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)
