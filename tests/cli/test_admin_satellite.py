"""``cm-admin satellite``: a stranger that asked to join is approved from the command line."""

from __future__ import annotations

import asyncio

import pytest

from cloudmailing.services.satellites import SatelliteRefused, SatelliteService
from cloudmailing.storage.stores import open_stores
from tests.cli.test_storage_migrate import _config, _run
from tests.conftest import free_port
from tests.helpers import aio_test


@aio_test
async def test_a_stranger_approved_with_cm_admin_is_served(database, mongo_url, db_name, tmp_path, clock):
    service = SatelliteService(await open_stores(database), clock)
    with pytest.raises(SatelliteRefused, match="waiting for an administrator"):
        await service.authenticate("newbox", "pw", "1.0")
    config = _config(tmp_path, mongo_url, db_name, free_port())
    listed = await asyncio.to_thread(_run, config, "admin", "satellite", "list")
    [line] = listed.stdout.splitlines()
    assert "newbox" in line and "paired=False" in line
    approved = await asyncio.to_thread(_run, config, "admin", "satellite", "approve", line.split()[0])
    assert approved.returncode == 0, approved.stderr
    assert (await service.authenticate("newbox", "pw", "1.0"))["serial"] == "newbox"
    missing = await asyncio.to_thread(_run, config, "admin", "satellite", "approve", "999")
    assert missing.returncode == 1 and "not found" in missing.stderr
