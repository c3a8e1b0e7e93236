"""Composing on every core: leased recipients turned into signed messages by worker processes.

Personalizing and DKIM-signing are CPU work (an RSA-2048 signature alone costs ~0.4 ms), and one
Python process uses one core. With ``compose_workers`` > 0 the satellite hands chunks of
recipients to that many worker processes; each compiles a mailing on first use and keeps it
while its content is unchanged. With 0, messages are composed in the daemon's own process, a
chunk at a time so that the reactor keeps sending in between.

A recipient whose message cannot be built fails alone (a GENERAL_ERROR outcome). A worker that
dies is replaced, and the chunk it held is composed again in the daemon's process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from cloudmailing.satellite.composer import PreparedMailing, build_failure, compose, prepare
from cloudmailing.satellite.delivery import DeliveryJob

log = logging.getLogger(__name__)

CHUNK_SIZE = 50          # recipients per task: large enough to pay for the trip, small enough to stream
_WORKER_CACHE_SIZE = 16  # compiled mailings a worker keeps


@dataclass
class Composed:
    """What one chunk gave: messages to deliver, and outcomes for those that could not be built."""

    jobs: list[DeliveryJob] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class MailingSource:
    """A mailing's content as the master sent it, compiled here, and a digest naming that version."""

    content: dict[str, Any]
    prepared: PreparedMailing
    digest: str

    @classmethod
    def from_content(cls, content: dict[str, Any]) -> MailingSource:
        digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
        return cls(content, prepare(content), digest)


def compose_chunk(mailing: PreparedMailing, recipients: Sequence[dict[str, Any]]) -> Composed:
    composed = Composed()
    for recipient in recipients:
        try:
            composed.jobs.append(compose(mailing, recipient))
        except Exception as error:  # this recipient fails alone
            composed.failures.append(build_failure(recipient["id"], error))
    return composed


# In a worker process: compiled mailings by digest, least recently used first.
_compiled: OrderedDict[str, PreparedMailing] = OrderedDict()


def _compose_in_worker(digest: str, content: dict[str, Any], recipients: list[dict[str, Any]]) -> Composed:
    mailing = _compiled.get(digest)
    if mailing is None:
        mailing = _compiled[digest] = prepare(content)
        while len(_compiled) > _WORKER_CACHE_SIZE:
            _compiled.popitem(last=False)
    _compiled.move_to_end(digest)
    return compose_chunk(mailing, recipients)


def _exit_with_parent(parent_pid: int) -> None:
    """Runs in each worker: a satellite killed with -9 must not leave workers waiting forever.

    (A worker holds both ends of its task pipe, so it never sees end-of-file when the parent dies.)
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ComposePool:
    """``workers`` processes composing chunks of recipients (0: composed in this process)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor | None:
        if self.workers <= 0:
            return None
        # "spawn": a fresh interpreter, not a fork of the running reactor and its sockets.
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_exit_with_parent, initargs=(os.getpid(),))

    async def compose(self, mailing: MailingSource, recipients: Sequence[dict[str, Any]]) -> AsyncIterator[Composed]:
        """Yield the recipients' messages chunk by chunk, as soon as each chunk is ready."""
        chunks = [list(recipients[start:start + CHUNK_SIZE]) for start in range(0, len(recipients), CHUNK_SIZE)]
        if self._executor is None:
            for chunk in chunks:
                yield compose_chunk(mailing.prepared, chunk)
                await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        executor = self._executor
        tasks = [(loop.run_in_executor(executor, _compose_in_worker, mailing.digest, mailing.content, chunk), chunk)
                 for chunk in chunks]
        for finished in asyncio.as_completed([future for future, _ in tasks]):
            try:
                yield await finished
            except Exception:  # noqa: BLE001 - composed below, once the others are in
                continue
        errors = [future.exception() for future, _ in tasks]
        lost = [recipient for error, (_, chunk) in zip(errors, tasks, strict=True) if error for recipient in chunk]
        if not lost:
            return
        log.error("compose workers failed (%s); composing %d messages here", next(e for e in errors if e),
                  len(lost), extra={"mailing": mailing.prepared.mailing_id})
        if any(isinstance(error, BrokenProcessPool) for error in errors) and self._executor is executor:
            self._restart()  # a worker died: the pool is unusable
        yield compose_chunk(mailing.prepared, lost)

    def _restart(self) -> None:
        old, self._executor = self._executor, self._new_executor()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def worker_pids(self) -> list[int]:
        """The worker processes' ids (started on first use)."""
        processes = getattr(self._executor, "_processes", None) or {}
        return [pid for pid in processes if pid != os.getpid()]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
