"""The satellite link over real TLS: who is served, and what a disconnect gives back."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

from cloudmailing.common.aio import wait_deferred
from cloudmailing.common.link import LinkError, LinkProtocol
from tests.helpers import aio_test, running_mailing

GRACE = 0.5  # seconds a satellite that left keeps its leases, in these tests


@pytest.fixture
def settings(settings):
    link = dataclasses.replace(settings.satellite_link, reconnect_grace_seconds=GRACE)
    return dataclasses.replace(settings, satellite_link=link)


async def _connect(master) -> LinkProtocol:
    from twisted.internet import reactor

    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", master.satellite_port, ssl.CertificateOptions(verify=False))
    return await wait_deferred(connectProtocol(endpoint, LinkProtocol(reactor)))


async def _registered_link(running_master, serial: str) -> LinkProtocol:
    """A link of a satellite registered through the API, that said hello."""
    await running_master.proxy().cloud_add_satellite(serial, {})
    link = await _connect(running_master.master)
    await link.call("hello", serial=serial, secret="pw")
    return link


async def _refused(link: LinkProtocol, method: str, **params) -> str:
    with pytest.raises(LinkError) as raised:
        await link.call(method, **params)
    return raised.value.code


@aio_test
async def test_unknown_satellites_wait_for_approval(running_master):
    api = running_master.proxy()
    link = await _connect(running_master.master)
    assert await _refused(link, "lease", max_recipients=1) == "unauthorized"  # no hello yet
    assert await _refused(link, "hello", serial="newcomer", secret="pw") == "not_paired"
    listed = await api.cloud_list_satellites()
    assert [(s["serial"], s["paired"]) for s in listed] == [("newcomer", False)]
    await api.cloud_set_satellite_properties(listed[0]["id"], {"paired": True})
    assert (await link.call("hello", serial="newcomer", secret="pw"))["satellite_id"] == listed[0]["id"]
    assert await _refused(link, "mailing", mailing_id=12345) == "not_found"
    link.close()


@aio_test
async def test_first_secret_is_kept_and_a_wrong_one_refused(running_master):
    api = running_master.proxy()
    satellite_id = await api.cloud_add_satellite("sat-1", {"group": "eu"})
    link = await _connect(running_master.master)
    assert (await link.call("hello", serial="sat-1", secret="right"))["group"] == "eu"
    assert (await api.cloud_list_satellites())[0]["connected"] is True
    other = await _connect(running_master.master)
    assert await _refused(other, "hello", serial="sat-1", secret="wrong") == "unauthorized"
    await api.cloud_set_satellite_properties(satellite_id, {"enabled": False})
    assert await _refused(link, "lease", max_recipients=5) == "not_paired"
    link.close()
    other.close()


async def _in_flight(api) -> int:
    return (await api.cloud_list_satellites())[0]["in_flight"]


@aio_test
async def test_a_disconnect_returns_the_leases_after_the_grace(running_master):
    api = running_master.proxy()
    await running_mailing(api, 3)
    link = await _registered_link(running_master, "sat-2")
    leased = (await link.call("lease", max_recipients=10))["recipients"]
    assert len(leased) == 3 and await _in_flight(api) == 3
    statuses = await api.get_recipients_status([r["id"] for r in leased], {})
    assert {s["status"] for s in statuses} == {"IN PROGRESS"}
    link.close()
    await link.closed_future
    assert await _in_flight(api) == 3  # a link that broke for a moment loses nothing
    await asyncio.sleep(GRACE + 0.5)
    assert await _in_flight(api) == 0
    assert (await api.cloud_list_satellites())[0]["connected"] is False
    assert {s["status"] for s in await api.get_recipients_status([r["id"] for r in leased], {})} == {"READY"}


@aio_test
async def test_a_reconnecting_satellite_keeps_what_it_holds_and_frees_the_rest_at_once(running_master):
    api = running_master.proxy()
    await running_mailing(api, 700)  # two blocks
    link = await _registered_link(running_master, "sat-r")
    first = (await link.call("lease", max_recipients=1000))["recipients"]
    assert len(first) in (500, 200) and len({r["lease"] for r in first}) == 1  # one block, either
    link.close()
    await link.closed_future
    # Back within the grace, holding nothing of that lease (its answer was lost in a crash).
    again = await _connect(running_master.master)
    await again.call("hello", serial="sat-r", secret="pw", leases=[])
    assert await _in_flight(api) == 0  # at once, not after lease_seconds
    held = (await again.call("lease", max_recipients=1000))["recipients"]
    again.close()
    await again.closed_future
    third = await _connect(running_master.master)
    await third.call("hello", serial="sat-r", secret="pw", leases=[held[0]["lease"]])
    assert await _in_flight(api) == len(held) > 0  # still its own
    third.close()


@aio_test
async def test_a_satellite_only_touches_what_it_holds_and_a_repeated_report_records_nothing(running_master):
    api = running_master.proxy()
    mailing_id = await running_mailing(api, 3)
    other_mailing = await api.create_mailing("news@sender.test", "Other", "Hi", "<p>Hi</p>", "", "utf-8")
    (unstarted,) = await api.add_recipients(other_mailing, [{"email": "x@example.org"}])
    holder = await _registered_link(running_master, "sat-h")
    stranger = await _registered_link(running_master, "sat-s")
    assert await _refused(stranger, "mailing", mailing_id=mailing_id) == "not_found"  # no DKIM key for it
    leased = (await holder.call("lease", max_recipients=10))["recipients"]
    assert (await holder.call("mailing", mailing_id=mailing_id))["id"] == mailing_id
    forged = [{"recipient_id": r["id"], "status": "ERROR", "reply_code": 550} for r in leased]
    forged.append({"recipient_id": unstarted["id"], "status": "FINISHED", "reply_code": 250})
    assert len((await stranger.call("report", outcomes=forged))["acknowledged"]) == 4  # acknowledged, ignored
    report = [{"recipient_id": r["id"], "status": "FINISHED", "reply_code": 250, "lease": r["lease"]} for r in leased]
    await holder.call("report", outcomes=report)
    await holder.call("report", outcomes=report)  # its acknowledgement was lost: sent again
    changes = (await api.get_recipients_status_updated_since("", {"status": ["FINISHED", "ERROR"]}, 100))
    assert sorted(c["id"] for c in changes["recipients"]) == sorted(r["id"] for r in leased)  # once each
    statuses = await api.get_recipients_status([*(r["id"] for r in leased), unstarted["id"]], {})
    assert [(s["status"], s["try_count"]) for s in statuses] == [("FINISHED", 1)] * 3 + [("READY", 0)]
    totals = (await api.list_mailings({"id": [other_mailing]}))[0]
    assert (totals["total_sent"], totals["total_pending"]) == (0, 1)
    holder.close()
    stranger.close()


@aio_test
async def test_a_satellite_holds_the_initial_lease_size_until_it_reports(running_master):
    """Leases are of whole blocks (500 recipients): at least one, then what the report rate allows."""
    api = running_master.proxy()
    await running_mailing(api, 700)  # two blocks: 500 and 200
    link = await _registered_link(running_master, "sat-3")
    leased = (await link.call("lease", max_recipients=50))["recipients"]
    assert len(leased) in (500, 200)  # one block, though [dispatch] initial_lease_size is 100
    assert (await link.call("lease", max_recipients=500))["recipients"] == []
    outcomes = [{"recipient_id": r["id"], "status": "FINISHED", "reply_code": 250} for r in leased[:150]]
    await link.call("report", outcomes=outcomes)
    # 150 outcomes within a second: a rate that allows far more than the other block.
    assert len((await link.call("lease", max_recipients=500))["recipients"]) == 700 - len(leased)
    link.close()


@aio_test
async def test_a_satellite_without_wake_is_woken_once_then_left_to_poll(running_master):
    link = await _registered_link(running_master, "sat-old")  # serves no method, as before wake existed
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    await api.start_mailing(mailing_id)
    for _ in range(12):  # more than the bad requests a link tolerates
        await api.send_test(mailing_id, [{"email": "qa@example.org"}])
        await asyncio.sleep(0.05)
    session = running_master.master.link_factory.sessions["sat-old"]
    assert session.wakes is False and link._bad_frames == 1 and not link.closed_future.done()
    assert (await link.call("lease", max_recipients=100))["recipients"]  # still served
    link.close()


@aio_test
async def test_leases_named_after_hello_are_kept_and_the_others_freed_at_the_last_call(running_master):
    """``held`` names the leases a satellite still holds, in as many calls as it needs (a hello
    naming them all could pass the pre-authentication frame limit)."""
    api = running_master.proxy()
    await running_mailing(api, 3)
    link = await _registered_link(running_master, "sat-n")
    stranger = await _connect(running_master.master)
    assert await _refused(stranger, "held", leases=[]) == "unauthorized"  # hello first
    stranger.close()
    leased = (await link.call("lease", max_recipients=10))["recipients"]
    link.close()
    await link.closed_future
    again = await _connect(running_master.master)
    await again.call("hello", serial="sat-n", secret="pw")  # names none: frees none, ends the grace
    await asyncio.sleep(GRACE + 0.3)
    assert await _in_flight(api) == 3  # the release after the grace did not run
    await again.call("held", leases=["another"], more=True)
    assert await _in_flight(api) == 3  # more to come: nothing freed yet
    await again.call("held", leases=[leased[0]["lease"]], more=False)
    assert await _in_flight(api) == 3  # named in the second call: kept
    await again.call("held", leases=[], more=False)
    assert await _in_flight(api) == 0  # named no more: freed at once
    assert len((await again.call("lease", max_recipients=10))["recipients"]) == 3
    await again.call("held", leases=[], more=False)
    assert await _in_flight(api) == 3  # granted on this link: never freed by held
    again.close()


@aio_test
async def test_a_release_after_the_grace_frees_nothing_once_the_satellite_is_back(running_master):
    """The grace ran out just as the satellite came back: the release under way stops, and the
    leases the satellite is about to name are its own still."""
    api = running_master.proxy()
    await running_mailing(api, 3)
    link = await _registered_link(running_master, "sat-g")
    assert len((await link.call("lease", max_recipients=10))["recipients"]) == 3
    factory = running_master.master.link_factory
    await factory._release_after_grace("sat-g")  # what the grace's timer runs, with the satellite back
    assert await _in_flight(api) == 3
    link.close()
    await link.closed_future
    await factory._release_after_grace("sat-g")  # away: freed
    assert await _in_flight(api) == 0


@aio_test
async def test_a_satellite_disabled_after_its_hello_gets_no_mailing_content_but_may_report(running_master):
    """The mailing content carries the DKIM private key: only a satellite enabled and paired now
    gets it; what a disabled one delivered is still recorded."""
    api = running_master.proxy()
    mailing_id = await running_mailing(api, 2)
    link = await _registered_link(running_master, "sat-d")
    leased = (await link.call("lease", max_recipients=10))["recipients"]
    satellite_id = next(s["id"] for s in await api.cloud_list_satellites() if s["serial"] == "sat-d")
    await api.cloud_set_satellite_properties(satellite_id, {"enabled": False})
    assert await _refused(link, "mailing", mailing_id=mailing_id) == "not_paired"
    assert await _refused(link, "lease", max_recipients=10) == "not_paired"
    report = [{"recipient_id": r["id"], "status": "FINISHED", "reply_code": 250, "lease": r["lease"]} for r in leased]
    await link.call("report", outcomes=report)
    assert (await api.list_mailings({"id": [mailing_id]}))[0]["total_sent"] == 2
    link.close()
