"""Connections per source address on both ports, over real sockets: the one over the limit is
closed at once, before TLS; those within it are served."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import ssl
import struct
import xmlrpc.client

import pytest

from cloudmailing.config.settings import ConfigError, load_settings
from tests.helpers import aio_test

LIMIT = 3


@pytest.fixture
def settings(settings):
    return dataclasses.replace(
        settings, api=dataclasses.replace(settings.api, max_connections_per_source=LIMIT),
        satellite_link=dataclasses.replace(settings.satellite_link, max_connections_per_source=LIMIT))


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _open(port: int, source: str = "127.0.0.1", tls: bool = True):  # type: ignore[no-untyped-def]
    return await asyncio.open_connection("127.0.0.1", port, ssl=_tls() if tls else None, local_addr=(source, 0))


async def _closed_at_once(port: int, source: str = "127.0.0.1", wait: float = 5.0) -> bool:
    reader, writer = await _open(port, source, tls=False)
    try:
        return await asyncio.wait_for(reader.read(1), wait) == b""
    except (TimeoutError, ConnectionError):
        return False
    finally:
        writer.close()


async def _api_call(reader, writer, key: str) -> bytes:  # type: ignore[no-untyped-def]
    body = xmlrpc.client.dumps((), "get_mailings_count").encode()
    auth = base64.b64encode(f"admin:{key}".encode())
    writer.write(b"POST /CloudMailing HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + auth
                 + b"\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)


async def _hello(reader, writer) -> dict:  # type: ignore[no-untyped-def,type-arg]
    frame = json.dumps({"id": 1, "method": "hello", "params": {"serial": "s", "secret": "pw"}}).encode()
    writer.write(struct.pack("!I", len(frame)) + frame)
    (length,) = struct.unpack("!I", await asyncio.wait_for(reader.readexactly(4), 10))
    return json.loads(await reader.readexactly(length))  # type: ignore[no-any-return]


@aio_test
async def test_the_api_closes_a_connection_over_the_limit_per_source(running_master):
    port = running_master.master.api_port
    held = [await _open(port) for _ in range(LIMIT)]
    assert await _closed_at_once(port)
    assert not await _closed_at_once(port, "127.0.0.2", wait=0.5)  # another address: its own count
    for reader, writer in held:  # those within the limit are served
        assert await _api_call(reader, writer, running_master.key) == b"HTTP/1.1 200 OK\r\n"
    held[0][1].close()
    await held[0][1].wait_closed()
    await asyncio.sleep(0.2)
    reader, writer = await _open(port)  # room again
    assert await _api_call(reader, writer, running_master.key) == b"HTTP/1.1 200 OK\r\n"
    for _, open_writer in [*held[1:], (reader, writer)]:
        open_writer.close()


@aio_test
async def test_the_satellite_link_closes_a_connection_over_the_limit_per_source(running_master):
    port = running_master.master.satellite_port
    held = [await _open(port) for _ in range(LIMIT)]
    assert await _closed_at_once(port)
    assert not await _closed_at_once(port, "127.0.0.2", wait=0.5)
    for reader, writer in held:
        assert (await _hello(reader, writer))["error"]["code"] == "not_paired"  # answered: recorded for approval
    held[0][1].close()
    await held[0][1].wait_closed()
    await asyncio.sleep(0.2)
    reader, writer = await _open(port)
    assert (await _hello(reader, writer))["error"]["code"] == "not_paired"
    for _, open_writer in [*held[1:], (reader, writer)]:
        open_writer.close()


def test_the_limits_are_settings_of_at_least_one(tmp_path) -> None:
    path = tmp_path / "c.ini"
    path.write_text("[api]\nmax_connections_per_source = 2\n[satellite_link]\nmax_connections_per_source = 1\n")
    settings = load_settings(path, environ={})
    assert (settings.api.max_connections_per_source, settings.satellite_link.max_connections_per_source) == (2, 1)
    for section in ("api", "satellite_link"):
        path.write_text(f"[{section}]\nmax_connections_per_source = 0\n")
        with pytest.raises(ConfigError):
            load_settings(path, environ={})
    defaults = load_settings(None, environ={})
    assert (defaults.api.max_connections_per_source, defaults.satellite_link.max_connections_per_source) == (64, 8)
