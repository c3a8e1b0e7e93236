"""The master's template check runs in child processes under hard limits (services/limited_process)."""

from __future__ import annotations

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
