"""Who the master serves: strangers wait for approval, but cannot fill the registry."""

from __future__ import annotations

import pytest

from cloudmailing.services.satellites import SatelliteRefused, SatelliteService
from cloudmailing.storage.stores import open_stores
from tests.helpers import aio_test


async def _refusal(service: SatelliteService, serial: str, secret: str = "pw") -> str:
    with pytest.raises(SatelliteRefused) as refused:
        await service.authenticate(serial, secret, "1.0")
    return str(refused.value)


@aio_test
async def test_at_most_max_awaiting_approval_strangers_are_recorded(database, clock):
    service = SatelliteService(await open_stores(database), clock, max_awaiting_approval=2)
    for serial in ("stranger-1", "stranger-2"):
        assert "waiting for an administrator" in await _refusal(service, serial)
    assert "not registered" in await _refusal(service, "stranger-3")
    assert "not registered" in await _refusal(service, "x" * 101)
    listed = await service.list()
    assert [(s["serial"], s["paired"]) for s in listed] == [("stranger-1", False), ("stranger-2", False)]

    # Approving one makes room for the next stranger, and the approved one is served.
    await service.set_properties(listed[0]["id"], {"paired": True})
    assert (await service.authenticate("stranger-1", "pw", "1.0"))["serial"] == "stranger-1"
    assert "waiting for an administrator" in await _refusal(service, "stranger-3")
    assert await service.count() == 3
