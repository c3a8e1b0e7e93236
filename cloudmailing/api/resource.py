"""The HTTP side of the API: a Twisted web resource that authenticates, parses and maps faults."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from pymongo.errors import PyMongoError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web import http, resource, server

from cloudmailing.api.auth import Authenticator
from cloudmailing.api.methods import SIGNATURES, ApiMethod, method_help
from cloudmailing.api.xmlrpc_codec import MalformedRequest, dump_fault, dump_response, parse_call
from cloudmailing.common.aio import as_deferred, wait_deferred
from cloudmailing.services.errors import ServiceError

log = logging.getLogger(__name__)

API_PATHS = (b"/CloudMailing", b"/RPC2")


class BoundedRequest(server.Request):
    """A request that refuses bodies over ``max_body`` bytes before reading them."""

    max_body = 32 * 1024 * 1024

    def gotLength(self, length: int | None) -> None:
        self._received = 0
        if length is not None and length > self.max_body:
            self._refuse_too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received = getattr(self, "_received", 0) + len(data)
        if self._received > self.max_body:
            self._refuse_too_large()
            return
        super().handleContentChunk(data)

    def _refuse_too_large(self) -> None:
        if getattr(self, "_refused", False):
            return
        self._refused = True
        transport: Any = self.channel.transport
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        transport.loseConnection()


def request_factory(max_body: int) -> type[BoundedRequest]:
    return type("ApiRequest", (BoundedRequest,), {"max_body": max_body})


class XmlRpcResource(resource.Resource):
    isLeaf = True

    def __init__(self, methods: dict[str, ApiMethod], authenticator: Authenticator, reactor: IReactorTime,
                 max_depth: int = 64) -> None:
        super().__init__()
        self._methods = methods
        self._auth = authenticator
        self._reactor = reactor
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
            if not await self._auth.authenticate(request.getHeader(b"authorization")):
                await self._refuse(request, address)
                return
            self._auth.record_success(address)
            body = request.content.read() if request.content is not None else b""
            answer = await self._call(body, address)
        except Exception:  # never let a bug leave a request hanging
            log.exception("unexpected error answering a request", extra={"client": address})
            answer = dump_fault(500, "internal error (see the master's log)")
        _finish(request, http.OK, answer)

    async def _refuse(self, request: server.Request, address: str) -> None:
        delay = self._auth.delay_before_answer(address)
        self._auth.record_failure(address)
        if delay:
            await wait_deferred(deferLater(self._reactor, delay, lambda: None))
        request.setHeader(b"WWW-Authenticate", b'Basic realm="CloudMailing"')
        _finish(request, http.UNAUTHORIZED, dump_fault(401, "authentication required: user admin, an API key"))

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
            return sorted([*self._methods, "system.listMethods", "system.methodHelp", "system.methodSignature"])
        if len(params) != 1 or not isinstance(params[0], str):
            raise _MethodFault(400, f"{name} takes one method name")
        target = params[0]
        if target not in self._methods:
            raise _MethodFault(404, f"method {target!r} not found")
        if name == "system.methodHelp":
            return method_help(self._methods[target])
        if name == "system.methodSignature":
            return SIGNATURES.get(target, "undef")
        raise _MethodFault(404, f"method {name!r} not found")


class _MethodFault(ServiceError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _finish(request: server.Request, code: int, body: bytes) -> None:
    if request.finished or request._disconnected:
        return
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
    request.setHeader(b"Content-Length", str(len(body)).encode())
    request.write(body)
    request.finish()
