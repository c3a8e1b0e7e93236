"""The master's end of the satellite link: who may connect, and what they may ask.

A satellite must say ``hello`` with its serial and secret first. The master serves only
satellites that are registered, ``enabled`` and ``paired``: an unknown serial is recorded as
unpaired (an admin approves it with ``cloud_set_satellite_properties`` or ``cm-admin``), and a
registered satellite without a secret yet keeps the first one it presents.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from pymongo.errors import PyMongoError
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure

from cloudmailing.common.keys import hash_secret, verify_secret
from cloudmailing.common.link import LinkError, LinkProtocol
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.dispatcher import Dispatcher
from cloudmailing.storage.database import Database
from cloudmailing.storage.satellites import SatelliteStore

log = logging.getLogger(__name__)


class SatelliteSession(LinkProtocol):
    """One connected satellite."""

    def __init__(self, factory: SatelliteLinkFactory) -> None:
        super().__init__({"hello": self.hello, "lease": self.lease, "mailing": self.mailing,
                          "report": self.report})
        self._factory = factory
        self.satellite: dict[str, Any] | None = None

    async def hello(self, serial: str, secret: str, version: str = "") -> dict[str, Any]:
        satellite = await self._factory.authenticate(str(serial), str(secret), str(version))
        self.satellite = satellite
        self._factory.sessions[satellite["serial"]] = self
        log.info("satellite connected", extra={"satellite": satellite["serial"]})
        return {"satellite_id": satellite["_id"], "group": satellite.get("group", "")}

    def _authenticated(self) -> dict[str, Any]:
        if self.satellite is None:
            raise LinkError("unauthorized", "say hello first")
        return self.satellite

    async def lease(self, max_recipients: int) -> dict[str, Any]:
        satellite = await self._factory.refresh(self._authenticated())
        recipients = await self._factory.dispatcher.lease(satellite, int(max_recipients))
        if self.closed_future.done():  # the satellite left while its lease was being made
            await self._factory.dispatcher.release_recipients([r["id"] for r in recipients])
        return {"recipients": recipients, "lease_seconds": self._factory.dispatcher.config.lease_seconds}

    async def mailing(self, mailing_id: int) -> dict[str, Any]:
        self._authenticated()
        content = await self._factory.dispatcher.mailing_content(int(mailing_id))
        if content is None:
            raise LinkError("not_found", f"mailing {mailing_id} not found")
        content["rfc822"] = base64.b64encode(content["rfc822"]).decode("ascii")
        return content

    async def report(self, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
        satellite = self._authenticated()
        return {"acknowledged": await self._factory.dispatcher.report(satellite, outcomes)}

    def describe_error(self, error: Exception) -> tuple[str, str] | None:
        if isinstance(error, PyMongoError):  # the database is away: the satellite retries
            return "unavailable", f"database unavailable: {error}"
        return None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.satellite is None:
            return
        serial = self.satellite["serial"]
        if self._factory.sessions.get(serial) is self:
            del self._factory.sessions[serial]
            asyncio.ensure_future(self._factory.dispatcher.release_satellite(serial))
        log.info("satellite disconnected", extra={"satellite": serial})


class SatelliteLinkFactory(Factory):
    def __init__(self, database: Database, dispatcher: Dispatcher, clock: SecondsClock) -> None:
        self.dispatcher = dispatcher
        self._store = SatelliteStore(database)
        self._clock = clock
        self.sessions: dict[str, SatelliteSession] = {}

    def buildProtocol(self, addr: Any) -> SatelliteSession:
        return SatelliteSession(self)

    def connected(self) -> set[str]:
        """Serials of the satellites connected now."""
        return set(self.sessions)

    async def authenticate(self, serial: str, secret: str, version: str) -> dict[str, Any]:
        if not serial or not secret:
            raise LinkError("unauthorized", "serial and secret are required")
        now = utc_now(self._clock)
        satellite = await self._store.get_by_serial(serial)
        if satellite is None:
            await self._store.insert({"serial": serial, "enabled": True, "paired": False, "group": "",
                                      "domain_affinity": [], "version": version, "last_seen": now,
                                      "secret": hash_secret(secret)})
            log.warning("unknown satellite asked to join; approve it by setting paired",
                        extra={"satellite": serial})
            raise LinkError("not_paired", "waiting for an administrator to approve this satellite")
        if not satellite.get("secret"):
            satellite["secret"] = hash_secret(secret)  # first contact keeps this secret
        elif not await asyncio.get_running_loop().run_in_executor(None, verify_secret, secret, satellite["secret"]):
            raise LinkError("unauthorized", "wrong secret")
        await self._store.update(satellite["_id"], {"secret": satellite["secret"], "version": version,
                                                    "last_seen": now})
        if not (satellite.get("enabled") and satellite.get("paired")):
            raise LinkError("not_paired", "this satellite is not enabled and paired")
        return satellite

    async def refresh(self, satellite: dict[str, Any]) -> dict[str, Any]:
        """The registry entry as it is now: an admin may have disabled or regrouped it."""
        current = await self._store.get(satellite["_id"])
        if current is None or not (current.get("enabled") and current.get("paired")):
            raise LinkError("not_paired", "this satellite is no longer enabled and paired")
        await self._store.update(current["_id"], {"last_seen": utc_now(self._clock)})
        return current
