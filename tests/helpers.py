"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, TypeVar

import pytest
import pytest_twisted
from pymongo import monitoring
from twisted.internet.defer import Deferred

T = TypeVar("T")


def aio_test(function: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an ``async def`` test (asyncio code) on the test reactor; fixtures work as usual."""

    @pytest_twisted.ensureDeferred
    @functools.wraps(function)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await Deferred.fromFuture(asyncio.ensure_future(function(*args, **kwargs)))

    return wrapper


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, polling every 20 ms; fail after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an asyncio coroutine from a fixture (not from a test body: use ``aio_test``)."""
    return pytest_twisted.blockon(Deferred.fromFuture(asyncio.ensure_future(coro)))  # type: ignore[no-any-return]


async def running_mailing(api: Any, count: int, domain: str = "example.org") -> int:
    """Through the API: a mailing of ``count`` recipients (u0@domain, ...), started and RUNNING."""
    mailing_id: int = await api.create_mailing("news@sender.test", "News", "Hi", "<p>Hi</p>", "", "utf-8")
    await api.add_recipients(mailing_id, [{"email": f"u{i}@{domain}"} for i in range(count)])
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    return mailing_id


async def set_statuses(stores: Any, recipient_ids: list[str], status: str, details: dict[str, Any] | None = None,
                       now: Any = None) -> None:
    """Move recipients to ``status`` straight through the storage's write path (as a report would)."""
    import datetime

    from cloudmailing.storage.ledger import Change

    found = await stores.lookup.find(recipient_ids)
    by_block: dict[int, list[int]] = {}
    for recipient in found.values():
        by_block.setdefault(recipient.block.id, []).append(recipient.slot)
    for block_id, slots in by_block.items():
        changes = [Change(slot, status, 1, details=details) for slot in slots]
        await stores.ledger.edit(block_id, lambda block, changes=changes: changes,
                                 now or datetime.datetime(2027, 1, 15))


@contextlib.asynccontextmanager
async def satellite_running(master: Any, data_dir: Any, serial: str, dns: Any, smtp_port: int,
                            **settings: Any) -> AsyncIterator[Any]:
    """A satellite daemon in this process, linked to ``master`` (registered beforehand), delivering
    through the test DNS server to loopback SMTP servers on ``smtp_port``, until the block ends."""
    import random

    from twisted.internet import reactor

    from cloudmailing.config.settings import SatelliteConfig
    from cloudmailing.satellite.daemon import SatelliteDaemon

    defaults = {"secret": "s3cret", "helo_hostname": "sat.test", "connect_timeout": 5, "reply_timeout": 5,
                "compose_workers": 1}
    config = SatelliteConfig(master_port=master.satellite_port, serial=serial, dns_servers=dns.nameserver,
                             smtp_port=smtp_port, **{**defaults, **settings})
    satellite = SatelliteDaemon(config, data_dir, reactor, random.Random(1))
    running = asyncio.ensure_future(satellite.run())
    try:
        yield satellite
    finally:
        await satellite.stop()
        running.cancel()


class CommandWatcher(monitoring.CommandListener):
    """A command listener that looks only at commands started: subclasses define ``started``."""

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def renewed(latest: Callable[[], Awaitable[dict[str, Any] | None]], ends: Any) -> None:
    """Wait until the latest writer's claim ends later than ``ends``: a renewal's database
    round trip (at most 5 s)."""
    for _ in range(500):
        claim = await latest()
        if claim is not None and claim["until"] != ends:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the claim was not renewed")


async def finished_changes(api: Any) -> Any:
    """How many FINISHED changes the cursor reports for each recipient (a ``Counter`` by id)."""
    from collections import Counter

    seen: Counter[str] = Counter()
    cursor = ""
    while True:
        page = await api.get_recipients_status_updated_since(cursor, {"status": ["FINISHED"]}, 1000)
        if not page["recipients"]:
            return seen
        seen.update(record["id"] for record in page["recipients"])
        cursor = page["cursor"]
