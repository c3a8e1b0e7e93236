"""Composing in worker processes: leased recipients turned into signed messages, under hard limits.

Personalizing and DKIM-signing are CPU work (an RSA-2048 signature alone costs ~0.4 ms), and one
Python process uses one core; a mailing's templates are also code written by a client. So the
daemon never renders a template itself: ``compose_workers`` worker processes do, each compiling a
mailing on first use and keeping it while its content is unchanged. A worker composes a chunk of
recipients and sends the messages back in small batches (:class:`_Batch`: a few per pipe write
and daemon wake-up; a message waits for at most ~20 ms of others, and the one under way); after a
worker was lost, one by one, so that a second loss names the message that caused it. A worker's
socket holds a few batches, so it goes on composing while the daemon is busy elsewhere.

Limits, so that no template stalls the satellite or starves other mailings:

* every render has its CPU time (``TemplateLimits.cpu_seconds``, counted cooperatively by the
  sandbox) and the sandbox's size limits;
* a worker's address space may grow by ``memory_mb`` beyond its start (``RLIMIT_AS``): a larger
  allocation is a MemoryError, that recipient fails;
* the worker's CPU timer (``common/cpu_limit.py``, on the kernel's profiling clock) always leaves
  a message between one second and its CPU time limit plus three seconds past that limit
  (re-armed only when less is left): a single long Python operation the sandbox cannot interrupt
  ends the worker (SIGPROF);
* the daemon waits at most ``wall_seconds`` for a message: past it the worker is killed.

A recipient whose message cannot be built fails alone (a GENERAL_ERROR outcome). A message that
goes over a limit also fails the rest of its mailing's recipients here (the template is at fault,
not the recipient), without composing them. A worker that dies, of its limits or otherwise, is
replaced; the message it was making is tried once more, alone, on another worker before it fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import resource
import signal
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, AsyncIterator, Callable, Sequence

from cloudmailing.common.cpu_limit import KILLED_BY, ensure_cpu_left
from cloudmailing.common.gc_tuning import settle_after_start
from cloudmailing.common.recent import keep_recent
from cloudmailing.satellite import templates
from cloudmailing.satellite.composer import PreparedMailing, build_failure, compose, prepare
from cloudmailing.satellite.delivery import DeliveryJob
from cloudmailing.satellite.templates import TemplateLimits

log = logging.getLogger(__name__)

CHUNK_SIZE = 50          # recipients per task: large enough to pay for the trip, small enough to stream
_BATCH_RESULTS = 16      # messages a worker sends back at once, at most ...
_BATCH_BYTES = 256 * 1024  # ... or about this many bytes of them
_BATCH_SECONDS = 0.02    # ... or what it made in this time, and the message under way
_RESULTS_BUFFER = 4 * _BATCH_BYTES  # a worker's results its socket holds while the daemon is busy
_WORKER_CACHE_SIZE = 16  # compiled mailings a worker keeps (the daemon mirrors this cache)
_POISONED_KEPT = 64      # mailings remembered as over the limits
LIMIT_PREFIX = "template over its limits"
STARTUP_SECONDS = 120.0  # for a new worker to start (a loaded host), not counted in wall_seconds
_READY = "ready"
_STARTS_TRIED = 3        # workers that fail to start, in a row, before a chunk fails


@dataclass
class Composed:
    """What composing gave: messages to deliver, and outcomes for those that could not be built."""

    jobs: list[DeliveryJob] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class MailingSource:
    """A mailing's content as the master sent it, and a digest naming that version."""

    content: dict[str, Any]
    digest: str

    @property
    def mailing_id(self) -> int:
        return int(self.content["id"])

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> MailingSource:
        digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
        return cls(content, digest)


def compose_chunk(mailing: PreparedMailing, recipients: Sequence[dict[str, Any]]) -> Composed:
    """Compose ``recipients`` here, each failing alone (no limits: for benchmarks and tools)."""
    composed = Composed()
    for recipient in recipients:
        try:
            composed.jobs.append(compose(mailing, recipient))
        except Exception as error:  # this recipient fails alone
            composed.failures.append(build_failure(recipient["id"], error))
    return composed


# -- in a worker process -------------------------------------------------------------------------

def _worker_main(conn: Connection, limits: TemplateLimits, memory_mb: int) -> None:
    """Compose what the daemon sends until it closes the pipe (or dies: end of file too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    templates.configure(limits)
    _limit_address_space(memory_mb)
    settle_after_start()
    compiled: OrderedDict[str, PreparedMailing | Exception] = OrderedDict()
    conn.send(_READY)
    while True:
        try:
            digest, content, recipients, one_by_one = conn.recv()
        except EOFError:
            return
        if content is not None:
            _arm_cpu_limit(limits.cpu_seconds)  # compiling is bounded too
            try:
                compiled[digest] = prepare(content)
            except Exception as error:  # noqa: BLE001 - its recipients fail with the reason
                compiled[digest] = error
            while len(compiled) > _WORKER_CACHE_SIZE:
                compiled.popitem(last=False)
        compiled.move_to_end(digest)
        batch = _Batch(conn, one_by_one)
        for recipient in recipients:
            batch.flush_if_old()
            result, over_limit = _compose_one(compiled[digest], recipient, limits, memory_mb)
            if over_limit and isinstance(result, dict):  # its other messages fail without being tried
                compiled[digest] = templates.PersonalizationError(not_composed(result["reply_text"]))
            batch.add(result, over_limit)
        batch.flush()


class _Batch:
    """A worker's results on their way back: sent when full, before a message is started once
    they are ~20 ms old, at once for a message over a limit, and at the end of the chunk."""

    def __init__(self, conn: Connection, one_by_one: bool) -> None:
        self._conn = conn
        self._one_by_one = one_by_one
        self._results: list[tuple[DeliveryJob | dict[str, Any], bool]] = []
        self._bytes = 0
        self._started = 0.0

    def add(self, result: DeliveryJob | dict[str, Any], over_limit: bool) -> None:
        if not self._results:
            self._started = time.monotonic()
        self._results.append((result, over_limit))
        self._bytes += len(result.data) if isinstance(result, DeliveryJob) else 0
        if self._one_by_one or over_limit or len(self._results) >= _BATCH_RESULTS or self._bytes >= _BATCH_BYTES:
            self.flush()

    def flush_if_old(self) -> None:
        if self._results and time.monotonic() - self._started >= _BATCH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._results:
            self._conn.send(self._results)
            self._results, self._bytes = [], 0


def not_composed(reason: str) -> str:
    """What recipients of a mailing one of whose messages went over a limit are told."""
    limit = reason.removeprefix(LIMIT_PREFIX + ": ")
    return f"not composed: another message of this mailing went over the limits ({limit})"


def _compose_one(mailing: PreparedMailing | Exception, recipient: dict[str, Any], limits: TemplateLimits,
                 memory_mb: int) -> tuple[DeliveryJob | dict[str, Any], bool]:
    """The message or failure, and whether it went over the CPU time or memory limit."""
    if isinstance(mailing, Exception):
        return build_failure(recipient["id"], mailing), False
    _arm_cpu_limit(limits.cpu_seconds)
    started = time.thread_time()
    try:
        with templates.cpu_budget(limits.cpu_seconds):
            return compose(mailing, recipient), False
    except MemoryError:
        return _failure(recipient["id"], f"{LIMIT_PREFIX}: memory over {memory_mb} MiB"), True
    except Exception as error:  # this recipient fails alone
        return build_failure(recipient["id"], error), time.thread_time() - started >= limits.cpu_seconds


def _limit_address_space(memory_mb: int) -> None:
    """Let this process's address space grow by ``memory_mb`` beyond what it maps now."""
    with open("/proc/self/status", encoding="ascii") as status:
        size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = size_kb * 1024 + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _arm_cpu_limit(seconds: float) -> None:
    """The worker ends (SIGPROF) after this message's CPU time plus one to ``seconds`` + 3 seconds."""
    ensure_cpu_left(seconds + 1, 2 * seconds + 3)


def _failure(recipient_id: str, reason: str) -> dict[str, Any]:
    return build_failure(recipient_id, templates.PersonalizationError(reason))


# -- in the daemon -------------------------------------------------------------------------------

class _WorkerLost(Exception):
    """The worker died or was killed while making a message; ``reason`` says why."""

    def __init__(self, reason: str, over_limit: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.over_limit = over_limit


class _Worker:
    """One worker process, its pipe, and the mailings it has compiled (mirrors its cache)."""

    def __init__(self, limits: TemplateLimits, memory_mb: int) -> None:
        # "spawn": a fresh interpreter, not a fork of the running reactor and its sockets; it
        # inherits no descriptor but its end of the pipe, so it sees end-of-file if we die.
        context = multiprocessing.get_context("spawn")
        self.conn, child_end = context.Pipe()
        try:
            _room_for_results(child_end)
            self.process = context.Process(target=_worker_main, args=(child_end, limits, memory_mb),
                                           name="cm-compose", daemon=True)
            self.process.start()
        except BaseException:  # not started (fork/exec refused: EAGAIN, ENOMEM): no pipe left open
            self.conn.close()
            raise
        finally:
            child_end.close()
        self.compiled: OrderedDict[str, None] = OrderedDict()
        self.ready = False  # it said so, once its interpreter and imports were up

    def send(self, mailing: MailingSource, recipients: list[dict[str, Any]], one_by_one: bool) -> None:
        known = mailing.digest in self.compiled
        keep_recent(self.compiled, mailing.digest, None, _WORKER_CACHE_SIZE)
        self.conn.send((mailing.digest, None if known else mailing.content, recipients, one_by_one))

    async def started(self) -> None:
        """Once the worker is up: its start-up does not count in a message's time."""
        if self.ready:
            return
        try:
            said = await self.receive(STARTUP_SECONDS)
        except _WorkerLost as lost:
            raise _WorkerLost(f"the compose worker did not start ({lost.reason})", False) from None
        if said != _READY:
            raise _WorkerLost("the compose worker did not start", False)
        self.ready = True

    async def receive(self, wall_seconds: float) -> Any:
        """The next batch of messages or failures; :class:`_WorkerLost` if none comes in
        ``wall_seconds`` (a batch takes ~20 ms more than its last message)."""
        if not self.conn.poll() and not await self._readable(wall_seconds):
            self.kill()
            raise _WorkerLost(f"{LIMIT_PREFIX}: composing took over {wall_seconds:g} s", True)
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise self._lost() from None

    async def _readable(self, wall_seconds: float) -> bool:
        """Wait until the pipe has something to read: False after ``wall_seconds``."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, _settle, ready)
        try:
            await asyncio.wait_for(ready, wall_seconds)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)
            # uvloop leaves a descriptor it watched non-blocking, and Connection.recv needs it
            # blocking: it reads a whole batch, which may not have arrived whole yet.
            os.set_blocking(fd, True)

    def _lost(self) -> _WorkerLost:
        self.process.join(5.0)
        code = self.process.exitcode
        if code == -KILLED_BY:
            return _WorkerLost(f"{LIMIT_PREFIX}: CPU time over the limit, the compose worker was stopped", True)
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return _WorkerLost(f"the compose worker died ({how}) while making this message", False)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()


def _room_for_results(conn: Connection) -> None:
    """Let a worker's finished batches wait in its socket while the daemon is busy, rather than
    block the worker in a write: with the default buffer (~208 KB, less than a batch of 20 KB
    messages) the workers of a 2-core satellite were found blocked so 5% of the time, and the
    delivery benchmark gained 0.035 of its ratio on average (seven pairs of runs). The kernel may
    grant less (``net.core.wmem_max``); no more is ever held than the daemon has asked for."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _RESULTS_BUFFER)


@dataclass
class _Slot:
    """The worker a chunk is being composed on, kept current as it is replaced."""

    worker: _Worker | None


class ComposePool:
    """``workers`` processes composing messages under `limits` (at least one worker)."""

    def __init__(self, workers: int, limits: TemplateLimits | None = None, memory_mb: int = 512,
                 wall_seconds: float | None = None) -> None:
        self.workers = max(1, workers)
        self.limits = limits or templates.DEFAULT_LIMITS
        self.memory_mb = memory_mb
        self.wall_seconds = wall_seconds or max(10.0, 5 * self.limits.cpu_seconds)
        self._all: list[_Worker] = []
        # A slot holds its worker, or None when none could be started (the next use tries again).
        self._idle: asyncio.Queue[_Worker | None] | None = None
        self._poisoned: OrderedDict[str, str] = OrderedDict()  # digest → the limit a message went over
        self._tasks: set[asyncio.Future[None]] = set()
        self._closed = False

    def start(self) -> None:
        """Start the worker processes now rather than on first use (in the running loop): the
        first lease need not wait for their interpreters and imports."""
        self._idle_workers()

    def _idle_workers(self) -> asyncio.Queue[_Worker | None]:
        if self._idle is None:  # started on first use, in the running loop
            self._idle = asyncio.Queue()
            for _ in range(self.workers):
                self._idle.put_nowait(self._try_start())
        return self._idle

    def _start(self) -> _Worker:
        """A new worker process; :class:`_WorkerLost` when the system refuses one."""
        try:
            worker = _Worker(self.limits, self.memory_mb)
        except Exception as error:  # fork/exec refused (EAGAIN, ENOMEM), no descriptor left, ...
            raise _WorkerLost(f"no compose worker could be started ({error})", False) from error
        self._all.append(worker)
        return worker

    def _try_start(self) -> _Worker | None:
        """A new worker, or None (logged) when it cannot be started now: the next use tries again."""
        try:
            return self._start()
        except _WorkerLost as error:
            log.error("%s: the next chunk tries again", error.reason)
            return None

    def _replace(self, worker: _Worker | None) -> _Worker | None:
        """Kill ``worker`` and start another (never raises: None when none could be started)."""
        if worker is not None:
            worker.kill()
            if worker in self._all:
                self._all.remove(worker)
        return None if self._closed else self._try_start()

    async def compose(self, mailing: MailingSource, recipients: Sequence[dict[str, Any]]) -> AsyncIterator[Composed]:
        """Yield the recipients' messages as they are made, one :class:`Composed` each."""
        results: asyncio.Queue[Composed | None] = asyncio.Queue()
        chunks = [list(recipients[start:start + CHUNK_SIZE]) for start in range(0, len(recipients), CHUNK_SIZE)]
        tasks = [asyncio.ensure_future(self._compose_chunk(mailing, chunk, results)) for chunk in chunks]
        self._tasks.update(tasks)
        try:
            for _ in recipients:
                composed = await results.get()
                if composed is None:  # the pool was closed
                    return
                yield composed
        finally:
            for task in tasks:
                task.cancel()
                self._tasks.discard(task)

    async def _compose_chunk(self, mailing: MailingSource, chunk: list[dict[str, Any]],
                             results: asyncio.Queue[Composed | None]) -> None:
        slot = _Slot(await self._idle_workers().get())
        reported: set[str] = set()

        def report(composed: Composed) -> None:
            reported.update(f["recipient_id"] for f in composed.failures)
            reported.update(job.recipient_id for job in composed.jobs)
            results.put_nowait(composed)

        try:
            await self._compose_on(slot, mailing, chunk, report)
        except asyncio.CancelledError:
            slot.worker = self._replace(slot.worker)  # it may still be sending what nobody will read
            raise
        except Exception:  # a bug here must not leave the chunk's recipients unreported
            log.exception("composing failed", extra={"mailing": mailing.mailing_id})
            for recipient in chunk:
                if recipient["id"] not in reported:
                    report(_failed(recipient["id"], "message build failed: internal error"))
            slot.worker = self._replace(slot.worker)
        finally:
            if self._closed:
                results.put_nowait(None)
            else:
                self._idle_workers().put_nowait(slot.worker)

    async def _compose_on(self, slot: _Slot, mailing: MailingSource, chunk: list[dict[str, Any]],
                          report: Callable[[Composed], None]) -> None:
        """Compose ``chunk`` on ``slot``'s worker (started when None, replaced when lost: ``slot``
        always holds the current one, to put back idle or to kill if the chunk is cancelled)."""
        remaining, retried, failed_starts = chunk, False, 0
        while remaining and not self._closed:
            poisoned = self._poisoned.get(mailing.digest)
            if poisoned:
                for recipient in remaining:
                    report(_failed(recipient["id"], not_composed(poisoned)))
                break
            try:
                if slot.worker is None:
                    slot.worker = self._start()
                await slot.worker.started()
                slot.worker.send(mailing, remaining, one_by_one=retried)
            except (OSError, _WorkerLost) as error:  # it died while idle or starting: nothing was lost
                slot.worker = self._replace(slot.worker) if slot.worker is not None else None
                failed_starts += 1
                if failed_starts == _STARTS_TRIED:  # workers cannot run here: say so, do not spin
                    for recipient in remaining:
                        report(_failed(recipient["id"], f"message build failed: {error}"))
                    break
                continue
            done = 0
            try:
                while done < len(remaining):
                    for result, over_limit in await slot.worker.receive(self.wall_seconds):
                        if over_limit:
                            self._poison(mailing, result["reply_text"])
                        report(_as_composed(result))
                        done += 1
                        retried = False
                break
            except _WorkerLost as lost:
                slot.worker = self._replace(slot.worker)
                remaining = remaining[done:]
                # The message under way may not be remaining[0] (results go back in batches), and a
                # death may be no fault of the template (a CPU timer or the wall clock of an
                # overloaded host): the rest is sent again one by one, and a worker lost on one
                # message alone, twice in a row, names that message and its mailing.
                if retried:
                    self._poison(mailing, lost.reason)
                    report(_failed(remaining[0]["id"], lost.reason))
                    remaining = remaining[1:]
                retried = not retried

    def _poison(self, mailing: MailingSource, reason: str) -> None:
        log.error("mailing over the template limits: %s", reason, extra={"mailing": mailing.mailing_id})
        keep_recent(self._poisoned, mailing.digest, reason, _POISONED_KEPT)

    def worker_pids(self) -> list[int]:
        """The worker processes' ids (started on first use)."""
        return [worker.process.pid for worker in self._all if worker.process.pid is not None]

    def close(self) -> None:
        """Kill the workers at once (what they were making is lost: the master leases it again)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for worker in self._all:
            worker.kill()
        self._all.clear()


def _as_composed(result: DeliveryJob | dict[str, Any]) -> Composed:
    if isinstance(result, DeliveryJob):
        return Composed(jobs=[result])
    return Composed(failures=[result])


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _failed(recipient_id: str, reason: str) -> Composed:
    return Composed(failures=[_failure(recipient_id, reason)])
