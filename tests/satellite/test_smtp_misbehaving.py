"""The SMTP client against servers that misbehave: replies that never end, a 421 at the hello,
a body the server takes slowly, a server that stops reading (scripted servers on 127.0.0.2)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from twisted.internet import reactor

from cloudmailing.satellite.outcomes import FINISHED, WARNING
from cloudmailing.satellite.smtp_client import SmtpClientOptions, SmtpConnectError, SmtpConnection
from tests.helpers import aio_test
from tests.satellite.scripted_smtp import Scripted, ScriptedServer, default_line

HOST = "127.0.0.2"
MESSAGE = b"From: <s@example.test>\r\nSubject: hi\r\n\r\nHello.\r\n"


def options(reply_timeout: float = 1.0, starttls: bool = False) -> SmtpClientOptions:
    return SmtpClientOptions("client.example.test", connect_timeout=2, reply_timeout=reply_timeout,
                             starttls=starttls)


async def connect_error(server: ScriptedServer, reply_timeout: float = 1.0, starttls: bool = False,
                        ) -> SmtpConnectError:
    """The error connecting to ``server`` raised, within a few seconds."""
    port = await server.start(HOST)
    connection = SmtpConnection(options(reply_timeout, starttls), "mx.test", reactor)
    try:
        with pytest.raises(SmtpConnectError) as raised:
            await asyncio.wait_for(connection.connect(HOST, port), 6)
        return raised.value
    finally:
        connection.abort()
        server.stop()


def greeting_forever(line: bytes, pause: float) -> ScriptedServer:
    """A server whose greeting is continuation lines (``220-``), never its last line."""
    def on_connect(p: Scripted) -> None:
        async def drip() -> None:
            while not p.tcp.is_closing():
                p.send(line)
                await asyncio.sleep(pause)
        asyncio.ensure_future(drip())
    return ScriptedServer(on_connect=on_connect)


@aio_test
async def test_a_reply_trickled_for_ever_times_out():
    started = time.monotonic()
    error = await connect_error(greeting_forever(b"220-still greeting you\r\n", 0.2), reply_timeout=1.0)
    assert "no reply within 1 s" in error.reason
    assert time.monotonic() - started < 4


@aio_test
async def test_a_reply_of_endless_lines_is_refused_before_it_fills_the_memory():
    error = await connect_error(greeting_forever(b"220-" + b"x" * 1000 + b"\r\n", 0), reply_timeout=30.0)
    assert "reply of over 1000 lines" in error.reason


def hello_answered(reply: bytes, starttls_reply: bytes = b"") -> ScriptedServer:
    def on_line(p: Scripted, line: bytes) -> None:
        if line.upper().startswith(b"EHLO") and starttls_reply:
            p.send(b"250-mx.test\r\n250 STARTTLS\r\n")
        elif line.upper().startswith(b"EHLO"):
            p.send(reply)
        elif line.upper().startswith(b"STARTTLS"):
            p.send(starttls_reply)
        else:
            default_line(p, line)
    return ScriptedServer(on_line)


@aio_test
async def test_a_421_to_ehlo_is_a_connect_error_with_its_code_and_no_helo_follows():
    server = hello_answered(b"421 4.3.2 service shutting down\r\n")
    error = await connect_error(server)
    assert error.reply_code == 421, error.smtp_log
    assert not any(line.upper().startswith(b"HELO") for p in server.connections for line in p.lines)


@pytest.mark.parametrize("server", [
    pytest.param(lambda: hello_answered(b"250 mx.test\r\n421 4.3.2 closing\r\n"), id="a 421 unasked after EHLO"),
    pytest.param(lambda: hello_answered(b"", starttls_reply=b"421 4.3.2 no TLS, closing\r\n"), id="a 421 to STARTTLS"),
])
@aio_test
async def test_a_channel_closing_at_the_hello_is_a_connect_error_the_back_off_sees(server):
    """Not a connection returned unusable, which the scheduler would open again and again."""
    error = await connect_error(server(), starttls=True)
    assert error.reply_code == 421, error.smtp_log


@aio_test
async def test_closing_after_a_421_in_the_middle_of_a_body_does_not_wait_for_it_to_drain():
    """The server says 421 during the body and stops reading (its socket open): the bytes not
    sent yet are dropped at close, not waited for."""
    def on_raw(p: Scripted, data: bytes) -> bool:
        if not p.in_data:
            return False
        if not p.lines or p.lines[-1] != b"421 said":
            p.lines.append(b"421 said")
            p.send(b"421 4.4.2 too slow, closing\r\n")
            p.tcp.pause_reading()
        return True

    server = ScriptedServer(on_raw=on_raw)
    port = await server.start(HOST)
    connection = SmtpConnection(options(2.0), "mx.test", reactor)
    big = MESSAGE + (b"y" * 998 + b"\r\n") * 20_000  # 20 MB: more than the socket buffers hold
    try:
        await connection.connect(HOST, port)
        outcome = await asyncio.wait_for(connection.send("b@x.test", "r@y.test", big, "r1"), 10)
        assert outcome.status == WARNING and outcome.reply_code == 421, outcome
        await asyncio.wait_for(connection.close(), 5)
    finally:
        connection.abort()
        server.stop()


@aio_test
async def test_a_body_the_server_takes_slower_than_the_reply_timeout_is_delivered():
    """RFC 5321 4.5.3.2 times each write of the data, not the whole: a server reading steadily
    but slowly (~2.5 MB/s here, 4 MB: longer than the 1 s reply timeout) gets the message."""
    def on_raw(p: Scripted, data: bytes) -> bool:
        if p.in_data:
            p.tcp.pause_reading()
            asyncio.get_running_loop().call_later(0.1, p.tcp.resume_reading)
        return False

    server = ScriptedServer(on_raw=on_raw)
    port = await server.start(HOST, reuse_address=True)
    for sock in server.server.sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    connection = SmtpConnection(options(1.0), "mx.test", reactor)
    big = MESSAGE + (b"z" * 998 + b"\r\n") * 4_000
    try:
        await connection.connect(HOST, port)
        started = time.monotonic()
        outcome = await asyncio.wait_for(connection.send("b@x.test", "r@y.test", big, "r1"), 60)
        assert outcome.status == FINISHED, outcome
        assert time.monotonic() - started > 1.0  # it did take longer than the reply timeout
    finally:
        connection.abort()
        server.stop()
