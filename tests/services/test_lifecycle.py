"""Mailing life cycle driven by a fake clock: scheduled start, time-out, finish."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from cloudmailing.master.app import build_services
from cloudmailing.services.clock import utc_now
from cloudmailing.storage.stores import open_stores
from tests.helpers import aio_test, set_statuses


async def _services(database, clock, block_recipients=500):
    stores = await open_stores(database, block_recipients=block_recipients)
    return build_services(stores, clock), stores


async def _status(services, mailing_id):
    return (await services.mailings.list({"id": [mailing_id]}))[0]


@aio_test
async def test_scheduled_start_then_finish_when_all_final(database, clock):
    services, stores = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    start = datetime.datetime.utcfromtimestamp(clock.seconds() + 3600)
    await services.mailings.set_properties(mailing_id, {"scheduled_start": start})
    answer = await services.recipients.add(mailing_id, [{"email": "a@example.org"}, {"email": "b@example.org"}])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "READY"
    clock.advance(3601)
    await services.lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "RUNNING"
    await set_statuses(stores, [answer[0]["id"]], "FINISHED", now=utc_now(clock))
    await services.lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "RUNNING"
    await set_statuses(stores, [answer[1]["id"]], "ERROR", now=utc_now(clock))
    await services.lifecycle.tick()
    mailing = await _status(services, mailing_id)
    assert mailing["status"] == "FINISHED"
    assert (mailing["total_sent"], mailing["total_error"], mailing["total_pending"]) == (1, 1, 0)


@aio_test
async def test_duration_times_out_remaining_recipients(database, clock):
    services, stores = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.mailings.set_properties(mailing_id, {"scheduled_duration": 60})
    await services.recipients.add(mailing_id, [{"email": f"u{i}@example.org"} for i in range(5)])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    clock.advance(59 * 60)
    await services.lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "RUNNING"
    clock.advance(61)
    await services.lifecycle.tick()
    mailing = await _status(services, mailing_id)
    assert mailing["status"] == "FINISHED" and mailing["total_error"] == 5
    changes = await services.reports.updated_since("", {"status": ["TIMEOUT"]}, 100, {})
    assert len(changes["recipients"]) == 5


@aio_test
async def test_opened_and_dont_close_if_empty_stay_open(database, clock):
    services, stores = await _services(database, clock)
    opened = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.mailings.set_properties(opened, {"type": "OPENED", "scheduled_duration": 1})
    empty = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    closing = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.mailings.set_properties(empty, {"dont_close_if_empty": True})
    for mailing_id in (opened, empty, closing):
        await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    clock.advance(120)  # past the OPENED mailing's duration: it still does not finish
    await services.lifecycle.tick()
    assert (await _status(services, opened))["status"] == "RUNNING"
    assert (await _status(services, empty))["status"] == "RUNNING"
    assert (await _status(services, closing))["status"] == "FINISHED"


@aio_test
async def test_recover_rolls_back_cut_batches_and_recounts(database, clock, monkeypatch):
    services, stores = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    (kept,) = await services.recipients.add(mailing_id, [{"email": "kept@example.org"}])

    async def crash(*args):  # the master dies after writing the batch, before counting it
        raise ConnectionError("killed")

    async def dead(*args):  # ... so it does not roll the batch back either (a live one would)
        pass

    monkeypatch.setattr(stores.mailings, "add_counts", crash)
    monkeypatch.setattr(stores.writer, "_roll_back_failed", dead)
    with pytest.raises(ConnectionError):
        await services.recipients.add(mailing_id, [{"email": "cut@example.org", "tracking_id": "cut-1"}])
    monkeypatch.undo()
    assert len(await services.reports.statuses([kept["id"], "cut-1"], {})) == 2  # written, not acknowledged
    await services.lifecycle.recover()
    assert [s["id"] for s in await services.reports.statuses([kept["id"], "cut-1"], {})] == [kept["id"]]
    assert (await _status(services, mailing_id))["total_recipient"] == 1
    # The cut id is free again: the client's retry of the batch goes in.
    (again,) = await services.recipients.add(mailing_id, [{"email": "cut@example.org", "tracking_id": "cut-1"}])
    assert again["id"] == "cut-1"


@aio_test
async def test_totals_never_lose_an_add_recipients_racing_the_life_cycle(database, clock):
    services, stores = await _services(database, clock, block_recipients=50)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.mailings.set_properties(mailing_id, {"dont_close_if_empty": True})
    await services.mailings.start(mailing_id)
    added = 0
    for round_number in range(30):
        batch = [{"email": f"r{round_number}-{i}@example.org"} for i in range(37)]
        await asyncio.gather(services.recipients.add(mailing_id, batch), services.lifecycle.tick(),
                             services.lifecycle.tick())
        added += len(batch)
        mailing = await _status(services, mailing_id)
        from_blocks = (await stores.blocks.counts([mailing_id]))[mailing_id]  # summed apart, from the blocks
        assert mailing["total_recipient"] == added == sum(from_blocks.values())
        assert await services.reports.count({"mailings": [mailing_id]}) == added


@aio_test
async def test_a_failed_summary_write_is_repaired_by_the_next_tick(database, clock, monkeypatch):
    services, stores = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    ids = [a["id"] for a in await services.recipients.add(mailing_id, [{"email": "a@example.org"}])]
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    real_write = stores.blocks.write_summary

    async def database_away(block, was_done=None):
        raise ConnectionError("database away")

    monkeypatch.setattr(stores.blocks, "write_summary", database_away)
    with pytest.raises(ConnectionError):
        await set_statuses(stores, ids, "FINISHED", now=utc_now(clock))
    monkeypatch.setattr(stores.blocks, "write_summary", real_write)
    assert (await _status(services, mailing_id))["total_pending"] == 1  # the counts trail the state
    await services.lifecycle.tick()  # repairs them, then finishes the mailing on them
    await services.lifecycle.tick()
    mailing = await _status(services, mailing_id)
    assert (mailing["status"], mailing["total_sent"], mailing["total_pending"]) == ("FINISHED", 1, 0)


@aio_test
async def test_old_status_log_pages_are_purged_at_most_hourly_but_current_details_stay(database, clock):
    services, stores = await _services(database, clock, block_recipients=2)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    first, other = await services.recipients.add(mailing_id, [{"email": "a@example.org"}, {"email": "b@example.org"}])
    await set_statuses(stores, [first["id"], other["id"]], "WARNING", {"reply_text": "try later"}, utc_now(clock))
    clock.advance(7200)
    await set_statuses(stores, [first["id"]], "ERROR", {"reply_text": "no such user"}, utc_now(clock))
    clock.advance(30 * 86400 - 7200 - 1800)
    await services.lifecycle.tick()  # purges: nothing is 30 days old yet
    clock.advance(2400)
    await services.lifecycle.tick()  # the first page is now older than 30 days, but the last purge was 40 min ago
    assert await _pages(stores) == 2
    clock.advance(1800)
    await services.lifecycle.tick()
    assert await _pages(stores) == 2  # the old page still holds the other recipient's details
    await set_statuses(stores, [other["id"]], "FINISHED", {"reply_text": "ok"}, utc_now(clock))
    clock.advance(3600)
    await services.lifecycle.tick()
    assert await _pages(stores) == 2  # now unused, the oldest goes; the newest is not old yet
    clock.advance(40 * 86400)
    await services.lifecycle.tick()  # older than 30 days too, but the recipients' details are there
    statuses = {s["id"]: s for s in await services.reports.statuses([first["id"], other["id"]], {})}
    assert (statuses[first["id"]]["status"], statuses[first["id"]]["reply_text"]) == ("ERROR", "no such user")
    assert (statuses[other["id"]]["status"], statuses[other["id"]]["reply_text"]) == ("FINISHED", "ok")


async def _pages(stores) -> int:
    database = stores.database
    return sum([await (await database.bucket("status_log", n)).count_documents({})
                for n in await database.bucket_numbers("status_log")])


@aio_test
async def test_a_batch_that_waited_while_the_last_report_finished_the_mailing_is_refused(database, clock):
    """add_recipients saw the mailing RUNNING, then waited its turn while the last report made it
    FINISHED: storing its recipients then would leave READY ones that are never sent."""
    from cloudmailing.common.link_protocol import Outcome
    from cloudmailing.services.errors import BadRequest

    services, stores = await _services(database, clock, block_recipients=2)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.recipients.add(mailing_id, [{"email": "u0@example.org"}])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    satellite = {"serial": "sat-a", "group": ""}
    leased = await services.dispatcher.lease(satellite, 10)
    gate, waiting = asyncio.Event(), asyncio.Event()
    append = stores.writer.append

    async def append_after_the_report(*args):
        waiting.set()
        await gate.wait()
        return await append(*args)

    stores.writer.append = append_after_the_report
    adding = asyncio.ensure_future(services.recipients.add(mailing_id, [{"email": "late@example.org"}]))
    await waiting.wait()
    await services.dispatcher.report(satellite, [Outcome(leased[0]["id"], "FINISHED", 250, "", "ok")])
    assert (await _status(services, mailing_id))["status"] == "FINISHED"
    gate.set()
    with pytest.raises(BadRequest, match="is finished"):
        await adding
    mailing = await _status(services, mailing_id)
    assert (mailing["status"], mailing["total_recipient"], mailing["total_pending"]) == ("FINISHED", 1, 0)


@aio_test
async def test_recipients_added_while_a_deadline_ends_the_mailing_time_out_too(database, clock):
    services, stores = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.mailings.set_properties(mailing_id, {"scheduled_duration": 60})
    await services.recipients.add(mailing_id, [{"email": "u0@example.org"}])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    finish = services.lifecycle._finish

    async def a_batch_comes_first(*args, **kwargs):  # between the time-out and FINISHED
        await services.recipients.add(mailing_id, [{"email": "late@example.org"}])
        await finish(*args, **kwargs)

    services.lifecycle._finish = a_batch_comes_first
    clock.advance(61 * 60)
    await services.lifecycle.tick()
    mailing = await _status(services, mailing_id)
    assert (mailing["status"], mailing["total_recipient"], mailing["total_pending"]) == ("FINISHED", 2, 0)


@aio_test
async def test_a_delivered_test_recipient_does_not_close_a_mailing_kept_open_when_empty(database, clock):
    """send_test before start, on a dont_close_if_empty mailing: once the test is delivered and
    the mailing started, it stays open for the recipients to come (test recipients are not in
    the totals a mailing finishes on)."""
    services, stores = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.mailings.set_properties(mailing_id, {"dont_close_if_empty": True})
    answer = await services.recipients.add(mailing_id, [{"email": "qa@example.org"}], test=True)
    await set_statuses(stores, [answer[0]["id"]], "FINISHED", now=utc_now(clock))
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    mailing = await _status(services, mailing_id)
    assert (mailing["status"], mailing["total_recipient"], mailing["total_sent"]) == ("RUNNING", 0, 0)
    await services.recipients.add(mailing_id, [{"email": "u0@example.org"}])
    assert (await _status(services, mailing_id))["total_recipient"] == 1


@aio_test
async def test_a_reset_of_a_finished_mailing_cut_by_a_crash_is_repaired_at_start(database, clock):
    """The reset's state was written, then the master died before the block's summary and the
    counts: at start-up the mailing is unfinished (reopened before the edits), so it is repaired
    and its reset recipient delivered, not left READY in a FINISHED mailing."""
    services, stores = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    answer = await services.recipients.add(mailing_id, [{"email": f"u{i}@example.org"} for i in range(2)])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    await set_statuses(stores, [a["id"] for a in answer], "FINISHED", now=utc_now(clock))
    await services.lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "FINISHED"

    async def killed(*args, **kwargs):
        raise ConnectionError("the master was killed")

    stores.blocks.write_summary = killed  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await services.recipients.reset([answer[0]["id"]])
    services, stores = await _services(database, clock)  # a new master
    await services.lifecycle.recover()
    await services.lifecycle.tick()
    mailing = await _status(services, mailing_id)
    assert (mailing["status"], mailing["total_sent"], mailing["total_pending"]) == ("RUNNING", 1, 1)
    leased = await services.dispatcher.lease({"serial": "sat-a", "group": ""}, 10)
    assert [r["id"] for r in leased] == [answer[0]["id"]]


@aio_test
async def test_a_reset_drops_the_message_kept_of_the_send_it_undid(database, clock):
    services, stores = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    [answer] = await services.recipients.add(mailing_id, [{"email": "u0@example.org"}])
    [found] = (await stores.lookup.find([answer["id"]])).values()
    place = (found.block.id, found.slot)
    await set_statuses(stores, [answer["id"]], "FINISHED", now=utc_now(clock))
    await stores.kept.put(mailing_id, *place, b"Subject: as sent\r\n\r\nHi\r\n")
    await services.recipients.reset([answer["id"]])
    assert await stores.kept.get([place]) == {}
    [status] = await services.reports.statuses([answer["id"]], {"with_customized_content": True})
    assert (status["status"], status["customized_content"]) == ("READY", "")
