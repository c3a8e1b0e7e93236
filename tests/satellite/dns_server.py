"""A real authoritative DNS server on loopback, for tests.

The server answers over UDP and TCP on the same ephemeral port of 127.0.0.1 (or another loopback
address), from a background thread, so it works the same for synchronous tests, tests that block
on the reactor, and satellite processes started by a test. Messages are encoded with ``dnslib``.

Usage::

    from tests.satellite.dns_server import DnsTestServer

    with DnsTestServer() as dns:
        dns.add_mail_domain("example.test", "127.0.0.2")      # MX mx.example.test + its A record
        dns.add_mx("other.test", "mx1.other.test", preference=10, ttl=60)
        dns.add_a("mx1.other.test", "127.0.0.3", ttl=30)
        dns.add_aaaa("mx1.other.test", "::1")
        dns.add_null_mx("nomail.test")                        # RFC 7505 "0 ."
        dns.set_servfail("broken.test")                       # answers SERVFAIL
        dns.set_refused("refused.test")                       # answers REFUSED
        dns.set_unresponsive("silent.test")                   # never answers: client times out
        dns.add_txt("sel._domainkey.example.test", "v=DKIM1; k=rsa; p=...")
        dns.remove("other.test")                              # back to NXDOMAIN
        resolver_config = [dns.address]                       # ("127.0.0.1", port)
        config_line = dns.nameserver                          # "127.0.0.1:port"
        ...
        dns.query_count("other.test", "MX")                   # queries received so far
        dns.queries, dns.reset_queries(), dns.clear()         # every Query; forget; empty all

Or as pytest fixtures, bound in a test module (or a conftest.py); binding them by assignment
rather than ``from ... import dns_server`` keeps ruff's F811 quiet::

    from tests.satellite import dns_server as dns_helper
    from tests.satellite.dns_server import DnsTestServer

    dns_server = dns_helper.dns_server
    dns_server_factory = dns_helper.dns_server_factory

    def test_x(dns_server: DnsTestServer) -> None: ...
    def test_y(dns_server_factory: Callable[..., DnsTestServer]) -> None:
        second = dns_server_factory(host="127.0.0.2")

Zone rules: names are case-insensitive and may be given with or without the final dot; Unicode
names are stored in their IDNA 2008 A-label form. A name that has no record at all answers
NXDOMAIN; a name that has records but none of the asked type answers NOERROR with no answer
(NODATA). Each record keeps its own TTL. The zone may be changed while the server runs (thread
safe). A UDP answer larger than the client's limit (512 bytes, or its EDNS size) is sent
truncated (TC flag), so the client retries over TCP. Every query received, answered or not, is
recorded in ``queries`` (name, type, transport).
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import idna
import pytest
from dnslib import (  # type: ignore[import-untyped]
    AAAA,
    MX,
    QTYPE,
    RCODE,
    RR,
    TXT,
    A,
    DNSError,
    DNSRecord,
)

DEFAULT_TTL = 300
_TCP_IDLE_TIMEOUT = 5.0
_MAX_UDP_SIZE = 4096
_FAILURE_MODES = ("servfail", "refused", "drop")


@dataclass(frozen=True)
class Query:
    """One query received by the server."""

    name: str  # lower case, no final dot
    rdtype: str  # "MX", "A", ...
    transport: str  # "udp" or "tcp"


def normalize_name(name: str) -> str:
    """Return the zone key for ``name``: lower-case A-labels without the final dot."""
    name = name.strip().rstrip(".")
    if not name.isascii():
        name = idna.encode(name, uts46=True).decode("ascii")
    return name.lower()


class DnsTestServer:
    """Authoritative DNS server on loopback whose zone the test sets (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._records: dict[str, list[RR]] = {}
        self._failures: dict[str, str] = {}
        self._queries: list[Query] = []
        self._lock = threading.Lock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._tcp_clients: set[socket.socket] = set()
        self._tcp_threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -- life cycle -------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, the form ``MxResolver(nameservers=[...])`` takes."""
        return (self.host, self.port)

    @property
    def nameserver(self) -> str:
        """``"host:port"``, the form of the ``dns_servers`` config entries."""
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        """Bind UDP and TCP on one free port and start answering; returns self."""
        self._udp, self._tcp = _bind_udp_and_tcp(self.host)
        self.port = self._udp.getsockname()[1]
        self._thread = threading.Thread(
            target=self._serve, name=f"dns-test-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering, close every socket and join the server threads."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wakeup_w.send(b"x")
        self._thread.join(timeout=5)
        with self._lock:
            clients = list(self._tcp_clients)
        for client in clients:
            _close_quietly(client)
        for thread in self._tcp_threads:
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wakeup_r, self._wakeup_w):
            if sock is not None:
                sock.close()
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- zone -------------------------------------------------------------------------------

    def add_mx(
        self, domain: str, exchange: str, preference: int = 10, ttl: int = DEFAULT_TTL
    ) -> None:
        """Add an MX record ``domain -> exchange`` (exchange "." makes a null MX)."""
        exchange = "." if exchange == "." else normalize_name(exchange) + "."
        self._add(
            domain,
            RR(
                normalize_name(domain),
                QTYPE.MX,
                rdata=MX(exchange, preference),
                ttl=ttl,
            ),
        )

    def add_null_mx(self, domain: str, ttl: int = DEFAULT_TTL) -> None:
        """Declare that ``domain`` accepts no mail (RFC 7505: ``MX 0 .``)."""
        self.add_mx(domain, ".", preference=0, ttl=ttl)

    def add_a(self, name: str, address: str, ttl: int = DEFAULT_TTL) -> None:
        """Add an A (IPv4) record."""
        self._add(name, RR(normalize_name(name), QTYPE.A, rdata=A(address), ttl=ttl))

    def add_aaaa(self, name: str, address: str, ttl: int = DEFAULT_TTL) -> None:
        """Add an AAAA (IPv6) record."""
        self._add(
            name, RR(normalize_name(name), QTYPE.AAAA, rdata=AAAA(address), ttl=ttl)
        )

    def add_txt(self, name: str, text: str, ttl: int = DEFAULT_TTL) -> None:
        """Add a TXT record (split in 255-byte strings), e.g. a DKIM public key."""
        data = text.encode()
        chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        self._add(name, RR(normalize_name(name), QTYPE.TXT, rdata=TXT(chunks), ttl=ttl))

    def add_mail_domain(
        self, domain: str, address: str, preference: int = 10, ttl: int = DEFAULT_TTL
    ) -> str:
        """Make ``domain`` deliverable to ``address``: MX ``mx.<domain>`` and its A record.

        Returns the MX host name.
        """
        host = "mx." + normalize_name(domain)
        self.add_mx(domain, host, preference=preference, ttl=ttl)
        self.add_a(host, address, ttl=ttl)
        return host

    def set_servfail(self, name: str) -> None:
        """Every query for ``name`` answers SERVFAIL."""
        self._set_failure(name, "servfail")

    def set_refused(self, name: str) -> None:
        """Every query for ``name`` answers REFUSED."""
        self._set_failure(name, "refused")

    def set_unresponsive(self, name: str) -> None:
        """Queries for ``name`` are recorded but never answered (the client times out)."""
        self._set_failure(name, "drop")

    def remove(self, name: str) -> None:
        """Forget every record and failure mode of ``name`` (it becomes NXDOMAIN)."""
        key = normalize_name(name)
        with self._lock:
            self._records.pop(key, None)
            self._failures.pop(key, None)

    def clear(self) -> None:
        """Empty the zone and forget the queries received."""
        with self._lock:
            self._records.clear()
            self._failures.clear()
            self._queries.clear()

    # -- query accounting ---------------------------------------------------------------------

    @property
    def queries(self) -> list[Query]:
        """A copy of every query received so far, in arrival order."""
        with self._lock:
            return list(self._queries)

    def query_count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """Number of queries received, optionally only for ``name`` and/or type ``rdtype``."""
        key = None if name is None else normalize_name(name)
        return sum(
            1
            for query in self.queries
            if (key is None or query.name == key)
            and (rdtype is None or query.rdtype == rdtype.upper())
        )

    def reset_queries(self) -> None:
        """Forget the queries received so far."""
        with self._lock:
            self._queries.clear()

    # -- internals ----------------------------------------------------------------------------

    def _add(self, name: str, record: RR) -> None:
        with self._lock:
            self._records.setdefault(normalize_name(name), []).append(record)

    def _set_failure(self, name: str, mode: str) -> None:
        assert mode in _FAILURE_MODES
        with self._lock:
            self._failures[normalize_name(name)] = mode

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ)
            selector.register(self._tcp, selectors.EVENT_READ)
            selector.register(self._wakeup_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._udp:
                        self._handle_udp()
                    elif key.fileobj is self._tcp:
                        self._accept_tcp()

    def _handle_udp(self) -> None:
        assert self._udp is not None
        try:
            data, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self._answer(data, "udp")
        if reply is not None:
            self._udp.sendto(reply, peer)

    def _accept_tcp(self) -> None:
        assert self._tcp is not None
        try:
            client, _ = self._tcp.accept()
        except OSError:
            return
        client.settimeout(_TCP_IDLE_TIMEOUT)
        with self._lock:
            self._tcp_clients.add(client)
        thread = threading.Thread(
            target=self._serve_tcp_client, args=(client,), daemon=True
        )
        self._tcp_threads = [t for t in self._tcp_threads if t.is_alive()] + [thread]
        thread.start()

    def _serve_tcp_client(self, client: socket.socket) -> None:
        """Answer length-prefixed queries until the client closes or goes idle."""
        try:
            while not self._stopping.is_set():
                header = _recv_exactly(client, 2)
                if header is None:
                    return
                data = _recv_exactly(client, struct.unpack("!H", header)[0])
                if data is None:
                    return
                reply = self._answer(data, "tcp")
                if reply is not None:
                    client.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return
        finally:
            with self._lock:
                self._tcp_clients.discard(client)
            _close_quietly(client)

    def _answer(self, data: bytes, transport: str) -> bytes | None:
        """Build the wire reply to one query, or None when it must go unanswered."""
        try:
            request = DNSRecord.parse(data)
        except DNSError:  # garbage: a test server just ignores it
            return None
        name = normalize_name(str(request.q.qname))
        rdtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        with self._lock:
            self._queries.append(Query(name, rdtype, transport))
            failure = self._failures.get(name)
            records = list(self._records.get(name, ()))
        if failure == "drop":
            return None
        reply = request.reply()
        if failure is not None:
            reply.header.rcode = (
                RCODE.SERVFAIL if failure == "servfail" else RCODE.REFUSED
            )
        elif not records:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for record in records:
                if request.q.qtype in (record.rtype, QTYPE.ANY):
                    reply.add_answer(record)
        wire = bytes(reply.pack())
        if transport == "udp" and len(wire) > _udp_limit(request):
            wire = _truncated_reply(request)
        return wire


def _udp_limit(request: DNSRecord) -> int:
    """Largest UDP reply the client accepts: its EDNS buffer size, else 512 bytes."""
    for record in request.ar:
        if record.rtype == QTYPE.OPT:
            return int(min(max(record.rclass, 512), _MAX_UDP_SIZE))
    return 512


def _truncated_reply(request: DNSRecord) -> bytes:
    """An empty reply with the TC flag, keeping the question (dnslib's truncate() drops it)."""
    reply = request.reply()
    reply.header.tc = 1
    return bytes(reply.pack())


def _bind_udp_and_tcp(host: str) -> tuple[socket.socket, socket.socket]:
    """Bind a UDP and a TCP socket to the same free port (retrying if TCP's is taken)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError as exc:
            udp.close()
            tcp.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        tcp.listen(16)
        return udp, tcp
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    """Read exactly ``size`` bytes, or None if the peer closed first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def dns_server() -> Iterator[DnsTestServer]:
    """A started ``DnsTestServer`` on 127.0.0.1 with an empty zone, stopped after the test."""
    with DnsTestServer() as server:
        yield server


@pytest.fixture
def dns_server_factory() -> Iterator[Callable[..., DnsTestServer]]:
    """A function ``(host="127.0.0.1") -> started DnsTestServer``; all are stopped after the test."""
    servers: list[DnsTestServer] = []

    def start(host: str = "127.0.0.1") -> DnsTestServer:
        server = DnsTestServer(host).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
