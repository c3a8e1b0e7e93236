"""The satellite registry: which sending hosts the master serves, and how."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

from cloudmailing.common.keys import hash_secret, verify_secret, verify_secret_or_dummy
from cloudmailing.services import values
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.errors import BadRequest, InvalidValue, NotFound
from cloudmailing.storage.stores import Stores

log = logging.getLogger(__name__)

_SETTABLE = ("enabled", "paired", "group", "domain_affinity")


def _properties(given: Any) -> dict[str, Any]:
    properties = values.struct("properties", given if given not in (None, "", []) else {})
    unknown = sorted(set(properties) - set(_SETTABLE))
    if unknown:
        raise InvalidValue(f"unknown satellite property: {', '.join(unknown)}")
    checked: dict[str, Any] = {}
    for key in ("enabled", "paired"):
        if key in properties:
            checked[key] = values.boolean(key, properties[key])
    if "group" in properties:
        checked["group"] = values.text("group", properties["group"], max_length=100, allow_none=True)
    if "domain_affinity" in properties:
        checked["domain_affinity"] = values.domain_list("domain_affinity", properties["domain_affinity"])
    return checked


class SatelliteRefused(Exception):
    """The master will not serve this satellite; ``code`` says why (unauthorized, not_paired);
    ``verified``: its secret was checked against a stored one (and was right)."""

    def __init__(self, code: str, message: str, verified: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.verified = verified


LAST_SEEN_SECONDS = 10.0  # a satellite's last_seen is written at most this often (leases come more often)


class SatelliteService:
    def __init__(self, stores: Stores, clock: SecondsClock, max_awaiting_approval: int = 100) -> None:
        self._store = stores.satellites
        self._blocks = stores.blocks
        self._clock = clock
        self._max_awaiting = max_awaiting_approval
        self._seen_written: dict[int, float] = {}  # satellite id -> when its last_seen was last written

    async def add(self, serial: Any, properties: Any) -> int:
        name = values.text("serial", serial, max_length=100, header=True).strip()
        if not name:
            raise InvalidValue("serial: empty")
        fields = {"serial": name, "enabled": True, "paired": True, "group": "", "domain_affinity": [],
                  "version": "", "last_seen": None, "secret": None}
        fields.update(_properties(properties))
        # Checked and inserted under the serial's lock (the one a hello takes, shared by every
        # master): two adds of one serial at once cannot both find it absent.
        async with self._store.serial_lock(name):
            if await self._store.get_by_serial(name):
                raise BadRequest(f"satellite {name!r} already exists")
            satellite_id = await self._store.insert(fields)
        log.info("satellite registered", extra={"satellite": name})
        return satellite_id

    async def set_properties(self, satellite_id: Any, properties: Any) -> int:
        identifier = values.integer("id", satellite_id)
        if not await self._store.update(identifier, _properties(properties)):
            raise NotFound(f"satellite {satellite_id} not found")
        return identifier

    async def delete(self, satellite_id: Any) -> None:
        if not await self._store.delete(values.integer("id", satellite_id)):
            raise NotFound(f"satellite {satellite_id} not found")

    async def authenticate(self, serial: str, secret: str, version: str) -> dict[str, Any]:
        """The registry entry of a satellite that may be served, or :class:`SatelliteRefused`.

        An unknown serial is recorded unpaired, for an administrator to approve, if it gets one of
        ``max_awaiting_approval`` places (else refused unrecorded: strangers cannot fill the registry);
        a registered satellite without a secret yet keeps the first one it presents (as a scrypt hash)."""
        if not serial or not secret:
            raise SatelliteRefused("unauthorized", "serial and secret are required")
        async with self._store.serial_lock(serial):  # read, check, write: one hello of a serial at a time
            now = utc_now(self._clock)
            satellite = await self._store.get_by_serial(serial)
            if satellite is None:
                await self._record_unknown(serial, secret, version, now)
            verified = bool(satellite.get("secret"))
            if not verified:
                # scrypt takes tens of milliseconds: off the reactor thread.
                satellite["secret"] = await asyncio.to_thread(hash_secret, secret)  # first contact keeps it
            elif not await asyncio.to_thread(verify_secret, secret, satellite["secret"]):
                raise SatelliteRefused("unauthorized", "wrong secret")
            await self._store.update(satellite["_id"], {"secret": satellite["secret"], "version": version,
                                                        "last_seen": now})
        if not (satellite.get("enabled") and satellite.get("paired")):
            raise SatelliteRefused("not_paired", "this satellite is not enabled and paired", verified)
        return satellite

    async def _record_unknown(self, serial: str, secret: str, version: str, now: Any) -> NoReturn:
        if len(serial) > 100 or not await self._store.take_awaiting_place(serial, self._max_awaiting, now):
            # The same scrypt as a known serial's check: the time does not tell which serials exist.
            await asyncio.to_thread(verify_secret_or_dummy, secret, None)
            log.warning("unknown satellite refused: too many already wait for approval (max_awaiting_approval)",
                        extra={"satellite": serial[:100]})
            raise SatelliteRefused("not_paired", "not registered on this master")
        await self._store.insert({"serial": serial, "enabled": True, "paired": False, "group": "",
                                  "domain_affinity": [], "version": version[:100], "last_seen": now,
                                  "secret": await asyncio.to_thread(hash_secret, secret)})
        log.warning("unknown satellite asked to join; approve it by setting paired", extra={"satellite": serial})
        raise SatelliteRefused("not_paired", "waiting for an administrator to approve this satellite")

    async def refresh(self, satellite_id: int) -> dict[str, Any]:
        """The registry entry as it is now: an admin may have disabled or regrouped it."""
        current = await self._store.get(satellite_id)
        if current is None or not (current.get("enabled") and current.get("paired")):
            raise SatelliteRefused("not_paired", "this satellite is no longer enabled and paired")
        now = self._clock.seconds()
        if now - self._seen_written.get(current["_id"], -LAST_SEEN_SECONDS) >= LAST_SEEN_SECONDS:
            await self._store.update(current["_id"], {"last_seen": utc_now(self._clock)})
            self._seen_written[current["_id"]] = now
        return current

    async def count(self) -> int:
        return await self._store.count()

    async def list(self, connected: set[str] | None = None) -> list[dict[str, Any]]:
        """Registered satellites; ``connected`` holds the serials linked now."""
        connected = connected or set()
        return [{"id": doc["_id"], "serial": doc["serial"], "enabled": doc.get("enabled", False),
                 "paired": doc.get("paired", False), "connected": doc["serial"] in connected,
                 "group": doc.get("group", ""), "domain_affinity": doc.get("domain_affinity", []),
                 "version": doc.get("version", ""), "last_seen": doc.get("last_seen"),
                 "in_flight": await self._blocks.leased_count(doc["serial"])}
                for doc in await self._store.list()]
