"""The satellite daemon's own decisions, against a real master over the real link."""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest

from cloudmailing import __version__
from cloudmailing.common.link import LinkError, LinkProtocol
from cloudmailing.common.link_protocol import LeaseAnswer, LeasedRecipient, Outcome
from cloudmailing.config.settings import SatelliteConfig
from cloudmailing.satellite.daemon import (
    MAILING_CACHE_SIZE,
    UNREPORTED_LEASES,
    SatelliteDaemon,
    SecretFileError,
    load_or_create_secret,
)
from tests.helpers import aio_test, running_mailing


@asynccontextmanager
async def _satellite(running_master: Any, tmp_path: Any, serial: str,
                     **config: Any) -> AsyncIterator[tuple[SatelliteDaemon, LinkProtocol]]:
    """A registered satellite daemon and its link to the master, said hello; its loops not running."""
    from twisted.internet import reactor

    await running_master.proxy().cloud_add_satellite(serial, {})
    settings = SatelliteConfig(master_port=running_master.master.satellite_port, serial=serial, secret="pw",
                               dns_servers="127.0.0.1:9", **config)
    satellite = SatelliteDaemon(settings, tmp_path / "sat", reactor, random.Random(0))
    link = await satellite._connect()
    try:
        await link.call("hello", serial=serial, secret="pw", version=__version__)
        yield satellite, link
    finally:
        link.close()
        await satellite.stop()


@aio_test
async def test_recipients_of_a_mailing_deleted_since_their_lease_are_dropped(running_master, tmp_path):
    api = running_master.proxy()
    mailing_id = await running_mailing(api, 3, "one.test")
    async with _satellite(running_master, tmp_path, "sat-gone") as (satellite, link):
        leased = (await link.call("lease", max_recipients=10))["recipients"]
        assert len(leased) == 3
        await api.delete_mailing(mailing_id)
        # Neither waits forever nor fails the link:
        await satellite._submit(link, [LeasedRecipient.from_wire(r) for r in leased])
        assert satellite._scheduler.pending == 0 and not satellite._outbox.batch(10)
        assert not link.closed_future.done()


@aio_test
async def test_no_new_lease_while_the_master_has_not_taken_the_outcomes(running_master, tmp_path):
    api = running_master.proxy()
    await running_mailing(api, 3, "one.test")
    async with _satellite(running_master, tmp_path, "sat-slow", lease_size=2) as (satellite, link):
        backlog = [f"old-{i}" for i in range(UNREPORTED_LEASES * 2)]
        for rid in backlog:  # outcomes the master has not acknowledged (the reporter is not running)
            satellite._outbox.add(Outcome(rid, "FINISHED", 250, "", ""))
        feeding = asyncio.ensure_future(satellite._feed(link))
        try:
            await asyncio.sleep(0.5)
            assert (await api.cloud_list_satellites())[0]["in_flight"] == 0
            satellite._outbox.acknowledge(backlog[:1])  # one taken: room for a lease
            for _ in range(40):
                if (await api.cloud_list_satellites())[0]["in_flight"]:
                    break
                await asyncio.sleep(0.05)
            assert (await api.cloud_list_satellites())[0]["in_flight"] == 3  # a whole block
        finally:
            feeding.cancel()


@aio_test
async def test_a_malformed_answer_of_the_master_is_refused_with_one_log_line(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from cloudmailing.common.link_protocol import LeaseAnswer
    from cloudmailing.satellite import daemon

    class Master:
        async def call(self, method: str, **params: Any) -> Any:
            return {"recipients": [{"id": "r1", "mailing_id": "one"}], "lease_seconds": 300}

    monkeypatch.setattr(daemon, "RETRY_PAUSE", 0)
    caplog.set_level(logging.INFO)
    answer = await SatelliteDaemon._ask(SimpleNamespace(serial="sat"), Master(), "lease",  # type: ignore[arg-type]
                                        {"max_recipients": 1}, LeaseAnswer.from_wire)
    assert answer is None  # the feeder asks again
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "malformed answer from the master to lease: lease answer.recipients[0].mailing_id: "
                    "expected an integer, got str")]


def test_a_build_failure_quoting_invalid_text_is_kept_as_valid_text():
    from types import SimpleNamespace

    from cloudmailing.satellite.composer import build_failure
    from cloudmailing.satellite.templates import PersonalizationError

    kept: list[Outcome] = []
    failure = build_failure("r1", PersonalizationError("template error near '\ud800'"))
    SatelliteDaemon._build_failed(SimpleNamespace(_keep=kept.append, _all_delivered=lambda: False, _deadlines={}),  # type: ignore[arg-type]
                                  failure, 3)
    assert Outcome.from_wire(kept[0].to_wire()).status == "GENERAL_ERROR"  # the master will take it
    assert kept[0].reply_text.startswith("template error near")


def test_an_acknowledged_outcome_of_an_older_lease_keeps_the_recipients_new_lease():
    from types import SimpleNamespace

    daemon = SimpleNamespace(_leases={"r1": "new", "r2": "L2", "r3": "L3", "r4": "new"}, _deadlines={"r1": 10.0})
    reported = [Outcome("r1", "FINISHED", 250, "", "", lease="old"), Outcome("r2", "FINISHED", 250, "", "", lease="L2"),
                Outcome("r3", "FINISHED", 250, "", "", lease="L3"), Outcome("r4", "FINISHED", 250, "", "", lease="old")]
    SatelliteDaemon._forget_leases(daemon, reported, {"r1", "r2", "r4"})  # type: ignore[arg-type]
    # r1 is queued again under its new lease; r3 not acknowledged yet; r4, leased again while its
    # outcome waited, was not sent again: that outcome was its last.
    assert daemon._leases == {"r1": "new", "r3": "L3"}


@aio_test
async def test_a_cancelled_daemon_leaves_no_loop_running(running_master, tmp_path):
    from twisted.internet import reactor

    await running_master.proxy().cloud_add_satellite("sat-c", {})
    settings = SatelliteConfig(master_port=running_master.master.satellite_port, serial="sat-c", secret="pw",
                               dns_servers="127.0.0.1:9")
    satellite = SatelliteDaemon(settings, tmp_path / "sat", reactor, random.Random(0))
    running = asyncio.ensure_future(satellite.run())
    while satellite.sessions == 0:
        await asyncio.sleep(0.05)

    def loops() -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() if not task.done() and getattr(
            task.get_coro(), "__qualname__", "") in ("SatelliteDaemon._feed", "SatelliteDaemon._report")]

    session_loops = loops()
    assert len(session_loops) == 2
    running.cancel()
    await satellite.stop()
    _, still_running = await asyncio.wait(session_loops, timeout=5)
    assert not still_running


@aio_test
async def test_the_last_outcomes_do_not_wait_for_the_report_in_flight(tmp_path):
    """Everything leased is delivered while a report is in flight: the rest goes at once, beside
    it; until then, reports go one at a time."""
    from twisted.internet import reactor

    settings = SatelliteConfig(master_port=9, serial="sat-r", secret="pw", dns_servers="127.0.0.1:9")
    satellite = SatelliteDaemon(settings, tmp_path / "sat", reactor, random.Random(0))

    class Master:
        def __init__(self) -> None:
            self.reports: list[list[str]] = []
            self.first_answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def call(self, method: str, **params: Any) -> Any:
            ids = [outcome["recipient_id"] for outcome in params["outcomes"]]
            self.reports.append(ids)
            if len(self.reports) == 1:
                await self.first_answer  # a slow master
            return {"acknowledged": ids}

    master = Master()
    delivered = [False]  # as if messages were still being composed and sent
    satellite._all_delivered = lambda: delivered[0]  # type: ignore[method-assign]
    satellite._outbox.add(Outcome("r1", "FINISHED", 250, "", ""))
    satellite._drained.set()
    reporting = asyncio.ensure_future(satellite._report(master))  # type: ignore[arg-type]
    try:
        await _until(lambda: master.reports)
        satellite._outbox.add(Outcome("r2", "FINISHED", 250, "", ""))
        await asyncio.sleep(0.7)  # longer than REPORT_INTERVAL: still one report at a time
        assert master.reports == [["r1"]]
        satellite._outbox.add(Outcome("r3", "FINISHED", 250, "", ""))
        delivered[0] = True
        satellite._drained.set()  # the last outcome of the work
        await _until(lambda: len(master.reports) == 2)
        assert master.reports == [["r1"], ["r2", "r3"]] and not master.first_answer.done()
        master.first_answer.set_result(None)
        await _until(lambda: not len(satellite._outbox))
    finally:
        reporting.cancel()
        await satellite.stop()


async def _until(condition: Any, seconds: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@aio_test
async def test_outcomes_past_one_report_after_the_last_delivery_do_not_wait(tmp_path, monkeypatch):
    """The last delivery woke the reporter, whose report took only part of what waits: the rest
    goes at once too, not after REPORT_INTERVAL."""
    from twisted.internet import reactor

    from cloudmailing.satellite import daemon

    monkeypatch.setattr(daemon, "REPORT_BATCH", 2)
    settings = SatelliteConfig(master_port=9, serial="sat-r2", secret="pw", dns_servers="127.0.0.1:9")
    satellite = SatelliteDaemon(settings, tmp_path / "sat", reactor, random.Random(0))
    reports: list[list[str]] = []

    class Master:
        async def call(self, method: str, **params: Any) -> Any:
            reports.append([outcome["recipient_id"] for outcome in params["outcomes"]])
            return {"acknowledged": reports[-1]}

    delivered = [False]
    satellite._all_delivered = lambda: delivered[0]  # type: ignore[method-assign]
    satellite._outbox.add(Outcome("r1", "FINISHED", 250, "", ""))
    reporting = asyncio.ensure_future(satellite._report(Master()))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.05)  # the reporter waits for more
        for rid in ("r2", "r3"):
            satellite._outbox.add(Outcome(rid, "FINISHED", 250, "", ""))
        delivered[0] = True
        satellite._drained.set()
        await _until(lambda: len(reports) == 2, seconds=daemon.REPORT_INTERVAL * 0.6)
        assert reports == [["r1", "r2"], ["r3"]]
    finally:
        reporting.cancel()
        await satellite.stop()


@aio_test
async def test_a_lease_refused_while_the_allowance_is_held_is_asked_again_when_a_report_frees_it(tmp_path):
    """The master refuses a lease while the satellite holds its whole allowance. The report that
    frees it wakes the feeder at once, rather than after IDLE_POLL (a second of a new satellite's
    first mailing lost, measured)."""
    from twisted.internet import reactor

    from cloudmailing.satellite import daemon

    settings = SatelliteConfig(master_port=9, serial="sat-b", secret="pw", dns_servers="127.0.0.1:9", lease_size=4)
    satellite = SatelliteDaemon(settings, tmp_path / "sat", reactor, random.Random(0))
    loop = asyncio.get_running_loop()

    class Master:
        def __init__(self) -> None:
            self.held: list[str] = []
            self.granted: list[float] = []  # when each lease with recipients was answered
            self.reported: list[float] = []

        async def call(self, method: str, **params: Any) -> Any:
            if method == "report":
                ids = [outcome["recipient_id"] for outcome in params["outcomes"]]
                self.held = [rid for rid in self.held if rid not in ids]
                self.reported.append(loop.time())
                return {"acknowledged": ids}
            if self.held or len(self.granted) == 2:  # the allowance is held (or the test is over)
                return {"recipients": [], "lease_seconds": 60}
            self.held = [f"r{len(self.granted)}-{i}" for i in range(2)]
            self.granted.append(loop.time())
            return {"recipients": [{"id": rid, "mailing_id": 1, "email": "a@b.test", "domain": "b.test",
                                    "contact": {}, "test": False, "lease": "L"} for rid in self.held],
                    "lease_seconds": 60}

    async def delivered_at_once(link: Any, leased: list[LeasedRecipient], *versions: Any) -> None:
        for recipient in leased:
            satellite._outbox.add(Outcome(recipient.id, "FINISHED", 250, "", "", lease=recipient.lease))
        satellite._drained.set()

    master = Master()
    satellite._submit = delivered_at_once  # type: ignore[method-assign]
    loops = [asyncio.ensure_future(satellite._feed(master)), asyncio.ensure_future(satellite._report(master))]  # type: ignore[arg-type]
    try:
        await _until(lambda: len(master.granted) == 2, seconds=3 * daemon.IDLE_POLL)
        assert master.granted[1] - master.reported[0] < daemon.IDLE_POLL / 4, (master.granted, master.reported)
    finally:
        for task in loops:
            task.cancel()
        await satellite.stop()


async def _in_flight(api: Any) -> int:
    return int((await api.cloud_list_satellites())[0]["in_flight"])


@aio_test
async def test_a_satellite_holding_more_leases_than_a_hello_frame_names_reconnects_and_keeps_them(
        running_master, tmp_path, monkeypatch):
    """Outcomes of 150 leases wait in the outbox: a hello naming them all would pass the master's
    4 KiB pre-authentication limit. The leases are named after it, in chunks, and kept."""
    from twisted.internet import reactor

    from cloudmailing.satellite import daemon

    api = running_master.proxy()
    await running_mailing(api, 3, "one.test")
    async with _satellite(running_master, tmp_path, "sat-many") as (first, link):
        leased = (await link.call("lease", max_recipients=10))["recipients"]
        # The previous run delivered one of them; its outbox also holds outcomes of 150 other leases.
        first._outbox.add(Outcome(leased[0]["id"], "FINISHED", 250, "", "ok", lease=leased[0]["lease"]))
        for i in range(150):
            first._outbox.add(Outcome(f"gone-{i}", "FINISHED", 250, "", "ok", lease=uuid.uuid4().hex))
        first._outbox.sync()
    monkeypatch.setattr(daemon, "HELD_PER_CALL", 40)  # named in four calls
    satellite = SatelliteDaemon(first.config, tmp_path / "sat", reactor, random.Random(0))  # restarted
    assert len(satellite.held_leases()) == 151
    running = asyncio.ensure_future(satellite.run())
    try:
        await _until(lambda: satellite.sessions > 0)
        await _until(lambda: not len(satellite._outbox))  # reported
        statuses = await api.get_recipients_status([r["id"] for r in leased], {})
        assert [s["status"] for s in statuses] == ["FINISHED", "IN PROGRESS", "IN PROGRESS"]
        assert await _in_flight(api) == 2  # the other two are still its own: not handed out again
    finally:
        running.cancel()
        await satellite.stop()


@aio_test
async def test_recipients_whose_mailing_could_not_be_fetched_are_not_held(running_master, tmp_path):
    """The link drops (or the feeder is cancelled) while a leased mailing's content is fetched:
    those recipients were never handed to composing, so they are not named at the next hello
    and the master frees them at once (not after lease_seconds)."""
    api = running_master.proxy()
    await running_mailing(api, 3, "one.test")
    async with _satellite(running_master, tmp_path, "sat-drop") as (satellite, link):
        class DropsOnMailing:
            async def call(self, method: str, **params: Any) -> Any:
                if method == "mailing":
                    link.close()
                    await link.closed_future
                return await link.call(method, **params)

        try:
            await satellite._feed(DropsOnMailing())  # type: ignore[arg-type]
        except LinkError as error:
            assert error.code == "disconnected"
        assert satellite._leases == {} and satellite.held_leases() == [] and satellite.ahead.pending == 0
        assert await _in_flight(api) == 3
        again = await satellite._connect()
        try:
            await satellite._hello(again)
            assert await _in_flight(api) == 0  # at once

            class HangsOnMailing:
                asked = False

                async def call(self, method: str, **params: Any) -> Any:
                    if method == "mailing":
                        self.asked = True
                        await asyncio.Future()  # never answered
                    return await again.call(method, **params)

            hangs = HangsOnMailing()
            feeding = asyncio.ensure_future(satellite._feed(hangs))  # type: ignore[arg-type]
            await _until(lambda: hangs.asked)
            assert await _in_flight(api) == 3
            feeding.cancel()
            await asyncio.wait([feeding])
            assert satellite._leases == {} and satellite.held_leases() == []
        finally:
            again.close()


@aio_test
async def test_mailing_contents_are_kept_a_short_while_and_only_a_few(running_master, tmp_path, monkeypatch):
    from cloudmailing.satellite import daemon

    api = running_master.proxy()
    mailing_ids = [await running_mailing(api, 1, f"m{i}.test") for i in range(MAILING_CACHE_SIZE + 1)]
    async with _satellite(running_master, tmp_path, "sat-cache") as (satellite, link):
        assert len((await link.call("lease", max_recipients=100))["recipients"]) == len(mailing_ids)
        for mailing_id in mailing_ids:
            await satellite._mailing(link, mailing_id)
        assert list(satellite._mailings) == mailing_ids[1:]  # the least recent dropped
        monkeypatch.setattr(daemon, "MAILING_CACHE_SECONDS", 0.2)
        await asyncio.sleep(0.3)
        await satellite._mailing(link, mailing_ids[0])
        assert list(satellite._mailings) == mailing_ids[:1]  # the others were fetched too long ago


@aio_test
async def test_a_lease_after_the_mailing_changed_brings_its_new_content(running_master, tmp_path):
    """set_mailing_properties on a running mailing moves its content version, which leases name:
    a satellite told a newer version than the content it kept fetches the content again."""
    api = running_master.proxy()
    mailing_id = await running_mailing(api, 3, "one.test")
    async with _satellite(running_master, tmp_path, "sat-version") as (satellite, link):
        answer = LeaseAnswer.from_wire(await link.call("lease", max_recipients=3))
        assert {r.mailing_id for r in answer.recipients} == {mailing_id}
        leased_version = answer.content_versions[mailing_id]
        first = (await satellite._mailing(link, mailing_id, leased_version)).content
        assert first["subject"] == "Hi" and first["content_version"] == leased_version
        assert (await satellite._mailing(link, mailing_id, leased_version)).content is first  # kept
        await api.set_mailing_properties(mailing_id, {"subject": "Fixed {{ email }}", "charset": "utf-8"})
        versions = await running_master.master.services.dispatcher.content_versions(
            [{"mailing_id": mailing_id}])  # what the next lease of this mailing names
        assert versions[mailing_id] > leased_version
        changed = (await satellite._mailing(link, mailing_id, versions[mailing_id])).content
        assert changed["subject"] == "Fixed {{ email }}" and changed["content_version"] == versions[mailing_id]


@aio_test
async def test_a_lease_whose_last_recipient_fails_to_build_is_reported_without_waiting(tmp_path):
    from twisted.internet import reactor

    settings = SatelliteConfig(master_port=9, serial="sat-f", secret="pw", dns_servers="127.0.0.1:9")
    satellite = SatelliteDaemon(settings, tmp_path / "sat", reactor, random.Random(0))
    try:
        satellite._build_failed({"recipient_id": "r1", "status": "GENERAL_ERROR", "reply_text": "template error"}, 1)
        assert satellite._drained.is_set()  # the report loop goes at once, not after REPORT_INTERVAL
        assert [o.recipient_id for o in satellite._outbox.batch(10)] == ["r1"]
    finally:
        await satellite.stop()


def test_a_secret_is_made_once_and_kept(tmp_path):
    secret = load_or_create_secret(SatelliteConfig(), tmp_path)
    assert len(secret) >= 40
    assert (tmp_path / "satellite.secret").read_text() == secret
    assert load_or_create_secret(SatelliteConfig(), tmp_path) == secret
    (tmp_path / "satellite.secret").write_text(secret + "\n")  # an editor's final newline
    assert load_or_create_secret(SatelliteConfig(), tmp_path) == secret


# The master refuses an empty secret ("serial and secret are required"): the satellite retried
# for ever. A damaged file gave a traceback (UnicodeDecodeError). Neither is replaced silently:
# the master keeps the secret it first received.
@pytest.mark.parametrize(("content", "problem"), [(b"", "is empty"), (b"\n", "is empty"), (b"   \n", "is empty"),
                                                  (b"\xff\xfe\x00garbage\n", "is damaged (not UTF-8 text)")])
def test_a_kept_secret_that_is_empty_or_damaged_stops_the_start(tmp_path, content, problem):
    path = tmp_path / "satellite.secret"
    path.write_bytes(content)
    with pytest.raises(SecretFileError, match=re.escape(f"{path} {problem}: restore it from a backup, or delete it "
                                                        "and register this satellite again on the master")):
        load_or_create_secret(SatelliteConfig(serial="sat-x"), tmp_path)
    assert path.read_bytes() == content  # left as it was
    assert load_or_create_secret(SatelliteConfig(secret="configured"), tmp_path) == "configured"
