"""Hellos over real TLS: wrong secrets slow their source address down (fake clock), and an
unknown serial costs the same scrypt as a wrong secret."""

from __future__ import annotations

import asyncio

import pytest
from twisted.internet import ssl, task
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

from cloudmailing.common.aio import wait_deferred
from cloudmailing.common.link import LinkError, LinkProtocol
from cloudmailing.common.throttle import SourceThrottle
from cloudmailing.services.satellites import SatelliteRefused, SatelliteService
from cloudmailing.storage.stores import open_stores
from tests.helpers import aio_test, until


async def connect(port: int, source: str = "127.0.0.1") -> LinkProtocol:
    """A link client to the master's satellite port, from ``source`` (any 127.0.0.x)."""
    from twisted.internet import reactor

    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, ssl.CertificateOptions(verify=False),
                                  bindAddress=(source, 0))
    return await wait_deferred(connectProtocol(endpoint, LinkProtocol(reactor)))


async def hello_code(link: LinkProtocol, serial: str, secret: str) -> str:
    try:
        await link.call("hello", serial=serial, secret=secret)
    except LinkError as error:
        return error.code
    return "ok"


@aio_test
async def test_wrong_secrets_slow_down_their_source_not_others(running_master, clock: task.Clock) -> None:
    master = running_master.master
    master.link_factory.throttle = SourceThrottle(clock, free_failures=2, max_delay=30.0)
    await running_master.proxy().cloud_add_satellite("sat-t", {})
    first = await connect(master.satellite_port)
    assert await hello_code(first, "sat-t", "right") == "ok"  # its first secret is kept
    for _ in range(2):  # free failures
        assert await hello_code(first, "sat-t", "guess") == "unauthorized"
    # Three more guesses in parallel, on three links: none is answered before its turn.
    links = [await connect(master.satellite_port) for _ in range(3)]
    guesses = [asyncio.ensure_future(hello_code(link, "sat-t", "guess")) for link in links]
    await asyncio.sleep(0.5)
    assert not any(guess.done() for guess in guesses)
    # Another address is answered at once, the right secret too.
    elsewhere = await connect(master.satellite_port, "127.0.0.2")
    assert await asyncio.wait_for(hello_code(elsewhere, "sat-t", "right"), 10) == "ok"
    clock.advance(1.0)
    await asyncio.wait_for(asyncio.wait(guesses, return_when=asyncio.FIRST_COMPLETED), 10)
    await asyncio.sleep(0.3)
    assert sum(guess.done() for guess in guesses) == 1  # the next waits 2 s more
    clock.advance(2.0)
    await asyncio.wait_for(_done(guesses, 2), 10)
    for link in [first, elsewhere, *links]:
        link.close()


@aio_test
async def test_a_hello_whose_link_closes_leaves_the_line(running_master, clock: task.Clock) -> None:
    master = running_master.master
    throttle = master.link_factory.throttle = SourceThrottle(clock, free_failures=1)
    await running_master.proxy().cloud_add_satellite("sat-l", {})
    first = await connect(master.satellite_port)
    assert await hello_code(first, "sat-l", "right") == "ok"
    other = await connect(master.satellite_port)
    assert await hello_code(other, "sat-l", "guess") == "unauthorized"  # free; the next waits 1 s
    links = [await connect(master.satellite_port) for _ in range(3)]
    guesses = [asyncio.ensure_future(hello_code(link, "sat-l", "guess")) for link in links]
    await until(lambda: throttle.in_line("127.0.0.1") == 3)
    for link in links:
        link.close()
    await until(lambda: throttle.in_line("127.0.0.1") == 0)
    assert await asyncio.gather(*guesses) == ["disconnected"] * 3
    first.close()
    other.close()


async def _done(futures: list[asyncio.Future[str]], count: int) -> None:
    while sum(future.done() for future in futures) < count:
        await asyncio.sleep(0.02)


@aio_test
async def test_an_unknown_serial_costs_the_same_scrypt_as_a_wrong_secret(database, clock, scrypt_calls) -> None:
    service = SatelliteService(await open_stores(database), clock, max_awaiting_approval=0)
    await service.add("known", {})
    await service.authenticate("known", "right", "1.0")  # keeps its first secret
    for serial in ("known", "unknown", "x" * 101):
        scrypt_calls.clear()
        with pytest.raises(SatelliteRefused):
            await service.authenticate(serial, "wrong", "1.0")
        assert len(scrypt_calls) == 1, serial


@aio_test
async def test_150_parallel_strangers_record_exactly_max_awaiting_approval(running_master) -> None:
    """The default cap, 100. Each stranger from its own address (127.0.0.2 on): no per-address
    throttle or connection limit lines them up."""
    port = running_master.master.satellite_port
    links = await asyncio.gather(*(connect(port, f"127.0.{2 + n // 250}.{2 + n % 250}") for n in range(150)))
    codes = await asyncio.gather(*(hello_code(link, f"stranger-{n}", "pw") for n, link in enumerate(links)))
    assert codes == ["not_paired"] * 150
    listed = await running_master.proxy().cloud_list_satellites()
    assert len(listed) == 100 and not any(satellite["paired"] for satellite in listed)
    for link in links:
        link.close()


@aio_test
async def test_a_hello_that_checks_no_secret_does_not_reset_the_count_of_wrong_ones(running_master,
                                                                                     clock: task.Clock) -> None:
    """An unknown serial (recorded or not) checks no secret: it must not wipe the wrong secrets
    before it, or one address could guess at full speed by slipping one in every few tries."""
    master = running_master.master
    master.link_factory.throttle = SourceThrottle(clock, free_failures=5, max_delay=30.0)
    await running_master.proxy().cloud_add_satellite("sat-r", {})
    link = await connect(master.satellite_port)
    assert await hello_code(link, "sat-r", "right") == "ok"
    for _ in range(4):
        assert await hello_code(link, "sat-r", "guess") == "unauthorized"
    other = await connect(master.satellite_port)  # one link speaks for one serial: another link
    assert await hello_code(other, "u" * 101, "x") == "not_paired"  # refused unrecorded
    assert await hello_code(other, "brand-new", "x") == "not_paired"  # recorded, awaiting approval
    assert master.link_factory.throttle.failures("127.0.0.1") == 4
    assert await hello_code(link, "sat-r", "right") == "ok"  # a secret checked and right resets it
    assert master.link_factory.throttle.failures("127.0.0.1") == 0
    link.close()
    other.close()
