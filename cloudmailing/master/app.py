"""The master process: database, services, the HTTPS XML-RPC API and periodic life-cycle work."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import ssl
from twisted.internet.task import LoopingCall
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import server

from cloudmailing.api.auth import Authenticator
from cloudmailing.api.methods import CloudMailingApi, Services
from cloudmailing.api.resource import XmlRpcResource, request_factory
from cloudmailing.api.xmlrpc_writer import written_ahead
from cloudmailing.common.aio import as_deferred, wait_deferred
from cloudmailing.common.connection_limit import LimitPerSource
from cloudmailing.common.link import LinkLimits
from cloudmailing.common.process_identity import this_process
from cloudmailing.common.tls import TlsFiles, ensure_certificate
from cloudmailing.config.settings import DispatchConfig, Settings
from cloudmailing.master.link_server import SatelliteLinkFactory
from cloudmailing.services.company import REVIEW_SECONDS, Company
from cloudmailing.services.dispatcher import Dispatcher
from cloudmailing.services.lifecycle import MailingLifecycle
from cloudmailing.services.mailings import MailingService
from cloudmailing.services.master_recovery import MasterRecovery
from cloudmailing.services.recipients import RecipientService
from cloudmailing.services.reports import ReportService
from cloudmailing.services.satellites import SatelliteService
from cloudmailing.services.templates import stop_unused_checkers
from cloudmailing.services.writer_claim import CLAIM_SECONDS, ClaimRenewal, MasterPresence, WriterClaim
from cloudmailing.storage.database import Database, open_database
from cloudmailing.storage.shared_locks import SharedLocks
from cloudmailing.storage.stores import Stores, open_stores
from cloudmailing.storage.writer_claims import MasterRegistry, WriterClaimStore

log = logging.getLogger(__name__)

LIFECYCLE_INTERVAL = 5.0
WITHDRAW_SECONDS = 5.0  # how long a stopping master waits to give up its range of change numbers
CHECKERS_INTERVAL = 120.0  # template-checking processes unused for one to two of these are stopped
FLOOR_INTERVAL = 0.2  # how often the other masters' readers learn how far this one's changes are written


@dataclass
class Master:
    """A running master; :meth:`start` opens everything, :meth:`stop` closes it."""

    settings: Settings
    reactor: Any
    database: Database | None = None
    stores: Stores | None = None
    services: Services | None = None
    tls: TlsFiles | None = None
    _ports: list[Any] = field(default_factory=list)
    _loop: LoopingCall | None = None
    link_factory: SatelliteLinkFactory | None = None
    api_site: server.Site | None = None
    on_claim_lost: Callable[[], None] = lambda: None  # its entry lapsed: the master has stopped
    _presence: MasterPresence | None = None
    _recovery: MasterRecovery | None = None
    _floor_loop: LoopingCall | None = None
    _company: Company | None = None
    _company_loop: LoopingCall | None = None
    _checkers_loop: LoopingCall | None = None
    _others_running: bool = False  # other masters share the database (as of the last tick)
    _renewal: ClaimRenewal | None = None
    _stopped: bool = False

    async def start(self) -> None:
        settings = self.settings
        self.database = await open_database(settings.mongodb_url, settings.database.name)
        try:
            presence = await self._enter()
        except BaseException:  # refused: nothing else was opened
            await self.database.close()
            self.database = None
            raise
        self.stores = await open_stores(self.database, settings.database.block_recipients, presence.key)
        self.services = build_services(self.stores, self.reactor, settings.reports.status_log_retention_days,
                                       settings.dispatch, settings.satellite_link.max_awaiting_approval)
        self._recovery = MasterRecovery(self.stores, self.reactor, presence.key)
        assert self.database.locks.shared is not None
        self._company = Company(MasterRegistry(self.database), self.database.locks.shared, self.reactor)
        await self._company.wait_for_company()  # a master alone so far takes lock documents again first
        await self._recovery.recover_dead()  # other masters' half-done writes, this one's last run's
        await self.services.lifecycle.recover(await self._recovery.running(), presence.key)
        self._listen_api()
        self._listen_satellites()
        self._loop = LoopingCall(lambda: as_deferred(self._tick()))
        self._loop.clock = self.reactor
        self._loop.start(LIFECYCLE_INTERVAL, now=False)
        self._floor_loop = LoopingCall(lambda: as_deferred(self._publish_floor()))
        self._floor_loop.clock = self.reactor
        self._floor_loop.start(FLOOR_INTERVAL, now=False)
        self._company_loop = LoopingCall(lambda: as_deferred(self._review_company()))
        self._company_loop.clock = self.reactor
        self._company_loop.start(REVIEW_SECONDS, now=True)
        self._checkers_loop = LoopingCall(lambda: as_deferred(self._stop_unused_checkers()))
        self._checkers_loop.clock = self.reactor
        self._checkers_loop.start(CHECKERS_INTERVAL, now=False)

    async def _enter(self) -> MasterPresence:
        """Say this master runs, beside any other (refused while ``cm-admin storage``, or a
        master of an earlier version, holds the writer's claim)."""
        assert self.database is not None
        me = this_process()
        presence = MasterPresence(MasterRegistry(self.database), self.reactor, me)
        await presence.register()
        try:
            await WriterClaim(WriterClaimStore(self.database), self.reactor, "a master", me).check_free()
        except BaseException:
            await presence.remove()
            raise
        self._presence = presence
        self.database.write_guard = presence.lapsed  # no write once it may have lapsed
        self.database.locks.shared = SharedLocks(lambda: self.database.write_locks, presence.key)
        self._renewal = ClaimRenewal(self._renew_presence, self.reactor, "this master's entry")
        self._renewal.start()
        return presence

    async def _renew_presence(self) -> bool:
        """Renew this master's entry; False (the master has stopped) if it lapsed: other masters
        may have recovered it."""
        assert self._presence is not None and self.database is not None
        if await self._presence.renew():
            if self.database.locks.shared is not None:
                await self.database.locks.shared.sweep()
            return True
        log.critical("this master's entry among the running ones lapsed (frozen, or cut off from the "
                     "database for %d s): the master stops", CLAIM_SECONDS)
        self._presence = None
        await self.stop()
        self.on_claim_lost()
        return False

    async def _review_company(self) -> None:
        """Alone on the database, take no lock documents; with others, take them again."""
        assert self._company is not None
        try:
            self._others_running = await self._company.review()
        except Exception:  # the database may be away for a while: try again next time
            log.exception("could not tell whether other masters share the database")

    async def _publish_floor(self) -> None:
        """Let the other masters' readers past the change numbers this one no longer writes."""
        assert self.stores is not None
        try:
            await self.stores.status_log.allocator.publish(self._others_running)
        except Exception:  # the database may be away for a while: try again next time
            log.exception("could not publish this master's floor of change numbers")

    async def _stop_unused_checkers(self) -> None:
        try:
            await stop_unused_checkers()
        except Exception:  # the next round tries again
            log.exception("could not stop the unused template-checking processes")

    async def _tick(self) -> None:
        assert self.services is not None and self._recovery is not None
        try:
            await self._recovery.recover_dead()
            await self.services.lifecycle.tick()
            assert self.services.dispatcher is not None
            await self.services.dispatcher.expire_leases()
        except Exception:  # the database may be away for a while: try again next time
            log.exception("life-cycle check failed")

    def _listen_api(self) -> None:
        api = self.settings.api
        assert self.stores is not None and self.services is not None
        self.tls = ensure_certificate(api.tls_cert, api.tls_key, self.settings.paths.data_path)
        authenticator = Authenticator(self.stores.api_keys, self.reactor, api.key_cache_seconds,
                                      api.auth_failures_before_delay, api.auth_max_delay_seconds)
        resource = XmlRpcResource(CloudMailingApi(self.services).methods(), authenticator, api.max_xml_depth)
        site = server.Site(resource, requestFactory=request_factory(api.max_request_bytes, authenticator,
                                                                   self.reactor))
        site.displayTracebacks = False
        self.api_site = site
        pem = self.tls.cert_path.read_bytes() + self.tls.key_path.read_bytes()
        context = ssl.PrivateCertificate.loadPEM(pem).options()
        self._ports.append(self._listen_tls(api.port, api.host, site, context, api.max_connections_per_source, "api"))

    def _listen_satellites(self) -> None:
        assert self.database is not None and self.services is not None and self.tls is not None
        assert self.services.dispatcher is not None
        link = self.settings.satellite_link
        limits = LinkLimits(link.max_frame_bytes, link.max_hello_frame_bytes, link.hello_timeout_seconds,
                            link.idle_timeout_seconds)
        self.link_factory = SatelliteLinkFactory(self.services.satellites, self.services.dispatcher, self.reactor,
                                                 limits, link.reconnect_grace_seconds)
        self.services.connected_satellites = self.link_factory.connected
        pem = self.tls.cert_path.read_bytes() + self.tls.key_path.read_bytes()
        context = ssl.PrivateCertificate.loadPEM(pem).options()
        self._ports.append(self._listen_tls(link.port, link.host, self.link_factory, context,
                                            link.max_connections_per_source, "satellite link"))

    def _listen_tls(self, port: int, host: str, factory: Any, context: Any, max_per_source: int, name: str) -> Any:
        """Listen with TLS, at most ``max_per_source`` connections per address (counted before the handshake)."""
        limited = LimitPerSource(TLSMemoryBIOFactory(context, False, factory), max_per_source, name)
        return self.reactor.listenTCP(port, limited, interface=host)

    @property
    def api_port(self) -> int:
        return int(self._ports[0].getHost().port)

    @property
    def satellite_port(self) -> int:
        return int(self._ports[1].getHost().port)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for loop in (self._loop, self._floor_loop, self._company_loop, self._checkers_loop):
            if loop is not None and loop.running:
                loop.stop()
        if self.link_factory is not None:
            self.link_factory.stop()
        for port in self._ports:
            await wait_deferred(port.stopListening())
        if self._renewal is not None:  # a renewal under way ends before the entry and claim go
            await self._renewal.stop()
        try:
            if self.stores is not None and self._presence is not None:
                # Not for ever: a write the database never answered keeps its number in flight
                # (a reservation waiting behind it holds the allocator). The floor then stays,
                # and the other masters recover it once the entry is gone.
                await asyncio.wait_for(self.stores.status_log.allocator.withdraw(), WITHDRAW_SECONDS)
        except Exception:
            log.exception("could not give up this master's range of change numbers")
        try:
            if self._presence is not None:
                await self._presence.remove()
        except Exception:  # it lapses by itself, and the other masters recover what it left
            log.exception("could not withdraw this master's entry")
        if self.database is not None:
            await self.database.close()


def build_services(stores: Stores, clock: Any, retention_days: int = 30, dispatch: DispatchConfig | None = None,
                   max_awaiting_approval: int = 100) -> Services:
    """Every domain service of the master, on ``stores`` (a test may hand in its own)."""
    dispatcher = Dispatcher(stores, clock, dispatch)
    mailings = MailingService(stores, clock, dispatcher.work_available)
    lifecycle = MailingLifecycle(stores, clock, retention_days, dispatcher.work_available)
    dispatcher.on_settled(lifecycle.settle)
    return Services(
        dispatcher=dispatcher,
        mailings=mailings,
        recipients=RecipientService(stores, mailings, clock, dispatcher.work_available),
        reports=ReportService(stores, clock, written_ahead),
        satellites=SatelliteService(stores, clock, max_awaiting_approval),
        lifecycle=lifecycle,
    )
