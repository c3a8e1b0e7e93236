"""API keys by name: one active key per name, even when several creations race (two cm-admin
processes at once); a revoked name can be used again."""

from __future__ import annotations

import asyncio

import pytest

from cloudmailing.services.api_keys import ApiKeyService
from cloudmailing.services.errors import BadRequest
from tests.helpers import aio_test


async def _active(service: ApiKeyService, name: str) -> int:
    return sum(1 for key in await service.list() if key["name"] == name and not key.get("revoked"))


@aio_test
async def test_concurrent_creations_of_one_name_keep_one_active_key(database, clock):
    service = ApiKeyService(database, clock)
    results = await asyncio.gather(*(service.create("dup-key") for _ in range(6)), return_exceptions=True)
    assert await _active(service, "dup-key") == 1
    assert sum(1 for result in results if isinstance(result, str)) == 1
    assert all(isinstance(result, (str, BadRequest)) for result in results), results


@aio_test
async def test_a_revoked_name_can_be_given_to_a_new_key(database, clock):
    service = ApiKeyService(database, clock)
    await service.create("ops")
    with pytest.raises(BadRequest, match="revoke it first"):
        await service.create("ops")
    assert await service.revoke("ops") == 1
    await service.create("ops")
    assert await _active(service, "ops") == 1
