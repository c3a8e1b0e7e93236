"""The satellite link against a misbehaving satellite: one link per serial, one serial per link,
closes that do not wait for a peer that does not read, and lease allowances that cannot be gamed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct

import pytest
from twisted.internet import task

from tests.helpers import aio_test, running_mailing
from tests.master.test_link_server import _connect, _refused, _registered_link

GRACE = 0.5


@pytest.fixture
def settings(settings):
    link = dataclasses.replace(settings.satellite_link, reconnect_grace_seconds=GRACE)
    return dataclasses.replace(settings, satellite_link=link)


async def _in_flight(api, serial: str) -> int:
    return next(s["in_flight"] for s in await api.cloud_list_satellites() if s["serial"] == serial)


async def _big_mailing(api, count: int) -> int:
    mailing_id = await api.create_mailing("news@sender.test", "News", "Hi", "<p>Hi</p>", "", "utf-8")
    for start in range(0, count, 500):
        await api.add_recipients(mailing_id, [{"email": f"u{i}@example.org"} for i in range(start, start + 500)])
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    return mailing_id


def _frame(message: dict) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack("!I", len(payload)) + payload


def _tcp(transport):
    """The TCP transport under the TLS and wrapper layers."""
    while not hasattr(transport, "dataBuffer"):
        transport = transport.transport
    return transport


def _mailing_requests(mailing_id: int, first_id: int, count: int) -> bytes:
    """``count`` 'mailing' requests in frames, ids from ``first_id``: ~60 bytes each, ~2 MB answers."""
    return b"".join(_frame({"id": first_id + i, "method": "mailing", "params": {"mailing_id": mailing_id}})
                    for i in range(count))


async def _deaf_satellite(running_master, serial: str, requests: int):
    """A satellite holding a lease of a mailing of ~2 MB content, that sends ``requests`` requests
    for that content and reads none of the answers: (its link, the master's session, the mailing)."""
    api = running_master.proxy()
    mailing_id = await api.create_mailing("news@sender.test", "News", "Hi", "<p>" + "x" * 900_000 + "</p>", "",
                                          "utf-8")
    await api.add_recipients(mailing_id, [{"email": "u@example.org"}])
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    link = await _registered_link(running_master, serial)
    assert (await link.call("lease", max_recipients=10))["recipients"]
    _tcp(link.transport).stopReading()
    link.transport.write(_mailing_requests(mailing_id, 1000, requests))
    return link, running_master.master.link_factory.sessions[serial], mailing_id


@aio_test
async def test_a_second_link_of_a_serial_closes_the_first_and_keeps_its_leases(running_master):
    """A second hello of a serial (the satellite reconnecting while its old link is half open)
    aborts the first link: one serial, one link. The first one's going frees nothing; the second
    one's, after the grace, frees what the serial holds."""
    api = running_master.proxy()
    await running_mailing(api, 3)
    first = await _registered_link(running_master, "sat-2x")
    leased = (await first.call("lease", max_recipients=10))["recipients"]
    assert len(leased) == 3
    second = await _connect(running_master.master)
    await second.call("hello", serial="sat-2x", secret="pw")  # names nothing: frees nothing
    await asyncio.wait_for(asyncio.shield(first.closed_future), 5)  # the master closed the first link
    assert running_master.master.link_factory.sessions["sat-2x"].transport is not None
    await asyncio.sleep(GRACE + 0.7)
    listed = {s["serial"]: (s["connected"], s["in_flight"]) for s in await api.cloud_list_satellites()}
    assert listed["sat-2x"] == (True, 3), "the live link lost its leases (or is shown disconnected)"
    second.close()
    await second.closed_future
    await asyncio.sleep(GRACE + 0.7)
    listed = {s["serial"]: (s["connected"], s["in_flight"]) for s in await api.cloud_list_satellites()}
    assert listed["sat-2x"] == (False, 0)


@aio_test
async def test_a_reconnect_gets_no_fresh_allowance_on_top_of_the_leases_kept(running_master):
    """The allowance counts what the satellite holds from its earlier links: one that reconnects
    and keeps its leases (held) may not hold ever more without reporting."""
    api = running_master.proxy()
    await _big_mailing(api, 1500)  # three blocks of 500
    link = await _registered_link(running_master, "sat-b")
    first = (await link.call("lease", max_recipients=1000))["recipients"]
    assert len(first) == 500
    assert (await link.call("lease", max_recipients=1000))["recipients"] == []  # allowance (100) used up
    link.close()
    await link.closed_future
    again = await _connect(running_master.master)
    await again.call("hello", serial="sat-b", secret="pw")
    await again.call("held", leases=[first[0]["lease"]], more=False)  # it still holds them all
    assert await _in_flight(api, "sat-b") == 500
    more = (await again.call("lease", max_recipients=1000))["recipients"]
    held = await _in_flight(api, "sat-b")
    again.close()
    assert more == [], f"nothing reported, yet it now holds {held} recipients (initial_lease_size 100)"


@aio_test
async def test_a_second_hello_with_another_serial_is_refused(running_master):
    """One link speaks for one satellite: a hello with another serial is refused, and when the link
    closes its serial leaves (its leases go back after the grace)."""
    api = running_master.proxy()
    await running_mailing(api, 3)
    await api.cloud_add_satellite("sat-y", {})
    link = await _registered_link(running_master, "sat-x")
    assert len((await link.call("lease", max_recipients=10))["recipients"]) == 3
    assert await _refused(link, "hello", serial="sat-y", secret="pw2") == "bad_request"
    await link.call("hello", serial="sat-x", secret="pw")  # its own serial again is fine
    assert set(running_master.master.link_factory.sessions) == {"sat-x"}
    link.close()
    await link.closed_future
    await asyncio.sleep(GRACE + 0.7)
    listed = {s["serial"]: (s["connected"], s["in_flight"]) for s in await api.cloud_list_satellites()}
    assert listed["sat-x"] == (False, 0), listed
    assert listed["sat-y"][0] is False


@aio_test
async def test_a_link_closed_for_idleness_that_does_not_read_is_closed_all_the_same(running_master):
    """A timeout aborts the link: it does not wait for a peer that never reads what is buffered
    (which would keep its link, and its connection slot, open)."""
    clock = task.Clock()
    running_master.master.link_factory.clock = clock
    link, session, _ = await _deaf_satellite(running_master, "sat-stuck", 10)
    for _ in range(100):  # every answer made
        await asyncio.sleep(0.1)
        if not session._answering:
            break
    await asyncio.sleep(0.5)
    clock.advance(901)  # idle: the master closes the link
    assert session._closing
    try:
        await asyncio.wait_for(asyncio.shield(session.closed_future), 5)
        closed = True
    except TimeoutError:
        closed = False
    _tcp(link.transport).startReading()
    link.close()
    assert closed, "the master said it closed the link, but the connection is still open"


@aio_test
async def test_wakes_a_satellite_never_answers_do_not_pile_up_nor_keep_an_idle_link_open(running_master):
    from twisted.internet import reactor
    from twisted.internet import ssl as tssl
    from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

    from cloudmailing.common.aio import wait_deferred
    from cloudmailing.common.link import LinkProtocol

    class Deaf(LinkProtocol):
        def frameReceived(self, data: bytes) -> None:
            if b'"method"' in data:
                return  # a request of the master's: never answered
            super().frameReceived(data)

    clock = task.Clock()
    running_master.master.link_factory.clock = clock
    api = running_master.proxy()
    await api.cloud_add_satellite("sat-nowake", {})
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", running_master.master.satellite_port,
                                  tssl.CertificateOptions(verify=False))
    link = await wait_deferred(connectProtocol(endpoint, Deaf(reactor)))
    await link.call("hello", serial="sat-nowake", secret="pw")
    mailing_id = await api.create_mailing("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await api.start_mailing(mailing_id)
    for _ in range(20):
        await api.send_test(mailing_id, [{"email": "qa@example.org"}])
    await asyncio.sleep(0.3)
    session = running_master.master.link_factory.sessions["sat-nowake"]
    waiting = len(session._waiting)
    assert waiting == 1  # one wake unanswered at most
    clock.advance(901)
    clock.advance(901)
    clock.advance(901)  # 45 minutes without a frame either way
    try:
        await asyncio.wait_for(asyncio.shield(link.closed_future), 3)
        closed = True
    except TimeoutError:
        closed = False
    link.close()
    assert closed, f"idle for 45 min, never closed: {waiting} unanswered wakes count as requests pending"


@aio_test
async def test_outcomes_the_master_ignores_neither_free_the_allowance_nor_raise_the_rate(running_master):
    """Only outcomes the dispatcher recorded count in the budget: acknowledged ones it ignored
    (recipients another satellite holds) leave the recipients leased, and the allowance used."""
    api = running_master.proxy()
    await _big_mailing(api, 1500)  # three blocks of 500
    link = await _registered_link(running_master, "sat-bogus")
    other = await _registered_link(running_master, "sat-other")
    first = (await link.call("lease", max_recipients=1000))["recipients"]
    assert len(first) == 500
    theirs = (await other.call("lease", max_recipients=1000))["recipients"]
    bogus = [{"recipient_id": r["id"], "status": "WARNING", "reply_code": 421, "lease": first[0]["lease"]}
             for r in theirs]
    assert len((await link.call("report", outcomes=bogus))["acknowledged"]) == 500
    statuses = {s["status"] for s in await api.get_recipients_status([r["id"] for r in theirs[:50]], {})}
    assert statuses == {"IN PROGRESS"}  # nothing recorded: all still held
    more = (await link.call("lease", max_recipients=1000))["recipients"]
    held = await _in_flight(api, "sat-bogus")
    link.close()
    other.close()
    assert more == [], f"nothing recorded, yet it now holds {held} recipients (initial_lease_size 100)"


@aio_test
async def test_a_satellite_that_never_reads_its_answers_has_the_master_buffer_a_bounded_few(running_master):
    """Each 'mailing' request of ~60 bytes gets ~2 MB back: a satellite that sends many and never
    reads has the master hold its further requests (flow control), not buffer every answer; past
    MAX_HELD_REQUESTS waiting, the link is aborted."""
    from cloudmailing.common.link import MAX_HELD_REQUESTS

    link, session, mailing_id = await _deaf_satellite(running_master, "sat-deaf", 60)
    master_tcp = _tcp(session.transport)
    peak = 0
    for _ in range(30):
        await asyncio.sleep(0.1)
        peak = max(peak, len(master_tcp.dataBuffer) - master_tcp.offset + master_tcp._tempDataLen)
    assert peak < 24 * 1024 * 1024, f"the master buffered {peak / 2**20:.0f} MiB"  # 60 answers: ~110 MiB
    assert len(session._held) > 40 and not session.closed_future.done()  # waiting, not answered
    link.transport.write(_mailing_requests(mailing_id, 2000, MAX_HELD_REQUESTS))
    await asyncio.wait_for(asyncio.shield(session.closed_future), 10)  # too many waiting: aborted
    link.close()
    _tcp(link.transport).startReading()
