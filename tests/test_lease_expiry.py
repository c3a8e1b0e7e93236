"""Leases that end under a satellite, with real satellite processes: nothing goes out twice.

Docs: "A message may go out twice only if it was in flight when a satellite or the master died."
A satellite back after the reconnect grace reports its outbox before it leases again (and the
master takes it); a satellite whose lease ran out (frozen, or held up by a slow server) sends none
of what it had not started by then: the master hands those out again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor

from cloudmailing.config.settings import DispatchConfig
from tests.conftest import free_port
from tests.helpers import aio_test, finished_changes
from tests.satellite.dns_server import DnsTestServer
from tests.satellite.smtp_servers import SmtpTestServer, _ServerProtocol
from tests.test_delivery_faults import _satellite_config, _start

N = 10


@pytest.fixture
def settings(settings, request):
    """Blocks of N; the lease settings and reconnect grace each test asks for (indirect parameter)."""
    wanted = dict(getattr(request, "param", {}))
    grace = wanted.pop("reconnect_grace_seconds", settings.satellite_link.reconnect_grace_seconds)
    return dataclasses.replace(settings, database=dataclasses.replace(settings.database, block_recipients=N),
                               dispatch=DispatchConfig(**wanted),
                               satellite_link=dataclasses.replace(settings.satellite_link,
                                                                  reconnect_grace_seconds=grace))


class _SlowProtocol(_ServerProtocol):
    """Every segment the client sends is processed ``delay`` seconds late (order kept)."""

    def dataReceived(self, data: bytes) -> None:
        reactor.callLater(self.server.delay, _ServerProtocol.dataReceived, self, data)


class _SlowServer(SmtpTestServer):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def buildProtocol(self, addr: Any) -> _SlowProtocol:
        return _SlowProtocol(self)


def _listen(server: SmtpTestServer) -> int:
    for _ in range(20):
        port = free_port()
        try:
            server.listen("127.0.0.2", port)
            return port
        except Exception:  # taken meanwhile
            continue
    raise RuntimeError("no port")


def _received(*servers: SmtpTestServer) -> list[str]:
    return [rcpt for server in servers for message in server.messages for rcpt in message.rcpt_to]


def _outbox(path: Path) -> dict[str, dict]:
    """The outcomes a replay of the outbox file would report, by recipient id."""
    pending: dict[str, dict] = {}
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if "outcome" in entry:
            pending[entry["outcome"]["recipient_id"]] = entry["outcome"]
        for rid in entry.get("ack") or []:
            pending.pop(rid, None)
    return pending


async def _until(predicate: Any, seconds: float, step: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(step)


async def _mailing(api: Any) -> tuple[int, dict[str, str]]:
    mailing_id = await api.create_mailing("news@sender.test", "N", "Hi", "<p>Hi</p>", "", "utf-8")
    ids = {a["email"]: a["id"] for a in
           await api.add_recipients(mailing_id, [{"email": f"u{i}@one.test"} for i in range(N)])}
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    return mailing_id, ids


async def _finished(api: Any, mailing_id: int) -> bool:
    await api.mailing_manager_force_check()
    return bool((await api.list_mailings({"id": [mailing_id]}))[0]["status"] == "FINISHED")


async def _stop(process: Any) -> None:
    os.kill(process.pid, signal.SIGCONT)
    process.kill()
    await asyncio.to_thread(process.wait)


@pytest.mark.parametrize("settings", [{"reconnect_grace_seconds": 1.0}], indirect=True)
@aio_test
async def test_a_satellite_back_after_the_grace_does_not_send_its_outbox_again(running_master, tmp_path):
    """Killed with every outcome kept in its outbox (the master slow to answer its report), back
    after the master freed its lease: its outbox is reported, and taken, before it leases again."""
    master = running_master.master
    api = running_master.proxy()
    gate = asyncio.Event()
    real_report = master.services.dispatcher.report

    async def slow_report(satellite: Any, outcomes: Any) -> Any:  # the master's database busy
        await gate.wait()
        return await real_report(satellite, outcomes)

    master.services.dispatcher.report = slow_report
    with DnsTestServer() as dns:
        dns.add_mail_domain("one.test", "127.0.0.2")
        sink = SmtpTestServer()
        port = _listen(sink)
        await api.cloud_add_satellite("sat-g", {})
        mailing_id, ids = await _mailing(api)
        config = _satellite_config(tmp_path, "sat-g", master.satellite_port, dns, port, lease_size=N)
        outbox = tmp_path / "sat-g" / "satellite" / "outbox.jsonl"
        satellite = _start("satellite", config)
        try:
            async def all_kept() -> bool:
                return len(_outbox(outbox)) == N

            await _until(all_kept, 15)
            assert sorted(_received(sink)) == sorted(ids)
            os.kill(satellite.pid, signal.SIGKILL)
            await asyncio.to_thread(satellite.wait)
            master.services.dispatcher.report = real_report  # the master answers again
            await asyncio.sleep(2.5)  # down longer than the reconnect grace: the lease is freed

            async def freed() -> bool:
                return bool((await api.cloud_list_satellites())[0]["in_flight"] == 0)

            await _until(freed, 5)
            satellite = _start("satellite", config)
            await _until(lambda: _finished(api, mailing_id), 15, 0.2)
            await asyncio.sleep(0.5)
            finished = await finished_changes(api)
            assert len(finished) == N and set(finished.values()) == {1}
            twice = sorted(email for email, n in Counter(_received(sink)).items() if n > 1)
            assert not twice, f"{len(twice)} recipients whose outcome was in the outbox were sent again"
        finally:
            await _stop(satellite)
            gate.set()
            await sink.stop()


@pytest.mark.parametrize("settings", [{"lease_seconds": 3}], indirect=True)
@aio_test
async def test_a_frozen_satellite_does_not_send_what_its_expired_lease_gave_to_another(running_master, tmp_path):
    """SIGSTOP a satellite (its link open) longer than lease_seconds: another satellite delivers
    its recipients. Woken (SIGCONT), it sends none of them."""
    master = running_master.master
    api = running_master.proxy()
    with DnsTestServer() as dns:
        dns.add_mail_domain("one.test", "127.0.0.2")
        slow_a = _SlowServer(0.5)  # what satellite A sends to
        port_a = _listen(slow_a)
        fast_b = SmtpTestServer()  # what satellite B sends to
        port_b = _listen(fast_b)
        for serial in ("sat-a", "sat-b"):
            await api.cloud_add_satellite(serial, {})
        mailing_id, ids = await _mailing(api)
        a = _start("satellite", _satellite_config(tmp_path, "sat-a", master.satellite_port, dns, port_a,
                                                  lease_size=N, max_connections_per_host=1))
        b = None
        try:
            await asyncio.wait_for(slow_a.wait_for_connection(), 15)
            os.kill(a.pid, signal.SIGSTOP)  # frozen before its first message got an answer
            frozen_at = len(_received(slow_a))
            assert {s["serial"]: s["in_flight"] for s in await api.cloud_list_satellites()}["sat-a"] == N
            await asyncio.sleep(3.2)
            assert await master.services.dispatcher.expire_leases() == N  # rather than at the next tick
            b = _start("satellite", _satellite_config(tmp_path, "sat-b", master.satellite_port, dns, port_b,
                                                      lease_size=N))
            await _until(lambda: _finished(api, mailing_id), 15, 0.2)
            assert sorted(_received(fast_b)) == sorted(ids)
            os.kill(a.pid, signal.SIGCONT)  # A wakes, seconds after its lease ended
            await asyncio.sleep(4)  # time for several messages on the slow server, were they sent
            after_wake = _received(slow_a)[frozen_at:]
            finished = await finished_changes(api)
            assert len(finished) == N and set(finished.values()) == {1}
            assert (await api.list_mailings({"id": [mailing_id]}))[0]["total_sent"] == N
            # At most the one message whose transaction may have begun at the freeze goes out.
            assert len(after_wake) <= 1, f"the woken satellite sent {len(after_wake)} messages B sent too"
        finally:
            for process in (a, b):
                if process is not None:
                    await _stop(process)
            await slow_a.stop()
            await fast_b.stop()


@pytest.mark.parametrize("settings", [{"lease_seconds": 4, "retry_initial_seconds": 1, "retry_factor": 1.0}],
                         indirect=True)
@aio_test
async def test_a_lease_outliving_lease_seconds_sends_nobody_twice(running_master, tmp_path):
    """A slow server makes a lease outlive lease_seconds; nobody dies. What was not started in
    time is reported as a soft failure and retried (soon, here): nobody gets two messages."""
    master = running_master.master
    api = running_master.proxy()

    async def expire_often() -> None:  # a master's tick every 0.2 s, not every 5 s
        while True:
            await master.services.dispatcher.expire_leases()
            await asyncio.sleep(0.2)

    expiring = asyncio.ensure_future(expire_often())
    with DnsTestServer() as dns:
        dns.add_mail_domain("one.test", "127.0.0.2")
        slow = _SlowServer(0.5)
        port = _listen(slow)
        await api.cloud_add_satellite("sat-s", {})
        mailing_id, ids = await _mailing(api)
        satellite = _start("satellite", _satellite_config(tmp_path, "sat-s", master.satellite_port, dns, port,
                                                          lease_size=N, max_connections_per_host=1))
        try:
            await _until(lambda: _finished(api, mailing_id), 25, 0.2)
            sent = Counter(_received(slow))
            finished = await finished_changes(api)
            assert len(finished) == N and set(finished.values()) == {1}
            assert set(sent) == set(ids)
            assert max(sent.values()) == 1, f"sent twice, nobody died: {[e for e, n in sent.items() if n > 1]}"
        finally:
            expiring.cancel()
            await _stop(satellite)
            await slow.stop()
