"""MxResolver against a real DNS server on loopback (tests/satellite/dns_server.py)."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cloudmailing.satellite.mx_resolver import (
    MailHost,
    MxResolver,
    PermanentDnsError,
    TemporaryDnsError,
)
from tests.satellite import dns_server as dns_helper
from tests.satellite.dns_server import DnsTestServer

dns_server = dns_helper.dns_server  # fixtures: a started DnsTestServer, and a factory
dns_server_factory = dns_helper.dns_server_factory

T = TypeVar("T")
P = ParamSpec("P")


def async_test(
    test: Callable[P, Coroutine[Any, Any, None]],
) -> Callable[P, Deferred[None]]:
    """pytest_twisted.ensureDeferred, typed: the test is a coroutine run by the reactor."""
    return cast(Callable[P, Deferred[None]], pytest_twisted.ensureDeferred(test))


def aio(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    """Run an asyncio coroutine on the reactor's loop; tests (Twisted coroutines) await this."""
    return Deferred.fromFuture(asyncio.ensure_future(coro))


def make_resolver(
    server: DnsTestServer, clock: Clock | None = None, seed: int = 0, **kwargs: Any
) -> MxResolver:
    return MxResolver(
        [server.address], clock=clock or Clock(), rng=random.Random(seed), **kwargs
    )


def names(hosts: list[MailHost]) -> list[str]:
    return [host.name for host in hosts]


# -- answers --------------------------------------------------------------------------------------


@async_test
async def test_mx_hosts_come_in_preference_order_with_a_then_aaaa(
    dns_server: DnsTestServer,
) -> None:
    dns_server.add_mx("example.test", "mx2.example.test", preference=20)
    dns_server.add_mx("example.test", "mx3.example.test", preference=30)
    dns_server.add_mx("example.test", "mx1.example.test", preference=10)
    dns_server.add_a("mx1.example.test", "127.0.0.11")
    dns_server.add_aaaa("mx1.example.test", "::1")
    dns_server.add_a("mx2.example.test", "127.0.0.12")
    dns_server.add_a("mx3.example.test", "127.0.0.13")

    hosts = await aio(make_resolver(dns_server).resolve("example.test"))

    assert hosts == [
        MailHost("mx1.example.test", "127.0.0.11", 10),
        MailHost("mx1.example.test", "::1", 10),
        MailHost("mx2.example.test", "127.0.0.12", 20),
        MailHost("mx3.example.test", "127.0.0.13", 30),
    ]
    # Both address families of a host are asked for.
    assert dns_server.query_count("mx1.example.test", "A") == 1
    assert dns_server.query_count("mx1.example.test", "AAAA") == 1


def _three_equal_mx(server: DnsTestServer) -> None:
    for index in (1, 2, 3):
        server.add_mx("equal.test", f"mx{index}.equal.test", preference=10)
        server.add_a(f"mx{index}.equal.test", f"127.0.0.{index}")
    server.add_mx("equal.test", "backup.equal.test", preference=50)
    server.add_a("backup.equal.test", "127.0.0.9")


@async_test
async def test_equal_preferences_are_shuffled_by_the_injected_rng(
    dns_server: DnsTestServer,
) -> None:
    _three_equal_mx(dns_server)

    async def order(seed: int) -> list[str]:
        return names(await make_resolver(dns_server, seed=seed).resolve("equal.test"))

    first, again, other = await aio(order(1)), await aio(order(1)), await aio(order(0))
    assert first == again  # reproducible for a seed
    assert first != other  # and the seed matters
    for hosts in (first, other):
        assert sorted(hosts[:3]) == [
            "mx1.equal.test",
            "mx2.equal.test",
            "mx3.equal.test",
        ]
        assert hosts[3] == "backup.equal.test"  # a worse preference stays last


@async_test
async def test_cached_answer_is_reshuffled_at_each_call(
    dns_server: DnsTestServer,
) -> None:
    _three_equal_mx(dns_server)
    resolver = make_resolver(dns_server)

    orders = set()
    for _ in range(60):
        orders.add(tuple(names(await aio(resolver.resolve("equal.test")))[:3]))

    assert len(orders) == 6  # every permutation of the 3 equal hosts shows up
    assert dns_server.query_count("equal.test", "MX") == 1


@async_test
async def test_domain_without_mx_falls_back_to_its_own_addresses(
    dns_server: DnsTestServer,
) -> None:
    dns_server.add_a("plain.test", "127.0.0.5")
    dns_server.add_aaaa("plain.test", "::1")

    hosts = await aio(make_resolver(dns_server).resolve("plain.test"))

    assert hosts == [
        MailHost("plain.test", "127.0.0.5", 0),
        MailHost("plain.test", "::1", 0),
    ]


@async_test
async def test_mx_host_without_address_is_skipped(dns_server: DnsTestServer) -> None:
    dns_server.add_mx(
        "partial.test", "gone.partial.test", preference=5
    )  # NXDOMAIN host
    dns_server.add_mx("partial.test", "mx.partial.test", preference=10)
    dns_server.add_a("mx.partial.test", "127.0.0.7")

    hosts = await aio(make_resolver(dns_server).resolve("partial.test"))

    assert hosts == [MailHost("mx.partial.test", "127.0.0.7", 10)]


@async_test
async def test_an_address_shared_by_two_mx_hosts_is_listed_once(
    dns_server: DnsTestServer,
) -> None:
    dns_server.add_mx("shared.test", "a.shared.test", preference=10)
    dns_server.add_mx("shared.test", "b.shared.test", preference=20)
    dns_server.add_a("a.shared.test", "127.0.0.8")
    dns_server.add_a("b.shared.test", "127.0.0.8")

    hosts = await aio(make_resolver(dns_server).resolve("shared.test"))

    assert hosts == [MailHost("a.shared.test", "127.0.0.8", 10)]


@async_test
async def test_large_mx_set_over_tcp_keeps_the_best_twenty_hosts(
    dns_server: DnsTestServer,
) -> None:
    for index in range(30):
        dns_server.add_mx("big.test", f"mx{index:02}.big.test", preference=index)
        dns_server.add_a(f"mx{index:02}.big.test", f"127.0.1.{index}")

    hosts = await aio(make_resolver(dns_server).resolve("big.test"))

    assert names(hosts) == [f"mx{index:02}.big.test" for index in range(20)]
    # The UDP answer was truncated, so the MX set came over TCP.
    transports = [q.transport for q in dns_server.queries if q.name == "big.test"]
    assert transports == ["udp", "tcp"]
    assert dns_server.query_count("mx25.big.test") == 0


# A hostile domain with thousands of addresses for one MX host made delivery try each in turn
# (connect_timeout, 30 s, each): RFC 5321 §5.1 allows a limit, as Postfix's smtp_mx_address_limit.
@async_test
async def test_the_first_five_addresses_of_each_mx_host_are_kept(
    dns_server: DnsTestServer,
) -> None:
    dns_server.add_mx("hostile.test", "mx.hostile.test", preference=10)
    dns_server.add_mx("hostile.test", "backup.hostile.test", preference=20)
    for i in range(1500):
        dns_server.add_a("mx.hostile.test", f"127.{1 + i // 250}.0.{1 + i % 250}")
    for i in range(3):
        dns_server.add_a("backup.hostile.test", f"127.9.0.{i + 1}")
    for i in range(3):
        dns_server.add_aaaa("backup.hostile.test", f"::{i + 1}")

    hosts = await aio(make_resolver(dns_server).resolve("hostile.test"))

    # In the order used before the limit: preference, then A before AAAA, as the server answered.
    assert [(h.name, h.address) for h in hosts] == [
        *(("mx.hostile.test", f"127.1.0.{i}") for i in range(1, 6)),
        *(("backup.hostile.test", f"127.9.0.{i}") for i in range(1, 4)),
        ("backup.hostile.test", "::1"), ("backup.hostile.test", "::2")]


@async_test
async def test_a_domain_gives_twenty_addresses_at_most(
    dns_server: DnsTestServer,
) -> None:
    for index in range(12):
        dns_server.add_mx("wide.test", f"mx{index:02}.wide.test", preference=10 * (index // 6))
        for last in range(1, 4):
            dns_server.add_a(f"mx{index:02}.wide.test", f"127.0.{index + 1}.{last}")

    resolver = make_resolver(dns_server)
    first = await aio(resolver.resolve("wide.test"))
    again = await aio(resolver.resolve("wide.test"))  # from the cache, reshuffled

    for hosts in (first, again):
        assert len(hosts) == 20
        # The six best hosts (18 addresses) come first, then the start of the next preference's.
        assert {h.preference for h in hosts[:18]} == {0} and {h.preference for h in hosts[18:]} == {10}
        assert len({h.address for h in hosts}) == 20
    assert [h.name for h in first] != [h.name for h in again]  # the limit is applied after the shuffle


@async_test
async def test_idn_domain_is_looked_up_as_idna2008_a_label(
    dns_server: DnsTestServer,
) -> None:
    # IDNA 2008 keeps "ß" (IDNA 2003 would have asked for "strasse.example").
    dns_server.add_a("xn--strae-oqa.example", "127.0.0.6")

    hosts = await aio(make_resolver(dns_server).resolve("Straße.Example."))

    assert hosts == [MailHost("xn--strae-oqa.example", "127.0.0.6", 0)]
    assert dns_server.query_count("xn--strae-oqa.example", "MX") == 1
    assert dns_server.query_count("strasse.example") == 0


# -- permanent failures ---------------------------------------------------------------------------


@async_test
async def test_null_mx_fails_permanently_without_address_queries(
    dns_server: DnsTestServer,
) -> None:
    dns_server.add_null_mx("nomail.test")
    dns_server.add_a("nomail.test", "127.0.0.5")  # must not be used as an implicit MX

    with pytest.raises(PermanentDnsError) as raised:
        await aio(make_resolver(dns_server).resolve("nomail.test"))

    assert raised.value.domain == "nomail.test"
    assert "null MX" in raised.value.reason
    assert dns_server.query_count() == 1


@async_test
async def test_nxdomain_fails_permanently_at_once(dns_server: DnsTestServer) -> None:
    with pytest.raises(PermanentDnsError) as raised:
        await aio(make_resolver(dns_server).resolve("unknown.test"))

    assert "NXDOMAIN" in raised.value.reason
    assert dns_server.query_count() == 1


@async_test
async def test_no_mx_and_no_address_fails_permanently(
    dns_server: DnsTestServer,
) -> None:
    dns_server.add_txt("textonly.test", "v=spf1 -all")

    with pytest.raises(PermanentDnsError, match="no MX and no A/AAAA"):
        await aio(make_resolver(dns_server).resolve("textonly.test"))


@async_test
async def test_mx_hosts_that_do_not_exist_fail_permanently(
    dns_server: DnsTestServer,
) -> None:
    dns_server.add_mx("dangling.test", "nowhere.dangling.test")

    with pytest.raises(PermanentDnsError, match="no address for any MX host"):
        await aio(make_resolver(dns_server).resolve("dangling.test"))


@pytest.mark.parametrize("domain", ["", "a" * 64 + ".test", "bad..test"])
@async_test
async def test_invalid_domain_fails_permanently_without_query(
    dns_server: DnsTestServer, domain: str
) -> None:
    with pytest.raises(PermanentDnsError, match="invalid domain"):
        await aio(make_resolver(dns_server).resolve(domain))

    assert dns_server.query_count() == 0


# -- temporary failures ---------------------------------------------------------------------------


@async_test
async def test_servfail_is_temporary_and_not_cached(dns_server: DnsTestServer) -> None:
    dns_server.set_servfail("broken.test")
    resolver = make_resolver(dns_server)

    for _ in range(2):
        with pytest.raises(TemporaryDnsError, match="SERVFAIL") as raised:
            await aio(resolver.resolve("broken.test"))
        assert raised.value.domain == "broken.test"

    assert dns_server.query_count("broken.test", "MX") == 2


@async_test
async def test_refused_is_temporary(dns_server: DnsTestServer) -> None:
    dns_server.set_refused("refused.test")

    with pytest.raises(TemporaryDnsError):
        await aio(make_resolver(dns_server).resolve("refused.test"))


@async_test
async def test_unanswered_query_times_out_as_temporary(
    dns_server: DnsTestServer,
) -> None:
    dns_server.set_unresponsive("silent.test")
    started = time.monotonic()

    with pytest.raises(TemporaryDnsError, match="timeout"):
        await aio(make_resolver(dns_server, timeout=0.3).resolve("silent.test"))

    assert 0.25 < time.monotonic() - started < 2.0
    assert dns_server.query_count("silent.test", "MX") >= 1


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback UDP port nobody listens on (queries to it are refused by the kernel)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    yield port


@async_test
async def test_no_dns_server_listening_is_temporary(closed_port: int) -> None:
    resolver = MxResolver(
        [("127.0.0.1", closed_port)], clock=Clock(), rng=random.Random(0), timeout=0.5
    )

    with pytest.raises(TemporaryDnsError):
        await aio(resolver.resolve("example.test"))


@async_test
async def test_next_nameserver_answers_when_the_first_does_not(
    dns_server_factory: Callable[..., DnsTestServer],
) -> None:
    silent, working = dns_server_factory(), dns_server_factory(host="127.0.0.2")
    working.add_mail_domain("failover.test", "127.0.0.3")
    silent.set_unresponsive("failover.test")
    silent.set_unresponsive("mx.failover.test")
    resolver = MxResolver(
        [silent.address, working.address],
        clock=Clock(),
        rng=random.Random(0),
        timeout=0.6,  # 0.3 s for each server
    )

    hosts = await aio(resolver.resolve("failover.test"))

    assert hosts == [MailHost("mx.failover.test", "127.0.0.3", 10)]
    assert silent.query_count("failover.test", "MX") == 1
    assert silent.query_count("mx.failover.test", "A") == 1


@async_test
async def test_all_mx_hosts_failing_is_temporary(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("flaky.test", "mx.flaky.test")
    dns_server.set_servfail("mx.flaky.test")

    with pytest.raises(TemporaryDnsError, match="cannot resolve the MX hosts"):
        await aio(make_resolver(dns_server).resolve("flaky.test"))


# -- caching ----------------------------------------------------------------------------------


@async_test
async def test_answer_is_cached_for_its_smallest_ttl(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("cached.test", "mx.cached.test", ttl=600)
    dns_server.add_a("mx.cached.test", "127.0.0.2", ttl=30)
    clock = Clock()
    resolver = make_resolver(dns_server, clock)

    first = await aio(resolver.resolve("cached.test"))
    sent = dns_server.query_count()
    clock.advance(29)
    assert await aio(resolver.resolve("cached.test")) == first
    assert dns_server.query_count() == sent  # served from the cache

    clock.advance(2)
    assert await aio(resolver.resolve("cached.test")) == first
    assert dns_server.query_count("cached.test", "MX") == 2  # expired: asked again


@async_test
async def test_permanent_failure_is_cached_for_negative_ttl(
    dns_server: DnsTestServer,
) -> None:
    clock = Clock()
    resolver = make_resolver(dns_server, clock, negative_ttl=100)
    with pytest.raises(PermanentDnsError):
        await aio(resolver.resolve("late.test"))
    dns_server.add_a("late.test", "127.0.0.3")  # the domain appears meanwhile

    clock.advance(99)
    with pytest.raises(PermanentDnsError, match="NXDOMAIN"):
        await aio(resolver.resolve("late.test"))
    assert dns_server.query_count("late.test", "MX") == 1

    clock.advance(2)
    assert await aio(resolver.resolve("late.test")) == [
        MailHost("late.test", "127.0.0.3", 0)
    ]
    assert dns_server.query_count("late.test", "MX") == 2


@async_test
async def test_partial_answer_is_cached_briefly(dns_server: DnsTestServer) -> None:
    dns_server.add_mx("half.test", "bad.half.test", preference=10)
    dns_server.add_mx("half.test", "good.half.test", preference=20)
    dns_server.set_servfail("bad.half.test")
    dns_server.add_a("good.half.test", "127.0.0.4", ttl=3600)
    clock = Clock()
    resolver = make_resolver(dns_server, clock)

    assert names(await aio(resolver.resolve("half.test"))) == ["good.half.test"]
    clock.advance(59)
    await aio(resolver.resolve("half.test"))
    assert dns_server.query_count("half.test", "MX") == 1
    clock.advance(2)
    await aio(resolver.resolve("half.test"))
    assert dns_server.query_count("half.test", "MX") == 2


@async_test
async def test_cache_is_bounded_and_evicts_the_oldest(
    dns_server: DnsTestServer,
) -> None:
    for domain in ("a.test", "b.test", "c.test"):
        dns_server.add_a(domain, "127.0.0.2")
    resolver = make_resolver(dns_server, max_cache_entries=2)
    for domain in ("a.test", "b.test", "c.test"):
        await aio(resolver.resolve(domain))

    await aio(resolver.resolve("c.test"))
    await aio(resolver.resolve("b.test"))
    assert dns_server.query_count("b.test", "MX") == 1
    assert dns_server.query_count("c.test", "MX") == 1
    await aio(resolver.resolve("a.test"))
    assert dns_server.query_count("a.test", "MX") == 2  # evicted, asked again


@async_test
async def test_concurrent_resolves_share_one_query(dns_server: DnsTestServer) -> None:
    dns_server.add_mail_domain("busy.test", "127.0.0.2")
    resolver = make_resolver(dns_server)

    async def both() -> list[list[MailHost]]:
        return list(
            await asyncio.gather(*(resolver.resolve("busy.test") for _ in range(5)))
        )

    results = await aio(both())

    assert results == [[MailHost("mx.busy.test", "127.0.0.2", 10)]] * 5
    assert dns_server.query_count("busy.test", "MX") == 1
    assert dns_server.query_count("mx.busy.test", "A") == 1


@async_test
async def test_concurrent_resolves_share_one_failure(dns_server: DnsTestServer) -> None:
    dns_server.set_servfail("down.test")
    resolver = make_resolver(dns_server)

    async def both() -> list[BaseException | list[MailHost]]:
        return list(
            await asyncio.gather(
                *(resolver.resolve("down.test") for _ in range(3)),
                return_exceptions=True,
            )
        )

    results = await aio(both())

    assert all(isinstance(result, TemporaryDnsError) for result in results)
    assert dns_server.query_count("down.test", "MX") == 1
