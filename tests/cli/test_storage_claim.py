"""``cm-admin storage`` keeps the writer's claim for as long as it runs, however long that is."""

from __future__ import annotations

import argparse
import time

import pytest
from twisted.internet import task

from cloudmailing.cli import admin
from cloudmailing.common.process_identity import ProcessIdentity
from cloudmailing.services.writer_claim import CLAIM_SECONDS, RENEW_SECONDS, ClaimHeld, WriterClaim
from cloudmailing.storage.writer_claims import WriterClaimStore
from tests.helpers import aio_test, renewed


@aio_test
async def test_a_storage_command_longer_than_a_claims_life_keeps_the_claim_and_writes(database, monkeypatch):
    clock = task.Clock()
    clock.advance(time.time())
    claims = WriterClaimStore(database)
    master = WriterClaim(claims, clock, "a master",
                         ProcessIdentity(host="elsewhere", boot="b", pid_namespace="pid:[1]", pid=7, started=1))

    async def three_claim_lives_long(args: argparse.Namespace, database) -> int:
        for _ in range(int(3 * CLAIM_SECONDS / RENEW_SECONDS)):
            ends = (await claims.latest())["until"]
            clock.advance(RENEW_SECONDS)
            await renewed(claims.latest, ends)
        with pytest.raises(ClaimHeld, match="in use by cm-admin storage recount"):
            await master.take()  # a master starting now is still refused
        await database.notes.insert_one({"_id": 1})  # and the command still writes
        return 0

    monkeypatch.setattr(admin, "_storage_action", three_claim_lives_long)
    assert await admin._storage(argparse.Namespace(action="recount"), database, clock) == 0
    assert await database.notes.count_documents({}) == 1
    await master.take()  # given back at the end
