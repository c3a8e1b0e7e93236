"""Whether this master runs alone on its database: alone, it takes no lock documents.

A lock document costs an insert and a delete, a third of the database commands of a lease or
a report: a master alone need not take them. Each master's entry says whether it runs *solo*.
A master writes ``solo`` before it stops taking lock documents and reads the entries after; a
starting master writes its entry (not solo) before it reads the others', and writes nothing
while another one says solo. So of the two, at least one sees the other: either the solo one
sees the newcomer and keeps (or takes again) its lock documents, or the newcomer waits until
the solo one has seen it and said so, which it does only once its holds taken without lock
documents have ended (``SharedLocks.engage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from cloudmailing.services.clock import SecondsClock
from cloudmailing.services.writer_claim import MasterPresence, recoverable
from cloudmailing.storage.database import Database
from cloudmailing.storage.shared_locks import SharedLocks
from cloudmailing.storage.writer_claims import MasterRegistry

log = logging.getLogger(__name__)

REVIEW_SECONDS = 1.0  # how often a master looks for others: a newcomer waits about this long


class Company:
    def __init__(self, registry: MasterRegistry, locks: SharedLocks, clock: SecondsClock) -> None:
        self._registry, self._locks, self._clock = registry, locks, clock
        self._solo = False  # what this master's entry says

    async def others(self) -> list[dict[str, Any]]:
        """The other masters' entries, dead ones (not yet recovered) included."""
        return [entry for entry in await self._registry.all() if entry["_id"] != self._locks.holder]

    async def wait_for_company(self) -> None:
        """At start-up, after this master's entry is in: until no other master runs solo (one
        that does sees this entry within :data:`REVIEW_SECONDS`; a dead one is recovered)."""
        while True:
            solo = [entry["_id"] for entry in await self.others()
                    if entry.get("solo") and not recoverable(entry, self._clock)]
            if not solo:
                return
            log.info("waiting for master %s, alone on the database so far, to see this one", solo[0])
            await asyncio.sleep(REVIEW_SECONDS / 4)

    async def review(self) -> bool:
        """Take lock documents or not, as the other masters run or not; whether any does."""
        if await self.others():
            if self._solo or not self._locks.engaged:
                await self._locks.engage()
                await self._registry.set_solo(self._locks.holder, False)
                self._solo = False
                log.info("another master shares the database: lock documents taken again")
            return True
        if self._locks.engaged:
            self._solo = True  # first: the write may land though its answer is lost
            await self._registry.set_solo(self._locks.holder, True)
            if await self.others():  # one came in meanwhile: it waits for this entry to change
                await self._registry.set_solo(self._locks.holder, False)
                self._solo = False
                return True
            self._locks.disengage()
        return False


@contextlib.asynccontextmanager
async def writing_beside_the_masters(database: Database, clock: SecondsClock) -> AsyncIterator[None]:
    """For a short command that writes what masters write (``cm-admin satellite``): an entry
    among the running ones, so that a solo master takes lock documents again first, and lock
    documents for every write; the entry withdrawn at the end (a killed command's is recovered
    as a dead master's)."""
    registry = MasterRegistry(database)
    presence = MasterPresence(registry, clock)
    await presence.register()
    try:
        locks = SharedLocks(lambda: database.write_locks, presence.key)
        await Company(registry, locks, clock).wait_for_company()
        database.locks.shared, database.write_guard = locks, presence.lapsed
        yield
    finally:
        database.locks.shared = database.write_guard = None
        await presence.remove()
