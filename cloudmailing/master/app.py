"""The master process: database, services, the HTTPS XML-RPC API and periodic life-cycle work."""

from __future__ import annotations

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
from cloudmailing.services.dispatcher import Dispatcher
from cloudmailing.services.lifecycle import MailingLifecycle
from cloudmailing.services.mailings import MailingService
from cloudmailing.services.recipients import RecipientService
from cloudmailing.services.reports import ReportService
from cloudmailing.services.satellites import SatelliteService
from cloudmailing.services.writer_claim import ClaimRenewal, MasterPresence, WriterClaim
from cloudmailing.storage.database import Database, open_database
from cloudmailing.storage.stores import Stores, open_stores
from cloudmailing.storage.writer_claims import MasterRegistry, WriterClaimStore

log = logging.getLogger(__name__)

LIFECYCLE_INTERVAL = 5.0


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
    on_claim_lost: Callable[[], None] = lambda: None  # the writer's claim was taken: the master has stopped
    _claim: WriterClaim | None = None
    _presence: MasterPresence | None = None
    _renewal: ClaimRenewal | None = None
    _stopped: bool = False

    async def start(self) -> None:
        settings = self.settings
        self.database = await open_database(settings.mongodb_url, settings.database.name)
        try:
            await self._take_claim()
        except BaseException:  # refused: nothing else was opened
            await self.database.close()
            self.database = None
            raise
        self.stores = await open_stores(self.database, settings.database.block_recipients)
        self.services = build_services(self.stores, self.reactor, settings.reports.status_log_retention_days,
                                       settings.dispatch, settings.satellite_link.max_awaiting_approval)
        await self.services.lifecycle.recover()
        self._listen_api()
        self._listen_satellites()
        self._loop = LoopingCall(lambda: as_deferred(self._tick()))
        self._loop.clock = self.reactor
        self._loop.start(LIFECYCLE_INTERVAL, now=False)

    async def _take_claim(self) -> None:
        """Say this master runs and be the database's only writer (refused while another master
        or ``cm-admin storage`` holds the writer's claim)."""
        assert self.database is not None
        me = this_process()
        self._presence = MasterPresence(MasterRegistry(self.database), self.reactor, me)
        await self._presence.register()
        claim = WriterClaim(WriterClaimStore(self.database), self.reactor, "a master", me)
        try:
            await claim.take()
            self._claim = claim
            self.database.write_guard = claim.lapsed  # no write once it may have lapsed
        except BaseException:
            await self._presence.remove()
            self._presence = None
            raise
        self._renewal = ClaimRenewal(self._renew_claim, self.reactor, "this master's entry and writer's claim")
        self._renewal.start()

    async def _renew_claim(self) -> bool:
        """Renew this master's entry and claim; False (the master has stopped) if the claim was taken."""
        assert self._presence is not None
        await self._presence.renew()
        if self._claim is None or await self._claim.renew():
            return True
        log.critical("another process has taken this database's writer's claim: the master stops")
        self._claim = None
        await self.stop()
        self.on_claim_lost()
        return False

    async def _tick(self) -> None:
        assert self.services is not None
        try:
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
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.link_factory is not None:
            self.link_factory.stop()
        for port in self._ports:
            await wait_deferred(port.stopListening())
        if self._renewal is not None:  # a renewal under way ends before the entry and claim go
            await self._renewal.stop()
        try:
            if self._presence is not None:
                await self._presence.remove()
            if self._claim is not None:
                await self._claim.release()
        except Exception:  # they expire by themselves
            log.exception("could not withdraw this master's entry or writer's claim")
        if self.database is not None:
            await self.database.close()


def build_services(stores: Stores, clock: Any, retention_days: int = 30, dispatch: DispatchConfig | None = None,
                   max_awaiting_approval: int = 100) -> Services:
    """Every domain service of the master, on ``stores`` (a test may hand in its own)."""
    mailings = MailingService(stores, clock)
    dispatcher = Dispatcher(stores, clock, dispatch)
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
