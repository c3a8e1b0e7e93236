"""HTTP Basic authentication of API calls: user ``admin``, password an API key.

Keys are checked against their scrypt hash (about 50 ms, run off the reactor thread); a key
that passed is remembered for ``cache_seconds`` (as a SHA-256 of the key, never in clear) so a
busy client does not pay the hash on every call. A revoked key therefore stops working within
``cache_seconds``. Each source address gets one check at a time, slowed down exponentially
after failures (:mod:`cloudmailing.common.throttle`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from collections import OrderedDict
from typing import Any

from cloudmailing.common.keys import parse_key, verify_secret_or_dummy
from cloudmailing.common.recent import keep_recent
from cloudmailing.common.throttle import SourceThrottle
from cloudmailing.services.clock import SecondsClock
from cloudmailing.storage.api_keys import ApiKeyStore

log = logging.getLogger(__name__)

API_USER = "admin"
_MAX_TRACKED = 10000  # verified keys remembered


def basic_credentials(header: bytes | None) -> tuple[str, str] | None:
    """``(user, password)`` from an ``Authorization: Basic`` header, or None."""
    if not header or not header[:6].lower() == b"basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class Authenticator:
    def __init__(self, keys: ApiKeyStore, reactor: Any, cache_seconds: float = 30.0,
                 failures_before_delay: int = 5, max_delay: float = 30.0) -> None:
        self._keys = keys
        self._clock: SecondsClock = reactor
        self._cache_seconds = cache_seconds
        self._verified: OrderedDict[bytes, float] = OrderedDict()  # key digest -> valid until
        self.throttle = SourceThrottle(reactor, failures_before_delay, max_delay)

    async def authenticate(self, header: bytes | None, source: str) -> bool:
        """Whether ``header`` carries a valid API key; ``source`` (the client's address) waits its
        turn for the check, slowed down after failures (see :mod:`cloudmailing.common.throttle`)."""
        credentials = basic_credentials(header)
        key = credentials[1] if credentials is not None and credentials[0] == API_USER else ""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        if self._cached(digest):
            return True
        async with self.throttle.attempt(source) as attempt:
            # Another request may have checked the same key while this one waited its turn.
            if not (self._cached(digest) or await self._check_key(key)):
                attempt.failed()
                log.warning("authentication failed (%d in a row)", self.throttle.failures(source),
                            extra={"client": source})
                return False
            attempt.succeeded()
        keep_recent(self._verified, digest, self._clock.seconds() + self._cache_seconds, _MAX_TRACKED)
        return True

    def _cached(self, digest: bytes) -> bool:
        return self._verified.get(digest, 0.0) > self._clock.seconds()

    async def _check_key(self, key: str) -> bool:
        parsed = parse_key(key)
        if parsed is None:
            return False
        record = await self._keys.get_active(parsed.key_id)
        # An unknown (or revoked) key id costs the same scrypt as a wrong secret: its answer comes
        # no sooner, so the time tells nobody which key ids exist.
        return await asyncio.to_thread(verify_secret_or_dummy, parsed.secret, record)
