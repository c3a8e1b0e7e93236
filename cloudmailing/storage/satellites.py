"""The ``satellites`` collection: the registry of sending hosts the master will serve; and
``awaiting_places``: the numbered places of unknown satellites awaiting approval."""

from __future__ import annotations

import datetime
from typing import Any, Mapping

from pymongo.errors import DuplicateKeyError

from cloudmailing.storage import counters
from cloudmailing.storage.database import Database

SATELLITE_ID_COUNTER = "satellite_id"
# A place taken whose satellite was never recorded (its master died in between) is freed after this.
ORPHAN_PLACE_SECONDS = 60.0
_ID_TRIES = 5


class SatelliteStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def insert(self, fields: Mapping[str, Any]) -> int:
        for attempt in range(_ID_TRIES):
            satellite_id = await counters.increment(self._db, SATELLITE_ID_COUNTER)
            try:
                await self._db.satellites.insert_one({"_id": satellite_id, **fields})
                return satellite_id
            except DuplicateKeyError:  # another master drew the same number (FerretDB's counter races)
                if attempt == _ID_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def get(self, satellite_id: int) -> dict[str, Any] | None:
        return await self._db.satellites.find_one({"_id": satellite_id})

    def serial_lock(self, serial: str) -> Any:
        """Held while a serial is checked and recorded (a hello, an administrator's add): this
        process's lock, then with other masters the shared lock document ``satellite:<serial>``.
        Two hellos of one serial at once cannot both keep a first secret, nor two records of one
        serial (a hello's, an add's) both find it absent and insert it twice."""
        return self._db.locks.hold(("satellite", serial))

    async def get_by_serial(self, serial: str) -> dict[str, Any] | None:
        return await self._db.satellites.find_one({"serial": serial})

    async def list(self) -> list[dict[str, Any]]:
        return await self._db.satellites.find({}).sort("_id", 1).to_list()

    async def count(self) -> int:
        return await self._db.satellites.count_documents({})

    async def take_awaiting_place(self, serial: str, places: int, now: datetime.datetime) -> bool:
        """Hold one of ``places`` numbered places for ``serial``, a stranger awaiting approval; False
        when all are held.

        A place is a document with a unique ``_id`` (0 to ``places`` - 1) in ``awaiting_places``:
        taking it is one insert, so the cap holds however many masters insert at once. A place whose
        satellite no longer waits (approved, or deleted) is taken back when none is free."""
        async with self._db.locks.hold("awaiting_places"):  # this process's takers in turn: no collisions
            for _ in range(places + 2):  # each lost insert means another process took a place
                held = {doc["_id"]: doc async for doc in self._db.awaiting_places.find({})}
                free = [number for number in range(places) if number not in held]
                if not free:
                    if await self._free_stale_places(held, now):
                        continue
                    return False
                try:
                    await self._db.awaiting_places.insert_one({"_id": free[0], "serial": serial, "at": now})
                    return True
                except DuplicateKeyError:
                    continue
        return False

    async def _free_stale_places(self, held: dict[int, dict[str, Any]], now: datetime.datetime) -> bool:
        """Free the places of satellites that no longer wait; True if any was freed."""
        serials = list({place["serial"] for place in held.values()})
        found = await self._db.satellites.find({"serial": {"$in": serials}}, {"serial": 1, "paired": 1}).to_list()
        waiting = {doc["serial"] for doc in found if not doc.get("paired")}
        known = {doc["serial"] for doc in found}
        orphan_before = now - datetime.timedelta(seconds=ORPHAN_PLACE_SECONDS)
        freed = False
        for number, place in held.items():
            if place["serial"] in waiting:
                continue
            if place["serial"] in known or place.get("at", now) < orphan_before:
                result = await self._db.awaiting_places.delete_one({"_id": number, "serial": place["serial"]})
                freed = freed or result.deleted_count == 1
        return freed

    async def update(self, satellite_id: int, fields: Mapping[str, Any]) -> bool:
        result = await self._db.satellites.update_one({"_id": satellite_id}, {"$set": dict(fields)})
        return result.matched_count == 1

    async def delete(self, satellite_id: int) -> bool:
        """Delete a satellite, and free its place if it was awaiting approval."""
        deleted = await self._db.satellites.find_one_and_delete({"_id": satellite_id})
        if deleted is not None:
            await self._db.awaiting_places.delete_many({"serial": deleted["serial"]})
        return deleted is not None
