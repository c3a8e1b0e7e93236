"""SmtpConnection against real SMTP servers on loopback (tests/satellite/smtp_servers.py)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import functools
import gc
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cloudmailing.satellite import smtp_client
from cloudmailing.satellite.outcomes import ERROR, FINISHED, WARNING
from cloudmailing.satellite.smtp_client import (
    SmtpClientOptions,
    SmtpConnectError,
    SmtpConnection,
    dot_stuff,
)
from tests.helpers import run
from tests.satellite.smtp_servers import Behaviour, SmtpTestServer, make_tls_options

HOST = "127.0.0.2"
OPTIONS = SmtpClientOptions("client.example.test", connect_timeout=5, reply_timeout=5)
MESSAGE = (
    b"From: <sender@example.test>\r\nTo: <rcpt@dest.test>\r\nSubject: hello\r\n"
    b"Message-ID: <1@example.test>\r\n\r\nHello world.\r\n"
)


def aio_test(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Deferred[None]]:
    """Run an asyncio test coroutine on the reactor (pytest-twisted waits for the Deferred)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Deferred[None]:
        return Deferred.fromFuture(asyncio.ensure_future(test(*args, **kwargs)))

    return wrapper


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[SmtpTestServer, int]]]:
    """Start servers on 127.0.0.2 with a behaviour; all are stopped after the test."""
    started: list[SmtpTestServer] = []

    def start(behaviour: Behaviour | None = None, tls: Any = None) -> tuple[SmtpTestServer, int]:
        server = SmtpTestServer(behaviour or Behaviour(), tls)
        started.append(server)
        return server, server.listen(HOST, 0)

    yield start
    for server in started:
        run(server.stop())


async def connected(port: int, options: SmtpClientOptions = OPTIONS, clock: Clock | None = None) -> SmtpConnection:
    connection = SmtpConnection(options, "mx.dest.test", clock or reactor)
    await connection.connect(HOST, port)
    return connection


# -- the happy path -------------------------------------------------------------------------------


@aio_test
async def test_accepted_message_is_received_intact(serve: Any) -> None:
    server, port = serve()
    connection = await connected(port)
    outcome = await connection.send("bounce@example.test", "rcpt@dest.test", MESSAGE, "r1")
    await connection.close()

    assert (outcome.status, outcome.reply_code, outcome.reply_enhanced_code) == (FINISHED, 250, "2.0.0")
    assert (outcome.recipient_id, outcome.mx_host, outcome.retryable) == ("r1", "mx.dest.test", False)
    assert "> RCPT TO:<rcpt@dest.test>" in outcome.smtp_log
    [received] = server.messages
    assert (received.mail_from, received.rcpt_to) == ("bounce@example.test", ["rcpt@dest.test"])
    assert received.helo == "client.example.test"
    parsed = email.message_from_bytes(received.data, policy=email.policy.SMTP)
    assert parsed["Subject"] == "hello" and parsed.get_content() == "Hello world.\r\n"


@aio_test
async def test_several_messages_on_one_connection_rset_only_after_an_unfinished_one(serve: Any) -> None:
    server, port = serve(Behaviour(rcpt_codes={"refused@dest.test": 550}))
    connection = await connected(port)
    rcpts = ["r0@dest.test", "r1@dest.test", "refused@dest.test", "r3@dest.test", "r4@dest.test"]
    results = [await connection.send("b@x.test", rcpt, MESSAGE) for rcpt in rcpts]
    await connection.close()

    assert [r.status for r in results] == [FINISHED, FINISHED, ERROR, FINISHED, FINISHED]
    assert server.connections_total == 1
    assert [m.rcpt_to for m in server.messages] == [[rcpt] for rcpt in rcpts if rcpt != "refused@dest.test"]
    segments = [segment for segment in server.batches[0] if segment]
    # The refused recipient ended its transaction before the data: the next one starts with RSET.
    assert [segment[0] for segment in segments if segment[0] in ("MAIL", "RSET")] == [
        "MAIL", "MAIL", "MAIL", "RSET", "MAIL"]
    assert segments[-1] == ["QUIT"]


@aio_test
async def test_pipelining_sends_the_envelope_in_one_segment(serve: Any) -> None:
    server, port = serve()
    connection = await connected(port)
    for i in range(3):
        await connection.send("b@x.test", f"r{i}@dest.test", MESSAGE)
    await connection.close()

    segments = [s for s in server.batches[0] if s]
    assert segments[1:] == [["MAIL", "RCPT", "DATA"], ["."]] * 3 + [["QUIT"]]


@aio_test
async def test_the_next_envelope_rides_with_the_previous_body(serve: Any) -> None:
    """Messages started before the previous one ended: one write and one round trip each."""
    server, port = serve()
    connection = await connected(port)
    results = await asyncio.gather(*(connection.send("b@x.test", f"r{i}@dest.test", MESSAGE, f"id{i}")
                                     for i in range(3)))
    await connection.close()

    assert [(r.status, r.recipient_id) for r in results] == [(FINISHED, f"id{i}") for i in range(3)]
    assert [m.rcpt_to for m in server.messages] == [[f"r{i}@dest.test"] for i in range(3)]
    segments = [s for s in server.batches[0] if s]
    assert segments[1:] == [["MAIL", "RCPT", "DATA"], [".", "MAIL", "RCPT", "DATA"],
                            [".", "MAIL", "RCPT", "DATA"], ["."], ["QUIT"]]
    assert "> RCPT TO:<r1@dest.test>" in results[1].smtp_log and "< 250 2.0.0 Ok: queued" in results[1].smtp_log


@aio_test
async def test_a_rider_after_a_refused_recipient_starts_with_rset(serve: Any) -> None:
    """No body was sent (DATA refused): the waiting message starts on its own, after RSET."""
    server, port = serve(Behaviour(rcpt_codes={"refused@dest.test": 550}))
    connection = await connected(port)
    refused, accepted = await asyncio.gather(connection.send("b@x.test", "refused@dest.test", MESSAGE),
                                             connection.send("b@x.test", "r@dest.test", MESSAGE))
    await connection.close()

    assert (refused.status, refused.reply_code, accepted.status) == (ERROR, 550, FINISHED)
    assert [m.rcpt_to for m in server.messages] == [["r@dest.test"]]
    segments = [s for s in server.batches[0] if s]
    assert segments[1:] == [["MAIL", "RCPT", "DATA"], ["RSET", "MAIL", "RCPT", "DATA"], ["."], ["QUIT"]]


@aio_test
async def test_without_pipelining_the_next_message_waits_for_the_previous_one(serve: Any) -> None:
    server, port = serve(Behaviour(pipelining=False))
    connection = await connected(port)
    results = await asyncio.gather(*(connection.send("b@x.test", f"r{i}@dest.test", MESSAGE) for i in range(2)))
    await connection.close()

    assert [r.status for r in results] == [FINISHED, FINISHED]
    segments = [s for s in server.batches[0] if s]
    assert segments[1:] == [["MAIL"], ["RCPT"], ["DATA"], ["."]] * 2 + [["QUIT"]]


@aio_test
async def test_a_rider_the_server_never_answered_was_not_tried(serve: Any) -> None:
    """The server closed after the first message: the second one's envelope went out with that
    body but got no reply. ``start`` says None (it may go elsewhere); ``send`` a temporary failure."""
    _, port = serve(Behaviour(close_after_messages=1))
    connection = await connected(port)
    first = connection.start("b@x.test", "r0@dest.test", MESSAGE)
    second = connection.start("b@x.test", "r1@dest.test", MESSAGE)
    assert ((await first).status, await second) == (FINISHED, None)
    assert not connection.usable

    connection = await connected(port)
    sent, riding = await asyncio.gather(connection.send("b@x.test", "r2@dest.test", MESSAGE),
                                        connection.send("b@x.test", "r3@dest.test", MESSAGE, "id3"))
    assert (sent.status, riding.status, riding.recipient_id) == (FINISHED, WARNING, "id3")
    assert riding.reply_text == "connection closed before this message"


@aio_test
async def test_without_pipelining_commands_wait_for_replies(serve: Any) -> None:
    server, port = serve(Behaviour(pipelining=False))
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "r@dest.test", MESSAGE)
    await connection.close()

    assert outcome.status == FINISHED
    segments = [s for s in server.batches[0] if s]
    assert segments[:4] == [["EHLO"], ["MAIL"], ["RCPT"], ["DATA"]]


@aio_test
async def test_helo_fallback_when_ehlo_refused(serve: Any) -> None:
    server, port = serve(Behaviour(esmtp=False))
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "r@dest.test", MESSAGE)
    await connection.close()

    assert outcome.status == FINISHED and not connection.esmtp
    assert [s for s in server.batches[0] if s][:2] == [["EHLO"], ["HELO"]]


@aio_test
async def test_dot_stuffing_round_trip(serve: Any) -> None:
    server, port = serve()
    body = b".starts with a dot\r\n.\r\n..\r\nmiddle . dot\r\n.\r\n.end"  # no final CRLF
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "r@dest.test", body)
    await connection.close()

    assert outcome.status == FINISHED
    assert server.messages[0].data == body + b"\r\n"


def test_dot_stuff() -> None:
    assert dot_stuff(b".a\r\n.b\r\nc\r\n") == b"..a\r\n..b\r\nc\r\n.\r\n"
    assert dot_stuff(b"abc") == b"abc\r\n.\r\n"


@given(st.lists(st.sampled_from([b".", b"..", b"a", b"n", b"\r\n", b"\n", b"\r"]), max_size=40).map(b"".join))
def test_dot_stuffing_is_its_definition_whatever_the_bytes(data: bytes) -> None:
    """The quick scan before the copy never lets a line starting with a dot through."""
    expected = (b"." + data if data.startswith(b".") else data).replace(b"\r\n.", b"\r\n..")
    expected += b"" if expected.endswith(b"\r\n") else b"\r\n"
    assert dot_stuff(data) == expected + b".\r\n"


# -- extensions -----------------------------------------------------------------------------------


@aio_test
async def test_starttls_is_negotiated_when_offered(serve: Any) -> None:
    server, port = serve(Behaviour(starttls=True), tls=make_tls_options())
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "r@dest.test", MESSAGE)
    await connection.close()

    assert connection.tls and outcome.status == FINISHED
    assert server.messages[0].tls and server.messages[0].helo == "client.example.test"
    assert "STARTTLS" not in connection.extensions  # the post-TLS EHLO answer is the one kept


@aio_test
async def test_plaintext_behind_the_starttls_reply_ends_the_connection(serve: Any) -> None:
    """Bytes sent in clear with the 220, before TLS (injected on the path), would be read as the
    start of the first reply inside TLS and shift every reply after it."""
    server, port = serve(Behaviour(starttls=True, after_starttls=b"2"), tls=make_tls_options())
    with pytest.raises(SmtpConnectError, match="data after the STARTTLS reply"):
        await connected(port)
    assert not server.messages


@aio_test
async def test_a_2xx_to_data_is_no_delivery(serve: Any) -> None:
    """The body was never sent, nor its end acknowledged: tried again later, never FINISHED."""
    server, port = serve(Behaviour(data_code=250))
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "r@dest.test", MESSAGE, "r1")
    await connection.close()
    assert (outcome.status, outcome.retryable) == (WARNING, True)
    assert "unexpected reply before the end of the data: 250" in outcome.reply_text
    assert not server.messages


@aio_test
async def test_starttls_not_used_when_not_offered_or_disabled(serve: Any) -> None:
    plain, plain_port = serve()
    offered, offered_port = serve(Behaviour(starttls=True), tls=make_tls_options())
    no_tls = SmtpClientOptions("client.example.test", starttls=False)
    first = await connected(plain_port)
    second = await connected(offered_port, no_tls)
    for connection in (first, second):
        await connection.send("b@x.test", "r@dest.test", MESSAGE)
        await connection.close()

    assert not first.tls and not second.tls
    assert not plain.messages[0].tls and not offered.messages[0].tls


@aio_test
async def test_8bitmime_and_smtputf8_used_when_needed(serve: Any) -> None:
    server, port = serve()
    connection = await connected(port)
    await connection.send("b@x.test", "r@dest.test", MESSAGE)
    await connection.send("b@x.test", "r@dest.test", "Subject: été\r\n\r\ncafé\r\n".encode())
    await connection.send("b@x.test", "josé@dest.test", MESSAGE)
    await connection.close()

    assert [m.mail_params for m in server.messages] == [[], ["BODY=8BITMIME"], ["SMTPUTF8"]]
    assert server.messages[2].rcpt_to == ["josé@dest.test"]


@aio_test
async def test_utf8_address_refused_without_smtputf8(serve: Any) -> None:
    server, port = serve(Behaviour(smtputf8=False))
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "josé@dest.test", MESSAGE)
    await connection.close()

    assert (outcome.status, outcome.retryable) == (ERROR, False)
    assert "SMTPUTF8" in outcome.reply_text and server.messages == []


@aio_test
async def test_address_with_line_break_is_never_sent(serve: Any) -> None:
    server, port = serve()
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "r@dest.test>\r\nRSET", MESSAGE)
    assert outcome.status == ERROR and connection.usable
    assert (await connection.send("b@x.test", "r@dest.test", MESSAGE)).status == FINISHED
    await connection.close()
    assert [m.rcpt_to for m in server.messages] == [["r@dest.test"]]


# -- refusals and failures ------------------------------------------------------------------------


@aio_test
async def test_rcpt_rejected_with_550_is_an_error(serve: Any) -> None:
    server, port = serve(Behaviour(rcpt_code=550))
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "nobody@dest.test", MESSAGE, "r9")
    again = await connection.send("b@x.test", "other@dest.test", MESSAGE)
    await connection.close()

    assert (outcome.status, outcome.reply_code, outcome.reply_enhanced_code) == (ERROR, 550, "5.1.1")
    assert outcome.reply_text == "5.1.1 no such user" and not outcome.retryable
    assert again.status == ERROR and server.messages == []


@aio_test
async def test_451_then_accepted_on_retry(serve: Any) -> None:
    server, port = serve(Behaviour(tempfail_first=True))
    connection = await connected(port)
    first = await connection.send("b@x.test", "grey@dest.test", MESSAGE)
    second = await connection.send("b@x.test", "grey@dest.test", MESSAGE)
    await connection.close()

    assert (first.status, first.reply_code, first.reply_enhanced_code) == (WARNING, 451, "4.7.1")
    assert first.retryable
    assert second.status == FINISHED and len(server.messages) == 1


@aio_test
async def test_421_greeting_fails_the_connection(serve: Any) -> None:
    _, port = serve(Behaviour(greeting_code=421))
    with pytest.raises(SmtpConnectError) as raised:
        await connected(port)
    assert raised.value.reply_code == 421
    assert any(line.startswith("< 421") for line in raised.value.smtp_log)


@aio_test
async def test_refused_connection() -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, not listening
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        with pytest.raises(SmtpConnectError) as raised:
            await connected(port)
    assert "refused" in raised.value.reason.lower()


@aio_test
async def test_drop_after_greeting_fails_the_connection(serve: Any) -> None:
    _, port = serve(Behaviour(drop_at="greeting"))
    with pytest.raises(SmtpConnectError) as raised:
        await connected(port)
    assert "connection lost" in raised.value.reason


@aio_test
async def test_drop_after_mail_is_a_warning(serve: Any) -> None:
    server, port = serve(Behaviour(drop_at="mail"))
    connection = await connected(port)
    outcome = await connection.send("b@x.test", "r@dest.test", MESSAGE)

    assert (outcome.status, outcome.reply_code, outcome.retryable) == (WARNING, None, True)
    assert "connection lost" in outcome.reply_text and not connection.usable
    assert (await connection.send("b@x.test", "r@dest.test", MESSAGE)).status == WARNING
    await connection.close()


@aio_test
async def test_greeting_timeout_when_server_hangs(serve: Any) -> None:
    server, port = serve(Behaviour(hang_at="connect"))
    clock = Clock()
    connection = SmtpConnection(OPTIONS, "mx", clock)
    attempt = asyncio.ensure_future(connection.connect(HOST, port))
    await server.wait_for_connection()
    await asyncio.sleep(0.05)  # let the client see the connection too
    clock.advance(OPTIONS.reply_timeout - 0.1)
    await asyncio.sleep(0.01)
    assert not attempt.done()
    clock.advance(0.2)
    with pytest.raises(SmtpConnectError) as raised:
        await attempt
    assert "no reply within 5 s" in raised.value.reason


@aio_test
async def test_reply_timeout_during_a_transaction(serve: Any) -> None:
    _, port = serve(Behaviour(hang_at="mail"))
    clock = Clock()
    connection = await connected(port, clock=clock)
    sending = asyncio.ensure_future(connection.send("b@x.test", "r@dest.test", MESSAGE))
    await asyncio.sleep(0.05)
    assert not sending.done()
    clock.advance(OPTIONS.reply_timeout)
    outcome = await sending

    assert (outcome.status, outcome.reply_code) == (WARNING, None)
    assert "no reply within" in outcome.reply_text and not connection.usable
    await connection.close()


@aio_test
async def test_short_real_reply_timeout(serve: Any) -> None:
    _, port = serve(Behaviour(hang_at="mail"))
    options = SmtpClientOptions("client.example.test", reply_timeout=0.2)
    connection = await connected(port, options)
    outcome = await connection.send("b@x.test", "r@dest.test", MESSAGE)
    assert outcome.status == WARNING and "no reply within 0.2 s" in outcome.reply_text
    await connection.close()


@aio_test
async def test_connect_timeout_in_the_same_step_as_the_greeting_timeout_leaves_nothing_behind(
        serve: Any, monkeypatch: Any, caplog: Any) -> None:
    """The connect timer and the greeting's reply timer both fire in the clock step that follows
    the TCP connection, before the connect call resumes: the attempt fails as a connect timeout,
    the connection is closed, and no failed future is left for asyncio to log unretrieved."""
    server, port = serve(Behaviour(hang_at="connect"))
    clock = Clock()
    made = smtp_client._SmtpClientProtocol.connection_made

    def made_then_both_timers_fire(self: Any, transport: Any) -> None:
        made(self, transport)
        clock.advance(OPTIONS.connect_timeout)  # give_up, then the greeting's timer

    monkeypatch.setattr(smtp_client._SmtpClientProtocol, "connection_made", made_then_both_timers_fire)
    with pytest.raises(SmtpConnectError) as raised:
        await SmtpConnection(OPTIONS, "mx", clock).connect(HOST, port)
    assert "connect timeout" in raised.value.reason
    del raised  # its traceback holds the attempt's frames
    await asyncio.sleep(0.05)  # the transport's close runs its callbacks
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


@aio_test
async def test_a_sent_message_leaves_no_reference_cycle_behind(serve: Any) -> None:
    """Each transaction is freed when its send returns, not at the next collection: the processes
    collect rarely (common.gc_tuning), and a cycle per message would hold their memory until then."""
    _, port = serve()
    connection = await connected(port)
    gc.collect()
    gc.disable()
    try:
        for n in range(3):
            assert (await connection.send("b@x.test", f"r{n}@dest.test", MESSAGE)).status == FINISHED
        left = [o for o in gc.get_objects() if type(o) is smtp_client._Transaction]
    finally:
        gc.enable()
    await connection.close()
    assert left == []


@aio_test
async def test_an_international_domain_with_an_ascii_local_part_needs_no_smtputf8(serve: Any) -> None:
    """RFC 6531 asks for SMTPUTF8 only for a non-ASCII local part: the domain goes as its A-label,
    and a server without SMTPUTF8 (most) takes it."""
    server, port = serve(Behaviour(smtputf8=False))
    connection = await connected(port)
    outcome = await connection.send("news@exämple.test", "rcpt@bücher.test", MESSAGE, "r1")
    refused = await connection.send("b@x.test", "jürgen@dest.test", MESSAGE, "r2")
    await connection.close()
    assert outcome.status == FINISHED
    assert (server.messages[0].mail_from, server.messages[0].rcpt_to) == (
        "news@xn--exmple-cua.test", ["rcpt@xn--bcher-kva.test"])
    assert refused.status == ERROR and "SMTPUTF8 required" in refused.reply_text
