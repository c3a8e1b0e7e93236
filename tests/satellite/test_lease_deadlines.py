"""A satellite sends nothing its lease no longer covers, and nothing twice for a lease renewed.

The daemon's own bookkeeping, on a fake clock (``twisted.internet.task.Clock``) where it can be:
when each lease arrived and how long it lasts decide whether a recipient may still start; a lease
that brings back a recipient already held moves it, without queueing it again; and after a
reconnect, the outbox is acknowledged before any lease is asked for.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from cloudmailing.common.link_protocol import LeasedRecipient, Outcome
from cloudmailing.config.settings import SatelliteConfig
from cloudmailing.satellite.compose_pool import MailingSource
from cloudmailing.satellite.daemon import LEASE_EXPIRED, SatelliteDaemon, lease_end
from cloudmailing.satellite.delivery import DeliveryJob
from cloudmailing.satellite.outcomes import DeliveryOutcome
from tests.helpers import aio_test
from tests.satellite.test_composer import CONTENT

LEASE_SECONDS = 30  # margin: the greater of 2 s and a tenth of it, 3 s


def _daemon(tmp_path: Path, reactor: Any) -> SatelliteDaemon:
    settings = SatelliteConfig(master_port=9, serial="sat-d", secret="pw", dns_servers="127.0.0.1:9")
    daemon = SatelliteDaemon(settings, tmp_path / "sat", reactor, random.Random(0))
    # The mailing's content as if fetched already: _submit asks the link for nothing.
    daemon._mailings[7] = (reactor.seconds(), MailingSource.from_content(CONTENT), 0)
    return daemon


def _leased(lease: str, *ids: str) -> list[LeasedRecipient]:
    return [LeasedRecipient(rid, 7, f"{rid}@one.test", "one.test", {}, False, lease) for rid in ids]


def _job(rid: str) -> DeliveryJob:
    return DeliveryJob(rid, "one.test", "news@sender.test", f"{rid}@one.test", b"Subject: x\r\n\r\nx\r\n")


def _waiting(daemon: SatelliteDaemon) -> list[str]:
    return [recipient["id"] for _, recipient in daemon.ahead._waiting]


def test_the_margin_is_two_seconds_or_a_tenth_of_the_lease_at_most_half_of_it():
    assert lease_end(100.0, 300) == 100.0 + 270
    assert lease_end(100.0, 10) == 100.0 + 8
    assert lease_end(100.0, 3) == 100.0 + 1.5  # a lease this short keeps half of itself


@aio_test
async def test_recipients_whose_lease_ran_out_are_neither_composed_nor_sent(tmp_path):
    clock = Clock()
    clock.advance(1000)
    daemon = _daemon(tmp_path, clock)
    try:
        await daemon._submit(None, _leased("L1", "r1", "r2", "r3"), {}, lease_end(clock.seconds(), LEASE_SECONDS))  # type: ignore[arg-type]
        assert _waiting(daemon) == ["r1", "r2", "r3"]
        clock.advance(LEASE_SECONDS - 3 - 0.01)  # just before the lease's end, less the margin
        assert not daemon._late("r1") and daemon._too_late(_job("r1")) is None
        clock.advance(0.01)
        assert daemon._late("r1") and daemon._too_late(_job("r1")) == LEASE_EXPIRED  # what the scheduler asks
        daemon.ahead._dispatch()  # their turn to be composed comes: too late
        assert daemon.ahead.pending == 0 and daemon.ahead.composing == 0
        kept = daemon._outbox.batch(10)
        assert [(o.recipient_id, o.status, o.reply_text, o.lease) for o in kept] == [
            (rid, "WARNING", LEASE_EXPIRED, "L1") for rid in ("r1", "r2", "r3")]
        assert daemon._drained.is_set()  # nothing left leased: reported at once
        assert daemon._deadlines == {}
    finally:
        await daemon.stop()


@aio_test
async def test_a_lease_bringing_back_recipients_held_moves_them_and_queues_none_twice(tmp_path):
    clock = Clock()
    clock.advance(1000)
    daemon = _daemon(tmp_path, clock)
    try:
        first_end = lease_end(clock.seconds(), LEASE_SECONDS)
        await daemon._submit(None, _leased("L1", "r1", "r2"), {}, first_end)  # type: ignore[arg-type]
        # r2 was composed and sent (its outcome awaits the master); r1 still waits for its turn.
        composed = daemon.ahead._waiting.pop()
        assert composed[1]["id"] == "r2"
        daemon._delivered(_job("r2"), DeliveryOutcome("r2", "FINISHED", 250, "2.0.0", "ok"))
        clock.advance(LEASE_SECONDS + 5)  # the lease ended on the master, which leased them again
        second_end = lease_end(clock.seconds(), LEASE_SECONDS)
        await daemon._submit(None, _leased("L2", "r1", "r2", "r3"), {}, second_end)  # type: ignore[arg-type]
        assert _waiting(daemon) == ["r1", "r3"]  # r1 once, r2 not again
        assert daemon._leases == {"r1": "L2", "r2": "L2", "r3": "L2"}
        assert daemon._deadlines == {"r1": second_end, "r3": second_end}
        assert not daemon._late("r1")  # under its new lease, it may still go
        assert daemon.held_leases() == ["L1", "L2"]  # r2's outcome names L1
        # r2's outcome acknowledged: it was its last (not queued again), its lease forgotten.
        daemon._forget_leases(daemon._outbox.batch(10), {"r2"})
        assert daemon._leases == {"r1": "L2", "r3": "L2"}
    finally:
        await daemon.stop()


class _Link:
    """A master whose answer to the first report waits for the test."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.calls: list[str] = []
        self.closed_future: asyncio.Future[None] = loop.create_future()
        self.report_answer: asyncio.Future[None] = loop.create_future()

    async def call(self, method: str, **params: Any) -> Any:
        self.calls.append(method)
        if method == "hello":
            return {"satellite_id": 1, "group": ""}
        if method == "report":
            await self.report_answer
            return {"acknowledged": [outcome["recipient_id"] for outcome in params["outcomes"]]}
        if method == "lease":
            return {"recipients": [], "lease_seconds": LEASE_SECONDS}
        return {}

    def close(self) -> None:
        if not self.closed_future.done():
            self.closed_future.set_result(None)


@aio_test
async def test_after_a_reconnect_the_outbox_is_acknowledged_before_any_lease(tmp_path):
    """The master may have freed the old lease (the satellite came back after the grace) and would
    lease the same recipients again: the outbox naming them goes, and is taken, first."""
    from twisted.internet import reactor

    daemon = SatelliteDaemon(SatelliteConfig(master_port=9, serial="sat-o", secret="pw", dns_servers="127.0.0.1:9"),
                             tmp_path / "sat", reactor, random.Random(0))
    daemon._outbox.add(Outcome("r1", "FINISHED", 250, "", "ok", lease="L-old"))
    link = _Link()
    session = asyncio.ensure_future(daemon._session(link))  # type: ignore[arg-type]
    try:
        for _ in range(100):
            if "report" in link.calls:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the feeder had every chance to ask
        assert "lease" not in link.calls, link.calls
        link.report_answer.set_result(None)
        for _ in range(100):
            if "lease" in link.calls:
                break
            await asyncio.sleep(0.01)
        assert link.calls[:4] == ["hello", "held", "report", "lease"] and not len(daemon._outbox)
    finally:
        link.close()
        await asyncio.wait_for(session, 5)
        await daemon.stop()
