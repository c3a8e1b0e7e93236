"""Per-source throttling of credential checks, on a fake clock."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import task

from cloudmailing.common.throttle import SourceThrottle
from tests.helpers import aio_test


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _fail(throttle: SourceThrottle, source: str) -> None:
    async with throttle.attempt(source) as attempt:
        attempt.failed()


@aio_test
async def test_failures_space_out_the_next_attempts(clock: task.Clock) -> None:
    throttle = SourceThrottle(clock, free_failures=3, max_delay=4.0)
    for _ in range(3):  # free: none waits
        await _fail(throttle, "10.0.0.1")
    for expected_wait in (1.0, 2.0, 4.0, 4.0):  # then doubling, up to max_delay
        checked = asyncio.ensure_future(_fail(throttle, "10.0.0.1"))
        clock.advance(expected_wait - 0.01)
        await _settle()
        assert not checked.done()
        clock.advance(0.01)
        await _settle()
        assert checked.done()
    assert throttle.failures("10.0.0.1") == 7
    # Another address is not slowed down.
    await asyncio.wait_for(_fail(throttle, "10.0.0.2"), 1)


@aio_test
async def test_a_success_forgives_and_old_failures_are_forgotten(clock: task.Clock) -> None:
    throttle = SourceThrottle(clock, free_failures=1, max_delay=30.0, forget_after=100.0)
    await _fail(throttle, "s")
    clock.advance(1)
    async with throttle.attempt("s") as attempt:
        attempt.succeeded()
    assert throttle.failures("s") == 0
    await asyncio.wait_for(_fail(throttle, "s"), 1)  # no wait: forgiven
    clock.advance(101)
    assert throttle.failures("s") == 0
    await asyncio.wait_for(_fail(throttle, "s"), 1)


@aio_test
async def test_parallel_attempts_of_one_source_are_checked_one_at_a_time(clock: task.Clock) -> None:
    throttle = SourceThrottle(clock, free_failures=2, max_delay=30.0)
    checking: list[str] = []
    most = 0

    async def guess(source: str) -> None:
        nonlocal most
        async with throttle.attempt(source) as attempt:
            checking.append(source)
            most = max(most, checking.count(source))
            await asyncio.sleep(0)  # a scrypt: others may run meanwhile
            checking.remove(source)
            attempt.failed()

    guesses = [asyncio.ensure_future(guess("10.0.0.1")) for _ in range(10)]
    other = asyncio.ensure_future(guess("10.0.0.2"))
    await _settle()
    # Two free failures, then the third waits 1 s of the fake clock: seven still wait in line.
    assert sum(g.done() for g in guesses) == 2 and other.done() and most == 1
    started = clock.seconds()
    while not all(g.done() for g in guesses):
        assert len(clock.getDelayedCalls()) == 1  # one waits its turn, the others wait in line
        clock.advance(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        await _settle()
    assert most == 1
    assert clock.seconds() - started == 1 + 2 + 4 + 8 + 16 + 30 * 3  # at most one guess per max_delay


@aio_test
async def test_the_table_of_sources_is_bounded(clock: task.Clock) -> None:
    throttle = SourceThrottle(clock, max_sources=50)
    for number in range(500):
        await _fail(throttle, f"10.0.{number // 256}.{number % 256}")
    assert len(throttle) == 50
    assert throttle.failures("10.0.1.243") == 1  # the most recent are kept
    assert throttle.failures("10.0.0.0") == 0


@aio_test
async def test_a_body_that_raises_its_refusal_is_still_charged(clock: task.Clock) -> None:
    throttle = SourceThrottle(clock)
    for charged in (1, 2):
        try:
            async with throttle.attempt("s") as attempt:
                attempt.failed()
                raise PermissionError("refused")
        except PermissionError:
            pass
        assert throttle.failures("s") == charged
    try:
        async with throttle.attempt("s"):
            raise OSError("the database is away")  # neither a success nor a failure
    except OSError:
        pass
    assert throttle.failures("s") == 2


def _now(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that must not suspend (an attempt whose turn is now)."""
    with pytest.raises(StopIteration):
        coroutine.send(None)


async def _one(throttle: SourceThrottle, source: str, good: bool) -> None:
    async with throttle.attempt(source) as attempt:
        if good:
            attempt.succeeded()
        else:
            attempt.failed()


FREE, MAX_DELAY, FORGET, MAX_SOURCES = 3, 30.0, 900.0, 4


@given(st.lists(st.tuples(st.integers(0, 7), st.booleans(), st.floats(0, 1000)), max_size=60))
@example([(n, False, 0.0) for n in (0, 1, 2, 3, 4, 0)])  # the oldest address was forgotten
@settings(max_examples=300, deadline=None)
def test_any_sequence_of_attempts_keeps_the_model(events: list[tuple[int, bool, float]]) -> None:
    """Strangers choose addresses, outcomes and timing: the table stays bounded, a wait never
    exceeds max_delay, and each remembered address is charged its failures since its last success."""
    clock = task.Clock()
    throttle = SourceThrottle(clock, FREE, MAX_DELAY, FORGET, MAX_SOURCES)
    # address -> (failures in a row, last failure), the least recently seen first
    model: OrderedDict[str, tuple[int, float]] = OrderedDict()
    for number, good, pause in events:
        source = f"10.0.0.{number}"
        clock.advance(pause + throttle.wait(source))  # its turn has come: the attempt does not wait
        _now(_one(throttle, source, good))
        failures, last = model.pop(source, (0, 0.0))
        if failures and clock.seconds() - last > FORGET:
            failures = 0
        model[source] = (0, 0.0) if good else (failures + 1, clock.seconds())
        while len(model) > MAX_SOURCES:
            model.popitem(last=False)
        assert len(throttle) <= MAX_SOURCES
        assert 0.0 <= throttle.wait(source) <= MAX_DELAY
        assert throttle.failures(source) == model[source][0]
        assert (throttle.wait(source) > 0) == (not good and model[source][0] >= FREE)
