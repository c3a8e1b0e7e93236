"""Recovering a master that died: what it left half done, repaired by one of the others.

A master may die (``kill -9``, its host lost) in the middle of writes. Once its entry among the
running ones is recoverable (``writer_claim.recoverable``: its process is known gone, or the
entry has not been renewed for a while), the first master to look takes the lock ``recovery``
(without waiting: if another master holds it, that one is at work; if a dead one does, it is
taken over) and recovers every dead master at once (one may hold a lock another's recovery
needs), in this order, so that a recovery cut short can be done again:

1. takes over the dead masters' lock documents: nobody else writes what they guarded until it
   is repaired;
2. under the change counter's lock: deletes the orphan pages of the dead master's range of
   change numbers (logged, their state never written), covers what no page holds with fillers,
   raises the counter past the range (it may have died before raising it: nobody may be given
   those numbers again), then deletes its floor: readers go past its numbers only then;
3. rewrites the summary of every block it held and recounts their mailings (it may have died
   between a state and them), then gives the locks back;
4. rolls back the batches of recipients it had not finished adding (``ingest``);
5. deletes its entry.

Every master does this at start-up before it serves anyone (its own previous run included), then
at each life-cycle tick. A master that is only frozen stops writing before its entry lapses and
stops for good when it wakes (``MasterPresence``).
"""

from __future__ import annotations

import contextlib
import logging

from cloudmailing.services.clock import SecondsClock
from cloudmailing.services.writer_claim import recoverable
from cloudmailing.storage import counters
from cloudmailing.storage.shared_locks import lock_name
from cloudmailing.storage.status_log import SEQUENCE_COUNTER, drop_floor, writer_floors
from cloudmailing.storage.stores import Stores
from cloudmailing.storage.writer_claims import MasterRegistry

log = logging.getLogger(__name__)


class MasterRecovery:
    def __init__(self, stores: Stores, clock: SecondsClock, me: str) -> None:
        self._stores = stores
        self._db = stores.database
        self._registry = MasterRegistry(self._db)
        self._clock = clock
        self._me = me  # this master's key: never recovered by itself

    async def running(self) -> set[str]:
        """The keys of the masters that count as running (this one included)."""
        return self._running(await self._registry.all())

    def _running(self, entries: list[dict]) -> set[str]:
        return {entry["_id"] for entry in entries if entry["_id"] == self._me or not recoverable(entry, self._clock)}

    async def recover_dead(self) -> list[str]:
        """Recover every dead master at once (one may hold a lock another's recovery needs);
        their keys (none when another master is recovering them)."""
        floors = {floor["_id"] for floor in await writer_floors(self._db)}  # first: see _recover_all
        entries = await self._registry.all()
        running = self._running(entries)
        dead = sorted(({entry["_id"] for entry in entries} | floors) - running - {self._me})
        if not dead:
            return []
        shared = self._db.locks.shared
        if shared is None:  # the only writer
            await self._recover_all(dead, running, set())
            return dead
        if not await shared.take_recovery(set(dead)):
            return []  # another master is at it
        try:
            adopted: set[str] = set()
            for key in dead:
                adopted.update(await shared.adopt(key))
            await self._recover_all(dead, running, adopted)
        finally:
            await shared.give_back_adopted()
            await shared.give_back_recovery()
        return dead

    async def _recover_all(self, dead: list[str], running: set[str], adopted: set[str]) -> None:
        """Steps 2 to 5 for ``dead``, whose locks this master holds (``adopted``). A floor whose
        master has no entry is a dead master's too: a starting master writes its entry before
        any floor, and the floors are read before the entries."""
        for key in dead:
            log.warning("recovering master %s, which stopped without a word", key)
            await self._recover_numbers(key, lock_name(("counter", SEQUENCE_COUNTER)) in adopted)
        touched = await self._repair_blocks(sorted(adopted))
        shared = self._db.locks.shared
        if shared is not None:
            await shared.give_back_adopted()
        touched |= set(await self._stores.writer.roll_back_cut_batches(running, only=set(dead)))
        await self._stores.ledger.recount(sorted(touched))
        for key in dead:
            await self._registry.remove(key)

    async def _recover_numbers(self, key: str, counter_adopted: bool) -> None:
        """Step 2, under the counter's lock: a dead master's, taken over, or taken here."""
        floor = next((doc for doc in await writer_floors(self._db) if doc["_id"] == key), None)
        if floor is None:
            return
        held = contextlib.nullcontext() if counter_adopted else self._db.locks.hold(("counter", SEQUENCE_COUNTER))
        async with held:
            orphans = await self._stores.ledger.recover_range(floor["floor"], floor["end"], fill=True)
            if orphans:
                log.warning("%d log pages of writes master %s did not finish were deleted", orphans, key)
            await counters.raise_held(self._db, SEQUENCE_COUNTER, floor["end"])
            await drop_floor(self._db, key)

    async def _repair_blocks(self, names: list[str]) -> set[int]:
        """Rewrite the summaries of the blocks whose locks the dead master held (taken over: not
        taken again, a task of this master may hold the process's lock while it waits for the
        document); the mailings to recount (theirs, and those whose counts' lock it held)."""
        mailings: set[int] = set()
        for name in names:
            kind, _, rest = name.partition(":")
            if kind == "block":
                block = await self._stores.blocks.repair_summary(int(rest))
                if block is not None:
                    mailings.add(block.mailing_id)
            elif kind == "mailing":
                mailings.add(int(rest))
        return mailings
