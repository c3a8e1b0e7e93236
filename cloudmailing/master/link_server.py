"""The master's end of the satellite link: who may connect, and what they may ask.

A satellite must say ``hello`` with its serial and secret first. The master serves only
satellites that are registered, ``enabled`` and ``paired``: an unknown serial is recorded as
unpaired (an admin approves it with ``cloud_set_satellite_properties`` or ``cm-admin``), and a
registered satellite without a secret yet keeps the first one it presents. Hellos from one
address are checked one at a time, slowed down after wrong secrets (``common/throttle.py``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any, Container

from pymongo.errors import PyMongoError
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure

from cloudmailing.common.clock import Clock, DelayedCall
from cloudmailing.common.link import LinkError, LinkLimits, LinkProtocol, Method
from cloudmailing.common.link_protocol import (
    Held,
    Hello,
    HelloAnswer,
    LeaseAnswer,
    LeaseRequest,
    MailingContent,
    MailingRequest,
    Report,
    ReportAnswer,
    Wake,
)
from cloudmailing.common.throttle import SourceThrottle
from cloudmailing.services.dispatcher import Dispatcher
from cloudmailing.services.satellites import SatelliteRefused, SatelliteService

log = logging.getLogger(__name__)

MAX_NAMED_LEASES = 100_000  # lease ids one ``held`` sequence may name; past it, none is freed


class SatelliteSession(LinkProtocol):
    """One connected satellite."""

    def __init__(self, factory: SatelliteLinkFactory, source: str = "") -> None:
        super().__init__(factory.clock, {
            "hello": Method(Hello.from_wire, self.hello), "held": Method(Held.from_wire, self.held),
            "lease": Method(LeaseRequest.from_wire, self.lease),
            "mailing": Method(MailingRequest.from_wire, self.mailing), "report": Method(Report.from_wire, self.report),
        }, factory.limits)
        self._factory = factory
        self.source = source  # the peer's address: its hellos are throttled together
        self.satellite: dict[str, Any] | None = None
        self._budget = factory.dispatcher.new_lease_budget()
        self.wakes = True  # False for a satellite of an earlier version, which has no ``wake``
        self._named: set[str] | None = set()  # the ``held`` leases so far (None: too many, free none)
        self._granted: set[str] = set()  # the leases granted on this link: never freed by ``held``
        self._wake: asyncio.Future[Any] | None = None  # the wake not answered yet
        # Whether the satellite may hold leases of its earlier links: until it named none at hello
        # (or held), or they are reported, each lease asks the database what it holds in all.
        self._may_inherit = True

    async def hello(self, hello: Hello) -> dict[str, Any]:
        """``leases``: those the satellite still holds recipients of; the master frees the others
        of this satellite at once (a lease answer lost in a crash strands nobody)."""
        self._same_satellite(hello.serial)
        satellite = await self._factory.authenticate(self, hello.serial, hello.secret, hello.version)
        self._same_satellite(satellite["serial"])  # another hello may have passed meanwhile
        if self.closed_future.done():
            raise LinkError("disconnected", "the link went down")
        self.satellite = satellite
        self.mark_authenticated()
        self._factory.connect(satellite["serial"], self)
        log.info("satellite connected", extra={"satellite": satellite["serial"]})
        if hello.leases is not None:
            self._may_inherit = bool(hello.leases)
            await self._factory.release_leases(satellite["serial"], keep=_Kept(self, set(hello.leases)))
        return HelloAnswer(satellite["_id"], satellite.get("group") or "").to_wire()

    def _same_satellite(self, serial: str) -> None:
        """One link speaks for one satellite: a hello with another serial is refused."""
        if self.satellite is not None and serial != self.satellite["serial"]:
            raise LinkError("bad_request", "this link already said hello as another satellite")

    async def held(self, held: Held) -> dict[str, Any]:
        """The leases the satellite still holds recipients of, a few at a time after ``hello``;
        at the last call (``more`` false) the master frees its others at once. Nothing is freed
        before: the release after a disconnect's grace was cancelled by ``hello``."""
        serial = self._authenticated()["serial"]
        if self._named is not None:
            self._named.update(held.leases)
            if len(self._named) > MAX_NAMED_LEASES:  # bounded memory: its leases then expire on their own
                log.warning("more than %d leases named: none freed at once", MAX_NAMED_LEASES,
                            extra={"satellite": serial})
                self._named = None
        if not held.more:
            named, self._named = self._named, set()
            if named is not None:
                self._may_inherit = bool(named)
                await self._factory.release_leases(serial, keep=_Kept(self, named))
        return {}

    def wake(self) -> None:
        """Tell the satellite there is work, without waiting for its answer: one wake at most
        unanswered (a satellite that does not answer them gets no more, and may still idle out)."""
        if self.wakes and self._wake is None:
            self._wake = asyncio.ensure_future(self.call_in_background("wake", **Wake().to_wire()))
            self._wake.add_done_callback(self._woken)

    def _woken(self, call: asyncio.Future[Any]) -> None:
        self._wake = None
        error = None if call.cancelled() else call.exception()
        if isinstance(error, LinkError) and error.code == "unknown_method":
            self.wakes = False  # it will poll; more wakes would count against it as bad requests

    def _authenticated(self) -> dict[str, Any]:
        if self.satellite is None:
            raise LinkError("unauthorized", "say hello first")
        return self.satellite

    async def lease(self, request: LeaseRequest) -> dict[str, Any]:
        satellite = await self._factory.refresh(self._authenticated())
        held = 0
        if self._may_inherit:  # (a read of every open block's summary on FerretDB: only while needed)
            held = await self._factory.dispatcher.leased_count(satellite["serial"])  # earlier links' too
            self._may_inherit = held > self._budget.holding
        recipients = await self._factory.dispatcher.lease(satellite, self._budget.allowance(request.max_recipients,
                                                                                            held))
        self._budget.leased(r["id"] for r in recipients)
        self._granted.update(r["lease"] for r in recipients)
        if self.closed_future.done():  # the satellite left while its lease was being made
            await self._factory.dispatcher.release_recipients([r["id"] for r in recipients])
        versions = await self._factory.dispatcher.content_versions(recipients)
        return LeaseAnswer.wire_of(recipients, self._factory.dispatcher.config.lease_seconds, versions)

    async def mailing(self, request: MailingRequest) -> dict[str, Any]:
        # As registered now: a satellite disabled or deleted since its hello gets no content
        # (DKIM keys included); it may still report what it delivered.
        satellite = await self._factory.refresh(self._authenticated())
        content = await self._factory.dispatcher.mailing_content(request.mailing_id, satellite)
        if content is None:
            raise LinkError("not_found",
                            f"mailing {request.mailing_id} not found, or none of its recipients leased to you")
        content["rfc822"] = base64.b64encode(content["rfc822"]).decode("ascii")
        return MailingContent.from_wire(content).to_wire()

    async def report(self, report: Report) -> dict[str, Any]:
        satellite = self._authenticated()
        reported = await self._factory.dispatcher.report(satellite, report.outcomes)
        self._budget.reported(reported.recorded)  # outcomes ignored say nothing of its rate
        return ReportAnswer(reported.acknowledged).to_wire()

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
            self._factory.release_later(serial)
        log.info("satellite disconnected", extra={"satellite": serial})


class SatelliteLinkFactory(Factory):
    def __init__(self, satellites: SatelliteService, dispatcher: Dispatcher, clock: Clock,
                 limits: LinkLimits | None = None, reconnect_grace_seconds: float = 10.0,
                 throttle: SourceThrottle | None = None) -> None:
        self.limits = limits or LinkLimits(max_frame_before_hello=4096, hello_timeout=30.0, idle_timeout=900.0)
        self.clock = clock  # the link's timeouts and the leases' grace
        self.dispatcher = dispatcher
        self._satellites = satellites
        self._clock = clock
        self._grace = reconnect_grace_seconds
        self._releases: dict[str, DelayedCall] = {}  # serial -> its leases' release, after the grace
        self.sessions: dict[str, SatelliteSession] = {}
        self.throttle = throttle or SourceThrottle(clock)  # hellos per source address
        dispatcher.on_work(self.wake_all)

    def wake_all(self) -> None:
        """Tell every connected satellite that there is work (``wake``): an idle one leases now."""
        for session in self.sessions.values():
            session.wake()

    def connect(self, serial: str, session: SatelliteSession) -> None:
        """``session`` said hello as ``serial``: an earlier link of the same serial is aborted (one
        serial, one link: a release when either goes must never free what the other holds)."""
        previous = self.sessions.get(serial)
        self.sessions[serial] = session
        self.cancel_release(serial)
        if previous is not None and previous is not session:
            log.warning("a second link of the satellite: the first one closed", extra={"satellite": serial})
            previous.abort()

    def release_later(self, serial: str) -> None:
        """A satellite left: its leases go back to the queue unless it says hello again within
        ``reconnect_grace_seconds`` (a link that broke for a moment loses no delivery)."""
        self.cancel_release(serial)
        self._releases[serial] = self._clock.callLater(
            self._grace, lambda: asyncio.ensure_future(self._release_after_grace(serial)))

    async def _release_after_grace(self, serial: str) -> None:
        self._releases.pop(serial, None)
        # Block by block, each stopping once the satellite is back: what it still holds, it
        # names after its hello (a release under way when it returns must not free those).
        await self.release_leases(serial, keep=_WhileConnected(self.sessions, serial))

    def stop(self) -> None:
        """No release after the master stops (a restarted master frees them at hello)."""
        for serial in list(self._releases):
            self.cancel_release(serial)

    def cancel_release(self, serial: str) -> None:
        pending = self._releases.pop(serial, None)
        if pending is not None and pending.active():
            pending.cancel()

    async def release_leases(self, serial: str, keep: Container[str] = frozenset()) -> None:
        try:
            await self.dispatcher.release_satellite(serial, keep)
        except Exception as error:  # the database may be away: the leases then expire on their own
            log.warning("could not return the leases at once: %s", error, extra={"satellite": serial})

    def buildProtocol(self, addr: Any) -> SatelliteSession:
        return SatelliteSession(self, str(getattr(addr, "host", addr)))

    def connected(self) -> set[str]:
        """Serials of the satellites connected now."""
        return set(self.sessions)

    async def authenticate(self, session: SatelliteSession, serial: str, secret: str, version: str,
                           ) -> dict[str, Any]:
        """The satellite's registry entry. Hellos from the session's address wait their turn, slowed
        down after wrong secrets; one whose link closes meanwhile leaves the line."""
        check = asyncio.ensure_future(self._check_hello(serial, secret, version, session.source))
        session.closed_future.add_done_callback(lambda _: check.cancel())
        try:
            return await check
        except asyncio.CancelledError:
            if not check.cancelled():
                raise
            raise LinkError("disconnected", "the link went down") from None

    async def _check_hello(self, serial: str, secret: str, version: str, source: str) -> dict[str, Any]:
        async with self.throttle.attempt(source) as attempt:
            try:
                satellite = await self._satellites.authenticate(serial, secret, version)
            except SatelliteRefused as refused:
                if refused.code == "unauthorized":
                    attempt.failed()
                    log.warning("satellite authentication failed (%d in a row)", self.throttle.failures(source),
                                extra={"client": source, "satellite": serial[:100]})
                elif refused.verified:  # not yet paired, but the secret was right
                    attempt.succeeded()
                # else a serial new or refused unrecorded: no secret was checked, nothing to count
                raise LinkError(refused.code, str(refused)) from None
            attempt.succeeded()
            return satellite

    async def refresh(self, satellite: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._satellites.refresh(satellite["_id"])
        except SatelliteRefused as refused:
            raise LinkError(refused.code, str(refused)) from None


class _Kept:
    """The ``keep`` of a release a session asks for: the leases it names, those granted on its link
    (even meanwhile), and every lease once it is no longer its serial's link (a later link's are not
    its to free)."""

    def __init__(self, session: SatelliteSession, named: Container[str]) -> None:
        self._session = session
        self._named = named

    def __contains__(self, lease_id: object) -> bool:
        session = self._session
        serial = session.satellite["serial"] if session.satellite is not None else None
        return (serial is None or session._factory.sessions.get(serial) is not session
                or lease_id in self._named or lease_id in session._granted)


class _WhileConnected:
    """Every lease id while ``serial`` has a session (a ``keep`` that freezes a release under way)."""

    def __init__(self, sessions: dict[str, SatelliteSession], serial: str) -> None:
        self._sessions = sessions
        self._serial = serial

    def __contains__(self, lease_id: object) -> bool:
        return self._serial in self._sessions
