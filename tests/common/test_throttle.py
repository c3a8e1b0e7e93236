"""Per-source throttling of credential checks, on a fake clock."""

from __future__ import annotations

import asyncio

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
