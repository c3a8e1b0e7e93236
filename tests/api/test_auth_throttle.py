"""API key checks: per-source throttling (fake clock) and equal work for unknown and wrong keys."""

from __future__ import annotations

import asyncio
import base64
import ssl

from cloudmailing.api.auth import Authenticator
from cloudmailing.common import keys
from cloudmailing.common.throttle import SourceThrottle
from cloudmailing.services.api_keys import ApiKeyService
from cloudmailing.storage.api_keys import ApiKeyStore
from tests.helpers import aio_test, until


def _header(key: str) -> bytes:
    return b"Basic " + base64.b64encode(f"admin:{key}".encode())


@aio_test
async def test_unknown_key_id_costs_the_same_scrypt_as_a_wrong_secret(database, clock, scrypt_calls) -> None:
    key = await ApiKeyService(database, clock).create("ops")
    key_id = keys.parse_key(key).key_id  # type: ignore[union-attr]
    authenticator = Authenticator(ApiKeyStore(database), clock)
    scrypt_calls.clear()
    assert not await authenticator.authenticate(_header(f"cm_{key_id}_wrongsecret"), "10.0.0.1")
    assert len(scrypt_calls) == 1
    assert not await authenticator.authenticate(_header("cm_000000000000_wrongsecret"), "10.0.0.1")
    assert len(scrypt_calls) == 2
    assert await authenticator.authenticate(_header(key), "10.0.0.1")
    assert len(scrypt_calls) == 3


@aio_test
async def test_parallel_guesses_from_one_source_wait_their_turn(database, clock, scrypt_calls) -> None:
    key = await ApiKeyService(database, clock).create("ops")
    authenticator = Authenticator(ApiKeyStore(database), clock, failures_before_delay=5, max_delay=30.0)
    for number in range(5):  # free failures
        assert not await authenticator.authenticate(_header(f"cm_000000000000_guess{number}"), "10.0.0.1")
    scrypt_calls.clear()
    guesses = [asyncio.ensure_future(authenticator.authenticate(_header(f"cm_000000000000_more{number}"),
                                                                "10.0.0.1")) for number in range(10)]
    await asyncio.sleep(0.5)
    assert scrypt_calls == [] and not any(guess.done() for guess in guesses)  # all wait: none checked
    # Another address is served at once, and a good key from it too.
    assert await asyncio.wait_for(authenticator.authenticate(_header(key), "10.0.0.2"), 10)
    scrypt_calls.clear()
    clock.advance(1.0)  # the first turn
    await until(lambda: sum(guess.done() for guess in guesses) == 1)
    await asyncio.sleep(0.3)
    assert len(scrypt_calls) == 1 and sum(guess.done() for guess in guesses) == 1
    clock.advance(2.0)  # the next, twice as far
    await until(lambda: sum(guess.done() for guess in guesses) == 2)
    assert len(scrypt_calls) == 2
    for guess in guesses:
        guess.cancel()


def _authenticator(master) -> Authenticator:  # type: ignore[no-untyped-def]
    return master.api_site.requestFactory.authenticator  # type: ignore[no-any-return]


@aio_test
async def test_a_client_that_leaves_takes_its_check_out_of_the_line(running_master, clock) -> None:
    authenticator = _authenticator(running_master.master)
    authenticator.throttle = SourceThrottle(clock, free_failures=1)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = (b"POST /CloudMailing HTTP/1.1\r\nHost: x\r\nAuthorization: " + _header("cm_000000000000_guess")
               + b"\r\nContent-Length: 10\r\n\r\n")
    first = await asyncio.open_connection("127.0.0.1", running_master.master.api_port, ssl=context)
    first[1].write(request + b"0123456789")
    assert b"401" in await asyncio.wait_for(first[0].readline(), 10)  # a free failure: the next wait 1 s
    leaving = [await asyncio.open_connection("127.0.0.1", running_master.master.api_port, ssl=context)
               for _ in range(5)]
    for _, writer in leaving:
        writer.write(request)  # the body never comes; the key check starts with the headers
    await until(lambda: authenticator.throttle.in_line("127.0.0.1") == 5)
    for _, writer in leaving:
        writer.close()
    await until(lambda: authenticator.throttle.in_line("127.0.0.1") == 0)
    first[1].close()
