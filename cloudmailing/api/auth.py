"""HTTP Basic authentication of API calls: user ``admin``, password an API key.

Keys are checked against their scrypt hash (about 50 ms, run off the reactor thread); a key
that passed is remembered for ``cache_seconds`` (as a SHA-256 of the key, never in clear) so a
busy client does not pay the hash on every call. A revoked key therefore stops working within
``cache_seconds``. Failed attempts slow down their source address exponentially.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

from cloudmailing.common.keys import parse_key, verify_secret
from cloudmailing.services.clock import SecondsClock
from cloudmailing.storage.api_keys import ApiKeyStore

log = logging.getLogger(__name__)

API_USER = "admin"
_MAX_TRACKED = 10000
FAILURE_MEMORY_SECONDS = 900.0  # failures older than this are forgiven


@dataclass
class _Failures:
    count: int
    last: float


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
    def __init__(self, keys: ApiKeyStore, clock: SecondsClock, cache_seconds: float = 30.0,
                 failures_before_delay: int = 5, max_delay: float = 30.0) -> None:
        self._keys = keys
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._free_failures = failures_before_delay
        self._max_delay = max_delay
        self._verified: OrderedDict[bytes, float] = OrderedDict()  # key digest -> valid until
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    async def authenticate(self, header: bytes | None) -> bool:
        credentials = basic_credentials(header)
        if credentials is None or credentials[0] != API_USER:
            return False
        key = credentials[1]
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        now = self._clock.seconds()
        if self._verified.get(digest, 0.0) > now:
            return True
        if not await self._check_key(key):
            return False
        self._remember(self._verified, digest, now + self._cache_seconds)
        return True

    async def _check_key(self, key: str) -> bool:
        parsed = parse_key(key)
        if parsed is None:
            return False
        record = await self._keys.get_active(parsed.key_id)
        if record is None:
            return False
        return await asyncio.to_thread(verify_secret, parsed.secret, record)

    def _recent_failures(self, address: str) -> _Failures:
        failures = self._failures.get(address)
        if failures is None or self._clock.seconds() - failures.last > FAILURE_MEMORY_SECONDS:
            return _Failures(0, 0.0)
        return failures

    def delay_before_answer(self, address: str) -> float:
        """Seconds to wait before answering this address's next failure."""
        failures = self._recent_failures(address)
        if failures.count < self._free_failures:
            return 0.0
        return min(2.0 ** (failures.count - self._free_failures), self._max_delay)

    def record_failure(self, address: str) -> None:
        failures = self._recent_failures(address)
        self._failures.pop(address, None)
        failures.count += 1
        failures.last = self._clock.seconds()
        self._remember(self._failures, address, failures)
        log.warning("authentication failed (%d in a row)", failures.count, extra={"client": address})

    def record_success(self, address: str) -> None:
        self._failures.pop(address, None)

    @staticmethod
    def _remember(table: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
        table[key] = value
        table.move_to_end(key)
        while len(table) > _MAX_TRACKED:
            table.popitem(last=False)
