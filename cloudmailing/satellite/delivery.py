"""Delivery policy: which connection sends which message, when to back off, what to report.

:class:`DeliveryScheduler` takes :class:`DeliveryJob` objects (one personalized message for one
recipient), resolves the recipient domain's mail hosts, and delivers through
:class:`~cloudmailing.satellite.smtp_client.SmtpConnection` objects:

* one queue per recipient domain, served by workers; each worker holds one connection and sends
  queued messages on it in order (up to ``max_messages_per_connection``), two in flight: the next
  one starts while the one before waits for its last reply (with PIPELINING, its envelope goes
  out with that body); a message the server never answered because the connection ended is not
  reported but queued again, for another connection. A job submitted while a lingering worker
  was just given one waits for that worker, to ride, rather than waking another. It lingers
  ``idle_timeout`` seconds for more before it says QUIT (at once when another destination
  waits for a connection slot);
* at most ``max_connections_per_host`` connections per MX address and ``max_connections`` in
  all; new connections go to the best MX host that is not backing off, and a worker whose
  connection fails tries the next MX host. A slot that frees goes first to the destinations
  waiting for one, in turn;
* a domain's route is resolved again once a second old (the resolver keeps each answer for its
  TTL); a connection to a host the domain no longer lists ends what it started, then QUITs;
* back-off (:class:`HostBackoff`): a 421, or ``backoff_burst`` temporary failures in a row (a
  connection closed before its first message is a failed one; a 4xx to RCPT TO, such as
  greylisting, judges one recipient and is not counted), pauses new connections to that
  MX address for a growing delay, reset by a delivered message. Jobs wait for a short pause;
  when every MX host of a domain is paused for longer than ``max_backoff_wait``, its queued
  jobs are reported as WARNING (the master retries them);
* jobs of a ``testing`` mailing go to ``test_target`` (the domain is still resolved, so DNS
  still decides deliverability).

Just before a job's SMTP transaction starts, ``hold(job)`` (when given) may name a reason not to
send it after all (the daemon's: its lease is over): it is then reported as WARNING with that
reason, untried.

Every job gets exactly one :class:`~cloudmailing.satellite.outcomes.DeliveryOutcome`, passed to
``on_outcome(job, outcome)``. The scheduler does not decide ``next_try``: the master does, with
:class:`~cloudmailing.satellite.outcomes.RetrySchedule`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cloudmailing.common.clock import Clock, DelayedCall
from cloudmailing.satellite import outcomes
from cloudmailing.satellite.mx_resolver import MailHost, PermanentDnsError
from cloudmailing.satellite.outcomes import DeliveryOutcome
from cloudmailing.satellite.smtp_client import SmtpClientOptions, SmtpConnectError, SmtpConnection

log = logging.getLogger("cloudmailing.satellite.delivery")

_IN_FLIGHT = 2  # messages started on one connection and not ended: one sending, the next riding
# A domain's route is resolved again when older than this (the resolver's cache keeps each answer
# for its TTL, so this is cheap): a domain that never stops getting work still sees its MX move.
_ROUTE_MAX_AGE = 1.0
# A host whose TLS handshake failed after it offered STARTTLS gets plaintext (opportunistic TLS,
# as MTAs do) for this long, then STARTTLS again.
_PLAINTEXT_SECONDS = 3600.0


@dataclass(frozen=True)
class DeliveryJob:
    """One message for one recipient, ready to send (personalized, signed, CRLF line endings)."""

    recipient_id: str
    domain: str
    envelope_from: str
    recipient: str
    data: bytes
    mailing_id: str = ""
    testing: bool = False  # the mailing's ``testing`` property: deliver to ``test_target``
    keep_content: bool = False  # the mailing's ``backup_customized_emails``: report ``data`` back


@dataclass(frozen=True)
class DeliveryConfig:
    """Scheduler settings (from ``[satellite]``: ``daemon.delivery_config``)."""

    helo_hostname: str = "localhost"
    smtp_port: int = 25
    test_target: tuple[str, int] | None = None
    max_connections: int = 200
    max_connections_per_host: int = 4
    max_messages_per_connection: int = 100
    connect_timeout: float = 30.0
    reply_timeout: float = 120.0
    idle_timeout: float = 2.0
    starttls: bool = True
    backoff_initial: float = 5.0
    backoff_factor: float = 2.0
    backoff_maximum: float = 600.0
    backoff_burst: int = 5
    max_backoff_wait: float = 60.0


class Resolver(Protocol):
    """What the scheduler needs from ``mx_resolver.MxResolver``."""

    async def resolve(self, domain: str) -> list[MailHost]: ...


OutcomeCallback = Callable[[DeliveryJob, DeliveryOutcome], None]


@dataclass(frozen=True)
class _Target:
    """Where to connect: an MX host address (or the test target) and a port."""

    name: str
    address: str
    port: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


class HostBackoff:
    """Per-destination back-off: pause new connections after a 421 or a burst of failures."""

    def __init__(self, clock: Clock, config: DeliveryConfig) -> None:
        self._clock = clock
        self._config = config
        self._failures: dict[tuple[str, int], int] = {}
        self._delay: dict[tuple[str, int], float] = {}
        self._paused_until: dict[tuple[str, int], float] = {}

    def remaining(self, key: tuple[str, int]) -> float:
        """Seconds before new connections to ``key`` are allowed again (0: allowed now)."""
        until = self._paused_until.get(key)
        if until is None:
            return 0.0
        left = until - self._clock.seconds()
        if left <= 0:
            del self._paused_until[key]
            return 0.0
        return left

    def success(self, key: tuple[str, int]) -> None:
        """A message was delivered: the destination is healthy again."""
        self._failures.pop(key, None)
        self._delay.pop(key, None)
        self._paused_until.pop(key, None)

    def failure(self, key: tuple[str, int], reply_code: int | None) -> None:
        """A temporary failure; pause at once on 421, else after a burst of them.

        Failures seen while already paused (other connections of the same wave) are ignored,
        so that a pause grows once per wave, not once per connection.
        """
        if self.remaining(key) > 0:
            return
        count = self._failures.get(key, 0) + 1
        if reply_code == 421 or count >= self._config.backoff_burst:
            self._pause(key)
            count = 0
        self._failures[key] = count

    def _pause(self, key: tuple[str, int]) -> None:
        previous = self._delay.get(key, 0.0)
        delay = self._config.backoff_initial if previous == 0 else previous * self._config.backoff_factor
        delay = min(delay, self._config.backoff_maximum)
        self._delay[key] = delay
        self._paused_until[key] = self._clock.seconds() + delay
        log.info("backing off %s:%d for %.0f s", key[0], key[1], delay)


@dataclass
class _Destination:
    """The queue of one recipient domain (testing jobs apart) and who serves it."""

    domain: str
    testing: bool
    jobs: deque[DeliveryJob] = field(default_factory=deque)
    route: list[_Target] | None = None
    route_keys: frozenset[tuple[str, int]] = frozenset()  # of ``route``: the hosts it may still use
    route_expires: float = 0.0  # then resolved again; the old route serves meanwhile
    resolving: bool = False
    workers: int = 0
    connecting: int = 0
    connected: int = 0
    waking: bool = False  # an idle worker elsewhere was asked to free a slot for us
    woken: int = 0  # lingering workers given a job, not running yet: each takes the next one queued
    idle: deque[asyncio.Future[DeliveryJob | None]] = field(default_factory=deque)
    wake_timer: DelayedCall | None = None


class DeliveryScheduler:
    """Delivers jobs through pooled SMTP connections and reports one outcome per job."""

    def __init__(
        self,
        config: DeliveryConfig,
        resolver: Resolver,
        on_outcome: OutcomeCallback,
        clock: Clock,
        hold: Callable[[DeliveryJob], str | None] | None = None,
    ) -> None:
        self.config = config
        self._resolver = resolver
        self._on_outcome = on_outcome
        self._hold = hold  # asked just before each transaction starts: a reason not to send, or None
        self._clock: Clock = clock
        self._options = SmtpClientOptions(
            config.helo_hostname, config.connect_timeout, config.reply_timeout, config.starttls
        )
        self._plaintext = dataclasses.replace(self._options, starttls=False)
        self._plaintext_until: dict[tuple[str, int], float] = {}  # host -> until when it gets plaintext
        self.backoff = HostBackoff(self._clock, config)
        self._destinations: dict[tuple[str, bool], _Destination] = {}
        self._per_host: dict[tuple[str, int], int] = {}
        self._connections = 0
        self._blocked: dict[int, _Destination] = {}  # waiting for connection slots
        self._idle_workers: dict[asyncio.Future[DeliveryJob | None], tuple[str, int]] = {}
        # When each lingering worker gives up, and the one timer that ends the lingers due (a
        # timer per linger cost a tenth of the daemon's time: a worker lingers after most messages).
        self._linger_ends: dict[asyncio.Future[DeliveryJob | None], float] = {}
        self._linger_timer: DelayedCall | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._pending = 0
        self._drained: asyncio.Future[None] | None = None

    # -- public API --------------------------------------------------------------------------
    def submit(self, job: DeliveryJob) -> None:
        """Queue a job; its outcome will be passed to ``on_outcome``."""
        self._pending += 1
        key = (job.domain.lower(), job.testing)
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = _Destination(key[0], job.testing)
        self._current_route(dest)  # resolves the route again when old
        if len(dest.jobs) < dest.woken:  # a connection woken for a job takes this one with it
            dest.jobs.append(job)
            return
        while dest.idle:
            waiter = dest.idle.popleft()
            if not waiter.done():
                waiter.set_result(job)  # a lingering connection takes it at once
                dest.woken += 1
                return
        dest.jobs.append(job)
        self._pump(dest)

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet reported."""
        return self._pending

    @property
    def open_connections(self) -> int:
        """Connections being opened or open."""
        return self._connections

    async def drain(self) -> None:
        """Wait until every submitted job has been reported."""
        while self._pending:
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    async def close(self) -> None:
        """QUIT lingering connections and wait for the workers. Queued jobs are not reported."""
        for dest in self._destinations.values():
            dest.jobs.clear()
            while dest.idle:
                waiter = dest.idle.popleft()
                if not waiter.done():
                    waiter.set_result(None)
            if dest.wake_timer is not None and dest.wake_timer.active():
                dest.wake_timer.cancel()
        if self._linger_timer is not None and self._linger_timer.active():
            self._linger_timer.cancel()
        self._linger_timer = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- reporting ---------------------------------------------------------------------------
    def _report(self, job: DeliveryJob, outcome: DeliveryOutcome) -> None:
        self._pending -= 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s: %s %s", job.recipient_id, outcome.status, outcome.reply_code,
                outcome.reply_text,
                extra={"mailing_id": job.mailing_id, "recipient_id": job.recipient_id},
            )
        try:
            self._on_outcome(job, outcome)
        except Exception:
            log.exception("on_outcome failed for %s", job.recipient_id,
                          extra={"mailing_id": job.mailing_id, "recipient_id": job.recipient_id})
        if self._pending == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _fail_queued(self, dest: _Destination, make: Callable[[str], DeliveryOutcome]) -> None:
        while dest.jobs:
            job = dest.jobs.popleft()
            self._report(job, make(job.recipient_id))
        self._forget_if_idle(dest)

    def _forget_if_idle(self, dest: _Destination) -> None:
        if dest.jobs or dest.workers or dest.resolving:
            return
        if dest.wake_timer is not None and dest.wake_timer.active():
            return
        key = (dest.domain, dest.testing)
        if self._destinations.get(key) is dest:
            del self._destinations[key]

    # -- scheduling --------------------------------------------------------------------------
    def _pump(self, dest: _Destination) -> None:
        """Start workers for ``dest`` while it has waiting jobs and capacity allows."""
        route = self._current_route(dest) if dest.jobs else None
        if route is None:
            return
        while len(dest.jobs) > dest.connecting:
            target_index = self._first_open_target(dest)
            if target_index is None:
                return
            target = route[target_index]
            host_full = self._per_host.get(target.key, 0) >= self.config.max_connections_per_host
            if host_full or self._connections >= self.config.max_connections:
                if host_full and dest.workers:
                    return  # its own connections to that host take the jobs: none need close for it
                self._blocked[id(dest)] = dest  # pumped again when a slot frees up
                if not dest.waking and not dest.workers:
                    self._wake_idle_worker(target.key if host_full else None, dest)
                return
            self._reserve(target)
            dest.workers += 1
            dest.connecting += 1
            self._spawn(self._worker(dest, route, target_index))

    def _current_route(self, dest: _Destination) -> list[_Target] | None:
        """The route to use now (None: not known yet); resolved again when missing or old."""
        if not dest.resolving and (dest.route is None or self._clock.seconds() >= dest.route_expires):
            dest.resolving = True
            self._spawn(self._resolve(dest))
        return dest.route

    def _first_open_target(self, dest: _Destination) -> int | None:
        """The best target not backing off; None (and a plan) when all of them are."""
        assert dest.route is not None
        waits = []
        for index, target in enumerate(dest.route):
            wait = self.backoff.remaining(target.key)
            if wait == 0:
                return index
            waits.append(wait)
        shortest = min(waits)
        if shortest > self.config.max_backoff_wait:
            self._fail_queued(dest, lambda rid: outcomes.temporary_failure(
                rid, f"not tried: every mail host of {dest.domain} is backing off"))
        elif dest.wake_timer is None or not dest.wake_timer.active():
            dest.wake_timer = self._clock.callLater(shortest, self._pump, dest)
        return None

    def _reserve(self, target: _Target) -> None:
        self._connections += 1
        self._per_host[target.key] = self._per_host.get(target.key, 0) + 1

    def _release(self, target: _Target) -> None:
        self._connections -= 1
        left = self._per_host[target.key] - 1
        if left:
            self._per_host[target.key] = left
        else:
            del self._per_host[target.key]

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _capacity_freed(self, dest: _Destination) -> None:
        # Those waiting for a slot go first, in turn (the ones still blocked queue again, at the
        # end): pumped first, the freeing destination would take the slot back every time.
        blocked, self._blocked = self._blocked, {}
        for waiting in blocked.values():
            waiting.waking = False
            self._pump(waiting)
        self._pump(dest)

    def _wake_idle_worker(self, key: tuple[str, int] | None, dest: _Destination) -> None:
        """Make a lingering connection (to ``key``, or any) QUIT so that ``dest`` gets its slot."""
        for waiter, waiter_key in self._idle_workers.items():
            if not waiter.done() and (key is None or waiter_key == key):
                dest.waking = True
                waiter.set_result(None)
                return

    # -- DNS ---------------------------------------------------------------------------------
    async def _resolve(self, dest: _Destination) -> None:
        try:
            hosts = await self._resolver.resolve(dest.domain)
        except PermanentDnsError as error:
            self._dns_failed(dest, error.reason, permanent=True)
            return
        except Exception as error:  # noqa: BLE001 - TemporaryDnsError or a resolver bug: retry later
            self._dns_failed(dest, getattr(error, "reason", str(error)), permanent=False)
            return
        dest.resolving = False
        self._set_route(dest, self._route(dest, hosts) or None)
        if dest.route is None:
            self._fail_queued(dest, lambda rid: outcomes.temporary_failure(rid, self._no_route(dest)))
            return
        self._pump(dest)
        self._forget_if_idle(dest)  # a refresh may end after the last worker

    def _dns_failed(self, dest: _Destination, reason: str, permanent: bool) -> None:
        dest.resolving = False
        log.info("DNS failure for %s: %s", dest.domain, reason)
        if dest.route is not None and not permanent:  # a refresh failed: the route we have still serves
            dest.route_expires = self._clock.seconds() + _ROUTE_MAX_AGE
            self._forget_if_idle(dest)
            return
        self._set_route(dest, None)
        make = outcomes.permanent_failure if permanent else outcomes.temporary_failure
        self._fail_queued(dest, lambda rid: make(rid, reason))

    def _set_route(self, dest: _Destination, route: list[_Target] | None) -> None:
        """Use ``route`` for new connections; connections to hosts no longer in it take no more jobs."""
        dest.route = route
        dest.route_expires = self._clock.seconds() + _ROUTE_MAX_AGE
        keys = frozenset(target.key for target in route or ())
        if keys == dest.route_keys:
            return
        dest.route_keys = keys
        for waiter in dest.idle:  # lingering connections to a host the domain left: QUIT
            if self._idle_workers.get(waiter) not in keys:
                _settle(waiter, None)

    def _route(self, dest: _Destination, hosts: Sequence[MailHost]) -> list[_Target]:
        if dest.testing:
            test = self.config.test_target
            return [_Target("test-target", test[0], test[1])] if test else []
        return [_Target(h.name, h.address, self.config.smtp_port) for h in hosts]

    def _no_route(self, dest: _Destination) -> str:
        if dest.testing:
            return "testing mailing, but this satellite has no test_target"
        return f"no mail host for {dest.domain}"

    # -- workers -----------------------------------------------------------------------------
    async def _worker(self, dest: _Destination, route: list[_Target], target_index: int) -> None:
        """Open a connection (falling back along the MX list), then send queued jobs on it."""
        try:
            try:
                opened = await self._open(dest, route, target_index)
            finally:
                dest.connecting -= 1
            if opened is None:
                return
            connection, target = opened
            dest.connected += 1
            try:
                await self._send_queued(dest, connection, target)
            finally:
                dest.connected -= 1
                self._release(target)
                self._capacity_freed(dest)  # blocked destinations may start while we QUIT
                await connection.close()
        finally:
            dest.workers -= 1
            self._capacity_freed(dest)
            self._forget_if_idle(dest)

    async def _open(
        self, dest: _Destination, route: list[_Target], index: int
    ) -> tuple[SmtpConnection, _Target] | None:
        """Connect to ``route[index]``, else to the following targets; None if all fail."""
        target = route[index]
        error: SmtpConnectError | None = None
        while True:
            connection = SmtpConnection(self._options_for(target.key), target.name, self._clock)
            try:
                await connection.connect(target.address, target.port)
                _check_usable(connection)
                return connection, target
            except SmtpConnectError as failed:
                if failed.tls_failed and self._plaintext_from_now(target.key):
                    log.info("TLS with %s [%s] failed (%s): trying again in plaintext", target.name,
                             target.address, failed.reason)
                    continue
                error = failed
                log.info("cannot connect to %s [%s]: %s", target.name, target.address, failed.reason)
                self.backoff.failure(target.key, failed.reply_code)
                self._release(target)
            next_target = self._next_target(route, index)
            if next_target is None:
                break
            index, target = next_target
            self._reserve(target)
        if not self._busy_after(route, index):
            self._connection_failed_everywhere(dest, target, error)
        return None

    def _options_for(self, key: tuple[str, int]) -> SmtpClientOptions:
        """Plaintext for a host whose TLS failed lately; otherwise STARTTLS when offered."""
        until = self._plaintext_until.get(key)
        if until is not None and until <= self._clock.seconds():
            del self._plaintext_until[key]
            until = None
        return self._options if until is None else self._plaintext

    def _plaintext_from_now(self, key: tuple[str, int]) -> bool:
        """Note that ``key``'s TLS failed; whether it was not noted already (then try again)."""
        if not self._options.starttls or key in self._plaintext_until:
            return False
        self._plaintext_until[key] = self._clock.seconds() + _PLAINTEXT_SECONDS
        return True

    def _next_target(self, route: list[_Target], index: int) -> tuple[int, _Target] | None:
        for next_index in range(index + 1, len(route)):
            target = route[next_index]
            if self.backoff.remaining(target.key) > 0:
                continue
            if self._per_host.get(target.key, 0) < self.config.max_connections_per_host:
                return next_index, target
        return None

    def _busy_after(self, route: list[_Target], index: int) -> bool:
        """Whether a target after ``index`` was skipped only because its pool is full."""
        return any(
            self.backoff.remaining(t.key) == 0
            and self._per_host.get(t.key, 0) >= self.config.max_connections_per_host
            for t in route[index + 1 :]
        )

    def _connection_failed_everywhere(
        self, dest: _Destination, target: _Target, error: SmtpConnectError | None
    ) -> None:
        # Other workers connected: they will serve the queue. Otherwise the domain is down now.
        if dest.connected or error is None:
            return
        reason = f"{target.name} [{target.address}]: {error.reason}"
        self._fail_queued(dest, lambda rid: outcomes.temporary_failure(
            rid, reason, error.smtp_log, target.name, error.reply_code))

    async def _send_queued(
        self, dest: _Destination, connection: SmtpConnection, target: _Target
    ) -> None:
        """Send queued jobs on ``connection``, the next one started while the one before waits
        for its last reply (with PIPELINING, its envelope rides with that body); outcomes in order."""
        in_flight: deque[tuple[DeliveryJob, asyncio.Future[DeliveryOutcome | None]]] = deque()
        not_tried = 0  # jobs put back at the head of the queue, in their order
        while True:
            job = self._startable_job(dest, connection, target, in_flight)
            if job is None and not in_flight and self._can_start(dest, connection, target):
                job = await self._next_job(dest, target)  # linger for one
                if job is not None and not self._can_start(dest, connection, target):
                    # closed by the server, or the domain's MX moved, while we lingered
                    dest.jobs.appendleft(job)
                    job = None
                if job is None:
                    return
            if job is not None:
                reason = self._hold(job) if self._hold is not None else None
                if reason is not None:  # not sent after all: reported untried
                    self._report(job, outcomes.temporary_failure(job.recipient_id, reason))
                    continue
                in_flight.append((job, connection.start(job.envelope_from, job.recipient, job.data,
                                                        job.recipient_id)))
                continue
            if not in_flight:
                return
            sent, started = in_flight.popleft()
            outcome = await started
            if outcome is None:  # the connection ended before it was tried: another one takes it
                dest.jobs.insert(not_tried, sent)
                not_tried += 1
                continue
            self._account(target, outcome, connection.saw_421)
            self._report(sent, outcome)

    def _can_start(self, dest: _Destination, connection: SmtpConnection, target: _Target) -> bool:
        return (connection.usable and connection.messages_sent < self.config.max_messages_per_connection
                and target.key in dest.route_keys)  # the domain's MX may have moved since

    def _startable_job(self, dest: _Destination, connection: SmtpConnection, target: _Target,
                       in_flight: deque[Any]) -> DeliveryJob | None:
        """A queued job to start now: at most two messages in flight on a connection."""
        if len(in_flight) < _IN_FLIGHT and dest.jobs and self._can_start(dest, connection, target):
            return dest.jobs.popleft()
        return None

    async def _next_job(self, dest: _Destination, target: _Target) -> DeliveryJob | None:
        """The next queued job, or one submitted within ``idle_timeout``; None when none comes.

        A lingering worker also gets None when another destination needs its connection slot.
        """
        if dest.jobs:
            return dest.jobs.popleft()
        if any(waiting is not dest for waiting in self._blocked.values()):
            return None  # other destinations wait for a slot: give ours up rather than linger
        waiter: asyncio.Future[DeliveryJob | None] = asyncio.get_running_loop().create_future()
        dest.idle.append(waiter)
        self._idle_workers[waiter] = target.key
        self._linger_ends[waiter] = self._clock.seconds() + self.config.idle_timeout
        if self._linger_timer is None:
            self._linger_timer = self._clock.callLater(self.config.idle_timeout, self._end_lingers)
        try:
            return await waiter
        finally:
            del self._idle_workers[waiter]
            del self._linger_ends[waiter]
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                dest.woken -= 1

    def _end_lingers(self) -> None:
        """Give None to the lingering workers whose ``idle_timeout`` is over; wait for the next."""
        now = self._clock.seconds()
        for waiter, end in self._linger_ends.items():
            if end <= now:
                _settle(waiter, None)
        waiting = [end for waiter, end in self._linger_ends.items() if not waiter.done()]
        self._linger_timer = self._clock.callLater(min(waiting) - now, self._end_lingers) if waiting else None

    def _account(self, target: _Target, outcome: DeliveryOutcome, saw_421: bool) -> None:
        if outcome.status == outcomes.FINISHED:
            self.backoff.success(target.key)
        elif outcome.status == outcomes.WARNING and (saw_421 or not outcome.recipient_level):
            self.backoff.failure(target.key, 421 if saw_421 else outcome.reply_code)


def _check_usable(connection: SmtpConnection) -> None:
    """Raise SmtpConnectError if ``connection`` is closed or closing before its first message.

    Such a connection (a 421 right after the hello) is a failed one: counted by the back-off,
    else every worker would end at once and its replacement reconnect, without end.
    """
    if connection.usable:
        return
    connection.abort()
    reply_code = 421 if connection.saw_421 else None
    raise SmtpConnectError("closed by the server before the first message", [], reply_code)


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
