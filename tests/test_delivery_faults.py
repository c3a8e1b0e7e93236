"""Fault tests with real processes: a satellite or the master killed with -9 mid-mailing.

Every recipient still reaches a final status; none is lost; a message may go out twice only if
it was in flight at the kill.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import signal
import ssl
import subprocess
import sys
import xmlrpc.client
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port
from tests.embedded_db import EmbeddedDatabase
from tests.helpers import aio_test, finished_changes
from tests.satellite.dns_server import DnsTestServer
from tests.satellite.smtp_servers import Behaviour, start_servers

RECIPIENTS = 120
LEASE = 10


@pytest.fixture
def settings(settings):
    """The in-process master's, with blocks as small as a lease: what a killed satellite held is small."""
    return dataclasses.replace(settings, database=dataclasses.replace(settings.database, block_recipients=LEASE))


@pytest.fixture
def world():
    """A DNS server and two accepting MX hosts (in this process, serving while tests await)."""
    with DnsTestServer() as dns:
        dns.add_mail_domain("one.test", "127.0.0.2")
        dns.add_mail_domain("two.test", "127.0.0.3")
        servers, smtp_port = start_servers({"127.0.0.2": Behaviour(), "127.0.0.3": Behaviour()})
        yield dns, servers, smtp_port


def _write(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
                            for name, values in sections.items()))
    return path


def _start(module: str, config: Path) -> subprocess.Popen:
    log = open(config.with_suffix(".log"), "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([sys.executable, "-m", f"cloudmailing.cli.{module}", "--config", str(config)],
                            stdout=log, stderr=log)


def _satellite_config(tmp_path: Path, name: str, link_port: int, dns, smtp_port: int,
                      compose_workers: int = 1, **satellite: object) -> Path:
    return _write(tmp_path / f"{name}.ini", {
        "satellite": {"master_port": link_port, "serial": name, "secret": f"{name}-secret",
                      "helo_hostname": "sat.test", "dns_servers": dns.nameserver, "smtp_port": smtp_port,
                      "lease_size": LEASE, "connect_timeout": 5, "reply_timeout": 5,
                      "compose_workers": compose_workers, **satellite},
        "paths": {"data_dir": tmp_path / name}, "logging": {"level": "INFO"}})


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()]


def _received(servers) -> list[str]:
    return [rcpt for server in servers.values() for message in server.messages for rcpt in message.rcpt_to]


async def _until(predicate, seconds: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def _new_mailing(api) -> tuple[int, list[str]]:
    mailing_id = await api.create_mailing("news@sender.test", "N", "Hi {{ n }}", "<p>{{ n }}</p>", "", "utf-8")
    entries = [{"email": f"u{i}@{'one' if i % 2 else 'two'}.test", "n": i} for i in range(RECIPIENTS)]
    await api.add_recipients(mailing_id, entries)
    await api.start_mailing(mailing_id)
    return mailing_id, [e["email"] for e in entries]


def _check_everyone_delivered(emails: list[str], received: list[str], mailing: dict, finished: Counter[str],
                              in_flight: int = 2 * LEASE) -> None:
    assert mailing["status"] == "FINISHED" and mailing["total_sent"] == RECIPIENTS, mailing
    assert len(finished) == RECIPIENTS and set(finished.values()) == {1}, \
        f"outcomes recorded twice: {[rid for rid, count in finished.items() if count > 1]}"
    assert set(received) == set(emails), "a recipient was lost"
    duplicates = len(received) - len(emails)
    assert duplicates <= in_flight, f"{duplicates} duplicates: more than what was in flight ({in_flight})"


@aio_test
async def test_kill_9_a_satellite_then_another_finishes_the_mailing(running_master, world, tmp_path, database):
    dns, servers, smtp_port = world
    api = running_master.proxy()
    link_port = running_master.master.satellite_port
    for serial in ("sat-a", "sat-b"):
        await api.cloud_add_satellite(serial, {})
    mailing_id, emails = await _new_mailing(api)
    await api.mailing_manager_force_check()

    first = _start("satellite", _satellite_config(tmp_path, "sat-a", link_port, dns, smtp_port, compose_workers=2))

    async def some_delivered() -> bool:
        return len(_received(servers)) >= 20

    await _until(some_delivered)
    workers = _children(first.pid)
    assert len(workers) >= 2  # its compose workers (and multiprocessing's helper)
    held = {s["serial"]: s["in_flight"] for s in await api.cloud_list_satellites()}["sat-a"]
    os.kill(first.pid, signal.SIGKILL)
    await asyncio.to_thread(first.wait)

    async def workers_gone() -> bool:  # no orphan keeps composing for a dead satellite
        return not any(Path(f"/proc/{pid}").exists() for pid in workers)

    await _until(workers_gone, 15)
    second = _start("satellite", _satellite_config(tmp_path, "sat-b", link_port, dns, smtp_port))

    async def finished() -> bool:
        await api.mailing_manager_force_check()
        return (await api.list_mailings({"id": [mailing_id]}))[0]["status"] == "FINISHED"

    try:
        await _until(finished)
        mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
        _check_everyone_delivered(emails, _received(servers), mailing, await finished_changes(api),
                                  in_flight=held + LEASE)  # (and what it leased just before the kill)
        # The killed satellite comes back with its outbox: what it had not reported is reported now.
        restarted = _start("satellite", _satellite_config(tmp_path, "sat-a", link_port, dns, smtp_port))
        outbox = tmp_path / "sat-a" / "satellite" / "outbox.jsonl"

        async def outbox_empty() -> bool:
            return not outbox.exists() or outbox.stat().st_size == 0

        await _until(outbox_empty, 30)
        restarted.terminate()
        await asyncio.to_thread(restarted.wait)
        # What it reported then was another satellite's since: recorded nowhere, counted once.
        assert set((await finished_changes(api)).values()) == {1}
    finally:
        second.terminate()
        await asyncio.to_thread(second.wait)
        for server in servers.values():
            await server.stop()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@aio_test
async def test_sigterm_stops_a_satellite_busy_on_a_hostile_template(running_master, world, tmp_path):
    dns, _, smtp_port = world
    api = running_master.proxy()
    await api.cloud_add_satellite("sat-busy", {})
    mailing_id = await api.create_mailing("news@sender.test", "N", "Hi", "", "{% for i in range(n) %}"
                                          "{% for j in range(n) %}{% endfor %}{% endfor %}", "utf-8")
    await api.add_recipients(mailing_id, [{"email": f"u{i}@one.test", "n": 100000} for i in range(4)])
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    # Limits so high that the template keeps a compose worker busy for minutes.
    satellite = _start("satellite", _satellite_config(tmp_path, "sat-busy", running_master.master.satellite_port,
                                                      dns, smtp_port, template_cpu_seconds=600))

    async def busy() -> bool:
        return any(_cpu_seconds(pid) > 1.0 for pid in _children(satellite.pid))

    await _until(busy, 60)
    workers = _children(satellite.pid)
    loop = asyncio.get_running_loop()
    started = loop.time()
    satellite.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.to_thread(satellite.wait), 10)
    finally:
        satellite.kill()
    assert loop.time() - started < 5
    assert satellite.returncode == 0

    async def workers_gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in workers)

    await _until(workers_gone, 5)


class _ProcessMaster:
    """A master process on its own ports, and an API client making a new connection per call
    (a kept-alive connection would be dead after a kill)."""

    def __init__(self, tmp_path: Path, mongo_url: str, db_name: str, lease_seconds: int = 5) -> None:
        self.api_port, self.link_port = free_port(), free_port()
        self.config = _write(tmp_path / "master.ini", {
            "database": {"url": mongo_url, "name": db_name, "block_recipients": LEASE},
            "api": {"host": "127.0.0.1", "port": self.api_port},
            "satellite_link": {"host": "127.0.0.1", "port": self.link_port},
            "dispatch": {"lease_seconds": lease_seconds},
            "paths": {"data_dir": tmp_path / "master"}, "logging": {"level": "INFO"}})
        key = subprocess.run([sys.executable, "-m", "cloudmailing.cli.admin", "--config", str(self.config),
                              "api-key", "create", "--name", "t"], capture_output=True, text=True, check=True
                             ).stdout.strip()
        self.url = f"https://admin:{key}@127.0.0.1:{self.api_port}/CloudMailing"
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        self.process = _start("master", self.config)
        await asyncio.to_thread(wait_for_port, self.api_port)

    async def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait)

    async def call(self, name: str, *args):
        def call():
            proxy = xmlrpc.client.ServerProxy(self.url, context=ssl._create_unverified_context())
            return getattr(proxy, name)(*args)
        return await asyncio.to_thread(call)

    def __getattr__(self, name: str):
        return lambda *args: self.call(name, *args)

    async def wait_finished(self, mailing_id: int, seconds: float) -> dict:
        async def finished() -> bool:
            try:
                await self.call("mailing_manager_force_check")
                return (await self.call("list_mailings", {"id": [mailing_id]}))[0]["status"] == "FINISHED"
            except (OSError, xmlrpc.client.Error):
                return False  # the master or its database is still coming back

        try:
            await _until(finished, seconds)
        except AssertionError:
            print("NOT FINISHED", await self.call("list_mailings", {"id": [mailing_id]}))
            raise
        return (await self.call("list_mailings", {"id": [mailing_id]}))[0]

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await asyncio.to_thread(self.process.wait)


async def _mailing_through_a_fault(master: _ProcessMaster, world, tmp_path: Path, serial: str, fault,
                                   ) -> tuple[list[str], list[str], dict, Counter[str]]:
    """Start a mailing with one satellite, run ``fault()`` once some mail is out, wait for its end:
    ``(recipients' addresses, addresses the MX hosts received, the finished mailing, the FINISHED
    changes the cursor reports per recipient)``."""
    dns, servers, smtp_port = world
    await master.cloud_add_satellite(serial, {})
    mailing_id, emails = await _new_mailing(master)
    satellite = _start("satellite", _satellite_config(tmp_path, serial, master.link_port, dns, smtp_port))
    try:
        async def some_delivered() -> bool:
            return len(_received(servers)) >= 20

        await _until(some_delivered)
        await fault()
        mailing = await master.wait_finished(mailing_id, 120)
        return emails, _received(servers), mailing, await finished_changes(master)
    finally:
        satellite.terminate()
        await asyncio.to_thread(satellite.wait)
        await master.stop()
        for server in servers.values():
            await server.stop()


@aio_test
async def test_kill_9_the_master_mid_mailing(mongo_url, db_name, database, world, tmp_path):
    master = _ProcessMaster(tmp_path, mongo_url, db_name)
    await master.start()

    async def restart_master() -> None:
        await master.kill()
        await master.start()  # the satellite reconnects by itself

    _check_everyone_delivered(*await _mailing_through_a_fault(master, world, tmp_path, "sat-m", restart_master))


@aio_test
async def test_the_database_going_away_for_a_few_seconds(world, tmp_path, tmp_path_factory):
    db_port = free_port()
    start_database = functools.partial(EmbeddedDatabase, tmp_path / "db", port=db_port,
                                       searchable_from=tmp_path_factory.getbasetemp().parent)
    databases = [await asyncio.to_thread(start_database)]
    master = _ProcessMaster(tmp_path, databases[0].url, "outage")
    await master.start()

    async def database_away_for_3_seconds() -> None:
        os.kill(databases[0].ferretdb_pid, signal.SIGKILL)
        os.kill(databases[0].postgres_pid, signal.SIGKILL)
        await asyncio.to_thread(databases[0].stop)
        await asyncio.sleep(3)
        databases[0] = await asyncio.to_thread(start_database)

    try:
        _check_everyone_delivered(
            *await _mailing_through_a_fault(master, world, tmp_path, "sat-d", database_away_for_3_seconds))
    finally:
        await asyncio.to_thread(databases[0].stop)


@aio_test
async def test_a_lease_whose_answer_died_with_the_master_is_freed_when_its_satellite_says_hello(
        mongo_url, db_name, database, world, tmp_path):
    from twisted.internet import reactor
    from twisted.internet import ssl as twisted_ssl
    from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

    from cloudmailing.common.aio import wait_deferred
    from cloudmailing.common.link import LinkProtocol

    dns, servers, smtp_port = world
    master = _ProcessMaster(tmp_path, mongo_url, db_name, lease_seconds=300)
    await master.start()
    try:
        await master.cloud_add_satellite("sat-x", {})
        mailing_id, emails = await _new_mailing(master)
        await master.mailing_manager_force_check()
        # The master hands a lease to sat-x, and is killed before the answer gets anywhere.
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", master.link_port,
                                      twisted_ssl.CertificateOptions(verify=False))
        link = await wait_deferred(connectProtocol(endpoint, LinkProtocol(reactor)))
        await link.call("hello", serial="sat-x", secret="sat-x-secret")
        stranded = (await link.call("lease", max_recipients=LEASE))["recipients"]
        assert len(stranded) == LEASE
        await master.kill()
        link.close()
        await master.start()
        started = asyncio.get_running_loop().time()
        satellite = _start("satellite", _satellite_config(tmp_path, "sat-x", master.link_port, dns, smtp_port))
        try:
            mailing = await master.wait_finished(mailing_id, 90)
        finally:
            satellite.terminate()
            await asyncio.to_thread(satellite.wait)
        assert asyncio.get_running_loop().time() - started < 90  # not lease_seconds (300 s)
        _check_everyone_delivered(emails, _received(servers), mailing, await finished_changes(master))
    finally:
        await master.stop()
        for server in servers.values():
            await server.stop()
