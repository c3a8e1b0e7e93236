"""Mailing life cycle driven by a fake clock: scheduled start, time-out, finish."""

from __future__ import annotations

import datetime

from cloudmailing.master.app import build_services
from cloudmailing.storage.status_log import StatusChange
from tests.helpers import aio_test, started_status_log


async def _services(database, clock):
    return build_services(database, await started_status_log(database), clock)


async def _status(services, mailing_id):
    return (await services.mailings.list({"id": [mailing_id]}))[0]


@aio_test
async def test_scheduled_start_then_finish_when_all_final(database, clock):
    services = await _services(database, clock)
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
    status_log = services.recipients._status_log
    from cloudmailing.services.clock import utc_now
    await status_log.apply([StatusChange(answer[0]["id"], "FINISHED")], utc_now(clock))
    await services.lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "RUNNING"
    await status_log.apply([StatusChange(answer[1]["id"], "ERROR")], utc_now(clock))
    await services.lifecycle.tick()
    mailing = await _status(services, mailing_id)
    assert mailing["status"] == "FINISHED"
    assert (mailing["total_sent"], mailing["total_error"], mailing["total_pending"]) == (1, 1, 0)


@aio_test
async def test_duration_times_out_remaining_recipients(database, clock):
    services = await _services(database, clock)
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
    services = await _services(database, clock)
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
async def test_recover_rolls_back_cut_batches_and_recounts(database, clock):
    services = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.recipients.add(mailing_id, [{"email": "kept@example.org"}])
    # A batch cut by a crash: announced, partly written, never acknowledged.
    await database.ingest_batches.insert_one({"_id": "cut", "mailing_id": mailing_id})
    await database.recipients.insert_one({"_id": "half", "mailing_id": mailing_id, "email": "h@example.org",
                                          "status": "READY", "test": False, "ingest_batch": "cut"})
    await database.mailings.update_one({"_id": mailing_id}, {"$set": {"counts": {"READY": 7}}})
    await services.lifecycle.recover()
    assert await database.recipients.count_documents({}) == 1
    assert (await _status(services, mailing_id))["total_recipient"] == 1


@aio_test
async def test_the_counters_spare_a_count_but_a_drift_is_caught_within_a_minute(database, clock):
    services = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.recipients.add(mailing_id, [{"email": "a@example.org"}, {"email": "b@example.org"}])
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    # Final behind the counters' back (as an interrupted write could leave them): they say 2 pending.
    await database.recipients.update_many({"mailing_id": mailing_id}, {"$set": {"status": "FINISHED"}})
    clock.advance(30)
    await services.lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "RUNNING"  # no count yet
    clock.advance(31)
    await services.lifecycle.tick()
    mailing = await _status(services, mailing_id)
    assert mailing["status"] == "FINISHED" and (mailing["total_sent"], mailing["total_pending"]) == (2, 0)


@aio_test
async def test_a_slow_count_spaces_the_next_ones(database, clock):
    from cloudmailing.services.lifecycle import COUNT_SPACING, MailingLifecycle

    services = await _services(database, clock)
    timer = iter(range(0, 10_000, 10))  # every count "takes" 10 s of real time
    lifecycle = MailingLifecycle(database, services.recipients._status_log, clock, timer=lambda: next(timer))
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await services.recipients.add(mailing_id, [{"email": "a@example.org"}])
    await services.mailings.start(mailing_id)
    await lifecycle.tick()  # counts: the counters say 1 pending
    await database.recipients.update_many({"mailing_id": mailing_id}, {"$set": {"status": "FINISHED"}})
    clock.advance(10 * COUNT_SPACING - 1)  # 60 s would have been enough before that slow count
    await lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "RUNNING"
    clock.advance(1)
    await lifecycle.tick()
    assert (await _status(services, mailing_id))["status"] == "FINISHED"


@aio_test
async def test_old_status_log_entries_are_purged_at_most_hourly_but_current_details_stay(database, clock):
    from cloudmailing.services.clock import utc_now

    services = await _services(database, clock)
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    (added,) = await services.recipients.add(mailing_id, [{"email": "a@example.org"}])
    status_log = services.recipients._status_log
    await status_log.apply([StatusChange(added["id"], "WARNING", {"reply_text": "try later"})], utc_now(clock))
    # An entry written before entries had groups (the details were on the recipient then).
    await database.status_log.insert_one({"_id": 0, "recipient_id": added["id"], "mailing_id": mailing_id,
                                          "status": "READY", "logged_at": utc_now(clock), "record": {}})
    clock.advance(7200)
    await status_log.apply([StatusChange(added["id"], "ERROR", {"reply_text": "no such user"})], utc_now(clock))
    clock.advance(30 * 86400 - 7200 - 1800)
    await services.lifecycle.tick()  # purges: nothing is 30 days old yet
    clock.advance(2400)
    await services.lifecycle.tick()  # the first entries are now older than 30 days, but the last purge was 40 min ago
    assert await database.status_log.count_documents({}) == 3
    clock.advance(1800)
    await services.lifecycle.tick()
    assert [entry["status"] async for entry in database.status_log.find({})] == ["ERROR"]
    clock.advance(10 * 86400)
    await services.lifecycle.tick()  # older than 30 days too, but the recipient's details are there
    (status,) = await services.reports.statuses([added["id"]], {})
    assert (status["status"], status["reply_text"]) == ("ERROR", "no such user")
