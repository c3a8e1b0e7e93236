"""DeliveryScheduler against real SMTP servers on 127.0.0.x, with an in-test resolver."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cloudmailing.satellite import delivery
from cloudmailing.satellite.delivery import (
    DeliveryConfig,
    DeliveryJob,
    DeliveryScheduler,
    HostBackoff,
)
from cloudmailing.satellite.mx_resolver import MailHost, MxResolver, PermanentDnsError, TemporaryDnsError
from cloudmailing.satellite.outcomes import ERROR, FINISHED, WARNING, DeliveryOutcome
from cloudmailing.satellite.smtp_client import SmtpConnection
from tests.helpers import run, until
from tests.satellite import dns_server as dns_helper
from tests.satellite.dns_server import DnsTestServer
from tests.satellite.scripted_smtp import Scripted, ScriptedServer, default_line
from tests.satellite.smtp_servers import Behaviour, start_servers

dns_server = dns_helper.dns_server  # fixture: a started DnsTestServer

MESSAGE = b"From: <s@example.test>\r\nSubject: hi\r\n\r\nHello.\r\n"


def aio_test(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Deferred[None]]:
    """Run an asyncio test coroutine on the reactor (pytest-twisted waits for the Deferred)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Deferred[None]:
        return Deferred.fromFuture(asyncio.ensure_future(test(*args, **kwargs)))

    return wrapper


class StaticResolver:
    """Domain → MX hosts, or the DNS error to raise; counts lookups."""

    def __init__(self, table: dict[str, list[MailHost] | Exception]) -> None:
        self.table = table
        self.lookups = 0

    async def resolve(self, domain: str) -> list[MailHost]:
        self.lookups += 1
        answer = self.table[domain]
        if isinstance(answer, Exception):
            raise answer
        return answer


def mx(address: str, preference: int = 10) -> MailHost:
    return MailHost(f"mx-{address}", address, preference)


class World:
    """Servers on several loopback addresses sharing one port, and a scheduler to drive."""

    def __init__(self, behaviours: dict[str, Behaviour]) -> None:
        self.servers, self.port = start_servers(behaviours)
        self.outcomes: list[tuple[DeliveryJob, DeliveryOutcome]] = []
        self.scheduler: DeliveryScheduler | None = None

    def start(self, table: dict[str, list[MailHost] | Exception], clock: Clock | None = None,
              hold: Callable[[DeliveryJob], str | None] | None = None, **config: Any) -> DeliveryScheduler:
        settings = {"helo_hostname": "sat.example.test", "smtp_port": self.port,
                    "connect_timeout": 5.0, "reply_timeout": 5.0, **config}
        self.resolver = StaticResolver(table)
        self.scheduler = DeliveryScheduler(
            DeliveryConfig(**settings), self.resolver,
            lambda job, outcome: self.outcomes.append((job, outcome)), clock or reactor, hold=hold,
        )
        return self.scheduler

    def statuses(self) -> dict[str, str]:
        return {job.recipient_id: outcome.status for job, outcome in self.outcomes}

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        for server in self.servers.values():
            await server.stop()


@pytest.fixture
def world() -> Iterator[Callable[[dict[str, Behaviour]], World]]:
    made: list[World] = []

    def make(behaviours: dict[str, Behaviour]) -> World:
        made.append(World(behaviours))
        return made[-1]

    yield make
    for item in made:
        run(item.stop())


def jobs(domain: str, count: int, prefix: str = "", testing: bool = False) -> list[DeliveryJob]:
    prefix = prefix or domain
    return [
        DeliveryJob(f"{prefix}-{i}", domain, "bounce@example.test", f"user{i}@{domain}", MESSAGE,
                    "mailing-1", testing)
        for i in range(count)
    ]


async def deliver(scheduler: DeliveryScheduler, batch: list[DeliveryJob]) -> None:
    for job in batch:
        scheduler.submit(job)
    await scheduler.drain()


# -- delivering -----------------------------------------------------------------------------------


@aio_test
async def test_every_job_delivered_and_reported_once(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]})
    await deliver(scheduler, jobs("a.test", 40))

    assert w.statuses() == {f"a.test-{i}": FINISHED for i in range(40)}
    assert len(w.outcomes) == 40
    server = w.servers["127.0.0.2"]
    assert sorted(m.rcpt_to[0] for m in server.messages) == sorted(f"user{i}@a.test" for i in range(40))
    assert server.connections_total <= 4  # connections were reused
    assert w.resolver.lookups == 1
    assert all(o.mx_host == "mx-127.0.0.2" for _, o in w.outcomes)


@pytest.mark.parametrize("bound", ["max_connections_per_host", "max_connections"])
@aio_test
async def test_jobs_arriving_in_bursts_reuse_the_open_connections(world: Any, bound: str) -> None:
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, **{"max_connections_per_host": 10, bound: 4})
    batch = jobs("a.test", 200)
    for start in range(0, 200, 20):  # as composed messages come: in chunks, the queue empty between
        for job in batch[start:start + 20]:
            scheduler.submit(job)
        await asyncio.sleep(0.05)
    await scheduler.drain()

    assert set(w.statuses().values()) == {FINISHED} and len(w.outcomes) == 200
    server = w.servers["127.0.0.2"]
    assert server.max_concurrent == 4
    assert server.connections_total == 4  # its own full pool never makes a destination close connections


@aio_test
async def test_per_host_connection_bound(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, max_connections_per_host=3)
    await deliver(scheduler, jobs("a.test", 90))

    assert w.servers["127.0.0.2"].max_concurrent == 3
    assert set(w.statuses().values()) == {FINISHED}


@aio_test
async def test_global_connection_bound(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")], "b.test": [mx("127.0.0.3")]},
                        max_connections=3, max_connections_per_host=4)
    peak = 0

    def watch(job: DeliveryJob, outcome: DeliveryOutcome) -> None:
        nonlocal peak
        peak = max(peak, scheduler.open_connections)

    scheduler._on_outcome = watch  # observe the bound while delivering
    await deliver(scheduler, jobs("a.test", 60) + jobs("b.test", 60))

    assert peak == 3
    assert w.servers["127.0.0.2"].message_count == w.servers["127.0.0.3"].message_count == 60


@aio_test
async def test_messages_per_connection_limit(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]},
                        max_connections_per_host=1, max_messages_per_connection=5)
    await deliver(scheduler, jobs("a.test", 20))

    server = w.servers["127.0.0.2"]
    assert server.connections_total == 4 and server.message_count == 20


@aio_test
async def test_queued_jobs_ride_on_one_connection_two_in_flight(world: Any) -> None:
    """Each next envelope goes out with the body before it: one segment per message."""
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, max_connections_per_host=1)
    await deliver(scheduler, jobs("a.test", 6))

    assert w.statuses() == {f"a.test-{i}": FINISHED for i in range(6)}
    assert [o.recipient for o, _ in w.outcomes] == [f"user{i}@a.test" for i in range(6)]  # in order
    segments = [s for s in w.servers["127.0.0.2"].batches[0] if s]
    assert segments[1:7] == [["MAIL", "RCPT", "DATA"]] + [[".", "MAIL", "RCPT", "DATA"]] * 5


@aio_test
async def test_a_job_held_back_just_before_its_transaction_is_reported_untried(world: Any) -> None:
    """The daemon's ``hold`` (its lease is over) is asked as each transaction is about to start:
    a job it names a reason for is not sent, and gets a WARNING with that reason."""
    w = world({"127.0.0.2": Behaviour()})
    asked: list[str] = []
    late = {"a.test-1", "a.test-4"}

    def hold(job: DeliveryJob) -> str | None:
        asked.append(job.recipient_id)
        return "lease expired before sending" if job.recipient_id in late else None

    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, hold=hold, max_connections_per_host=1)
    await deliver(scheduler, jobs("a.test", 6))

    assert sorted(asked) == [f"a.test-{i}" for i in range(6)]  # once each
    assert w.statuses() == {f"a.test-{i}": WARNING if f"a.test-{i}" in late else FINISHED for i in range(6)}
    assert {o.reply_text for _, o in w.outcomes if o.status == WARNING} == {"lease expired before sending"}
    received = [m.rcpt_to[0] for m in w.servers["127.0.0.2"].messages]
    assert received == [f"user{i}@a.test" for i in (0, 2, 3, 5)]  # the others never went out


@aio_test
async def test_jobs_arriving_together_ride_on_the_connection_woken_for_the_first(world: Any) -> None:
    """Two lingering connections; two jobs at once: the second goes with the first, riding,
    rather than waking the other connection."""
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, max_connections_per_host=2, idle_timeout=5.0)
    server = w.servers["127.0.0.2"]

    def sent_per_connection() -> list[int]:
        return [sum(segment.count(".") for segment in batches) for batches in server.batches]

    await deliver(scheduler, jobs("a.test", 2, "first"))  # opens two connections
    assert server.connections_total == 2
    before = sent_per_connection()
    await deliver(scheduler, jobs("a.test", 2, "second"))

    assert w.statuses() == {"first-0": FINISHED, "first-1": FINISHED, "second-0": FINISHED, "second-1": FINISHED}
    assert server.connections_total == 2
    added = [after - earlier for after, earlier in zip(sent_per_connection(), before, strict=True)]
    assert sorted(added) == [0, 2]  # one connection sent both
    both = [segment for segment in server.batches[added.index(2)] if segment]
    assert both[-3:] == [["MAIL", "RCPT", "DATA"], [".", "MAIL", "RCPT", "DATA"], ["."]]  # the second rode


@aio_test
async def test_a_job_whose_connection_closed_before_it_was_tried_goes_to_another(world: Any) -> None:
    """The server hangs up after each message, unasked: the job riding on it was not tried and
    is sent on the next connection, reported once, not failed."""
    w = world({"127.0.0.2": Behaviour(close_after_messages=1)})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, max_connections_per_host=1)
    await deliver(scheduler, jobs("a.test", 4))

    assert w.statuses() == {f"a.test-{i}": FINISHED for i in range(4)} and len(w.outcomes) == 4
    server = w.servers["127.0.0.2"]
    assert [m.rcpt_to for m in server.messages] == [[f"user{i}@a.test"] for i in range(4)]
    assert server.connections_total == 4


@aio_test
async def test_lingering_connection_takes_later_jobs(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, idle_timeout=5.0)
    await deliver(scheduler, jobs("a.test", 1, "first"))
    await deliver(scheduler, jobs("a.test", 1, "second"))

    assert w.servers["127.0.0.2"].connections_total == 1
    assert w.statuses() == {"first-0": FINISHED, "second-0": FINISHED}


@aio_test
async def test_idle_connection_is_closed_after_idle_timeout(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour()})
    clock = Clock()
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, clock=clock, idle_timeout=2.0)
    await deliver(scheduler, jobs("a.test", 1))
    server = w.servers["127.0.0.2"]
    assert server.open_connections == 1
    clock.advance(2.0)
    for _ in range(100):
        if server.open_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert server.open_connections == 0 and scheduler.open_connections == 0


@aio_test
async def test_each_lingering_connection_ends_its_own_idle_timeout_after_its_last_message(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
    clock = Clock()
    scheduler = w.start({"a.test": [mx("127.0.0.2")], "b.test": [mx("127.0.0.3")]}, clock=clock, idle_timeout=2.0)
    await deliver(scheduler, jobs("a.test", 1))
    clock.advance(1.5)
    await deliver(scheduler, jobs("b.test", 1))
    first, second = w.servers["127.0.0.2"], w.servers["127.0.0.3"]

    async def settled(server: Any, open_connections: int) -> bool:
        for _ in range(100):
            if server.open_connections == open_connections:
                return True
            await asyncio.sleep(0.01)
        return False

    clock.advance(0.5)  # 2 s after a.test's last message, 0.5 s after b.test's
    assert await settled(first, 0) and second.open_connections == 1
    clock.advance(1.4)
    await asyncio.sleep(0.05)
    assert second.open_connections == 1
    clock.advance(0.1)
    assert await settled(second, 0) and scheduler.open_connections == 0


# -- refusals -------------------------------------------------------------------------------------


@aio_test
async def test_rejections_and_greylisting(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour(rcpt_code=550), "127.0.0.3": Behaviour(tempfail_first=True)})
    scheduler = w.start({"reject.test": [mx("127.0.0.2")], "grey.test": [mx("127.0.0.3")]})
    await deliver(scheduler, jobs("reject.test", 3) + jobs("grey.test", 3))

    by_id = {job.recipient_id: outcome for job, outcome in w.outcomes}
    assert {by_id[f"reject.test-{i}"].reply_code for i in range(3)} == {550}
    assert {by_id[f"reject.test-{i}"].status for i in range(3)} == {ERROR}
    assert {(by_id[f"grey.test-{i}"].status, by_id[f"grey.test-{i}"].reply_code) for i in range(3)} == {
        (WARNING, 451)}

    w.outcomes.clear()
    await deliver(scheduler, jobs("grey.test", 3))  # the master's retry
    assert set(w.statuses().values()) == {FINISHED}
    assert w.servers["127.0.0.3"].message_count == 3


@aio_test
async def test_dns_failures(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({
        "gone.test": PermanentDnsError("gone.test", "NXDOMAIN"),
        "flaky.test": TemporaryDnsError("flaky.test", "SERVFAIL"),
    })
    await deliver(scheduler, jobs("gone.test", 2) + jobs("flaky.test", 2))

    by_id = {job.recipient_id: outcome for job, outcome in w.outcomes}
    assert (by_id["gone.test-0"].status, by_id["gone.test-0"].reply_text) == (ERROR, "NXDOMAIN")
    assert (by_id["flaky.test-1"].status, by_id["flaky.test-1"].retryable) == (WARNING, True)
    assert len(w.outcomes) == 4


@aio_test
async def test_fallback_to_second_mx_when_first_refuses(world: Any) -> None:
    # 127.0.0.4 has no server: connections to it are refused; 127.0.0.5 answers 421.
    w = world({"127.0.0.2": Behaviour(), "127.0.0.5": Behaviour(greeting_code=421)})
    scheduler = w.start({
        "a.test": [mx("127.0.0.4", 5), mx("127.0.0.2", 10)],
        "b.test": [mx("127.0.0.5", 5), mx("127.0.0.2", 10)],
    })
    await deliver(scheduler, jobs("a.test", 5) + jobs("b.test", 5))

    assert set(w.statuses().values()) == {FINISHED}
    assert {o.mx_host for _, o in w.outcomes} == {"mx-127.0.0.2"}
    assert w.servers["127.0.0.2"].message_count == 10


@aio_test
async def test_every_mx_down_reports_warnings(world: Any) -> None:
    w = world({"127.0.0.5": Behaviour(greeting_code=421)})
    scheduler = w.start({"down.test": [mx("127.0.0.4", 5), mx("127.0.0.5", 10)]})
    await deliver(scheduler, jobs("down.test", 6))

    assert len(w.outcomes) == 6
    assert {(o.status, o.retryable) for _, o in w.outcomes} == {(WARNING, True)}
    last = w.outcomes[0][1]
    assert last.reply_code == 421 and last.mx_host == "mx-127.0.0.5"


@aio_test
async def test_hanging_server_times_out(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour(hang_at="mail")})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, reply_timeout=0.2, max_connections_per_host=1)
    await deliver(scheduler, jobs("a.test", 2))

    assert {(o.status, o.reply_code) for _, o in w.outcomes} == {(WARNING, None)}
    assert all("no reply within 0.2 s" in o.reply_text for _, o in w.outcomes)


@aio_test
async def test_test_target_receives_testing_mailings(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
    scheduler = w.start(
        {"real.test": [mx("127.0.0.2")], "gone.test": PermanentDnsError("gone.test", "NXDOMAIN")},
        test_target=("127.0.0.3", w.port),
    )
    await deliver(scheduler, jobs("real.test", 3, "test", testing=True)
                  + jobs("real.test", 2, "live") + jobs("gone.test", 1, "gone", testing=True))

    assert w.servers["127.0.0.3"].message_count == 3  # the testing mailing
    assert w.servers["127.0.0.2"].message_count == 2  # the regular one
    assert w.statuses()["gone-0"] == ERROR  # DNS still decides deliverability


@aio_test
async def test_failing_callback_does_not_lose_other_outcomes(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]})
    seen: list[str] = []

    def flaky(job: DeliveryJob, outcome: DeliveryOutcome) -> None:
        seen.append(job.recipient_id)
        if len(seen) == 1:
            raise RuntimeError("callback bug")

    scheduler._on_outcome = flaky
    await deliver(scheduler, jobs("a.test", 5))
    assert len(seen) == 5 and scheduler.pending == 0


# -- back-off -------------------------------------------------------------------------------------


def test_backoff_grows_and_resets() -> None:
    clock = Clock()
    backoff = HostBackoff(clock, DeliveryConfig(backoff_initial=5, backoff_factor=2,
                                                backoff_maximum=15, backoff_burst=3))
    key = ("192.0.2.1", 25)
    backoff.failure(key, 451)
    backoff.failure(key, None)
    assert backoff.remaining(key) == 0
    backoff.failure(key, 451)  # third in a row: a burst
    assert backoff.remaining(key) == 5
    clock.advance(5)
    assert backoff.remaining(key) == 0
    backoff.failure(key, 421)  # a 421 pauses at once, longer each time
    assert backoff.remaining(key) == 10
    backoff.failure(key, 421)  # same wave (already paused): no growth
    assert backoff.remaining(key) == 10
    clock.advance(10)
    backoff.failure(key, 421)
    assert backoff.remaining(key) == 15  # capped
    assert backoff.remaining(("192.0.2.2", 25)) == 0
    backoff.success(key)
    assert backoff.remaining(key) == 0
    backoff.failure(key, 421)
    assert backoff.remaining(key) == 5


@aio_test
async def test_backoff_on_one_destination_does_not_slow_another(world: Any) -> None:
    w = world({"127.0.0.5": Behaviour(greeting_code=421), "127.0.0.2": Behaviour()})
    clock = Clock()
    scheduler = w.start({"busy.test": [mx("127.0.0.5")], "fine.test": [mx("127.0.0.2")]},
                        clock=clock, backoff_initial=30.0, max_backoff_wait=10.0)
    busy, fine = w.servers["127.0.0.5"], w.servers["127.0.0.2"]

    await deliver(scheduler, jobs("busy.test", 5, "busy1") + jobs("fine.test", 5, "fine1"))
    attempts = busy.connections_total
    assert scheduler.backoff.remaining(("127.0.0.5", w.port)) == 30.0
    assert scheduler.backoff.remaining(("127.0.0.2", w.port)) == 0

    # While busy.test backs off: its jobs are deferred without a connection; fine.test flows.
    await deliver(scheduler, jobs("busy.test", 5, "busy2") + jobs("fine.test", 5, "fine2"))
    assert busy.connections_total == attempts
    assert fine.message_count == 10
    statuses = w.statuses()
    assert {statuses[f"busy2-{i}"] for i in range(5)} == {WARNING}
    assert {statuses[f"fine2-{i}"] for i in range(5)} == {FINISHED}
    assert all("backing off" in o.reply_text for j, o in w.outcomes if j.recipient_id.startswith("busy2"))

    clock.advance(30.0)  # the pause is over: busy.test is tried again
    await deliver(scheduler, jobs("busy.test", 1, "busy3"))
    assert busy.connections_total > attempts


@aio_test
async def test_greylisting_replies_to_rcpt_do_not_pause_the_host_but_failing_transactions_do(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour(tempfail_first=True), "127.0.0.3": Behaviour(data_code=451)})
    scheduler = w.start({"grey.test": [mx("127.0.0.2")], "busy.test": [mx("127.0.0.3")]},
                        clock=Clock(), backoff_burst=5)
    await deliver(scheduler, jobs("grey.test", 12, "first") + jobs("busy.test", 12))

    first = {job.recipient_id: outcome for job, outcome in w.outcomes if job.domain == "grey.test"}
    assert {o.status for o in first.values()} == {WARNING} and len(first) == 12
    assert all(o.recipient_level and o.reply_code == 451 for o in first.values())
    assert scheduler.backoff.remaining(("127.0.0.2", w.port)) == 0  # greylisting judges recipients
    assert scheduler.backoff.remaining(("127.0.0.3", w.port)) > 0  # 451 to DATA: the host is in trouble
    busy = [o for job, o in w.outcomes if job.domain == "busy.test"]
    assert not any(o.recipient_level for o in busy)

    await deliver(scheduler, jobs("grey.test", 12, "again"))  # the retries: past the greylist
    assert {w.statuses()[f"again-{i}"] for i in range(12)} == {FINISHED}


@aio_test
async def test_short_backoff_holds_jobs_until_it_ends(world: Any) -> None:
    w = world({"127.0.0.2": Behaviour()})
    clock = Clock()
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, clock=clock, backoff_initial=5.0,
                        max_backoff_wait=60.0)
    scheduler.backoff.failure(("127.0.0.2", w.port), 421)  # as if a 421 had just been seen
    for job in jobs("a.test", 3):
        scheduler.submit(job)
    await asyncio.sleep(0.1)
    assert w.outcomes == [] and w.servers["127.0.0.2"].connections_total == 0

    clock.advance(5.0)
    await scheduler.drain()
    assert set(w.statuses().values()) == {FINISHED}


@pytest.mark.parametrize("bound", ["global", "per_host"])
@aio_test
async def test_lingering_connection_yields_its_slot(world: Any, bound: str) -> None:
    w = world({"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
    limits = {"max_connections": 1} if bound == "global" else {"max_connections_per_host": 1}
    other = "127.0.0.3" if bound == "global" else "127.0.0.2"
    clock = Clock()  # never advanced: only a wake-up can end the linger
    scheduler = w.start({"a.test": [mx("127.0.0.2")], "b.test": [mx(other)]},
                        clock=clock, idle_timeout=30.0, **limits)
    await deliver(scheduler, jobs("a.test", 1))
    assert scheduler.open_connections == 1  # lingering

    await asyncio.wait_for(deliver(scheduler, jobs("b.test", 1)), timeout=5)
    assert w.statuses() == {"a.test-0": FINISHED, "b.test-0": FINISHED}


@aio_test
async def test_a_domain_sharing_a_busy_mx_gets_the_next_free_slot(world: Any) -> None:
    """One connection per host, two messages per connection: small.test, arriving while big.test
    sends, gets the slot when big.test's connection ends, not after the whole of big.test."""
    w = world({"127.0.0.2": Behaviour()})
    scheduler = w.start({"big.test": [mx("127.0.0.2")], "small.test": [mx("127.0.0.2")]},
                        max_connections_per_host=1, max_messages_per_connection=2)
    order: list[str] = []

    def arrive(job: DeliveryJob, outcome: DeliveryOutcome) -> None:
        order.append(job.recipient_id)
        if job.recipient_id == "big.test-0":
            scheduler.submit(jobs("small.test", 1)[0])

    scheduler._on_outcome = arrive
    await deliver(scheduler, jobs("big.test", 30))

    assert len(order) == 31
    assert order.index("small.test-0") <= 5, order


# -- DNS changes ----------------------------------------------------------------------------------


@aio_test
async def test_a_busy_domain_follows_its_mx_when_it_moves(world: Any, dns_server: DnsTestServer) -> None:
    """The route is resolved again once old (the resolver keeps each answer for its TTL): a domain
    that never stops getting work, its connection lingering between messages, sees its MX move."""
    w = world({"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
    old, new = w.servers["127.0.0.2"], w.servers["127.0.0.3"]
    dns_server.add_mx("a.test", "mx1.a.test", preference=10, ttl=1)
    dns_server.add_a("mx1.a.test", "127.0.0.2", ttl=1)
    clock = Clock()
    resolver = MxResolver([dns_server.address], clock=clock, rng=random.Random(1), timeout=2)
    scheduler = w.scheduler = DeliveryScheduler(
        DeliveryConfig(helo_hostname="sat.example.test", smtp_port=w.port, idle_timeout=30.0),
        resolver, lambda job, outcome: w.outcomes.append((job, outcome)), clock)
    await deliver(scheduler, jobs("a.test", 1, "first"))
    dns_server.remove("a.test")
    dns_server.remove("mx1.a.test")
    dns_server.add_mx("a.test", "mx2.a.test", preference=10, ttl=1)
    dns_server.add_a("mx2.a.test", "127.0.0.3", ttl=1)

    clock.advance(2.0)  # the old answer's TTL is over
    for i in range(3):  # one message every 0.1 s: the connection lingers between them
        await deliver(scheduler, jobs("a.test", 1, f"later{i}"))
        await asyncio.sleep(0.1)

    assert set(w.statuses().values()) == {FINISHED}
    assert w.outcomes[-1][1].mx_host == "mx2.a.test" and new.message_count >= 1
    await until(lambda: old.open_connections == 0, timeout=5)  # the old MX's connection said QUIT


class HangsUpAfterHello(asyncio.Protocol):
    """Greets and answers EHLO, then says ``goodbye`` and hangs up 20 ms later (going down)."""

    def __init__(self, goodbye: bytes, accepted: list[HangsUpAfterHello]) -> None:
        self.goodbye = goodbye
        accepted.append(self)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"220 mx.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if data.upper().startswith(b"EHLO"):
            self.transport.write(b"250 mx.test\r\n")
            asyncio.get_running_loop().call_later(0.02, self.hang_up)

    def hang_up(self) -> None:
        self.transport.write(self.goodbye)
        self.transport.close()


class LateConnection(SmtpConnection):
    """Returns from connect() 0.1 s after the hello: the server has hung up by then."""

    async def connect(self, host_ip: str, port: int = 25) -> None:
        await super().connect(host_ip, port)
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(("goodbye", "reply_code"), [(b"421 4.3.2 shutting down\r\n", 421), (b"", None)])
@aio_test
async def test_a_connection_closed_before_its_first_message_is_a_failed_one(
    world: Any, monkeypatch: pytest.MonkeyPatch, goodbye: bytes, reply_code: int | None
) -> None:
    """Whatever the SMTP client lets through, a connection that cannot take its first message
    counts as a failed connection (reported, backed off), not one to replace at once, forever."""
    monkeypatch.setattr(delivery, "SmtpConnection", LateConnection)
    accepted: list[HangsUpAfterHello] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: HangsUpAfterHello(goodbye, accepted), "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    w = world({})
    scheduler = w.start({"a.test": [mx("127.0.0.2")]}, smtp_port=port)
    try:
        for job in jobs("a.test", 2):
            scheduler.submit(job)
        await asyncio.wait_for(scheduler.drain(), 3)
    finally:
        server.close()

    assert {(o.status, o.reply_code) for _, o in w.outcomes} == {(WARNING, reply_code)}
    assert len(w.outcomes) == 2 and len(accepted) <= 2
    paused = scheduler.backoff.remaining(("127.0.0.2", port)) > 0
    assert paused == (reply_code == 421)


def _broken_tls(p: Scripted, line: bytes) -> None:
    """Offers STARTTLS, says go ahead, then answers the handshake with an alert (a broken TLS)."""
    if line.upper().startswith(b"EHLO"):
        p.send(b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
    elif line.upper().startswith(b"STARTTLS"):
        p.send(b"220 2.0.0 ready\r\n")
        p.lines.append(b"(handshake)")
    else:
        default_line(p, line)


def _tls_alert(p: Scripted, data: bytes) -> bool:
    if p.lines and p.lines[-1] == b"(handshake)":
        p.send(b"\x15\x03\x01\x00\x02\x02\x28")  # a TLS alert: handshake_failure
        p.tcp.close()
        return True
    return False


@aio_test
async def test_a_host_whose_tls_fails_gets_the_message_in_plaintext_and_keeps_getting_plaintext():
    """Opportunistic TLS: a handshake that fails after STARTTLS was offered is no reason to
    bounce; the message goes again at once without STARTTLS, as MTAs do, and that host gets
    plaintext for a while."""
    server = ScriptedServer(_broken_tls, on_raw=_tls_alert)
    port = await server.start("127.0.0.2")
    got: list[DeliveryOutcome] = []

    class OneHost:
        async def resolve(self, domain: str) -> list[MailHost]:
            return [MailHost("mx.tls.test", "127.0.0.2", 10)]

    scheduler = DeliveryScheduler(DeliveryConfig(helo_hostname="sat.test", smtp_port=port, connect_timeout=2,
                                                 reply_timeout=2), OneHost(), lambda j, o: got.append(o), reactor)
    try:
        for i in range(2):
            scheduler.submit(DeliveryJob(f"r{i}", "tls.test", "bounce@example.test", f"u{i}@tls.test", MESSAGE, "m1"))
            await asyncio.wait_for(scheduler.drain(), 10)
        assert [o.status for o in got] == [FINISHED, FINISHED], [o.reply_text for o in got]
        starttls = [any(line.upper() == b"STARTTLS" for line in p.lines) for p in server.connections]
        assert starttls[0] and not any(starttls[1:])  # tried once, then plaintext
    finally:
        await scheduler.close()
        server.stop()
