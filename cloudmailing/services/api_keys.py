"""API keys: creation (the key is shown once, only its scrypt hash is kept) and revocation."""

from __future__ import annotations

from typing import Any

from cloudmailing.common.keys import generate_key, hash_secret, parse_key
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.errors import BadRequest
from cloudmailing.storage.api_keys import ApiKeyStore, NameTaken
from cloudmailing.storage.database import Database


class ApiKeyService:
    def __init__(self, database: Database, clock: SecondsClock) -> None:
        self._store = ApiKeyStore(database)
        self._clock = clock

    async def create(self, name: str) -> str:
        """Store a new key named ``name`` and return it; it cannot be read back later."""
        key_id, key = generate_key()
        parsed = parse_key(key)
        assert parsed is not None  # generate_key makes keys of our own shape
        try:
            await self._store.insert(key_id, name, hash_secret(parsed.secret), utc_now(self._clock))
        except NameTaken:
            raise BadRequest(f"an active key named {name!r} exists; revoke it first") from None
        return key

    async def list(self) -> list[dict[str, Any]]:
        """Names, creation and revocation dates: never keys nor hashes."""
        return await self._store.list()

    async def revoke(self, name: str) -> int:
        return await self._store.revoke(name, utc_now(self._clock))
