"""The master's template check runs in child processes under hard limits (services/limited_process)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time

import pytest

from cloudmailing.services.errors import InvalidValue
from cloudmailing.services.limited_process import LimitedProcesses, OverLimits
from cloudmailing.services.templates import check_template
from tests.helpers import aio_test


def _allocate(megabytes: int) -> int:
    return len(bytearray(megabytes * 1024 * 1024))


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def _spin(seconds: float) -> None:
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        pass


def _fail() -> None:
    raise ValueError("bad")


@aio_test
async def test_calls_run_under_memory_cpu_and_wall_clock_limits():
    processes = LimitedProcesses(1, memory_mb=64, preload=(__name__,))
    try:
        assert await processes.call(_allocate, 8, cpu_seconds=1, wall_seconds=10) == 8 * 1024 * 1024
        with pytest.raises(OverLimits, match="^template over its limits: memory over 64 MiB$"):
            await processes.call(_allocate, 200, cpu_seconds=1, wall_seconds=10)
        [pid] = processes.pids()  # a MemoryError does not end the process
        with pytest.raises(ValueError, match="bad"):
            await processes.call(_fail, cpu_seconds=1, wall_seconds=10)
        with pytest.raises(OverLimits, match="CPU time over the limit, the checking process was stopped"):
            await processes.call(_spin, 60.0, cpu_seconds=0.5, wall_seconds=30)
        assert processes.pids() == []
        with pytest.raises(OverLimits, match="^template over its limits: checking took over 0.5 s$"):
            await processes.call(_sleep, 5.0, cpu_seconds=1, wall_seconds=0.5)
        assert await processes.call(_sleep, 0.0, cpu_seconds=1, wall_seconds=10) == "woke"  # a new process
        assert processes.pids() != [pid]
    finally:
        processes.close()


@aio_test
async def test_check_template_keeps_its_process_and_refuses_what_cannot_render():
    await check_template("subject", "Hi {{ firstname }}")
    started = time.monotonic()
    await check_template("subject", "Hi {{ firstname }}")
    assert time.monotonic() - started < 1.0  # no process started per check
    with pytest.raises(InvalidValue, match=r"^html: template over its limits: value larger than 1000000 .* data\)$"):
        await check_template("html", "{% set ns = namespace(x=['x'*1000000]*1000) %}{{ ns }}", html=True)


def test_calls_waiting_their_turn_do_not_take_the_default_executor():
    """Each call waited for its turn inside asyncio.to_thread (a threading semaphore): queued
    template checks filled the loop's default executor, and the API key checks and satellite
    hellos that use it waited behind them all. Run in a loop of its own, whose default executor
    has 2 threads, so that a few short calls show it."""

    async def scenario(processes: LimitedProcesses) -> float:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(2))
        assert await processes.call(_sleep, 0.0, cpu_seconds=1, wall_seconds=60) == "woke"  # started
        calls = [asyncio.ensure_future(processes.call(_sleep, 0.2, cpu_seconds=1, wall_seconds=10))
                 for _ in range(4)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.to_thread(lambda: None)  # as api/auth.py checks a key
        waited = time.monotonic() - started
        assert await asyncio.gather(*calls) == ["woke"] * 4
        assert len(processes.pids()) == 1  # one at a time: the one process did them all
        return waited

    processes = LimitedProcesses(1, memory_mb=64, preload=(__name__,))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as runner:  # asyncio.run needs a thread with no loop
            waited = runner.submit(asyncio.run, scenario(processes)).result(timeout=60)
    finally:
        processes.close()
    assert waited < 0.15, f"the default executor was busy for {waited:.2f} s"


@aio_test
async def test_a_cancelled_call_keeps_its_turn_until_its_child_answers():
    processes = LimitedProcesses(1, memory_mb=64, preload=(__name__,))
    try:
        first = asyncio.ensure_future(processes.call(_sleep, 0.3, cpu_seconds=1, wall_seconds=60))
        await asyncio.sleep(0.05)
        first.cancel()
        started = time.monotonic()
        assert await processes.call(_sleep, 0.0, cpu_seconds=1, wall_seconds=60) == "woke"
        assert time.monotonic() - started > 0.1  # after the cancelled call's child had answered
        assert len(processes.pids()) == 1  # ... and its process served this call too
    finally:
        processes.close()


@aio_test
async def test_children_unused_between_two_rounds_are_stopped_and_started_again_when_needed():
    processes = LimitedProcesses(1, memory_mb=64, preload=(__name__,))
    try:
        assert await processes.call(_sleep, 0.0, cpu_seconds=1, wall_seconds=10) == "woke"
        [pid] = processes.pids()
        assert await asyncio.to_thread(processes.stop_unused) == 0  # used since the last round
        assert await processes.call(_sleep, 0.0, cpu_seconds=1, wall_seconds=10) == "woke"
        assert await asyncio.to_thread(processes.stop_unused) == 0  # used again
        assert await asyncio.to_thread(processes.stop_unused) == 1  # a whole round unused
        assert processes.pids() == []
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert await processes.call(_sleep, 0.0, cpu_seconds=1, wall_seconds=10) == "woke"  # a new one
        assert processes.pids() not in ([], [pid])
    finally:
        processes.close()
