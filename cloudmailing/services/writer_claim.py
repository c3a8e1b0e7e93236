"""Who writes the database: the running masters, or one ``cm-admin storage`` command alone.

Several masters may share a database (``storage/shared_locks.py`` says how their writes stay
correct). Each keeps an entry among the running ones (:class:`MasterPresence`), renewed every
:data:`RENEW_SECONDS`; one whose entry lapses is recovered by the others
(``services/master_recovery.py``).

``cm-admin storage`` (migrate, recount) must run with no master at all: it takes the *writer's
claim*, renews it while it runs and gives it back when it stops, then checks that no master is
running; a master checks the claim after writing its entry. So of a master and a storage command
that start at once, at least one sees the other and refuses. A claim not renewed for
:data:`CLAIM_SECONDS` is free, and at once when its holder ran on this host and is gone
(``kill -9``). (Masters of earlier versions took the claim too, alone on their database: a
master does not start while one of those runs.)
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from cloudmailing.common.aio import as_deferred, wait_deferred
from cloudmailing.common.process_identity import ProcessIdentity, is_running, this_process
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.storage.writer_claims import MasterRegistry, WriterClaimStore

log = logging.getLogger(__name__)

CLAIM_SECONDS = 30.0  # a claim not renewed for this long is free
RENEW_SECONDS = 5.0  # how often a holder renews: several renewals fit in one claim's life
_TAKE_TRIES = 5
# A holder stops writing this long before its claim ends: room for a clock a little ahead on
# another host, and for a write sent just before the end.
_MARGIN = datetime.timedelta(seconds=RENEW_SECONDS)


class ClaimHeld(RuntimeError):
    """Another process holds the writer's claim; the message names it."""


class WriterClaim:
    """This process's claim on the database (take, renew, release)."""

    def __init__(self, store: WriterClaimStore, clock: SecondsClock, role: str,
                 me: ProcessIdentity | None = None) -> None:
        self._store, self._clock, self._role = store, clock, role
        self._me = me or this_process()
        self.generation: int | None = None
        self._held_until: datetime.datetime | None = None  # the claim's end as last written by us

    async def check_free(self) -> dict | None:
        """Raise :class:`ClaimHeld` if a live process holds the claim (without taking it); the
        latest claim, expired or given back, if any."""
        latest = await self._store.latest()
        if latest is not None and _live(latest, self._clock, self._me):
            raise ClaimHeld(self._refusal(latest))
        return latest

    async def take(self) -> None:
        """Take the claim, or raise :class:`ClaimHeld` if a live process holds it."""
        for _ in range(_TAKE_TRIES):
            latest = await self.check_free()
            generation = (latest["_id"] if latest else 0) + 1
            until = _until(self._clock)
            if await self._store.insert(generation, {"role": self._role, **self._me.as_dict()}, until):
                self.generation, self._held_until = generation, until
                if latest is not None and latest["until"] > utc_now(self._clock):
                    log.warning("writer's claim taken over from %s (%s), which no longer runs",
                                ProcessIdentity.from_dict(latest).describe(), latest.get("role"))
                return
        raise ClaimHeld("the writer's claim changed hands while it was being taken: try again")

    async def renew(self) -> bool:
        """Renew the claim; False if another process has taken it since (stop writing at once)."""
        assert self.generation is not None, "take() first"
        until = _until(self._clock)  # before asking: the claim may have been taken meanwhile
        if await self._store.superseded(self.generation):
            self._held_until = None
            return False
        await self._store.renew(self.generation, until)
        self._held_until = until
        return True

    def lapsed(self) -> str | None:
        """Why this process may not write, if its claim may have lapsed: its end, as we last
        wrote it, is less than :data:`RENEW_SECONDS` away. The database's write guard: a
        process frozen past its claim's life (``SIGSTOP``, a paused machine) writes nothing once
        it wakes, until a renewal has found the claim still its own."""
        if self._held_until is not None and utc_now(self._clock) < self._held_until - _MARGIN:
            return None
        last = "not held" if self._held_until is None else f"renewed until {self._held_until:%H:%M:%S} UTC"
        return f"the writer's claim of {self._role} may have lapsed ({last}): no write until it is renewed"

    async def release(self) -> None:
        """Give the claim back: the next process may take it at once."""
        self._held_until = None
        if self.generation is not None and not await self._store.superseded(self.generation):
            await self._store.renew(self.generation, datetime.datetime(1970, 1, 1))
        self.generation = None

    def _refusal(self, claim: dict) -> str:
        role = str(claim.get("role", "another process"))
        why = ("no master runs while `cm-admin storage` does: wait for it to end" if role.startswith("cm-admin")
               else "a master of an earlier CloudMailing version runs alone on its database: stop it first "
                    "(its claim frees within 30 s of its end)")
        return (f"this database is in use by {role} ({ProcessIdentity.from_dict(claim).describe()}), its claim "
                f"renewed until {claim['until']:%Y-%m-%d %H:%M:%S} UTC: {why}")


class ClaimRenewal:
    """Calls ``renew`` every :data:`RENEW_SECONDS` until stopped, or until it answers False (the
    claim was taken: its :meth:`~WriterClaim.lapsed` then refuses every write). The master
    renews its entry and claim with it; ``cm-admin storage`` its claim, as a migration may run
    longer than a claim lives."""

    def __init__(self, renew: Callable[[], Awaitable[bool]], clock: IReactorTime, what: str) -> None:
        self._renew, self._what = renew, what
        self._loop = LoopingCall(lambda: as_deferred(self._once()))
        self._loop.clock = clock
        self._ended: Deferred[LoopingCall] | None = None
        self._renewing: asyncio.Task[Any] | None = None  # the task of the latest renewal

    def start(self) -> None:
        self._ended = self._loop.start(RENEW_SECONDS, now=False)

    async def stop(self) -> None:
        """Stop renewing, once a renewal under way has ended: finishing after the claim was
        given back, it would hold it again for a claim's life. (Called by that renewal itself,
        it cannot wait for its own end.)"""
        if self._loop.running:
            self._loop.stop()
        if self._ended is not None and asyncio.current_task() is not self._renewing:
            await wait_deferred(self._ended)

    async def _once(self) -> None:
        self._renewing = asyncio.current_task()
        try:
            held = await self._renew()
        except Exception:  # the database may be away for a while: try again next time
            log.exception("could not renew %s", self._what)
            return
        if not held:
            log.critical("%s lost (taken by another process, or lapsed): no longer renewed", self._what)
            if self._loop.running:
                self._loop.stop()  # the loop ends with this very call


class MasterPresence:
    """This master's entry among the running ones, renewed like a claim. It is what lets the
    master write: the other masters recover it (repair what it left half done, delete its locks)
    once the entry has lapsed, so the master stops writing before that (:meth:`lapsed`) and
    stops for good if its entry lapsed or was recovered (:meth:`renew` answers False)."""

    def __init__(self, registry: MasterRegistry, clock: SecondsClock, me: ProcessIdentity | None = None) -> None:
        self._registry, self._clock = registry, clock
        self._me = me or this_process()
        # Two masters of one process (tests) are two entries: the key ends with a random token.
        self.key = f"{self._me.host}/{self._me.boot}/{self._me.pid}/{self._me.started}/{secrets.token_hex(4)}"
        self._held_until: datetime.datetime | None = None

    async def register(self) -> None:
        until = _until(self._clock)
        await self._registry.register(self.key, self._me.as_dict(), until)
        self._held_until = until

    async def renew(self) -> bool:
        """Renew the entry; False if it lapsed meanwhile (this master was frozen or cut off from
        the database for a claim's life: another may have recovered it) or is gone."""
        if self._held_until is None or utc_now(self._clock) >= self._held_until:
            self._held_until = None
            return False
        until = _until(self._clock)
        if not await self._registry.renew(self.key, until):
            self._held_until = None
            return False
        self._held_until = until
        return True

    def lapsed(self) -> str | None:
        """Why this master may not write (its entry may lapse before a write lands), or None."""
        if self._held_until is not None and utc_now(self._clock) < self._held_until - _MARGIN:
            return None
        last = "lapsed" if self._held_until is None else f"renewed until {self._held_until:%H:%M:%S} UTC"
        return f"this master's entry among the running ones may have lapsed ({last}): no write"

    async def remove(self) -> None:
        self._held_until = None
        await self._registry.remove(self.key)


def recoverable(entry: dict, clock: SecondsClock, me: ProcessIdentity | None = None) -> bool:
    """Whether a master's entry is one the others recover: its process is known to have ended,
    or it has not been renewed for :data:`RENEW_SECONDS` after its end (room for clocks a little
    apart: the master itself stops writing that long before the end)."""
    if is_running(ProcessIdentity.from_dict(entry), me or this_process()) is False:
        return True
    return entry["until"] + _MARGIN < utc_now(clock)


async def running_masters(registry: MasterRegistry, clock: SecondsClock,
                          me: ProcessIdentity | None = None) -> list[ProcessIdentity]:
    """The masters that run on this database, as far as can be told (their entries are renewed,
    and those of this host still run)."""
    me = me or this_process()
    return [ProcessIdentity.from_dict(entry) for entry in await registry.all() if _live(entry, clock, me)]


def _live(entry: dict, clock: SecondsClock, me: ProcessIdentity) -> bool:
    """Whether a claim or master entry stands: renewed lately, and its process, if of this host,
    still runs (one killed frees it at once)."""
    if entry["until"] <= utc_now(clock):
        return False
    return is_running(ProcessIdentity.from_dict(entry), me) is not False


def _until(clock: SecondsClock) -> datetime.datetime:
    return utc_now(clock) + datetime.timedelta(seconds=CLAIM_SECONDS)
