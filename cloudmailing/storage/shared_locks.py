"""Locks held across the masters that share one database.

Several masters may run on one database. FerretDB v1 updates a document by reading it and
writing it back, with no lock, so two processes updating one document at once can lose one of
the updates; and on any server a block edit (read the state, decide, log, write) is a sequence.
So every writer of a document other processes also write (a block, a mailing and its counts, a
counter, a satellite's entry) holds that document's lock: first an asyncio lock of its own
process (``database.KeyedLocks``), then a *lock document* in ``write_locks`` whose ``_id`` names
the key. Inserting it takes the lock: ``_id`` is unique (on FerretDB, PostgreSQL's unique index
decides), so of two takers one is refused and waits. Deleting it gives the lock back.

A master killed while holding locks leaves their documents behind. Each names its holder; once
that master's entry among the running ones has lapsed, the one master that recovers it takes
them over (:meth:`SharedLocks.adopt`), repairs what they guarded and gives them back
(``services/master_recovery.py``). A waiting taker never deletes another's lock document: a
delete with a filter is not atomic on FerretDB either.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Hashable
from typing import Any

from pymongo.errors import DuplicateKeyError

log = logging.getLogger(__name__)

_FIRST_WAIT = 0.002  # seconds before the first retry: most locks are held for a few milliseconds
_LONGEST_WAIT = 0.05
_WARN_AFTER = 10.0  # a wait this long is logged (its holder may be dead: recovered within a minute)


def lock_name(key: Hashable) -> str:
    """``("block", 12)`` -> ``"block:12"``: the lock document's ``_id``."""
    return ":".join(str(part) for part in key) if isinstance(key, tuple) else str(key)


class SharedLocks:
    """This master's takings of lock documents (``holder``: its entry's key).

    A master alone on its database need not take them (an insert and a delete per lock, a third
    of a report's database commands): it *disengages* them while its entry says it runs alone,
    and *engages* them again, once its holds taken without them have ended, before its entry
    says it no longer does (``master/company.py`` tells when)."""

    def __init__(self, collection: Any, holder: str) -> None:
        self._collection = collection  # write_locks (a callable giving it: the write guard may change)
        self.holder = holder
        self._leftovers: set[str] = set()  # locks given back while the database failed: deleted later
        self._adopted: set[str] = set()  # a dead master's locks handed to this one (its recovery)
        self.engaged = True
        self._unshared = 0  # holds under way that took no lock document
        self._no_unshared = asyncio.Event()
        self._no_unshared.set()

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Hold the lock of ``key`` against every other master (the caller holds this process's)."""
        if not self.engaged:
            self._unshared += 1
            self._no_unshared.clear()
            try:
                yield
            finally:
                self._unshared -= 1
                if not self._unshared:
                    self._no_unshared.set()
            return
        name = lock_name(key)
        await self._take(name)
        try:
            yield
        finally:
            await self._give_back(name)

    async def engage(self) -> None:
        """Take lock documents from now on; return once no hold taken without them is under way."""
        self.engaged = True
        await self._no_unshared.wait()

    def disengage(self) -> None:
        self.engaged = False

    async def _take(self, name: str) -> None:
        wait, waited = _FIRST_WAIT, 0.0
        while True:
            try:
                await self._collection().insert_one({"_id": name, "holder": self.holder, "at": _now()})
                self._leftovers.discard(name)
                return
            except DuplicateKeyError:
                if name in self._leftovers and await self._still_ours(name):
                    return  # from a give-back that failed: held again
            if waited < _WARN_AFTER <= waited + wait:
                holder = await self._collection().find_one({"_id": name})
                log.warning("waiting for lock %s, held by %s", name, holder and holder.get("holder"))
            await asyncio.sleep(wait)
            waited += wait
            wait = min(wait * 2, _LONGEST_WAIT)

    async def _still_ours(self, name: str) -> bool:
        self._leftovers.discard(name)  # the failed delete may have happened after all
        found = await self._collection().find_one({"_id": name}, {"holder": 1})
        return found is not None and found.get("holder") == self.holder

    async def _give_back(self, name: str) -> None:
        try:
            await self._collection().delete_one({"_id": name})
        except Exception:
            # Still ours: taken again at once by this process, deleted by the next sweep.
            self._leftovers.add(name)
            raise

    async def adopt(self, holder: str) -> list[str]:
        """Take over the locks of ``holder``, a dead master (only its recovery calls this, and
        writes what they guard without taking them again): nobody else writes what they guarded
        before the recovery has repaired it and given them back. Their names."""
        names = [doc["_id"] async for doc in self._collection().find({"holder": holder}, {"_id": 1})]
        for name in names:
            await self._collection().update_one({"_id": name, "holder": holder}, {"$set": {"holder": self.holder}})
            self._adopted.add(name)
        return names

    async def take_recovery(self, dead: set[str]) -> bool:
        """Take the lock ``recovery`` without waiting; False if a live master holds it. One a
        master of ``dead`` holds is taken over (that master died recovering others): of several
        masters trying, the one that inserts ``recovery-takeover:<dead one>`` does."""
        try:
            await self._collection().insert_one({"_id": "recovery", "holder": self.holder, "at": _now()})
            return True
        except DuplicateKeyError:
            pass
        held = await self._collection().find_one({"_id": "recovery"})
        if held is None or held.get("holder") not in dead:
            return False
        takeover = f"recovery-takeover:{held['holder']}"
        try:
            await self._collection().insert_one({"_id": takeover, "holder": self.holder, "at": _now()})
        except DuplicateKeyError:
            return False
        self._adopted.add(takeover)  # given back with the dead masters' locks
        await self._collection().update_one({"_id": "recovery", "holder": held["holder"]},
                                            {"$set": {"holder": self.holder}})
        return True

    async def give_back_recovery(self) -> None:
        await self._collection().delete_one({"_id": "recovery", "holder": self.holder})

    async def give_back_adopted(self) -> None:
        await self._delete_ours(self._adopted)

    async def sweep(self) -> None:
        """Delete the lock documents a failed give-back left (called periodically)."""
        await self._delete_ours(self._leftovers)

    async def _delete_ours(self, names: set[str]) -> None:
        """Delete this master's lock documents of ``names``, each leaving the set once deleted."""
        for name in list(names):
            await self._collection().delete_one({"_id": name, "holder": self.holder})
            names.discard(name)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
