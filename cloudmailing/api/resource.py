"""The HTTP side of the API: a Twisted web resource that authenticates, parses and maps faults."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from pymongo.errors import DocumentTooLarge, PyMongoError
from twisted.web import http, resource, server

from cloudmailing.api.auth import Authenticator
from cloudmailing.api.methods import SIGNATURES, ApiMethod, method_help
from cloudmailing.api.xmlrpc_codec import MalformedRequest, dump_fault, dump_response, parse_call
from cloudmailing.api.xmlrpc_writer import GZIP_AT_LEAST, gzipped
from cloudmailing.common.aio import as_deferred
from cloudmailing.common.clock import Clock
from cloudmailing.services.errors import ServiceError

log = logging.getLogger(__name__)

API_PATHS = (b"/CloudMailing", b"/RPC2")


# Body bytes a request may send before its credentials are known to be good: enough for any
# small call; a larger body waits (the socket is not read) until the key has been checked.
PREAUTH_BODY_BYTES = 64 * 1024
CLOSE_GRACE_SECONDS = 1.0  # a refused, unread connection is aborted after this long


class BoundedRequest(server.Request):
    """A request that refuses bodies over ``max_body`` bytes, and reads at most
    ``PREAUTH_BODY_BYTES`` of a body before its credentials are checked.

    A refused request is never executed: the channel may still parse the end of a chunked body,
    but the request it completes is dropped (:meth:`requestReceived`)."""

    max_body = 32 * 1024 * 1024
    authenticator: Authenticator | None = None
    reactor: Any = None  # IReactorTime (its stubs type callLater oddly)
    authenticated: asyncio.Future[bool] | None = None  # started as soon as the headers are in
    _refused = False
    _paused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._refuse_too_large(f"Content-Length {length}")
            return
        super().gotLength(length)
        if self.authenticator is not None:
            self.authenticated = asyncio.ensure_future(self.authenticator.authenticate(
                self.getHeader(b"authorization"), self.getClientAddress().host))  # type: ignore[attr-defined]
            self.authenticated.add_done_callback(self._credentials_checked)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse_too_large("chunked body")
            return
        if self._received > PREAUTH_BODY_BYTES and not self._credentials_good() and not self._paused:
            self._paused = True  # read no more until the key is checked
            self.channel.transport.pauseProducing()  # type: ignore[union-attr]
            if self.authenticated is not None and self.authenticated.done():
                self._credentials_checked(self.authenticated)  # known bad already
                return
        super().handleContentChunk(data)

    def connectionLost(self, reason: Any) -> None:
        if self.authenticated is not None and not self.authenticated.done():
            self.authenticated.cancel()  # the client left: its key check leaves its address's line
        super().connectionLost(reason)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:  # answered already; the connection is closing
            return
        super().requestReceived(command, path, version)

    def _credentials_good(self) -> bool:
        future = self.authenticated
        return future is None or (future.done() and not future.cancelled() and future.exception() is None
                                  and future.result())

    def _credentials_checked(self, future: asyncio.Future[bool]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved here: a refused request may never await it
        if not self._paused or self._refused or self.channel is None:
            return  # the resource answers (a small body, or one that was complete anyway)
        if self._credentials_good():
            self._paused = False
            self.channel.transport.resumeProducing()  # type: ignore[union-attr]
            return
        self._refused = True  # the check waited its source's turn already: answer at once
        self._write_and_close(b"401 Unauthorized", dump_fault(401, "authentication required: user admin, an API key"),
                              b'WWW-Authenticate: Basic realm="CloudMailing"\r\n')

    def _refuse_too_large(self, what: str) -> None:
        if self._refused:
            return
        self._refused = True
        log.info("refused request: %s over %d bytes", what, self.max_body,
                 extra={"client": self.getClientAddress().host})  # type: ignore[attr-defined]
        self._write_and_close(b"413 Payload Too Large", b"")

    def _write_and_close(self, status: bytes, body: bytes, headers: bytes = b"") -> None:
        channel: Any = self.channel
        if channel is None or channel.transport is None:
            return
        channel.transport.write(b"HTTP/1.1 " + status + b"\r\n" + headers + b"Content-Type: text/xml\r\n"
                                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        channel.loseConnection()
        if self._paused and self.reactor is not None:
            # TLS waits for the peer's close_notify, which we no longer read: cut it short.
            self.reactor.callLater(CLOSE_GRACE_SECONDS, _abort, channel.transport)


def _abort(transport: Any) -> None:
    if transport.connected:
        transport.abortConnection()


def request_factory(max_body: int, authenticator: Authenticator | None, reactor: Clock) -> type[BoundedRequest]:
    """The Site's request class: bodies over ``max_body`` get 413; with ``authenticator``, a body
    over ``PREAUTH_BODY_BYTES`` is read only once its credentials are good (else 401, unread)."""
    return type("ApiRequest", (BoundedRequest,),
                {"max_body": max_body, "authenticator": authenticator, "reactor": reactor})


class XmlRpcResource(resource.Resource):
    isLeaf = True

    def __init__(self, methods: dict[str, ApiMethod], authenticator: Authenticator, max_depth: int = 64) -> None:
        super().__init__()
        self._methods = methods
        self._auth = authenticator
        self._max_depth = max_depth

    def render_GET(self, request: server.Request) -> bytes:
        request.setResponseCode(http.NOT_ALLOWED)
        request.setHeader(b"Allow", b"POST")
        return b"XML-RPC: POST only\n"

    def render_POST(self, request: server.Request) -> Any:
        if request.path not in API_PATHS:
            request.setResponseCode(http.NOT_FOUND)
            return b"Not found\n"
        as_deferred(self._handle(request))
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request) -> None:
        address = request.getClientAddress().host
        try:
            early = getattr(request, "authenticated", None)  # started by BoundedRequest
            good = await early if early is not None else await self._auth.authenticate(
                request.getHeader(b"authorization"), address)
            if not good:
                request.setHeader(b"WWW-Authenticate", b'Basic realm="CloudMailing"')
                _finish(request, http.UNAUTHORIZED, dump_fault(401, "authentication required: user admin, an API key"))
                return
            body = request.content.read() if request.content is not None else b""
            answer = await self._call(body, address)
        except asyncio.CancelledError:  # the client left while its key check waited: nobody to answer
            return
        except PyMongoError as error:  # the key check's read: the database is away, as in a call
            log.error("database error checking an API key: %s", error, extra={"client": address})
            answer = dump_fault(500, "database unavailable, please retry")
        except Exception:  # never let a bug leave a request hanging
            log.exception("unexpected error answering a request", extra={"client": address})
            answer = dump_fault(500, "internal error (see the master's log)")
        _finish(request, http.OK, answer)

    async def _call(self, body: bytes, address: str) -> bytes:
        try:
            name, params = parse_call(body, self._max_depth)
        except MalformedRequest as error:
            log.info("refused request: %s", error, extra={"client": address})
            return dump_fault(400, str(error))
        try:
            return dump_response(await self._dispatch(name, params))
        except ServiceError as error:
            return dump_fault(error.code, str(error))
        except DocumentTooLarge as error:  # e.g. a filter list over the database's 16 MiB
            log.info("refused request: %s: %s", name, error, extra={"client": address})
            return dump_fault(400, f"{name}: arguments too large for one database request")
        except PyMongoError as error:
            log.error("database error in %s: %s", name, error, extra={"client": address})
            return dump_fault(500, "database unavailable, please retry")

    async def _dispatch(self, name: str, params: tuple[Any, ...]) -> Any:
        if name.startswith("system."):
            return self._introspect(name, params)
        method = self._methods.get(name)
        if method is None:
            raise _MethodFault(404, f"method {name!r} not found")
        try:
            inspect.signature(method).bind(*params)
        except TypeError:
            raise _MethodFault(400, f"{name}: wrong number of arguments ({len(params)})") from None
        return await method(*params)

    def _introspect(self, name: str, params: tuple[Any, ...]) -> Any:
        if name == "system.listMethods":
            return sorted([*self._methods, *_SYSTEM_HELP])
        if len(params) != 1 or not isinstance(params[0], str):
            raise _MethodFault(400, f"{name} takes one method name")
        target = params[0]
        if target in _SYSTEM_HELP:  # listed, so described too
            help_text, signature = _SYSTEM_HELP[target]
            return help_text if name == "system.methodHelp" else signature
        if target not in self._methods:
            raise _MethodFault(404, f"method {target!r} not found")
        if name == "system.methodHelp":
            return method_help(self._methods[target])
        if name == "system.methodSignature":
            return SIGNATURES.get(target, "undef")
        raise _MethodFault(404, f"method {name!r} not found")


# The introspection methods themselves (XML-RPC introspection's own wording of them).
_SYSTEM_HELP: dict[str, tuple[str, Any]] = {
    "system.listMethods": ("The names of every method this server answers.", [["array"]]),
    "system.methodHelp": ("The help text of the method named.", [["string", "string"]]),
    "system.methodSignature": ("The signatures of the method named: lists of types, the return type first.",
                               [["array", "string"]]),
}


class _MethodFault(ServiceError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _finish(request: server.Request, code: int, body: bytes) -> None:
    if request.finished or request._disconnected:
        return
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
    if len(body) >= GZIP_AT_LEAST and accepts_gzip(request.getHeader(b"accept-encoding")):
        # A cursor page of a thousand statuses: 1.3 MB of XML, a tenth of it compressed, and less
        # for both ends to encrypt and read (xmlrpc.client asks for gzip).
        body = gzipped(body)
        request.setHeader(b"Content-Encoding", b"gzip")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.write(body)
    request.finish()


def accepts_gzip(header: bytes | None) -> bool:
    """Whether an ``Accept-Encoding`` header takes gzip (named, or ``*``, without ``q=0``)."""
    for item in (header or b"").decode("latin-1").split(","):
        coding, _, params = item.strip().partition(";")
        quality = params.replace(" ", "").lower()
        refused = quality in ("q=0", "q=0.0", "q=0.00", "q=0.000")
        if coding.strip().lower() in ("gzip", "x-gzip", "*") and not refused:
            return True
    return False
