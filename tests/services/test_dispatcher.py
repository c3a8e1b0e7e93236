"""Leases and reports, driven by a fake clock, on blocks of two recipients."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import email
import email.policy
import json

from pymongo import AsyncMongoClient, monitoring

from cloudmailing.common.link_protocol import LeaseAnswer, MailingContent, Outcome
from cloudmailing.config.settings import DispatchConfig
from cloudmailing.master.app import build_services
from cloudmailing.satellite.composer import compose, prepare
from cloudmailing.services.dispatcher import retry_delay
from cloudmailing.storage.blocks import BlockStore
from cloudmailing.storage.database import Database
from cloudmailing.storage.stores import open_stores
from tests.helpers import CommandWatcher, aio_test

SATELLITE = {"serial": "sat-a", "group": "", "domain_affinity": []}


async def _world(database, clock, **config):
    services = build_services(await open_stores(database, block_recipients=2), clock,
                              dispatch=DispatchConfig(**config))
    mailing_id = await services.mailings.create("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    return services, mailing_id


async def _add(services, mailing_id, count, domain="example.org"):
    answer = await services.recipients.add(mailing_id, [{"email": f"u{i}@{domain}"} for i in range(count)])
    return [a["id"] for a in answer]


def _outcome(recipient_id, status, code=250):
    return Outcome.from_wire({"recipient_id": recipient_id, "status": status, "reply_code": code, "reply_text": "x",
                              "smtp_log": ["> RCPT", f"< {code}"]})


@aio_test
async def test_only_running_mailings_are_leased_and_pause_stops_leases(database, clock):
    services, mailing_id = await _world(database, clock)
    await _add(services, mailing_id, 5)
    assert await services.dispatcher.lease(SATELLITE, 10) == []  # not started
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    first = await services.dispatcher.lease(SATELLITE, 1)
    assert len(first) == 2  # a whole block
    await services.mailings.pause(mailing_id)
    assert await services.dispatcher.lease(SATELLITE, 10) == []
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    rest = await services.dispatcher.lease(SATELLITE, 10)
    assert len(rest) == 3 and not {r["id"] for r in rest} & {r["id"] for r in first}


@aio_test
async def test_test_recipients_go_out_before_the_mailing_starts(database, clock):
    services, mailing_id = await _world(database, clock)
    await _add(services, mailing_id, 3)
    answer = await services.recipients.add(mailing_id, [{"email": "qa@example.org"}], test=True)
    leased = await services.dispatcher.lease(SATELLITE, 10)
    assert [r["id"] for r in leased] == [answer[0]["id"]] and leased[0]["test"] is True


@aio_test
async def test_groups_and_domain_affinity(database, clock):
    services, mailing_id = await _world(database, clock)
    await services.mailings.set_properties(mailing_id, {"satellite_group": "eu"})
    await _add(services, mailing_id, 2, "one.test")
    await _add(services, mailing_id, 2, "two.test")
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    assert await services.dispatcher.lease(SATELLITE, 10) == []  # not in group eu
    specialist = {"serial": "sat-b", "group": "eu", "domain_affinity": ["two.test"]}
    leased = await services.dispatcher.lease(specialist, 10)
    assert sorted(r["domain"] for r in leased) == ["two.test", "two.test"]


@aio_test
async def test_expired_and_abandoned_leases_come_back(database, clock):
    services, mailing_id = await _world(database, clock, lease_seconds=60)
    await _add(services, mailing_id, 4)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    assert len(await services.dispatcher.lease(SATELLITE, 2)) == 2
    assert len(await services.dispatcher.lease({**SATELLITE, "serial": "sat-b"}, 2)) == 2
    assert await services.dispatcher.lease(SATELLITE, 10) == []
    clock.advance(30)
    assert await services.dispatcher.expire_leases() == 0
    assert await services.dispatcher.release_satellite("sat-b") == 2  # disconnected
    clock.advance(31)
    assert await services.dispatcher.expire_leases() == 2
    assert len(await services.dispatcher.lease(SATELLITE, 10)) == 4


@aio_test
async def test_leases_never_reported_are_forgotten_once_they_end(database, clock):
    """A satellite that dies leaves its leases unreported: the master forgets them when they end,
    so its memory stays bounded; the live ones it keeps, and their reports count."""
    services, mailing_id = await _world(database, clock, lease_seconds=60)
    await _add(services, mailing_id, 3)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    assert len(await services.dispatcher.lease(SATELLITE, 10)) == 3
    clock.advance(61)
    assert await services.dispatcher.expire_leases() == 3
    assert services.dispatcher._held == {}
    again = await services.dispatcher.lease(SATELLITE, 10)
    clock.advance(30)
    await services.dispatcher.expire_leases()
    assert len(services.dispatcher._held) == 3  # not ended yet
    await services.dispatcher.report(SATELLITE, [Outcome.from_wire(
        {"recipient_id": r["id"], "status": "FINISHED", "reply_code": 250, "reply_text": "ok", "smtp_log": [],
         "lease": r["lease"]}) for r in again])
    assert [s["status"] for s in await services.reports.statuses([r["id"] for r in again], {})] == ["FINISHED"] * 3
    assert services.dispatcher._held == {}


def _kept(recipient, status, code=250, lease=None):
    """The outcome a satellite kept for a leased recipient, naming its lease (or ``lease``)."""
    return Outcome.from_wire({"recipient_id": recipient["id"], "status": status, "reply_code": code,
                              "reply_text": "x", "smtp_log": [], "lease": lease or recipient["lease"]})


async def _status(services, recipient):
    return (await services.reports.statuses([recipient["id"]], {}))[0]


@aio_test
async def test_an_outcome_kept_past_its_lease_counts_unless_another_satellite_holds_the_recipient(database, clock):
    """A satellite back after the reconnect grace freed its leases reports its outbox: the master
    records what is still pending and leased to nobody; what another satellite holds now, or what
    was reported already (a repeat after a lost acknowledgement), it ignores. (Past the lease's
    end, the master has forgotten which lease it gave: a late outcome records nothing.)"""
    services, mailing_id = await _world(database, clock, lease_seconds=60, retry_initial_seconds=300)
    await _add(services, mailing_id, 5)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    first = await services.dispatcher.lease(SATELLITE, 5)
    assert len(first) == 5  # three blocks
    clock.advance(30)
    assert await services.dispatcher.release_satellite(SATELLITE["serial"]) == 5  # gone past the grace
    stolen = await services.dispatcher.lease({**SATELLITE, "serial": "sat-b"}, 1)
    assert [r["id"] for r in stolen] == [r["id"] for r in first[:2]]  # the first block, now sat-b's
    reported = await services.dispatcher.report(SATELLITE, [
        _kept(first[0], "FINISHED"), _kept(first[2], "FINISHED"), _kept(first[3], "WARNING", 451)])
    assert sorted(reported.recorded) == sorted([first[2]["id"], first[3]["id"]])
    assert (await _status(services, first[0]))["status"] == "IN PROGRESS"  # sat-b's now: untouched
    assert (await _status(services, first[2]))["status"] == "FINISHED"
    warned = await _status(services, first[3])
    assert (warned["status"], warned["try_count"]) == ("WARNING", 1)
    # Sent again, its acknowledgement lost: nothing new, not even the soft bounce's try.
    again = await services.dispatcher.report(SATELLITE, [_kept(first[2], "ERROR", 550),
                                                         _kept(first[3], "WARNING", 451)])
    assert again.recorded == []
    assert (await _status(services, first[2]))["status"] == "FINISHED"
    assert (await _status(services, first[3]))["try_count"] == 1
    # An outcome naming no lease counts only for what the satellite holds.
    assert (await services.dispatcher.report(SATELLITE, [_outcome(first[4]["id"], "FINISHED")])).recorded == []
    assert (await _status(services, first[4]))["status"] == "READY"


@aio_test
async def test_an_outcome_of_an_earlier_lease_of_the_same_satellite_counts_and_ends_the_new_hold(database, clock):
    """The lease ended and the same satellite was leased the recipients again before its outbox
    was reported: the outcome of the earlier lease is recorded, and the later lease lets go of
    that recipient (its other recipients stay held)."""
    services, mailing_id = await _world(database, clock, lease_seconds=60)
    await _add(services, mailing_id, 2)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    first = await services.dispatcher.lease(SATELLITE, 2)
    clock.advance(61)
    await services.dispatcher.expire_leases()
    second = await services.dispatcher.lease(SATELLITE, 2)
    assert [r["id"] for r in second] == [r["id"] for r in first] and second[0]["lease"] != first[0]["lease"]
    reported = await services.dispatcher.report(SATELLITE, [_kept(first[0], "FINISHED")])
    assert reported.recorded == [first[0]["id"]]
    assert (await _status(services, first[0]))["status"] == "FINISHED"
    assert await services.dispatcher.leased_count("sat-a") == 1  # the other one is still held
    assert (await _status(services, first[1]))["status"] == "IN PROGRESS"
    assert (await services.dispatcher.report(SATELLITE, [_kept(second[1], "FINISHED")])).recorded == [first[1]["id"]]
    assert await services.dispatcher.leased_count("sat-a") == 0


@aio_test
async def test_reports_set_final_statuses_and_soft_bounce_retries(database, clock):
    services, mailing_id = await _world(database, clock, retry_initial_seconds=300, retry_max_age_hours=1)
    ids = await _add(services, mailing_id, 3)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    await services.dispatcher.lease(SATELLITE, 3)
    reported = await services.dispatcher.report(SATELLITE, [
        _outcome(ids[0], "FINISHED"), _outcome(ids[1], "ERROR", 550), _outcome(ids[2], "WARNING", 451),
        _outcome("deleted-id", "FINISHED")])
    assert sorted(reported.acknowledged) == sorted([*ids, "deleted-id"])
    assert sorted(reported.recorded) == sorted(ids)  # the unknown id is acknowledged, not recorded
    status = {s["id"]: s for s in await services.reports.statuses(ids, {})}
    assert [status[i]["status"] for i in ids] == ["FINISHED", "ERROR", "WARNING"]
    assert status[ids[2]]["next_try"] - status[ids[2]]["first_try"] == datetime.timedelta(seconds=300)
    assert status[ids[0]]["in_progress"] is False and status[ids[0]]["cloud_client"] == "sat-a"
    assert await services.dispatcher.lease(SATELLITE, 10) == []  # the soft bounce waits for next_try
    clock.advance(301)
    retry = await services.dispatcher.lease(SATELLITE, 10)
    assert [r["id"] for r in retry] == [ids[2]]
    clock.advance(3600)  # soft-bouncing for over retry_max_age_hours: TIMEOUT
    await services.dispatcher.report(SATELLITE, [_outcome(ids[2], "WARNING", 451)])
    assert (await services.reports.statuses([ids[2]], {}))[0]["status"] == "TIMEOUT"
    mailing = (await services.mailings.list({"id": [mailing_id]}))[0]
    assert (mailing["total_sent"], mailing["total_error"], mailing["total_pending"]) == (1, 2, 0)


@aio_test
async def test_due_retries_are_leased_before_fresh_recipients(database, clock):
    services, mailing_id = await _world(database, clock, retry_initial_seconds=300)
    ids = await _add(services, mailing_id, 4)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    assert [r["id"] for r in await services.dispatcher.lease(SATELLITE, 4)] == ids
    await services.dispatcher.report(SATELLITE, [_outcome(rid, "WARNING", 451) for rid in ids[2:]])
    await services.dispatcher.release_recipients(ids[:2])  # back to READY, ahead in the queue
    clock.advance(301)
    leased = [r["id"] for r in await services.dispatcher.lease(SATELLITE, 1)]
    assert leased == [ids[2], ids[3]]  # the block of due retries, then (next lease) the fresh one
    assert [r["id"] for r in await services.dispatcher.lease(SATELLITE, 1)] == ids[:2]
    details = {s["id"]: s for s in await services.reports.statuses(ids, {})}
    assert details[ids[2]]["reply_code"] == 451 and details[ids[2]]["smtp_log"] == "> RCPT\n< 451"
    assert details[ids[2]]["status"] == "IN PROGRESS" and details[ids[0]]["reply_code"] is None


def test_retry_delay_doubles_up_to_the_cap():
    config = DispatchConfig(retry_initial_seconds=300, retry_factor=2, retry_max_seconds=14400)
    assert [retry_delay(config, n) for n in (1, 2, 3, 6, 7, 20)] == [300, 600, 1200, 9600, 14400, 14400]
    # A recipient's tries are kept up to 65,535; the settings give floats: no OverflowError.
    assert retry_delay(dataclasses.replace(config, retry_factor=2.0), 65535) == 14400


@aio_test
async def test_a_lease_stops_where_its_attachments_pass_max_lease_bytes(database, clock):
    services, mailing_id = await _world(database, clock, max_lease_bytes=10_000)
    attachment = {"filename": "a.pdf", "content_type": "application/pdf", "content": b"%" * 3000}
    entries = [{"email": f"u{i}@example.org", "attachments": [attachment]} for i in range(5)]
    entries.append({"email": "big@example.org", "attachments": [dict(attachment, content=b"%" * 30_000)]})
    await services.recipients.add(mailing_id, entries)  # blocks: 6 KB, 6 KB, 33 KB
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    leases = [await services.dispatcher.lease(SATELLITE, 10) for _ in range(4)]
    assert [len(lease) for lease in leases] == [2, 2, 2, 0]  # a block each time; the big one goes alone
    # The master sends these without decoding them again: they must be of the link's shape.
    answer = LeaseAnswer.from_wire(json.loads(json.dumps(LeaseAnswer.wire_of(leases[0], 60, {}))))
    assert [r.to_wire() for r in answer.recipients] == leases[0]
    assert base64.b64decode(answer.recipients[0].attachments[0].content) == b"%" * 3000
    assert await BlockStore(database).leased_count("sat-a") == 6


@aio_test
async def test_attachments_in_the_original_spelling_reach_the_satellite_message(database, clock):
    services, mailing_id = await _world(database, clock)
    original = {"content-type": "text/plain", "charset": "iso-8859-1",  # the original server's struct,
                "data": base64.b64encode("café".encode("latin-1")).decode()}  # without a filename
    ours = {"filename": "invoice.pdf", "content_type": "application/pdf", "content": b"%PDF-1.4"}
    answer = await services.recipients.add(mailing_id, [
        {"email": "old@example.org", "attachments": [original, {"data": "AAE=", "content-type": "image/png"}]},
        {"email": "new@example.org", "attachments": [ours]}])
    assert all("id" in a for a in answer)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    leased = await services.dispatcher.lease(SATELLITE, 10)
    # Stored and leased in the one shape of today: {filename, content_type, content}, charset as a parameter.
    by_email = {r["email"]: r["attachments"] for r in leased}
    assert by_email["old@example.org"] == [
        {"filename": "attachment.txt", "content_type": "text/plain; charset=iso-8859-1",
         "content": base64.b64encode("café".encode("latin-1")).decode()},
        {"filename": "attachment.png", "content_type": "image/png", "content": "AAE="}]
    # What the satellite gets over the link, and the message it builds from it.
    content = await services.dispatcher.mailing_content(mailing_id)
    content["rfc822"] = base64.b64encode(content["rfc822"]).decode("ascii")
    mailing = prepare(MailingContent.from_wire(content).to_wire())
    lease = LeaseAnswer.from_wire(json.loads(json.dumps(LeaseAnswer.wire_of(leased, 60, {}))))
    parts = {}
    for recipient in lease.recipients:
        message = email.message_from_bytes(compose(mailing, recipient.to_wire()).data, policy=email.policy.default)
        assert message.get_content_type() == "multipart/mixed"
        parts[recipient.email] = list(message.iter_attachments())
    text, image = parts["old@example.org"]
    assert (text.get_content_type(), text.get_content_charset(), text.get_filename()) == (
        "text/plain", "iso-8859-1", "attachment.txt")
    assert text.get_content() == "café" and text.get_payload(decode=True) == "café".encode("latin-1")
    assert (image.get_content_type(), image.get_filename(), image.get_payload(decode=True)) == (
        "image/png", "attachment.png", b"\0\1")
    (pdf,) = parts["new@example.org"]
    assert (pdf.get_content_type(), pdf.get_filename(), pdf.get_content()) == (
        "application/pdf", "invoice.pdf", b"%PDF-1.4")


class _Finds(CommandWatcher):
    """The searches for free blocks the database is asked."""

    def __init__(self) -> None:
        self.free_searches = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        query = event.command.get("filter") or {} if event.command_name == "find" else {}
        if "free" in query and "m" in query:  # of the mailing (not of test recipients)
            self.free_searches += 1


@contextlib.asynccontextmanager
async def _watched_world(mongo_url, db_name, clock, listener):
    """``_world`` on a connection whose commands ``listener`` sees."""
    client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=False, event_listeners=[listener])
    try:
        yield await _world(Database(client=client, db=client[db_name]), clock)
    finally:
        await client.drop_database(db_name)
        await client.close()


@aio_test
async def test_free_blocks_found_by_one_search_serve_the_next_leases(mongo_url, db_name, clock):
    finds = _Finds()
    async with _watched_world(mongo_url, db_name, clock, finds) as (services, mailing_id):
        ids = await _add(services, mailing_id, 10)  # five blocks of two
        await services.mailings.start(mailing_id)
        await services.lifecycle.tick()
        leased = [await services.dispatcher.lease(SATELLITE, 1) for _ in range(3)]
        assert [len(lease) for lease in leased] == [2, 2, 2] and finds.free_searches == 1
        # Recipients added to the running mailing: searched again, the new block found at once.
        new = await _add(services, mailing_id, 2, domain="example.net")
        more = await services.dispatcher.lease(SATELLITE, 100)
        assert sorted(r["id"] for r in more) == sorted(ids[6:] + new) and finds.free_searches == 2
        # Leases returned to the queue: searched again, found again.
        await services.dispatcher.release_satellite(SATELLITE["serial"])
        again = await services.dispatcher.lease(SATELLITE, 100)
        assert sorted(r["id"] for r in again) == sorted(ids + new) and finds.free_searches == 3


class _ContentReads(_Finds):
    """The searches for free blocks, and the reads of block contents, the database is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.content_reads = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        super().started(event)
        if event.command_name == "find" and str(event.command.get("find", "")).startswith("block_content"):
            self.content_reads += 1


@aio_test
async def test_a_satellite_with_a_domain_affinity_leaves_the_other_blocks_to_the_others(mongo_url, db_name, clock):
    watched = _ContentReads()
    async with _watched_world(mongo_url, db_name, clock, watched) as (services, mailing_id):
        common = await _add(services, mailing_id, 8)  # four blocks of two
        rare = await _add(services, mailing_id, 2, domain="rare.test")
        await services.mailings.start(mailing_id)
        await services.lifecycle.tick()
        specialist = {"serial": "sat-b", "group": "", "domain_affinity": ["rare.test"]}
        assert sorted(r["id"] for r in await services.dispatcher.lease(specialist, 100)) == sorted(rare)
        assert (watched.free_searches, watched.content_reads) == (1, 5)
        # Its next leases read none of the blocks it passed over again...
        assert await services.dispatcher.lease(specialist, 100) == []
        assert watched.content_reads == 5
        # ...and the blocks it passed over are still handed out from that one search.
        leased = await services.dispatcher.lease(SATELLITE, 100)
        assert sorted(r["id"] for r in leased) == sorted(common) and watched.free_searches == 1
        # Once recipients are added, it looks at the blocks again.
        more_rare = await _add(services, mailing_id, 2, domain="rare.test")
        assert sorted(r["id"] for r in await services.dispatcher.lease(specialist, 100)) == sorted(more_rare)


@aio_test
async def test_a_mailing_is_finished_by_the_report_of_its_last_outcome_not_at_the_next_tick(database, clock):
    services, mailing_id = await _world(database, clock)
    ids = await _add(services, mailing_id, 3)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    leased = await services.dispatcher.lease(SATELLITE, 10)
    assert len(leased) == 3
    await services.dispatcher.report(SATELLITE, [_outcome(ids[0], "FINISHED"), _outcome(ids[1], "WARNING", 451)])
    assert (await services.mailings.get(mailing_id))["status"] == "RUNNING"  # one not tried, one to retry
    await services.dispatcher.report(SATELLITE, [_outcome(ids[2], "ERROR", 550)])
    assert (await services.mailings.get(mailing_id))["status"] == "RUNNING"  # the soft bounce is pending
    clock.advance(retry_delay(services.dispatcher.config, 1) + 1)
    assert [r["id"] for r in await services.dispatcher.lease(SATELLITE, 10)] == [ids[1]]
    await services.dispatcher.report(SATELLITE, [_outcome(ids[1], "FINISHED")])
    mailing = await services.mailings.get(mailing_id)  # no tick in between
    assert mailing["status"] == "FINISHED" and mailing["end_time"]


async def _tests(services, mailing_id, count, prefix="qa"):
    answer = await services.recipients.add(mailing_id, [{"email": f"{prefix}{i}@example.org"} for i in range(count)],
                                           test=True)
    return [a["id"] for a in answer]


@aio_test
async def test_test_recipients_go_only_to_satellites_of_the_mailings_group(database, clock):
    """A lease brings the mailing's content, DKIM private key included: a test recipient of a
    group's mailing is not leased to another group's satellite."""
    services, mailing_id = await _world(database, clock)
    await services.mailings.set_properties(mailing_id, {"satellite_group": "eu"})
    ids = await _tests(services, mailing_id, 1)
    elsewhere = {"serial": "sat-us", "group": "us", "domain_affinity": []}
    assert await services.dispatcher.lease(elsewhere, 10) == []
    assert await services.dispatcher.mailing_content(mailing_id, elsewhere) is None
    own = {"serial": "sat-eu", "group": "eu", "domain_affinity": []}
    assert [r["id"] for r in await services.dispatcher.lease(own, 10)] == ids  # found at once all the same


@aio_test
async def test_a_deadline_does_not_time_out_test_recipients(database, clock):
    services, mailing_id = await _world(database, clock)
    await services.mailings.set_properties(mailing_id, {"scheduled_duration": 1})
    await _add(services, mailing_id, 1)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    ids = await _tests(services, mailing_id, 1)
    clock.advance(61)
    await services.lifecycle.tick()  # the deadline: the mailing's recipient times out, not the test
    assert [s["status"] for s in await services.reports.statuses(ids, {})] == ["READY"]
    assert [r["id"] for r in await services.dispatcher.lease(SATELLITE, 10)] == ids


@aio_test
async def test_a_block_whose_lease_a_report_ended_is_leased_again_at_once(database, clock):
    """A test recipient added to a block while it was held goes out once the lease ends (it
    waited up to 30 s for the free blocks' next search)."""
    services, mailing_id = await _world(database, clock)
    first = await _tests(services, mailing_id, 1)
    assert [r["id"] for r in await services.dispatcher.lease(SATELLITE, 10)] == first
    second = await _tests(services, mailing_id, 1, prefix="qb")  # into the held block
    assert await services.dispatcher.lease(SATELLITE, 10) == []
    await services.dispatcher.report(SATELLITE, [_outcome(first[0], "FINISHED")])
    assert [r["id"] for r in await services.dispatcher.lease(SATELLITE, 10)] == second


def _reported(recipient_id, status="FINISHED", lease="no-such-lease", code=250):
    return Outcome.from_wire({"recipient_id": recipient_id, "status": status, "reply_code": code,
                              "reply_text": "ok", "smtp_log": [], "lease": lease})


@aio_test
async def test_naming_some_lease_records_nothing_the_satellite_was_never_given(database, clock):
    services, mailing_id = await _world(database, clock)
    await services.mailings.set_properties(mailing_id, {"satellite_group": "eu"})
    ids = await _add(services, mailing_id, 2)
    tests = [a["id"] for a in await services.recipients.add(mailing_id, [{"email": "qa@example.org"}], test=True)]
    elsewhere = {"serial": "sat-us", "group": "us", "domain_affinity": []}
    reported = await services.dispatcher.report(elsewhere, [_reported(rid) for rid in ids + tests])
    assert reported.recorded == []
    assert [s["status"] for s in await services.reports.statuses(ids + tests, {})] == ["READY"] * 3


@aio_test
async def test_a_soft_bounce_reported_again_once_its_retry_is_due_records_nothing_new(database, clock):
    services, mailing_id = await _world(database, clock, lease_seconds=60, retry_initial_seconds=300)
    await _add(services, mailing_id, 2)
    await services.mailings.start(mailing_id)
    await services.lifecycle.tick()
    [first, _] = await services.dispatcher.lease(SATELLITE, 2)
    warning = _reported(first["id"], "WARNING", first["lease"], 451)
    assert (await services.dispatcher.report(SATELLITE, [warning])).recorded == [first["id"]]
    clock.advance(301)  # its acknowledgement lost, the satellite back once the retry is due
    assert (await services.dispatcher.report(SATELLITE, [warning])).recorded == []
    assert (await services.reports.statuses([first["id"]], {}))[0]["try_count"] == 1
