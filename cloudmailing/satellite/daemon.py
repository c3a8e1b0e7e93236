"""The satellite daemon: lease recipients from the master, deliver them, report every outcome.

Three loops share one link: the *feeder* leases recipients whenever fewer than half a lease
wait to be delivered (and the master keeps up with the reports); *compose-ahead*
(``compose_ahead.py``) turns them into signed messages in ``compose_workers`` worker processes,
under the template limits, only as far ahead of sending as ``max_composed_bytes`` allows; the
*scheduler* (``delivery.py``) delivers; the *reporter* sends outcomes back in batches, after
writing them to the outbox on disk. A lost link ends the
session: the master takes the leases back, and the satellite reconnects and first reports what
its outbox still holds: no lease is asked for before the master has acknowledged it (a lease
given first could bring back the very recipients it names). The satellite keeps no other state:
the master is the only truth.

A lease lasts ``lease_seconds`` (its answer says) on the master, from about when it arrives: a
recipient not started a margin before then (see :func:`lease_end`; not composed yet, or composed
and its transaction not begun) is not sent, but reported as WARNING "lease expired before sending"
(the master may have handed it to another satellite already, or will soon; it retries it). A
lease that brings a recipient the satellite still holds (queued, being sent, or its outcome not
acknowledged yet: the lease before ran out) only moves it to the new lease: it is not sent again.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import logging
import math
import random
import secrets
import socket
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

from cloudmailing import __version__
from cloudmailing.common.aio import wait_deferred
from cloudmailing.common.link import LinkError, LinkProtocol, Method
from cloudmailing.common.link_protocol import (
    HELD_PER_CALL,
    FrameError,
    Held,
    Hello,
    HelloAnswer,
    LeaseAnswer,
    LeasedRecipient,
    LeaseRequest,
    MailingContent,
    MailingRequest,
    Outcome,
    Report,
    ReportAnswer,
    Wake,
)
from cloudmailing.common.private_files import write_private
from cloudmailing.common.recent import keep_recent
from cloudmailing.common.statuses import WARNING
from cloudmailing.config.settings import SatelliteConfig, parse_host_port
from cloudmailing.satellite.compose_ahead import ComposeAhead
from cloudmailing.satellite.compose_pool import ComposePool, MailingSource
from cloudmailing.satellite.delivery import DeliveryConfig, DeliveryJob, DeliveryScheduler
from cloudmailing.satellite.master_identity import master_options
from cloudmailing.satellite.mx_resolver import MxResolver
from cloudmailing.satellite.outbox import Outbox
from cloudmailing.satellite.outcomes import DeliveryOutcome
from cloudmailing.satellite.templates import TemplateLimits

log = logging.getLogger(__name__)

REPORT_BATCH = 1000
REPORT_INTERVAL = 0.5  # outcomes wait up to this long before they are reported
IDLE_POLL = 1.0  # an idle satellite asks again after this, or at once when the master wakes it
MAILING_CACHE_SECONDS = 60.0
MAILING_CACHE_SIZE = 4  # mailings whose content is kept (each up to ~16 MiB)
RECONNECT_MAX = 30.0
RETRY_PAUSE = 1.0
_REPORTS_AT_ONCE = 2  # reports in flight: the last outcomes do not wait for the one before
UNREPORTED_LEASES = 5  # no new lease while this many leases' worth of outcomes await the master
# A recipient is not started later than this before its lease ends on the master: the greater of
# LEASE_MARGIN_SECONDS and LEASE_MARGIN_SHARE of lease_seconds, at most half of them.
LEASE_MARGIN_SECONDS = 2.0
LEASE_MARGIN_SHARE = 0.1
LEASE_EXPIRED = "lease expired before sending"
Answer = TypeVar("Answer")


def host_port(text: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` of a checked setting item: "host", "host:port", an IPv6 address alone or
    as "[address]:port" (the configuration check refused anything else)."""
    return parse_host_port(text, default_port)


def delivery_config(config: SatelliteConfig) -> DeliveryConfig:
    """The scheduler's settings: every one of them comes from ``[satellite]``."""
    return DeliveryConfig(
        helo_hostname=config.helo_hostname or socket.getfqdn(), smtp_port=config.smtp_port,
        test_target=host_port(config.test_target, 25) if config.test_target else None,
        max_connections=config.max_connections, max_connections_per_host=config.max_connections_per_host,
        connect_timeout=config.connect_timeout, reply_timeout=config.reply_timeout,
        max_messages_per_connection=config.max_messages_per_connection, idle_timeout=config.connection_idle_timeout,
        starttls=config.starttls, backoff_initial=config.backoff_initial, backoff_factor=config.backoff_factor,
        backoff_maximum=config.backoff_maximum, backoff_burst=config.backoff_burst,
        max_backoff_wait=config.max_backoff_wait)


def lease_end(arrived: float, lease_seconds: float) -> float:
    """When the recipients of a lease that arrived at ``arrived`` (reactor seconds) may no longer
    start: a margin before the master takes it back (the answer's way here, a transaction started
    just then and its report fit in it)."""
    margin = min(max(LEASE_MARGIN_SECONDS, LEASE_MARGIN_SHARE * lease_seconds), lease_seconds / 2)
    return arrived + lease_seconds - margin


def template_limits(config: SatelliteConfig) -> TemplateLimits:
    return TemplateLimits(cpu_seconds=config.template_cpu_seconds, max_output_chars=config.template_max_output_chars,
                          max_value_chars=config.template_max_value_chars)


class SecretFileError(ValueError):
    """``satellite.secret`` exists but holds no usable secret: the satellite cannot start.

    It is never replaced silently: the master keeps the secret it first received, and would
    refuse a new one."""


def load_or_create_secret(config: SatelliteConfig, data_dir: Path) -> str:
    """The configured secret, else one made on first start and kept in ``data_dir``.

    Raises :class:`SecretFileError` for a kept secret that is not UTF-8 text or is empty."""
    if config.secret:
        return config.secret
    path = data_dir / "satellite.secret"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32).encode("ascii"))  # 0600, in a 0700 data_dir
    serial = config.serial or socket.gethostname()
    remedy = ("restore it from a backup, or delete it and register this satellite again on the master "
              f"(cm-admin satellite list gives its ID; cm-admin satellite delete ID, then cm-admin satellite add "
              f"{serial}); the satellite then makes a new one")
    try:
        secret = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{path} is damaged (not UTF-8 text): {remedy}") from None
    if not secret:
        raise SecretFileError(f"{path} is empty: {remedy}")
    return secret


class SatelliteDaemon:
    def __init__(self, config: SatelliteConfig, data_dir: Path, reactor: Any, rng: random.Random | None = None) -> None:
        self.config = config
        self.serial = config.serial or socket.gethostname()
        self._secret = load_or_create_secret(config, data_dir)
        self._data_dir = data_dir
        self._reactor = reactor
        nameservers = [host_port(s, 53) for s in config.dns_servers.split(",") if s.strip()] or None
        self._resolver = MxResolver(nameservers, clock=reactor, rng=rng or random.Random())
        self._outbox = Outbox(data_dir / "outbox.jsonl")
        self._scheduler = DeliveryScheduler(delivery_config(config), self._resolver, self._delivered,
                                            clock=reactor, hold=self._too_late)
        self._composer = ComposePool(config.compose_workers, template_limits(config), config.compose_memory_mb)
        self.ahead = ComposeAhead(self._composer, self._scheduler.submit, self._build_failed,
                                  config.max_composed_bytes, self._late, self._not_composed)
        # id -> (when fetched, content, its content version)
        self._mailings: OrderedDict[int, tuple[float, MailingSource, int]] = OrderedDict()
        # The lease of every recipient held (handed to composing, not yet acknowledged): a
        # reconnecting satellite names them, and the master frees its other leases at once.
        self._leases: dict[str, str] = {}
        # When each recipient queued or being sent may no longer start (its lease's end, less the
        # margin; reactor seconds): from its lease until its outcome. Held, not in the outbox yet.
        self._deadlines: dict[str, float] = {}
        # The outcomes the outbox held when the link began, not acknowledged yet: the session asks
        # for no lease before they are (``_replayed`` set then).
        self._replaying: set[str] = set()
        self._replayed = asyncio.Event()
        self._replayed.set()
        self._work = asyncio.Event()  # the master said it has work (``wake``) since the last lease
        self._drained = asyncio.Event()  # everything leased is delivered: report without waiting
        self._stopping = False
        self.sessions = 0  # how many times it has connected (for tests and logs)

    # -- outcomes ---------------------------------------------------------------------------

    def _delivered(self, job: DeliveryJob, outcome: DeliveryOutcome) -> None:
        self.ahead.sent(job)
        self._deadlines.pop(outcome.recipient_id, None)
        content = base64.b64encode(job.data).decode("ascii") if job.keep_content else None
        self._outbox.add(Outcome(outcome.recipient_id, outcome.status, outcome.reply_code,
                                 outcome.reply_enhanced_code, outcome.reply_text, outcome.smtp_log, outcome.mx_host,
                                 self._leases.get(outcome.recipient_id), content))
        if self._all_delivered():
            self._drained.set()

    def _keep(self, outcome: Outcome) -> None:
        """Into the outbox, to be reported, naming the lease the recipient came with."""
        lease = self._leases.get(outcome.recipient_id)
        self._outbox.add(dataclasses.replace(outcome, lease=lease) if lease is not None else outcome)

    def held_leases(self) -> list[str]:
        """The leases of the recipients this satellite holds, outbox included (after a restart too)."""
        return sorted(set(self._leases.values()) | self._outbox.leases())

    # -- the link ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect with a growing pause, until :meth:`stop`."""
        self._composer.start()
        composing = asyncio.ensure_future(self.ahead.run())
        try:
            await self._serve()
        finally:
            composing.cancel()

    async def _serve(self) -> None:
        pause = 1.0
        while not self._stopping:
            try:
                link = await self._connect()
            except Exception as error:  # refused, TLS failure, master away
                log.warning("cannot reach the master: %s", error, extra={"satellite": self.serial})
            else:
                pause = 1.0
                await self._session(link)
            if not self._stopping:
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECONNECT_MAX)

    async def _connect(self) -> LinkProtocol:
        options = master_options(self.config.master_fingerprint, self._data_dir)
        endpoint = SSL4ClientEndpoint(self._reactor, self.config.master_host, self.config.master_port, options)
        served = {"wake": Method(Wake.from_wire, self._wake)}  # the one request the master makes
        link: LinkProtocol = await wait_deferred(connectProtocol(endpoint, LinkProtocol(self._reactor, served)))
        return link

    async def _session(self, link: LinkProtocol) -> None:
        try:
            await self._hello(link)
        except LinkError as error:
            log.error("the master refused this satellite: %s", error, extra={"satellite": self.serial})
            link.close()
            return
        except FrameError as error:  # a master of another version: reconnecting will not help soon
            log.error("malformed answer from the master to hello: %s", error, extra={"satellite": self.serial})
            link.close()
            return
        self.sessions += 1
        log.info("connected to the master", extra={"satellite": self.serial})
        self._replay_first()
        tasks = [asyncio.ensure_future(self._feed(link)), asyncio.ensure_future(self._report(link))]
        try:
            await asyncio.wait([link.closed_future, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:  # the session ends, or run() was cancelled: its loops and link end with it
            for task in tasks:
                task.cancel()
            link.close()
        log.warning("link to the master lost", extra={"satellite": self.serial})

    async def _hello(self, link: LinkProtocol) -> None:
        """Say hello, then name the leases held, HELD_PER_CALL at a time: the hello itself stays
        under the master's small pre-authentication frame limit however many they are."""
        HelloAnswer.from_wire(await link.call("hello", **Hello(self.serial, self._secret, __version__).to_wire()))
        leases = self.held_leases()
        for start in range(0, max(len(leases), 1), HELD_PER_CALL):
            held = Held(leases[start:start + HELD_PER_CALL], more=start + HELD_PER_CALL < len(leases))
            try:
                await link.call("held", **held.to_wire())
            except LinkError as error:
                if error.code != "unknown_method":
                    raise
                # An older master: it freed nothing at hello either; those leases expire instead.
                log.info("the master cannot be told the leases held", extra={"satellite": self.serial})
                return

    def _replay_first(self) -> None:
        """Note the outcomes the outbox holds as the link begins: the feeder waits until the master
        has acknowledged them. Its lease ended meanwhile (the master down, or this satellite past
        the reconnect grace), the master may lease their recipients again: to this satellite, only
        once it has taken these outcomes; named in a lease first, they would go out again."""
        self._replaying = {outcome.recipient_id for outcome in
                           self._outbox.batch(len(self._outbox), max_bytes=sys.maxsize)}
        self._replayed = asyncio.Event()
        if not self._replaying:
            self._replayed.set()

    # -- leasing and composing --------------------------------------------------------------

    async def _feed(self, link: LinkProtocol) -> None:
        await self._replayed.wait()  # the outbox of before this link is acknowledged first
        low_water = max(1, self.config.lease_size // 2)
        # Outcomes the master has not acknowledged yet are held in memory (and on disk): while the
        # master is slow to take them, leasing more would only grow that backlog.
        max_unreported = UNREPORTED_LEASES * self.config.lease_size
        while True:
            self._forget_old_mailings()
            held = self._scheduler.pending + self.ahead.pending
            if held >= low_water or len(self._outbox) >= max_unreported:
                await asyncio.sleep(0.05)
                continue
            self._work.clear()  # a wake from now on is for what this lease may not see
            answer = await self._ask(link, "lease", LeaseRequest(self.config.lease_size - held).to_wire(),
                                     LeaseAnswer.from_wire)
            recipients = answer.recipients if answer else []
            if answer and recipients:
                until = lease_end(self._reactor.seconds(), answer.lease_seconds)
                await self._submit(link, recipients, answer.content_versions, until)
            if not recipients:
                await _set_or_after(self._work, IDLE_POLL)  # the master may wake us sooner

    async def _wake(self, wake: Wake) -> dict[str, Any]:
        self._work.set()
        return {}

    async def _submit(self, link: LinkProtocol, recipients: list[LeasedRecipient],
                      content_versions: Mapping[int, int] | None = None, until: float = math.inf) -> None:
        """Hand a lease's recipients to composing, to start before ``until`` (reactor seconds).
        Every mailing's content comes first (fetched again when the lease names a newer version
        than the one kept): only then
        are the recipients held (in ``_leases``), all at once. A fetch that fails (link lost,
        feeder cancelled) leaves none of them held: not named at the next hello, they are freed
        at once (a lease may span mailings: one held recipient would keep them all). A recipient
        held already (its lease before ran out: it is queued, being sent, or its outcome awaits
        the master) is moved to this lease, and not sent again."""
        by_mailing: dict[int, list[LeasedRecipient]] = {}
        for recipient in recipients:
            by_mailing.setdefault(recipient.mailing_id, []).append(recipient)
        mailings: dict[int, MailingSource] = {}
        for mailing_id, leased in by_mailing.items():
            try:
                version = content_versions.get(mailing_id) if content_versions else None
                mailings[mailing_id] = await self._mailing(link, mailing_id, version)
            except LinkError as error:
                if error.code != "not_found":
                    raise
                # Deleted since the lease, with its recipients: nothing to send, nothing to report.
                log.warning("mailing gone; %d leased recipients dropped", len(leased),
                            extra={"mailing": mailing_id, "satellite": self.serial})
        leases, deadlines = self._leases, self._deadlines
        for mailing_id, mailing in mailings.items():  # no await from here: all held, or none
            fresh = []
            for recipient in by_mailing[mailing_id]:
                rid = recipient.id
                if rid not in leases:
                    fresh.append(recipient.to_wire())  # the compose workers take dicts
                    deadlines[rid] = until
                elif rid in deadlines:  # queued or being sent: its outcome will name this lease
                    deadlines[rid] = until
                leases[rid] = recipient.lease
            if len(fresh) < len(by_mailing[mailing_id]):
                log.info("%d leased recipients held already, not sent again",
                         len(by_mailing[mailing_id]) - len(fresh), extra={"mailing": mailing_id,
                                                                            "satellite": self.serial})
            if fresh:
                self.ahead.add(mailing, fresh)

    def _late(self, recipient_id: str) -> bool:
        """Whether the recipient's lease is over (less the margin): then it is not composed."""
        return self._deadlines.get(recipient_id, math.inf) <= self._reactor.seconds()

    def _too_late(self, job: DeliveryJob) -> str | None:
        """The scheduler asks just before the job's transaction: a reason not to start it, or None."""
        return LEASE_EXPIRED if self._late(job.recipient_id) else None

    def _not_composed(self, recipients: list[dict[str, Any]], mailing_id: int) -> None:
        """Recipients left uncomposed, their lease over: reported as WARNING (the master retries them,
        or ignores the outcome when it has handed them to another satellite already)."""
        log.warning("%d recipients not sent: %s", len(recipients), LEASE_EXPIRED,
                    extra={"mailing": mailing_id, "satellite": self.serial})
        for recipient in recipients:
            self._deadlines.pop(recipient["id"], None)
            self._keep(Outcome(recipient["id"], WARNING, None, "", LEASE_EXPIRED))
        if self._all_delivered():
            self._drained.set()

    def _build_failed(self, failure: dict[str, Any], mailing_id: int) -> None:
        self._deadlines.pop(failure["recipient_id"], None)
        log.warning("cannot build the message: %s", failure["reply_text"],
                    extra={"mailing": mailing_id, "recipient": failure["recipient_id"]})
        # The reason may quote a template: made valid text, so that the master takes the report.
        reason = str(failure["reply_text"]).encode("utf-8", "replace").decode("utf-8")
        self._keep(Outcome(failure["recipient_id"], failure["status"], None, "", reason))
        if self._all_delivered():  # the lease's last recipient: its report need not wait
            self._drained.set()

    async def _mailing(self, link: LinkProtocol, mailing_id: int, version: int | None = None) -> MailingSource:
        """The mailing's content: the one kept, unless ``version`` (from the lease) is newer."""
        now = self._forget_old_mailings()
        cached = self._mailings.get(mailing_id)
        if cached and (version is None or version <= cached[2]):
            return cached[1]
        content = None
        while content is None:  # its recipients are leased to us: wait out the master's troubles
            content = await self._ask(link, "mailing", MailingRequest(mailing_id).to_wire(), MailingContent.from_wire)
        source = MailingSource.from_content(content.to_wire())
        keep_recent(self._mailings, mailing_id, (now, source, content.content_version), MAILING_CACHE_SIZE)
        return source

    def _forget_old_mailings(self) -> float:
        """Drop the contents fetched MAILING_CACHE_SECONDS ago or more (a master that sends no
        content versions); the time now."""
        now: float = self._reactor.seconds()
        for mailing_id, (fetched, _, _) in list(self._mailings.items()):
            if now - fetched >= MAILING_CACHE_SECONDS:
                del self._mailings[mailing_id]
        return now

    # -- reporting --------------------------------------------------------------------------

    async def _report(self, link: LinkProtocol) -> None:
        """Report what the outbox holds every REPORT_INTERVAL, or at once when a full batch waits or
        everything leased is delivered (the last outcomes of a mailing do not wait): each report is a
        write per block on the master, so a few large ones beat many small ones. One report at a
        time, except that the last outcomes do not wait for the one in flight either: they go
        beside it (its answer takes the master a few tenths of a second)."""
        reporting: set[str] = set()  # recipient ids of the reports in flight
        sending: set[asyncio.Future[None]] = set()
        try:
            while True:
                batch = self._outbox.batch(REPORT_BATCH, skip=reporting)
                if not batch or (len(batch) < REPORT_BATCH and not self._all_delivered()):
                    await _set_or_after(self._drained, REPORT_INTERVAL)
                    self._drained.clear()
                    batch = self._outbox.batch(REPORT_BATCH, skip=reporting)
                    if not batch:
                        continue
                self._outbox.sync()
                reporting.update(outcome.recipient_id for outcome in batch)
                report = asyncio.ensure_future(self._send_report(link, batch, reporting))
                sending.add(report)
                report.add_done_callback(functools.partial(_ended, sending))
                if self._all_delivered() and len(sending) < _REPORTS_AT_ONCE and \
                        self._outbox.batch(1, skip=reporting):
                    continue  # the rest goes now, beside this one
                drained = asyncio.ensure_future(self._drained.wait())
                try:  # the next report waits for this one, unless everything leased is delivered
                    await asyncio.wait({report, drained}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    drained.cancel()
                if report.done():
                    report.result()  # the link's end ends the session
        finally:
            for unanswered in sending:
                unanswered.cancel()

    def _all_delivered(self) -> bool:
        """Whether everything leased has its outcome (none waits for composing or sending)."""
        return not self._scheduler.pending and not self.ahead.pending

    async def _send_report(self, link: LinkProtocol, batch: list[Outcome], reporting: set[str]) -> None:
        """Report ``batch``, whose recipients are in ``reporting`` until the master answers."""
        try:
            answer = await self._ask(link, "report", Report(batch).to_wire(), ReportAnswer.from_wire)
        finally:
            reporting.difference_update(outcome.recipient_id for outcome in batch)
        if answer:
            self._outbox.acknowledge(answer.acknowledged)
            self._forget_leases(batch, set(answer.acknowledged))
            if self._replaying:
                self._replaying.difference_update(answer.acknowledged)
                if not self._replaying:
                    self._replayed.set()  # the feeder may lease now
            # What the master took no longer counts against this satellite's lease allowance: a
            # lease it refused for that may be granted now, not after IDLE_POLL.
            self._work.set()

    def _forget_leases(self, reported: list[Outcome], acknowledged: set[str]) -> None:
        """Forget the lease of each acknowledged recipient, unless it is queued or being sent again
        (the outcome names an older lease): its next outcome must name the lease it holds now. One
        leased again while its outcome waited was not sent again: that outcome was its last."""
        for outcome in reported:
            rid = outcome.recipient_id
            if rid in acknowledged and (rid not in self._deadlines or self._leases.get(rid) == outcome.lease):
                self._leases.pop(rid, None)

    async def _ask(self, link: LinkProtocol, method: str, params: dict[str, Any],
                   decode: Callable[[Any], Answer]) -> Answer | None:
        """A call that survives the master's passing troubles (its database away, a malformed
        answer): None after one log line and a pause, for the caller to retry."""
        try:
            return decode(await link.call(method, **params))
        except LinkError as error:
            if error.code in ("disconnected", "unauthorized", "not_paired", "not_found"):
                raise
            log.warning("the master could not answer %s: %s", method, error, extra={"satellite": self.serial})
        except FrameError as error:
            log.warning("malformed answer from the master to %s: %s", method, error, extra={"satellite": self.serial})
        await asyncio.sleep(RETRY_PAUSE)
        return None

    async def stop(self) -> None:
        self._stopping = True
        self._composer.close()  # first: a worker may be busy on a template that takes its full limit
        await self._scheduler.close()
        self._outbox.close()


def _ended(sending: set[asyncio.Future[None]], report: asyncio.Future[None]) -> None:
    """A report ended: its failure is marked as seen here (one that ended beside the next one is
    not awaited). ``_ask`` raises only for the link itself (closed, or this satellite refused),
    which the session's next call meets again."""
    sending.discard(report)
    if not report.cancelled():
        report.exception()


async def _set_or_after(event: asyncio.Event, seconds: float) -> None:
    """Until ``event`` is set, or ``seconds`` have passed."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass
