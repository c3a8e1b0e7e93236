"""A mailing's status against concurrent changes: a pause or a start racing the mailing's end
never brings a FINISHED mailing back; force_purge_empty_mailings never finishes a mailing that
just got recipients; resetting a test recipient does not reopen its finished mailing."""

from __future__ import annotations

import datetime

import pytest

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.master.app import build_services
from cloudmailing.services.errors import BadRequest
from cloudmailing.storage.stores import open_stores
from tests.helpers import aio_test

SATELLITE = {"serial": "sat-a", "group": "", "domain_affinity": []}


async def _world(database, clock):
    stores = await open_stores(database, block_recipients=500)
    services = build_services(stores, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    return services, stores, mailing_id


@aio_test
async def test_pause_racing_the_last_report_does_not_unfinish_the_mailing(database, clock):
    services, stores, mailing_id = await _world(database, clock)
    (added,) = await services.recipients.add(mailing_id, [{"email": "u0@example.org"}])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    leased = await services.dispatcher.lease(SATELLITE, 10)
    assert [r["id"] for r in leased] == [added["id"]]

    # pause_mailing reads the mailing (RUNNING); the satellite's last report is recorded before
    # pause writes (the API and the satellite link run concurrently in the master).
    get = stores.mailings.get

    async def get_then_report(mailing_id_, *args, **kwargs):
        mailing = await get(mailing_id_, *args, **kwargs)
        stores.mailings.get = get
        await services.dispatcher.report(SATELLITE, [Outcome.from_wire(
            {"recipient_id": added["id"], "status": "FINISHED", "reply_code": 250, "reply_text": "ok",
             "smtp_log": []})])
        return mailing

    stores.mailings.get = get_then_report
    with pytest.raises(BadRequest, match="finished"):  # as a pause coming after the end
        await services.mailings.pause(mailing_id)
    assert (await stores.mailings.get(mailing_id))["status"] == "FINISHED"


@aio_test
async def test_start_racing_a_deadline_does_not_unfinish_the_mailing(database, clock):
    services, stores, mailing_id = await _world(database, clock)
    await services.recipients.add(mailing_id, [{"email": "u0@example.org"}])
    now = datetime.datetime.utcfromtimestamp(clock.seconds())
    await services.mailings.set_properties(mailing_id, {"scheduled_end": now + datetime.timedelta(minutes=1)})
    await services.mailings.start(mailing_id)   # READY
    await services.mailings.pause(mailing_id)   # PAUSED before it ever ran (no start_time)
    clock.advance(120)                          # its deadline passes

    get = stores.mailings.get

    async def get_then_tick(mailing_id_, *args, **kwargs):
        mailing = await get(mailing_id_, *args, **kwargs)
        stores.mailings.get = get
        await services.lifecycle.tick()  # the life cycle times it out and finishes it meanwhile
        return mailing

    stores.mailings.get = get_then_tick
    with pytest.raises(BadRequest, match="finished"):
        await services.mailings.start(mailing_id)
    assert (await stores.mailings.get(mailing_id))["status"] == "FINISHED"


@aio_test
async def test_force_purge_does_not_finish_a_mailing_that_got_recipients_meanwhile(database, clock):
    services, stores, mailing_id = await _world(database, clock)
    await services.mailings.start(mailing_id)   # READY, empty
    finish = stores.mailings.finish
    added = []

    async def add_then_finish(mailing_id_, now, when=None):
        stores.mailings.finish = finish
        # add_recipients is served while force_purge_empty_mailings walks the mailings
        added.extend(await services.recipients.add(mailing_id, [{"email": f"u{i}@example.org"} for i in range(3)]))
        return await finish(mailing_id_, now, when)

    stores.mailings.finish = add_then_finish
    await services.lifecycle.close_empty_mailings()
    assert all("id" in a for a in added)
    listed = (await services.mailings.list({"id": [mailing_id]}))[0]
    assert (listed["status"], listed["total_pending"]) == ("READY", 3)


def _ok(rid):
    return Outcome.from_wire({"recipient_id": rid, "status": "FINISHED", "reply_code": 250, "reply_text": "ok",
                              "smtp_log": []})


@aio_test
async def test_resetting_a_test_recipient_leaves_a_finished_mailing_finished(database, clock):
    stores = await open_stores(database)
    services = build_services(stores, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    (test_one,) = await services.recipients.add(mailing_id, [{"email": "qa@example.org"}], test=True)
    await services.recipients.add(mailing_id, [{"email": "u0@example.org"}])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    leased = await services.dispatcher.lease(SATELLITE, 10)
    await services.dispatcher.report(SATELLITE, [_ok(r["id"]) for r in leased])
    before = await stores.mailings.get(mailing_id)
    assert before["status"] == "FINISHED"
    clock.advance(60)
    await services.recipients.reset([test_one["id"]])
    during = (await stores.mailings.get(mailing_id))["status"]
    await services.lifecycle.tick()
    after = await stores.mailings.get(mailing_id)
    assert (during, after["status"], after["end_time"]) == ("FINISHED", "FINISHED", before["end_time"])


@aio_test
async def test_a_resumed_mailing_wakes_the_idle_satellites(database, clock):
    """As a start or added recipients do: an idle satellite would otherwise lease only at its
    next poll."""
    services, stores, mailing_id = await _world(database, clock)
    woken: list[int] = []
    services.dispatcher.on_work(lambda: woken.append(1))
    await services.recipients.add(mailing_id, [{"email": "u0@example.org"}])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()  # RUNNING
    assert await services.mailings.pause(mailing_id) == "PAUSED"
    woken.clear()
    assert await services.mailings.start(mailing_id) == "RUNNING"
    assert woken
