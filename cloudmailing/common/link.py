"""The master ↔ satellite link: length-prefixed JSON requests over TLS, on Twisted.

Each frame is a 32-bit length and a UTF-8 JSON object: a request ``{"id", "method", "params"}``
or its answer ``{"id", "result"}`` / ``{"id", "error": {"code", "message"}}``. Either side may
call the other; in practice the satellite calls and the master answers. (AMP was the first idea,
but its 64 KiB value limit does not fit mailing bodies.)

Methods the master serves (see ``master/link_server.py``):

- ``hello(serial, secret, version)`` → ``{"satellite_id", "group"}``; must come first.
- ``lease(max_recipients)`` → ``{"recipients": [...], "lease_seconds"}``: recipients this
  satellite may deliver until the lease expires. Each: ``id``, ``mailing_id``, ``email``,
  ``domain``, ``contact``, ``test``.
- ``mailing(mailing_id)`` → the mailing's content and delivery settings (``rfc822`` base64).
- ``report(outcomes)`` → ``{"acknowledged": [recipient ids]}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024 * 1024
Handler = Callable[..., Awaitable[Any]]


class LinkError(Exception):
    """The other side answered with an error, or the link went down."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LinkProtocol(Int32StringReceiver):
    """One link end: calls out with :meth:`call`, answers with the coroutines in ``handlers``."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, handlers: dict[str, Handler] | None = None) -> None:
        self.handlers: dict[str, Handler] = handlers or {}
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        # Protocols are built while the reactor (the asyncio loop) runs.
        self.closed_future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(LinkError("disconnected", "the link went down"))
        self._waiting.clear()
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    async def call(self, method: str, **params: Any) -> Any:
        self._next_id += 1
        request_id = self._next_id
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        self._send({"id": request_id, "method": method, "params": params})
        return await waiter

    def stringReceived(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("unreadable frame on the link; closing it")
            self.close()
            return
        if "method" in message:
            asyncio.ensure_future(self._answer(message))
        else:
            self._resolve(message)

    def _resolve(self, message: dict[str, Any]) -> None:
        waiter = self._waiting.pop(message.get("id", -1), None)
        if waiter is None or waiter.done():
            return
        if "error" in message:
            error = message["error"] or {}
            waiter.set_exception(LinkError(str(error.get("code")), str(error.get("message"))))
        else:
            waiter.set_result(message.get("result"))

    async def _answer(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        handler = self.handlers.get(str(message.get("method")))
        try:
            if handler is None:
                raise LinkError("unknown_method", f"no method {message.get('method')!r}")
            result = await handler(**(message.get("params") or {}))
            self._send({"id": request_id, "result": result})
        except LinkError as error:
            self._send({"id": request_id, "error": {"code": error.code, "message": error.message}})
        except Exception as error:  # one bad request must not take the link down
            known = self.describe_error(error)
            if known is not None:
                log.warning("link request %s failed: %s", message.get("method"), known[1])
                self._send({"id": request_id, "error": {"code": known[0], "message": known[1]}})
                return
            log.exception("link request %s failed", message.get("method"), exc_info=error)
            self._send({"id": request_id, "error": {"code": "internal", "message": "internal error"}})

    def describe_error(self, error: Exception) -> tuple[str, str] | None:
        """``(code, message)`` for an expected failure of a handler; None logs it as a bug."""
        return None

    def close(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def _send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and self.connected:
            self.sendString(json.dumps(message, default=str).encode("utf-8"))
