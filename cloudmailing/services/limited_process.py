"""Calls run in long-lived child processes under hard limits, awaited without blocking the loop.

The master checks templates written by API clients (``services/templates.py``): a render is
bounded cooperatively by the sandbox, but one Python operation it does not count (``in`` over a
huge list, a filter's internals) runs in C holding the GIL, and the memory a render allocates is
not bounded at all. So the check runs here, in a child process like the satellite's compose
workers (``satellite/compose_pool.py``, whose address-space limit is reused):

* the child's address space may grow by ``memory_mb`` beyond its start (``RLIMIT_AS``): a larger
  allocation is a MemoryError there, answered as :class:`OverLimits`;
* its CPU timer (``common/cpu_limit.py``, on the kernel's profiling clock) is armed before each
  call, one to two seconds past the call's CPU time: a long operation ends the child (SIGPROF);
* the parent waits at most ``wall_seconds`` for an answer, then kills the child.

A child is spawned on first use (``spawn``: a fresh interpreter, not a fork of the running
reactor) and kept for the next calls; one that was killed or died is replaced on the next call.
At most ``processes`` calls run at once, the others wait their turn on an :class:`asyncio.Semaphore`,
in the event loop. A call that has its turn waits for its child in a thread of this object's own
pool, of ``processes`` threads: never in the loop's default executor, which the API key checks and
the satellites' hello use (calls queued there, each blocking a thread, would starve them). The
event loop goes on meanwhile, and nothing here is bound to one loop (each has its own semaphore;
the pool bounds them all).
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import signal
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Callable, TypeVar

from cloudmailing.common.cpu_limit import KILLED_BY, ensure_cpu_left

T = TypeVar("T")

LIMIT_PREFIX = "template over its limits"
STARTUP_SECONDS = 120.0  # for a new child to start (a loaded host), not counted in wall_seconds
_READY = "ready"


class OverLimits(Exception):
    """A call went over one of the child's limits; ``reason`` says which, as the satellite does."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- in the child ------------------------------------------------------------------------------

def _child_main(conn: Connection, memory_mb: int, preload: tuple[str, ...]) -> None:
    """Run the calls the parent sends until it closes the pipe (or dies: end of file too)."""
    from cloudmailing.satellite.compose_pool import _limit_address_space

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    for module in preload:  # imported before the limit: their code is not counted in memory_mb
        importlib.import_module(module)
    _limit_address_space(memory_mb)
    conn.send(_READY)
    while True:
        try:
            function, args, cpu_seconds = conn.recv()
        except EOFError:
            return
        _arm_cpu_limit(cpu_seconds)
        try:
            answer: tuple[str, Any] = ("result", function(*args))
        except MemoryError:
            answer = ("over", f"{LIMIT_PREFIX}: memory over {memory_mb} MiB")
        except Exception as error:  # noqa: BLE001 - raised again in the parent
            answer = ("error", error)
        conn.send(answer)


def _arm_cpu_limit(seconds: float) -> None:
    """The child ends (SIGPROF) one to two seconds past ``seconds`` of CPU time from now."""
    ensure_cpu_left(seconds + 1, seconds + 2)


# -- in the parent -----------------------------------------------------------------------------

class _Child:
    """One child process and its pipe."""

    def __init__(self, memory_mb: int, preload: tuple[str, ...]) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_end = context.Pipe()
        try:
            self.process = context.Process(target=_child_main, args=(child_end, memory_mb, preload),
                                           name="cm-limited", daemon=True)
            self.process.start()
        except BaseException:  # not started (fork/exec refused): no pipe left open
            self.conn.close()
            raise
        finally:
            child_end.close()
        self.ready = False
        self.used = True  # since the last stop_unused: kept by it

    def receive(self, seconds: float) -> Any:
        """The child's next answer; None when none came in ``seconds`` (the child is killed)."""
        if not self.conn.poll(seconds):
            self.kill()
            return None
        return self.conn.recv()

    def death(self) -> str:
        """Why the child is gone (it closed its pipe)."""
        self.process.join(5.0)
        code = self.process.exitcode
        if code == -KILLED_BY:
            return f"{LIMIT_PREFIX}: CPU time over the limit, the checking process was stopped"
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"{LIMIT_PREFIX}: the checking process died ({how})"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()


class LimitedProcesses:
    """Up to ``processes`` long-lived children running calls under hard limits; ``preload``: the
    modules a child imports before its address space is limited (those of the functions called)."""

    def __init__(self, processes: int = 2, memory_mb: int = 512, preload: tuple[str, ...] = ()) -> None:
        self.memory_mb = memory_mb
        self.preload = preload
        self.processes = max(1, processes)
        self._turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
            weakref.WeakKeyDictionary()
        self._executor: ThreadPoolExecutor | None = None
        self._idle: list[_Child] = []
        self._lock = threading.Lock()

    async def call(self, function: Callable[..., T], *args: Any, cpu_seconds: float,
                   wall_seconds: float) -> T:
        """``function(*args)`` in a child (both picklable: ``function`` defined at module level).

        Raises :class:`OverLimits` past the child's memory, ``cpu_seconds`` of CPU time (plus one
        to two seconds for one long operation) or ``wall_seconds``; what ``function`` raises;
        OSError when no child can be started.
        """
        loop = asyncio.get_running_loop()
        turns = self._turns_of(loop)
        await turns.acquire()  # in the loop: no thread is taken while a call waits its turn
        try:
            future: Future[T] = self._pool().submit(self._call, function, args, cpu_seconds, wall_seconds)
        except BaseException:
            turns.release()
            raise
        # The turn ends with the work, not with the awaiting: a cancelled call's child still runs.
        future.add_done_callback(lambda _: _release(loop, turns))
        return await asyncio.wrap_future(future)

    def _turns_of(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        with self._lock:
            turns = self._turns.get(loop)
            if turns is None:
                turns = self._turns[loop] = asyncio.Semaphore(self.processes)
            return turns

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.processes, thread_name_prefix="cm-limited")
            return self._executor

    def _call(self, function: Callable[..., T], args: tuple[Any, ...], cpu_seconds: float,
              wall_seconds: float) -> T:
        """In a thread of the pool (at most ``processes`` at once): one call in one child."""
        child = self._take()
        try:
            if not child.ready:
                if child.receive(STARTUP_SECONDS) != _READY:
                    raise OSError("the checking process did not start")
                child.ready = True
            child.conn.send((function, args, cpu_seconds))
            answer = child.receive(wall_seconds)
        except (EOFError, OSError) as error:
            reason = child.death() if isinstance(error, EOFError) and child.ready else None
            child.kill()
            if reason is None:
                raise OSError(f"the checking process failed: {error}") from None
            raise OverLimits(reason) from None
        except BaseException:
            child.kill()
            raise
        if answer is None:
            raise OverLimits(f"{LIMIT_PREFIX}: checking took over {wall_seconds:g} s")
        child.used = True
        with self._lock:
            self._idle.append(child)
        kind, value = answer
        if kind == "over":
            raise OverLimits(value)
        if kind == "error":
            raise value
        return value  # type: ignore[no-any-return]

    def _take(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.process.is_alive():
                    return child
                child.kill()
        return _Child(self.memory_mb, self.preload)

    def pids(self) -> list[int]:
        """The idle children's process ids."""
        with self._lock:
            return [child.process.pid for child in self._idle if child.process.pid is not None]

    def stop_unused(self) -> int:
        """Stop the idle children no call used since the last ``stop_unused`` (each holds tens of
        MiB); how many. Called at a steady interval, a child unused for one to two intervals
        goes, and the next call starts one again. Blocks while they end: call it in a thread."""
        with self._lock:
            unused = [child for child in self._idle if not child.used]
            self._idle = [child for child in self._idle if child.used]
            for child in self._idle:
                child.used = False
        for child in unused:
            child.kill()
        return len(unused)

    def close(self) -> None:
        """Kill the idle children (a call under way keeps its child until it ends) and let the
        pool's threads end; a later call starts them again."""
        with self._lock:
            children, self._idle = self._idle, []
            executor, self._executor = self._executor, None
        for child in children:
            child.kill()
        if executor is not None:
            executor.shutdown(wait=False)


def _release(loop: asyncio.AbstractEventLoop, turns: asyncio.Semaphore) -> None:
    """Give the turn back, from the pool's thread, in the loop that waits on it."""
    try:
        loop.call_soon_threadsafe(turns.release)
    except RuntimeError:  # that loop is closed: nobody waits on its semaphore any more
        pass
