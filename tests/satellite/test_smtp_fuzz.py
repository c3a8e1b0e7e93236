"""The SMTP client against a server that answers anything: generated replies (any codes, multi-line,
very long lines, invalid UTF-8, control characters, garbage) from a loopback server. Whatever the
server says, no exception escapes, the outcome's reply_text and smtp_log are bounded valid text,
and the link and the API answers that carry them stay well-formed."""

from __future__ import annotations

import asyncio
import json
import logging
import xmlrpc.client
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from cloudmailing.api.xmlrpc_writer import dump_response
from cloudmailing.common.aio import wait_deferred
from cloudmailing.common.link_protocol import Outcome
from cloudmailing.satellite import outcomes
from cloudmailing.satellite.outcomes import SMTP_LOG_MAX_LINE_CHARS, SMTP_LOG_MAX_LINES, DeliveryOutcome
from cloudmailing.satellite.smtp_client import SmtpClientOptions, SmtpConnectError, SmtpConnection
from tests.common.properties import on_loop, run_property
from tests.helpers import aio_test

HOST = "127.0.0.2"
OPTIONS = SmtpClientOptions("client.example.test", connect_timeout=5, reply_timeout=5, starttls=False)
MESSAGE = b"From: <s@example.test>\r\nSubject: hi\r\n\r\nHello.\r\n"


class ScriptedServer(Protocol):
    """Sends the script's first chunk on connect, the next one for each line received, and closes
    once the script is spent."""

    def __init__(self, script: list[bytes]) -> None:
        self._script = list(script)
        self._buffer = b""

    def connectionMade(self) -> None:
        self._next()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for _ in lines:
            self._next()

    def _next(self) -> None:
        transport: Any = self.transport
        if self._script:
            transport.write(self._script.pop(0))
        if not self._script:
            transport.loseConnection()


text_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")) | st.sampled_from(
    [b"ok", b"5.1.1 no such user", b"\xff\xfe\x00\x1b[31m\r", "é ✉ 漢".encode(), b"\xed\xa0\x80"])
long_line = st.integers(1000, 70_000).map(lambda n: b"\xc3" * n)  # to past the client's 64 KiB line limit
usual_codes = st.sampled_from([b"220", b"250", b"354", b"421", b"451", b"550", b"221"])
codes = st.one_of(usual_codes, usual_codes, usual_codes, st.integers(0, 999).map(lambda code: b"%03d" % code),
                  st.binary(max_size=3))  # mostly codes a server would send


@st.composite
def replies(draw: st.DrawFn) -> bytes:
    code = draw(codes)
    lines = draw(st.lists(st.one_of(text_bytes, text_bytes, text_bytes, long_line), min_size=1, max_size=4))
    body = b"".join(code + b"-" + line + b"\r\n" for line in lines[:-1])
    return body + code + draw(st.sampled_from([b" ", b" ", b"", b"\t"])) + lines[-1] + draw(st.sampled_from(
        [b"\r\n", b"\r\n", b"\n", b""]))


chunks = st.lists(st.one_of(replies(), replies(), replies(), st.binary(max_size=60)), max_size=8)
# Most scripts start with a sound greeting and EHLO answer, so that the envelope and data replies
# (the ones outcomes are made of) get generated too.
handshakes = st.sampled_from([[b"220 mx ESMTP\r\n", b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n"],
                              [b"220 mx ESMTP\r\n", b"250 mx\r\n"]])
transactions = st.lists(st.one_of(replies(), replies(), replies(), st.binary(max_size=60)), min_size=3, max_size=6)
scripts = chunks | st.tuples(handshakes, transactions).map(lambda parts: parts[0] + parts[1])


async def _deliver(port: int, clock: Clock, messages: int) -> list[DeliveryOutcome | None]:
    """``messages`` messages through a new connection, started at once (the next rides on the one
    before); a failed connect reported as the scheduler does."""
    connection = SmtpConnection(OPTIONS, "mx.fuzz.test", clock)
    try:
        await connection.connect(HOST, port)
    except SmtpConnectError as error:
        return [outcomes.temporary_failure("r1", f"mx.fuzz.test [{HOST}]: {error.reason}", error.smtp_log,
                                           "mx.fuzz.test", error.reply_code)]
    started = [connection.start("bounce@example.test", f"rcpt{n}@fuzz.test", MESSAGE, f"r{n + 1}")
               for n in range(messages)]
    ended = [await outcome for outcome in started]
    await connection.close()
    return ended


async def _outcomes_of(script: list[bytes], messages: int) -> list[DeliveryOutcome | None]:
    clock = Clock()
    factory = Factory.forProtocol(lambda: ScriptedServer(script))
    port = reactor.listenTCP(0, factory, interface=HOST)
    try:
        task = asyncio.ensure_future(_deliver(port.getHost().port, clock, messages))
        while not task.done():  # the client awaits a reply the script never completes: time it out
            await asyncio.wait({task}, timeout=0.05)
            clock.advance(OPTIONS.reply_timeout)
        return task.result()
    finally:
        await wait_deferred(port.stopListening())


async def _outcome_of(script: list[bytes]) -> DeliveryOutcome:
    [outcome] = await _outcomes_of(script, 1)
    assert outcome is not None  # only a message riding on another one can be "not tried"
    return outcome


def _check(outcome: DeliveryOutcome) -> None:
    assert len(outcome.reply_text) <= SMTP_LOG_MAX_LINE_CHARS
    assert len(outcome.smtp_log) <= SMTP_LOG_MAX_LINES
    assert all(len(line) <= SMTP_LOG_MAX_LINE_CHARS for line in outcome.smtp_log)
    for text in (outcome.reply_text, outcome.reply_enhanced_code, *outcome.smtp_log):
        text.encode("utf-8")  # valid text: no lone surrogate
    # To the master over the link, and back.
    wire = Outcome(outcome.recipient_id, outcome.status, outcome.reply_code, outcome.reply_enhanced_code,
                   outcome.reply_text, outcome.smtp_log, outcome.mx_host).to_wire()
    assert Outcome.from_wire(json.loads(json.dumps(wire))).reply_text == outcome.reply_text
    # Shown by the API (get_recipients_status): a well-formed XML-RPC answer.
    shown = {"id": "r1", "status": outcome.status, "reply_code": outcome.reply_code or 0,
             "reply_enhanced_code": outcome.reply_enhanced_code, "reply_text": outcome.reply_text,
             "smtp_log": "\n".join(outcome.smtp_log)}
    (parsed,), _ = xmlrpc.client.loads(dump_response([shown]))
    assert parsed[0]["status"] == outcome.status and isinstance(parsed[0]["smtp_log"], str)


def _scripted(max_examples: int) -> Any:
    """A property over generated server scripts, run on the test's loop (see run_property)."""
    shared = settings(max_examples=max_examples, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large])
    return lambda test: shared(given(scripts)(test))


@aio_test
async def test_any_server_replies_give_a_bounded_outcome_and_well_formed_answers(caplog):
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.INFO)

    @_scripted(max_examples=120)
    def check(script: list[bytes]) -> None:
        caplog.clear()
        outcome = on_loop(loop, _outcome_of(script))
        event(f"{outcome.status}, {'a reply' if outcome.reply_code is not None else 'no reply'}")
        _check(outcome)
        assert [r for r in caplog.records if r.exc_info or r.levelno > logging.WARNING] == []

    await run_property(check)


@aio_test
async def test_any_server_replies_to_messages_riding_on_each_other(caplog):
    """Three messages started at once on one connection: each gets exactly one outcome, bounded;
    only those after the first may be "not tried" (None), and then every one after it too."""
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.INFO)

    @_scripted(max_examples=80)
    def check(script: list[bytes]) -> None:
        caplog.clear()
        ended = on_loop(loop, _outcomes_of(script, 3))
        assert len(ended) in (1, 3) and ended[0] is not None
        tried = [outcome for outcome in ended if outcome is not None]
        assert ended == tried + [None] * (len(ended) - len(tried))
        assert [outcome.recipient_id for outcome in tried] == [f"r{n + 1}" for n in range(len(tried))]
        event(f"{len(tried)} of {len(ended)} tried")
        for outcome in tried:
            _check(outcome)
        assert [r for r in caplog.records if r.exc_info or r.levelno > logging.WARNING] == []

    await run_property(check)


@aio_test
async def test_a_hostile_reply_is_cut_to_the_bounds():
    huge = b"550 5.7.1 " + b"\x00\xff\x1b" * 20_000 + b"\r\n"
    outcome = await _outcome_of([b"220 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", huge])
    assert outcome.status == outcomes.ERROR and outcome.reply_code == 550
    assert outcome.reply_enhanced_code == "5.7.1" and len(outcome.reply_text) == SMTP_LOG_MAX_LINE_CHARS
    _check(outcome)
