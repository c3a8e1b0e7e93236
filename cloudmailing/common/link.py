"""The master ↔ satellite link: length-prefixed JSON requests over TLS, on Twisted.

Each frame is a 32-bit big-endian length and a UTF-8 JSON object: a request
``{"id", "method", "params"}`` or its answer ``{"id", "result"}`` /
``{"id", "error": {"code", "message"}}``. Either side may call the other; in practice the
satellite calls and the master answers. (AMP was the first idea, but its 64 KiB value limit does
not fit mailing bodies.)

What the requests and answers carry, and how they are checked, is ``link_protocol.py``: each
method an end serves is a :class:`Method`, the decoder of its parameters and their handler.

The receiving side is written for a hostile peer (see :class:`LinkLimits`): frames are bounded,
tiny until the peer said hello, buffered in linear time, and a malformed one gets an error
answer and one log line (so do parameters their decoder refuses). Error codes of the link
itself: ``bad_request`` (malformed frame or parameters), ``unknown_method``, ``frame_too_large``
(then the link is closed), ``internal``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, TypeVar

from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from cloudmailing.common.clock import Clock, DelayedCall
from cloudmailing.common.link_protocol import FrameError

log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024 * 1024
MAX_BAD_FRAMES = 10  # malformed frames tolerated on one link before it is closed
CLOSE_LINGER_SECONDS = 10.0  # a link closed gracefully is aborted if its peer has not read what is left by then
# While the peer does not read its answers (the transport asks us to pause), its further requests
# wait unanswered; past this many waiting, the link is aborted: answers never pile up unbounded.
MAX_HELD_REQUESTS = 64
MAX_ANSWERING = 8  # requests of the peer answered at once; the others wait their turn
_HEADER = struct.Struct("!I")
_INT64 = (-2**63, 2**63 - 1)
Request = TypeVar("Request")


@dataclass(frozen=True)
class Method(Generic[Request]):
    """A method one end serves: the decoder of its parameters (:class:`FrameError` when they are
    not of its shape), and the handler of the request decoded, whose result is the answer."""

    decode: Callable[[dict[str, Any]], Request]
    handle: Callable[[Request], Awaitable[Any]]


@dataclass(frozen=True)
class LinkLimits:
    """What one end accepts from its peer. The defaults trust the peer (the satellite's end, which
    pinned the master's certificate); the master's end sets every field (``[satellite_link]``)."""

    max_frame: int = MAX_FRAME
    max_frame_before_hello: int | None = None  # None: no smaller limit before authentication
    hello_timeout: float | None = None         # seconds to authenticate, from the connection
    idle_timeout: float | None = None          # seconds without a frame either way, nothing pending


class LinkError(Exception):
    """The other side answered with an error, or the link went down."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MalformedFrame(ValueError):
    """A frame that is not a JSON object of the link's shape; ``request_id`` is its id if readable,
    so that the caller gets its error answer."""

    def __init__(self, reason: str, request_id: int | str | None = None) -> None:
        super().__init__(reason)
        self.request_id = request_id


def _strict_int(digits: str) -> int:
    number = int(digits)
    if not _INT64[0] <= number <= _INT64[1]:
        raise MalformedFrame("integer out of the 64-bit range")
    return number


def _strict_float(digits: str) -> float:
    number = float(digits)
    if not math.isfinite(number):  # 1e999 is infinity
        raise MalformedFrame("number out of the float range")
    return number


def _no_constant(name: str) -> Any:
    raise MalformedFrame(f"{name} is not a JSON number")


def _request_id(message: Any) -> int | str | None:
    """The id of a decoded message, if it has a usable one."""
    request_id = message.get("id") if isinstance(message, dict) else None
    if isinstance(request_id, str) or (isinstance(request_id, int) and not isinstance(request_id, bool)
                                       and _INT64[0] <= request_id <= _INT64[1]):
        return request_id
    return None


def _lenient_id(data: bytes) -> int | str | None:
    """The id of a frame refused for its numbers, read without the number rules."""
    try:
        return _request_id(json.loads(data))
    except (ValueError, RecursionError):
        return None


def decode_frame(data: bytes) -> dict[str, Any]:
    """The message in one frame's payload, or :class:`MalformedFrame` (never anything else)."""
    try:
        message = json.loads(data, parse_int=_strict_int, parse_float=_strict_float, parse_constant=_no_constant)
    except MalformedFrame as error:
        raise MalformedFrame(str(error), _lenient_id(data)) from None
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise MalformedFrame(f"not JSON: {str(error)[:100]}") from None
    if not isinstance(message, dict):
        raise MalformedFrame(f"expected a JSON object, got {type(message).__name__}")
    request_id = _request_id(message)
    if message.get("id") is not None and request_id is None:
        raise MalformedFrame("id: expected an integer or a string")
    if "method" in message:
        if not isinstance(message["method"], str):
            raise MalformedFrame("method: expected a string", request_id)
        if "params" in message and not isinstance(message["params"], dict):
            raise MalformedFrame("params: expected an object", request_id)
    return message


class FrameBuffer:
    """Bytes in, whole frames out, in time linear in the bytes (a bytearray consumed from the front)."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> None:
        self._data += data

    def pending_length(self) -> int | None:
        """The length announced by the next frame's header, once its 4 bytes are in."""
        if len(self._data) < _HEADER.size:
            return None
        return int(_HEADER.unpack_from(self._data)[0])

    def next_frame(self) -> bytes | None:
        length = self.pending_length()
        if length is None or len(self._data) < _HEADER.size + length:
            return None
        frame = bytes(self._data[_HEADER.size:_HEADER.size + length])
        del self._data[:_HEADER.size + length]  # CPython moves the start: no copy of the rest
        return frame


def encode_frame(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message, default=str).encode("utf-8")
    return _HEADER.pack(len(payload)) + payload


class LinkProtocol(Protocol):
    """One link end: calls out with :meth:`call`, answers the requests its ``methods`` decode."""

    def __init__(self, clock: Clock, methods: dict[str, Method[Any]] | None = None,
                 limits: LinkLimits | None = None) -> None:
        self.methods: dict[str, Method[Any]] = methods or {}
        self.limits = limits or LinkLimits()
        self._clock = clock  # the link's hello and idle timeouts
        self._frames = FrameBuffer()
        self._trusted = self.limits.max_frame_before_hello is None
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._answering = 0  # requests of the peer being handled now
        self._bad_frames = 0
        self._closing = False
        self._hello_timer: DelayedCall | None = None
        self._idle_timer: DelayedCall | None = None
        self._linger_timer: DelayedCall | None = None
        self._background: set[int] = set()  # calls whose answer does not keep the link from idling
        # Flow control: the transport pauses us while the peer does not read what we wrote; its
        # requests then wait here, unanswered (a satellite waits for its answers: few ever do).
        self._paused = False
        self._held: collections.deque[dict[str, Any]] = collections.deque()
        # Protocols are built while the reactor (the asyncio loop) runs.
        self.closed_future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- connection and timers ------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(self, True)  # pauseProducing while the peer does not read
        if self.limits.hello_timeout is not None and not self._trusted:
            self._hello_timer = self._clock.callLater(self.limits.hello_timeout, self._time_out, "no hello")
        if self.limits.idle_timeout is not None:
            self._idle_timer = self._clock.callLater(self.limits.idle_timeout, self._idle)

    def mark_authenticated(self) -> None:
        """The peer proved who it is: frames may now be as large as ``limits.max_frame``."""
        self._trusted = True
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()

    def _activity(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            assert self.limits.idle_timeout is not None
            self._idle_timer.reset(self.limits.idle_timeout)

    def _idle(self) -> None:
        if self._answering or self._waiting.keys() - self._background:  # a slow request is not idleness
            assert self.limits.idle_timeout is not None
            self._idle_timer = self._clock.callLater(self.limits.idle_timeout, self._idle)
            return
        self._time_out("idle")

    def _time_out(self, why: str) -> None:
        log.info("link closed: %s for too long", why, extra={"peer": self._peer()})
        self.abort()  # a peer that does not read must not keep it open

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for timer in (self._hello_timer, self._idle_timer, self._linger_timer):
            if timer is not None and timer.active():
                timer.cancel()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(LinkError("disconnected", "the link went down"))
        self._waiting.clear()
        self._background.clear()
        self._held.clear()
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    # -- frames in ----------------------------------------------------------------------------

    def _frame_limit(self) -> int:
        if self._trusted or self.limits.max_frame_before_hello is None:
            return self.limits.max_frame
        return self.limits.max_frame_before_hello

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # what a refused peer still sends is not even buffered
        self._frames.feed(data)
        while not self._closing:
            length = self._frames.pending_length()
            if length is not None and length > self._frame_limit():
                self._refuse_frame(length)
                return
            frame = self._frames.next_frame()
            if frame is None:
                return
            self._activity()
            self.frameReceived(frame)

    def _refuse_frame(self, length: int) -> None:
        log.warning("link closed: a frame of %d bytes, over the %d accepted%s", length, self._frame_limit(),
                    "" if self._trusted else " before hello", extra={"peer": self._peer()})
        self._send({"id": None, "error": {"code": "frame_too_large",
                                          "message": f"frames are limited to {self._frame_limit()} bytes"}})
        self.close()

    def frameReceived(self, data: bytes) -> None:
        try:
            message = decode_frame(data)
        except MalformedFrame as error:
            self._bad_frame(error.request_id, "bad_request", str(error))
            return
        if "method" not in message:
            self._resolve(message)
        elif not self._trusted and self._answering:  # hello costs a key check: one at a time
            self._bad_frame(message.get("id"), "bad_request", "one request at a time before hello")
        else:  # in turn: at most MAX_ANSWERING at once, none while the peer does not read
            self._hold(message)
            self._answer_held()

    # -- flow control (IPushProducer: the transport calls these) --------------------------------

    def _hold(self, message: dict[str, Any]) -> None:
        self._held.append(message)
        if len(self._held) > MAX_HELD_REQUESTS:
            log.warning("link closed: %d requests while not reading the answers", len(self._held),
                        extra={"peer": self._peer()})
            self.abort()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._answer_held()

    def _answer_held(self) -> None:
        while self._held and not self._paused and not self._closing and self._answering < MAX_ANSWERING:
            self._answering += 1
            asyncio.ensure_future(self._answer(self._held.popleft()))

    def stopProducing(self) -> None:
        self._held.clear()

    def _bad_frame(self, request_id: Any, code: str, reason: str) -> None:
        """One log line and an error answer; too many bad frames close the link."""
        self._bad_frames += 1
        log.warning("bad request on the link: %s", reason, extra={"peer": self._peer()})
        self._send({"id": request_id, "error": {"code": code, "message": reason}})
        if self._bad_frames >= MAX_BAD_FRAMES or not self._trusted:
            self.close()  # a stranger gets one chance; a satellite a few

    def _resolve(self, message: dict[str, Any]) -> None:
        waiter = self._waiting.pop(message["id"], None) if isinstance(message.get("id"), int) else None
        if waiter is None or waiter.done():
            return
        if "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            waiter.set_exception(LinkError(str(error.get("code")), str(error.get("message"))))
        else:
            waiter.set_result(message.get("result"))

    async def _answer(self, message: dict[str, Any]) -> None:
        try:
            await self._answer_request(message.get("id"), message["method"], message.get("params", {}))
        finally:
            self._answering -= 1
            self._answer_held()

    async def _answer_request(self, request_id: Any, name: str, params: dict[str, Any]) -> None:
        method = self.methods.get(name)
        if method is None:
            self._bad_frame(request_id, "unknown_method", f"no method {name[:100]!r}")
            return
        try:
            request = method.decode(params)
        except FrameError as error:
            self._bad_frame(request_id, "bad_request", str(error)[:300])
            return
        try:
            result = await method.handle(request)
            self._send({"id": request_id, "result": result})
        except LinkError as error:
            self._send({"id": request_id, "error": {"code": error.code, "message": error.message}})
        except Exception as error:  # one bad request must not take the link down
            known = self.describe_error(error)
            if known is not None:
                log.warning("link request %s failed: %s", name, known[1])
                self._send({"id": request_id, "error": {"code": known[0], "message": known[1]}})
                return
            log.exception("link request %s failed", name, exc_info=error)
            self._send({"id": request_id, "error": {"code": "internal", "message": "internal error"}})

    def describe_error(self, error: Exception) -> tuple[str, str] | None:
        """``(code, message)`` for an expected failure of a handler; None logs it as a bug."""
        return None

    # -- frames out ---------------------------------------------------------------------------

    async def call(self, method: str, **params: Any) -> Any:
        return await self._call(method, params, background=False)

    async def call_in_background(self, method: str, **params: Any) -> Any:
        """A call whose answer, while awaited, does not count as a request pending: the link may
        still be closed for idleness (a peer that never answers it cannot keep the link open)."""
        return await self._call(method, params, background=True)

    async def _call(self, method: str, params: dict[str, Any], background: bool) -> Any:
        if self._closing or self.closed_future.done():
            raise LinkError("disconnected", "the link is closed")
        self._next_id += 1
        request_id = self._next_id
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        if background:
            self._background.add(request_id)
        try:
            self._send({"id": request_id, "method": method, "params": params})
            return await waiter
        finally:
            self._waiting.pop(request_id, None)
            self._background.discard(request_id)

    def close(self) -> None:
        """Close once what is written is sent; a peer that does not read it within
        ``CLOSE_LINGER_SECONDS`` has the connection aborted."""
        self._closing = True
        transport: Any = self.transport
        if transport is not None and not self.closed_future.done():
            transport.unregisterProducer()  # else loseConnection waits for the producer to finish
            transport.loseConnection()
            if self._linger_timer is None:
                self._linger_timer = self._clock.callLater(CLOSE_LINGER_SECONDS, self.abort)

    def abort(self) -> None:
        """Close at once, dropping whatever is not sent yet."""
        self._closing = True
        transport: Any = self.transport
        if transport is not None and not self.closed_future.done():
            transport.abortConnection()

    def _send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and self.connected and not self._closing:
            self._activity()
            transport: Any = self.transport
            transport.write(encode_frame(message))

    def _peer(self) -> str:
        transport: Any = self.transport
        try:
            return str(transport.getPeer().host)
        except AttributeError:
            return "?"
