"""Real SMTP servers for tests and benchmarks, on loopback addresses (127.0.0.x).

A small, fast Twisted SMTP server (PIPELINING-aware: replies to the commands of one segment go
out in one write) whose misbehaviour is chosen with a :class:`Behaviour`::

    Behaviour()                          accept everything, store each message
    Behaviour(rcpt_code=550)             reject every RCPT with 550 5.1.1
    Behaviour(rcpt_codes={"x@y": 550})   reject that address only
    Behaviour(tempfail_first=True)       451 4.7.1 on the first RCPT of an address, 250 after
    Behaviour(hang_at="connect")         accept the TCP connection, never send a greeting
    Behaviour(hang_at="mail")            never answer MAIL FROM (the reply timeout case)
    Behaviour(drop_at="greeting")        close right after the greeting
    Behaviour(drop_at="mail")            close when MAIL FROM arrives, without replying
    Behaviour(greeting_code=421)         "421 busy" on connect, then close
    Behaviour(starttls=True)             advertise STARTTLS (needs ``tls=make_tls_options()``)
    Behaviour(starttls=True, after_starttls=b"2")  those plaintext bytes right behind the STARTTLS
                                         220, before TLS (a reply injected on the path)
    Behaviour(data_code=250)             answer DATA with that code instead of 354 (out of step)
    Behaviour(pipelining=False, esmtp=False, eightbitmime=False, smtputf8=False)  fewer features
    Behaviour(store=False)               count messages and bytes only (benchmarks)
    Behaviour(close_after_messages=1)    close right after queuing that many messages on a connection,
                                         ignoring what else came with the last one

Any reply code 421 makes the server close the connection after sending it.

API::

    server = SmtpTestServer(Behaviour(), tls=None)
    port = server.listen("127.0.0.2", 0)        # 0: any free port; returns the port
    server.messages      -> list[ReceivedMessage] (mail_from, rcpt_to, data un-dot-stuffed, ...)
    server.message_count, server.byte_count, server.connections_total, server.max_concurrent
    server.batches       -> per connection, the commands grouped by received segment, "." for the
                            end of a message's data: [["EHLO"], ["MAIL", "RCPT", "DATA"], ["."], ...]
                            (shows pipelining)
    await server.wait_for_connection()          # a connection was accepted
    await server.stop()                         # stop listening, drop connections

    servers, port = start_servers({"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour(rcpt_code=550)})
    # one server per address, all on the same port (like MX hosts on port ``smtp_port``)

Run a standalone sink (benchmarks): ``python -m tests.satellite.smtp_servers 127.0.0.1:2525``.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer


@dataclass(frozen=True)
class Behaviour:
    """How a :class:`SmtpTestServer` answers (see the module docstring)."""

    greeting_code: int = 220
    hang_at: str = ""  # "connect" or "mail"
    drop_at: str = ""  # "greeting" or "mail"
    esmtp: bool = True
    pipelining: bool = True
    starttls: bool = False
    eightbitmime: bool = True
    smtputf8: bool = True
    rcpt_code: int = 250
    rcpt_codes: dict[str, int] = field(default_factory=dict)  # per address, over rcpt_code
    tempfail_first: bool = False
    store: bool = True
    hostname: str = "mx.test"
    close_after_messages: int = 0  # 0: never
    after_starttls: bytes = b""
    data_code: int = 354


@dataclass
class ReceivedMessage:
    """One accepted message: its envelope and its bytes, dot-stuffing removed."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes
    mail_params: list[str]
    helo: str
    tls: bool


_REPLIES = {
    "RCPT550": b"550 5.1.1 no such user\r\n",
    "RCPT451": b"451 4.7.1 greylisted, try again later\r\n",
}


class _ServerProtocol(Protocol):
    def __init__(self, server: SmtpTestServer) -> None:
        self.server = server
        self.behaviour = server.behaviour
        self.buffer = b""
        self.in_data = False
        self.scanned = 0
        self.tls = False
        self.helo = ""
        self.mail_from: str | None = None
        self.mail_params: list[str] = []
        self.rcpt_to: list[str] = []
        self.out: list[bytes] = []
        self.closing = False
        self.hanging = False
        self.batches: list[list[str]] = []
        self.queued = 0
        self.tcp: Any = None

    def connectionMade(self) -> None:
        self.tcp = self.transport
        self.tcp.setTcpNoDelay(True)
        self.server._connection_opened(self)
        if self.behaviour.hang_at == "connect":
            self.hanging = True
            return
        if self.behaviour.greeting_code != 220:
            self._reply(b"%d service not available, closing\r\n" % self.behaviour.greeting_code)
            self.closing = True
        else:
            self._reply(b"220 %s ESMTP test server\r\n" % self.behaviour.hostname.encode())
            if self.behaviour.drop_at == "greeting":
                self.closing = True
        self._flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server._connection_closed(self)

    def dataReceived(self, data: bytes) -> None:
        if self.hanging or self.closing:
            return
        self.buffer += data
        self.batches.append([])
        while self.buffer and not (self.hanging or self.closing):
            if self.in_data:
                if not self._consume_data():
                    break
            elif not self._consume_line():
                break
        self._flush()

    # -- parsing -----------------------------------------------------------------------------
    def _consume_line(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
        self._command(line.decode("utf-8", "replace"))
        return True

    def _consume_data(self) -> bool:
        if self.buffer.startswith(b".\r\n"):
            end = -2  # empty message
        else:
            end = self.buffer.find(b"\r\n.\r\n", max(0, self.scanned - 4))
            if end < 0:
                self.scanned = len(self.buffer)
                return False
        body, self.buffer = self.buffer[: end + 2], self.buffer[end + 5 :]
        self.in_data, self.scanned = False, 0
        self.server._message_received(self, _unstuff(body))
        self.mail_from, self.rcpt_to = None, []
        self.batches[-1].append(".")
        self._reply(b"250 2.0.0 Ok: queued\r\n")
        self.queued += 1
        if self.queued == self.behaviour.close_after_messages:
            self.closing = True
        return True

    # -- commands ------------------------------------------------------------------------------
    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        self.batches[-1].append(verb)
        handler = getattr(self, "_do_" + verb, None)
        if handler is None:
            self._reply(b"502 5.5.2 command not recognized\r\n")
        else:
            handler(arg)

    def _do_EHLO(self, arg: str) -> None:
        if not self.behaviour.esmtp:
            self._reply(b"502 5.5.2 no ESMTP here\r\n")
            return
        self.helo = arg
        features = ["SIZE 52428800"]
        if self.behaviour.pipelining:
            features.append("PIPELINING")
        if self.behaviour.eightbitmime:
            features.append("8BITMIME")
        if self.behaviour.smtputf8:
            features.append("SMTPUTF8")
        if self.behaviour.starttls and not self.tls and self.server.tls is not None:
            features.append("STARTTLS")
        lines = [self.behaviour.hostname] + features
        text = "".join(f"250-{item}\r\n" for item in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._reply(text.encode())

    def _do_HELO(self, arg: str) -> None:
        self.helo = arg
        self._reply(b"250 %s\r\n" % self.behaviour.hostname.encode())

    def _do_STARTTLS(self, arg: str) -> None:
        self._reply(b"220 2.0.0 ready to start TLS\r\n" + self.behaviour.after_starttls)
        self._flush()
        self.tcp.startTLS(self.server.tls)
        self.tls, self.helo = True, ""

    def _do_MAIL(self, arg: str) -> None:
        if self.behaviour.drop_at == "mail":
            self.closing = True
            return
        if self.behaviour.hang_at == "mail":
            self.hanging = True
            return
        address, _, params = arg.partition(">")
        self.mail_from = address.partition("<")[2]
        self.mail_params = params.split()
        self.rcpt_to = []
        self._reply(b"250 2.1.0 Ok\r\n")

    def _do_RCPT(self, arg: str) -> None:
        if self.mail_from is None:
            self._reply(b"503 5.5.1 need MAIL first\r\n")
            return
        address = arg.partition("<")[2].partition(">")[0]
        code = self.behaviour.rcpt_codes.get(address, self.behaviour.rcpt_code)
        if self.behaviour.tempfail_first and address not in self.server.greylist_seen:
            self.server.greylist_seen.add(address)
            code = 451
        if code == 250:
            self.rcpt_to.append(address)
            self._reply(b"250 2.1.5 Ok\r\n")
        elif code == 550:
            self._reply(_REPLIES["RCPT550"])
        elif code == 451:
            self._reply(_REPLIES["RCPT451"])
        else:
            self._reply(b"%d rcpt refused\r\n" % code)

    def _do_DATA(self, arg: str) -> None:
        if not self.rcpt_to:
            self._reply(b"554 5.5.1 no valid recipients\r\n")
            return
        if self.behaviour.data_code != 354:
            self._reply(b"%d 2.0.0 Ok\r\n" % self.behaviour.data_code)
            return
        self.in_data = True
        self._reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def _do_RSET(self, arg: str) -> None:
        self.mail_from, self.rcpt_to = None, []
        self._reply(b"250 2.0.0 Ok\r\n")

    def _do_NOOP(self, arg: str) -> None:
        self._reply(b"250 2.0.0 Ok\r\n")

    def _do_QUIT(self, arg: str) -> None:
        self._reply(b"221 2.0.0 Bye\r\n")
        self.closing = True

    # -- output --------------------------------------------------------------------------------
    def _reply(self, line: bytes) -> None:
        self.out.append(line)
        if line.startswith(b"421"):
            self.closing = True

    def _flush(self) -> None:
        if self.out:
            self.tcp.write(b"".join(self.out))
            self.out = []
        if self.closing:
            self.tcp.loseConnection()


def _unstuff(body: bytes) -> bytes:
    # RFC 5321 4.5.2: a line starting with "." loses that first character.
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\r\n.", b"\r\n")


class SmtpTestServer(Factory):
    """A listening SMTP server with a fixed :class:`Behaviour`, recording what it receives."""

    def __init__(self, behaviour: Behaviour | None = None, tls: Any = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.tls = tls
        self.messages: list[ReceivedMessage] = []
        self.message_count = 0
        self.byte_count = 0
        self.connections_total = 0
        self.max_concurrent = 0
        self.greylist_seen: set[str] = set()
        self.batches: list[list[list[str]]] = []
        self._open: set[_ServerProtocol] = set()
        self._port: Any = None
        self._connection_waiters: list[asyncio.Future[None]] = []

    def buildProtocol(self, addr: Any) -> _ServerProtocol:
        return _ServerProtocol(self)

    def listen(self, host: str, port: int = 0, reactor: Any = None) -> int:
        """Start listening on ``host:port`` (0: any free port); return the port."""
        if reactor is None:
            from twisted.internet import reactor
        self._port = reactor.listenTCP(port, self, interface=host, backlog=256)
        return int(self._port.getHost().port)

    async def wait_for_connection(self) -> None:
        """Return once at least one connection has been accepted."""
        if self.connections_total:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connection_waiters.append(future)
        await future

    async def stop(self) -> None:
        """Stop listening and drop open connections."""
        for protocol in list(self._open):
            protocol.tcp.abortConnection()
        if self._port is not None:
            await self._port.stopListening().asFuture(asyncio.get_running_loop())
            self._port = None

    def _connection_opened(self, protocol: _ServerProtocol) -> None:
        self._open.add(protocol)
        self.batches.append(protocol.batches)
        self.connections_total += 1
        self.max_concurrent = max(self.max_concurrent, len(self._open))
        for future in self._connection_waiters:
            if not future.done():
                future.set_result(None)
        self._connection_waiters = []

    def _connection_closed(self, protocol: _ServerProtocol) -> None:
        self._open.discard(protocol)

    @property
    def open_connections(self) -> int:
        """Connections currently open."""
        return len(self._open)

    def _message_received(self, protocol: _ServerProtocol, data: bytes) -> None:
        self.message_count += 1
        self.byte_count += len(data)
        if self.behaviour.store:
            self.messages.append(
                ReceivedMessage(
                    protocol.mail_from or "", list(protocol.rcpt_to), data,
                    protocol.mail_params, protocol.helo, protocol.tls,
                )
            )


def start_servers(
    behaviours: Mapping[str, Behaviour], tls: Any = None, attempts: int = 20
) -> tuple[dict[str, SmtpTestServer], int]:
    """One server per loopback address, all on one free port; returns (servers, port)."""
    from twisted.internet.error import CannotListenError

    for _ in range(attempts):
        port = random.randint(20000, 60000)
        servers: dict[str, SmtpTestServer] = {}
        try:
            for host, behaviour in behaviours.items():
                servers[host] = SmtpTestServer(behaviour, tls)
                servers[host].listen(host, port)
            return servers, port
        except CannotListenError:
            for server in servers.values():
                if server._port is not None:
                    server._port.stopListening()
    raise RuntimeError("no common free port found")


@implementer(IOpenSSLContextFactory)
class _ServerTls:
    """A Twisted context factory (``getContext``) for the server side of STARTTLS."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def getContext(self) -> Any:
        return self._context


def make_tls_options(hostname: str = "mx.test") -> Any:
    """Server TLS options with a fresh self-signed certificate (EC P-256, valid one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import SSL

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(cert)
    context.use_privatekey(key)
    return _ServerTls(context)


def _main(argv: list[str]) -> None:
    """Standalone counting sink: ``python -m tests.satellite.smtp_servers HOST:PORT``."""
    from twisted.internet import reactor as default_reactor
    from twisted.internet import task

    reactor: Any = default_reactor
    host, _, port = (argv[1] if len(argv) > 1 else "127.0.0.1:2525").rpartition(":")
    server = SmtpTestServer(Behaviour(store=False))
    server.listen(host, int(port))

    def report() -> None:
        print(f"messages={server.message_count} bytes={server.byte_count}", flush=True)

    task.LoopingCall(report).start(5.0, now=False)
    print(f"listening on {host}:{port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    _main(sys.argv)
