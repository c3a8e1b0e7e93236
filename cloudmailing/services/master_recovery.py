"""Recovering a master that died: what it left half done, repaired by one of the others.

A master may die (``kill -9``, its host lost) in the middle of writes. Once its entry among the
running ones is recoverable (``writer_claim.recoverable``: its process is known gone, or the
entry has not been renewed for a while), the first master to look takes the lock
``recovery:<its key>`` and, in this order, so that a recovery cut short can be done again:

1. takes over the dead master's lock documents: nobody else writes what they guarded until it
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
        return {entry["_id"] for entry in await self._registry.all()
                if entry["_id"] == self._me or not recoverable(entry, self._clock)}

    async def recover_dead(self) -> list[str]:
        """Recover every dead master; their keys."""
        entries = await self._registry.all()
        running = {entry["_id"] for entry in entries
                   if entry["_id"] == self._me or not recoverable(entry, self._clock)}
        floors = {floor["_id"]: floor for floor in await writer_floors(self._db)}
        dead = sorted(({entry["_id"] for entry in entries} | set(floors)) - running - {self._me})
        for key in dead:
            async with self._db.locks.hold(("recovery", key)):  # one master recovers it
                await self._recover(key, running)
        return dead

    async def _recover(self, key: str, running: set[str]) -> None:
        log.warning("recovering master %s, which stopped without a word", key)
        shared = self._db.locks.shared
        names = await shared.adopt(key) if shared is not None else []
        try:
            await self._recover_numbers(key, lock_name(("counter", SEQUENCE_COUNTER)) in names)
            touched = await self._repair_blocks(names)
        finally:
            if shared is not None:
                await shared.give_back_adopted()
        touched |= set(await self._stores.writer.roll_back_cut_batches(running))
        await self._stores.ledger.recount(sorted(touched))
        await self._registry.remove(key)

    async def _recover_numbers(self, key: str, counter_adopted: bool) -> None:
        """Step 2, under the counter's lock: the dead master's, taken over, or taken here."""
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
