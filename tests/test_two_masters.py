"""Two masters on one database, each a real process (``python -m cloudmailing.cli.master``) with a
satellite process linked to it, delivering through the test DNS server to loopback SMTP sinks
(this process): a mailing is delivered once, counted once and logged once whichever master is
asked, when a master is killed mid-delivery, and when a master starts beside a busy one.

Every recipient's deliveries are counted at the sinks, and each satellite says EHLO with its own
name (``sat-a.test``, ``sat-b.test``), so the sinks tell which satellite delivered what. The
change log is read through each master twice: live, by a reader that follows the cursor while
both masters write (a horizon that is one process's own view lets such a reader jump past a
change the other master is still writing: skipped for good), and once more from the start at
the end. Each read must hold every recipient's change once, none twice, and end on its final
status.

Settings relied on: ``[database] block_recipients`` (small blocks: many leases and reports),
``[dispatch] lease_seconds`` (10 s where a killed satellite's leases must expire), and the
satellite's ``lease_size``, ``helo_hostname``, ``dns_servers``, ``smtp_port`` and
``max_connections_per_host``. A satellite has one master address (``master_host``/``master_port``):
one whose master dies cannot go to another.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import xmlrpc.client
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, AsyncProxy, free_port
from tests.helpers import aio_test, run
from tests.satellite.dns_server import DnsTestServer
from tests.satellite.smtp_servers import SmtpTestServer, _ServerProtocol

RECIPIENTS = 3000
BLOCK_RECIPIENTS = 100  # [database] block_recipients: 30 blocks, leased and reported a few at a time
LEASE_SIZE = 200  # [satellite] lease_size: two blocks a lease
SINK_LATENCY = 0.02  # seconds before a sink answers: a few seconds of delivery to act in
DOMAINS = {f"d{i}.test": f"127.0.0.{i + 2}" for i in range(4)}  # one sink each, all on one port
MAILING = ("news@sender.test", "News", "Hi", "<p>Hi</p>", "Hi", "utf-8")
# Through the API, calls that change nothing are asked again on "database unavailable, please
# retry" (docs/api.md, Faults): an allowed answer, not a failure. Writes are not repeated.
READS = frozenset({"list_mailings", "get_recipients_count", "get_recipients_status", "cloud_list_satellites",
                   "get_recipients_status_updated_since", "get_hourly_statistics", "mailing_manager_force_check"})
UNREACHABLE = (OSError, xmlrpc.client.ProtocolError, http.client.HTTPException)


# -- the processes ------------------------------------------------------------------------------

@dataclass
class Node:
    """One master process and the satellite process linked to it (one configuration file)."""

    name: str  # "a", "b"
    config: Path
    api_port: int
    link_port: int
    directory: Path
    master: subprocess.Popen | None = None
    satellite: subprocess.Popen | None = None
    logs: list[Any] = field(default_factory=list)

    @property
    def serial(self) -> str:
        return f"sat-{self.name}"

    @property
    def helo(self) -> str:
        return f"sat-{self.name}.test"

    def log_tail(self, program: str, lines: int = 30) -> str:
        """The program's last log lines, but the API's access log (the cursor readers poll)."""
        path = self.directory / f"{program}.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join([line for line in text if '"POST /' not in line][-lines:])


class Cluster:
    """The processes of a test: started on demand, all stopped at its end (killed if need be)."""

    def __init__(self, tmp_path: Path, mongo_url: str, db_name: str, dns: DnsTestServer, smtp_port: int) -> None:
        self._tmp, self._url, self._db, self._dns, self._smtp_port = tmp_path, mongo_url, db_name, dns, smtp_port
        self.nodes: list[Node] = []
        # A CM_DATA_DIR of the environment would give both masters one data directory.
        self._env = {key: value for key, value in os.environ.items() if key != "CM_DATA_DIR"}

    def node(self, name: str, lease_seconds: int) -> Node:
        directory = self._tmp / name
        directory.mkdir()
        api_port, link_port = free_port(), free_port()
        config = directory / "cloudmailing.ini"
        config.write_text(
            f"[database]\nurl = {self._url}\nname = {self._db}\nblock_recipients = {BLOCK_RECIPIENTS}\n\n"
            f"[api]\nhost = 127.0.0.1\nport = {api_port}\n\n"
            f"[satellite_link]\nhost = 127.0.0.1\nport = {link_port}\n\n"
            f"[dispatch]\nlease_seconds = {lease_seconds}\n\n"
            f"[satellite]\nmaster_host = 127.0.0.1\nmaster_port = {link_port}\nserial = sat-{name}\n"
            f"secret = s3cret-{name}\nhelo_hostname = sat-{name}.test\ndns_servers = {self._dns.nameserver}\n"
            f"smtp_port = {self._smtp_port}\nlease_size = {LEASE_SIZE}\ncompose_workers = 1\n"
            f"max_connections_per_host = 2\nconnect_timeout = 5\nreply_timeout = 5\n\n"
            f"[paths]\ndata_dir = {directory / 'data'}\n")
        node = Node(name, config, api_port, link_port, directory)
        self.nodes.append(node)
        return node

    def _spawn(self, node: Node, program: str) -> subprocess.Popen:
        log = open(node.directory / f"{program}.log", "w")  # closed by stop()
        node.logs.append(log)
        return subprocess.Popen([sys.executable, "-m", f"cloudmailing.cli.{program}", "--config", str(node.config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self._env)

    async def start_master(self, node: Node) -> None:
        """Start the node's master and wait until both its ports listen (fail at once if it exits)."""
        node.master = self._spawn(node, "master")
        for port in (node.api_port, node.link_port):
            await _listening(node, port)

    def start_satellite(self, node: Node) -> None:
        node.satellite = self._spawn(node, "satellite")

    def api(self, node: Node, key: str) -> Api:
        return Api(key, node.api_port)

    def stop(self) -> None:
        processes = [p for node in self.nodes for p in (node.satellite, node.master) if p is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for node in self.nodes:
            for log in node.logs:
                log.close()


async def _listening(node: Node, port: int, timeout: float = 60.0) -> None:
    assert node.master is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if node.master.poll() is not None:
            raise AssertionError(f"master {node.name} exited ({node.master.returncode}) before listening on "
                                 f"{port}:\n{node.log_tail('master')}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise AssertionError(f"master {node.name} does not listen on {port}:\n{node.log_tail('master')}")


async def _kill(process: subprocess.Popen | None) -> None:
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    await asyncio.to_thread(process.wait)


class Api:
    """An API client of one master (``AsyncProxy``); reads are asked again on "database unavailable"."""

    def __init__(self, key: str, port: int) -> None:
        self._proxy = AsyncProxy(f"https://admin:{key}@127.0.0.1:{port}/CloudMailing")

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._proxy, name)
        if name not in READS:
            return method

        async def call(*args: Any) -> Any:
            for _ in range(100):
                try:
                    return await method(*args)
                except xmlrpc.client.Fault as fault:
                    if "database unavailable" not in fault.faultString:
                        raise
                await asyncio.sleep(0.1)
            return await method(*args)
        return call


# -- the sinks and the DNS ------------------------------------------------------------------------

class _SlowSinkProtocol(_ServerProtocol):
    """Answers SINK_LATENCY late (in order): a delivery takes seconds, not a blink."""

    def _flush(self) -> None:
        from twisted.internet import reactor

        reactor.callLater(SINK_LATENCY, _ServerProtocol._flush, self)


class _SlowSink(SmtpTestServer):
    def buildProtocol(self, addr: Any) -> _ServerProtocol:
        return _SlowSinkProtocol(self)


@pytest.fixture
def sinks() -> Iterator[tuple[dict[str, SmtpTestServer], int]]:
    """One accepting sink per domain's MX address, all on one free port."""
    from twisted.internet.error import CannotListenError

    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        servers: dict[str, SmtpTestServer] = {}
        try:
            for address in DOMAINS.values():
                servers[address] = _SlowSink()
                servers[address].listen(address, port)
        except CannotListenError:
            for server in servers.values():
                run(server.stop())
            continue
        yield servers, port
        for server in servers.values():
            run(server.stop())
        return
    raise RuntimeError("no common free port for the sinks")


@pytest.fixture
def dns() -> Iterator[DnsTestServer]:
    with DnsTestServer() as server:
        for domain, address in DOMAINS.items():
            server.add_mail_domain(domain, address)
        yield server


@pytest.fixture
def cluster(tmp_path, mongo_url, db_name, database, dns, sinks) -> Iterator[Cluster]:
    """The processes of the test; the ``database`` fixture drops the database after they stopped."""
    started = Cluster(tmp_path, mongo_url, db_name, dns, sinks[1])
    try:
        yield started
    finally:
        started.stop()


async def _api_key(database: Any) -> str:
    from twisted.internet import reactor

    from cloudmailing.services.api_keys import ApiKeyService

    return await ApiKeyService(database, reactor).create("tests")


def _deliveries(sinks: dict[str, SmtpTestServer]) -> dict[str, list[str]]:
    """Each address the sinks accepted a message for, with the EHLO name of each delivery."""
    found: dict[str, list[str]] = defaultdict(list)
    for server in sinks.values():
        for message in list(server.messages):
            for address in message.rcpt_to:
                found[address].append(message.helo)
    return found


def _delivered_count(sinks: dict[str, SmtpTestServer]) -> int:
    return sum(server.message_count for server in sinks.values())


# -- the mailing --------------------------------------------------------------------------------

async def _mailing(api: Api, count: int, prefix: str = "u") -> tuple[int, dict[str, str]]:
    """A mailing of ``count`` recipients (``{prefix}{i}@d{i % 4}.test``), filled in batches of
    1,000: its id, and each address's recipient id."""
    mailing_id = await api.create_mailing(*MAILING)
    ids: dict[str, str] = {}
    for start in range(0, count, 1000):
        entries = [{"email": f"{prefix}{i}@d{i % len(DOMAINS)}.test"} for i in range(start, min(start + 1000, count))]
        answer = await api.add_recipients(mailing_id, entries)
        assert all("id" in a for a in answer), [a for a in answer if "id" not in a][:3]
        ids.update((a["email"], a["id"]) for a in answer)
    return mailing_id, ids


async def _linked(api: Api, serial: str, timeout: float = 30.0) -> None:
    """Wait until the master answering ``api`` serves satellite ``serial``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if any(s["serial"] == serial and s["connected"] for s in await api.cloud_list_satellites()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{serial} never linked to its master")


async def _finished(api: Api, mailing_ids: list[int], nodes: list[Node], timeout: float = 90.0) -> None:
    """Wait until every mailing is FINISHED, as the master answering ``api`` says; fail at once
    if a process of ``nodes`` died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    mailings: list[dict[str, Any]] = []
    while loop.time() < deadline:
        for node in nodes:
            for program, process in (("master", node.master), ("satellite", node.satellite)):
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"{program} {node.name} exited ({process.returncode}):\n"
                                         f"{node.log_tail(program)}")
        await api.mailing_manager_force_check()
        mailings = await api.list_mailings({"id": mailing_ids})
        if mailings and all(m["status"] == "FINISHED" for m in mailings):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not finished in {timeout} s: {[_totals(m) for m in mailings]}\n"
                         + "\n".join(f"-- master {n.name}:\n{n.log_tail('master')}" for n in nodes))


def _totals(mailing: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "status", "total_recipient", "total_sent", "total_error", "total_softbounce", "total_pending")
    return {key: mailing[key] for key in keys}


async def _check_totals(api: Api, mailing_id: int, count: int) -> dict[str, Any]:
    """The mailing FINISHED, every recipient sent, through this master's every way of counting."""
    (mailing,) = await api.list_mailings({"id": [mailing_id]})
    assert _totals(mailing) == {"id": mailing_id, "status": "FINISHED", "total_recipient": count, "total_sent": count,
                                "total_error": 0, "total_softbounce": 0, "total_pending": 0}
    assert await api.get_recipients_count({"mailings": [mailing_id]}) == count
    assert await api.get_recipients_count({"mailings": [mailing_id], "status": ["FINISHED"]}) == count
    assert await api.get_recipients_count({"mailings": [mailing_id], "status": ["READY", "WARNING"]}) == 0
    return _totals(mailing)


async def _statuses(api: Api, recipient_ids: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(recipient_ids), 1000):
        for status in await api.get_recipients_status(recipient_ids[start:start + 1000], {}):
            found[status["id"]] = status
    assert set(found) == set(recipient_ids), f"{len(set(recipient_ids) - set(found))} recipients not found"
    return found


def _check_final(statuses: dict[str, dict[str, Any]], serials: set[str]) -> None:
    """Every recipient FINISHED on its first and only recorded try, by one of ``serials``."""
    wrong = {rid: (s["status"], s["try_count"], s["in_progress"], s["cloud_client"]) for rid, s in statuses.items()
             if (s["status"], s["try_count"], s["in_progress"]) != ("FINISHED", 1, False)
             or s["cloud_client"] not in serials}
    assert not wrong, f"{len(wrong)} recipients not delivered as expected, e.g. {list(wrong.items())[:5]}"


# -- the change log -------------------------------------------------------------------------------

def _read_changes(key: str, port: int) -> list[dict[str, Any]]:
    """The whole change log from the start through one master, 250 changes a page, until an empty page."""
    proxy = _client(key, port)
    changes: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = _page(proxy, cursor)
        if not page["recipients"]:
            return changes
        changes += page["recipients"]
        cursor = page["cursor"]


def _client(key: str, port: int) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(f"https://admin:{key}@127.0.0.1:{port}/CloudMailing",
                                     context=ssl._create_unverified_context(), use_builtin_types=True)


def _page(proxy: xmlrpc.client.ServerProxy, cursor: str) -> dict[str, Any]:
    for _ in range(100):
        try:
            return proxy.get_recipients_status_updated_since(cursor, {}, 250)  # type: ignore[return-value]
        except xmlrpc.client.Fault as fault:
            if "database unavailable" not in fault.faultString:
                raise
        time.sleep(0.1)
    return proxy.get_recipients_status_updated_since(cursor, {}, 250)  # type: ignore[return-value]


class Follower(threading.Thread):
    """Follows the change cursor live, as a client polls it, through the first of ``ports`` until
    that master is unreachable, then on through the next with the same cursor (a cursor is the
    database's, not a master's). Stops at the first empty page read after :meth:`finish`."""

    def __init__(self, key: str, *ports: int) -> None:
        super().__init__(daemon=True)
        self._key, self._ports = key, list(ports)
        self.changes: list[dict[str, Any]] = []
        self.masters_used = 1
        self.error: BaseException | None = None
        self._finish = threading.Event()

    def run(self) -> None:
        try:
            proxy = _client(self._key, self._ports.pop(0))
            cursor = ""
            while True:
                finishing = self._finish.is_set()
                try:
                    page = _page(proxy, cursor)
                except UNREACHABLE:
                    if not self._ports:
                        raise
                    proxy = _client(self._key, self._ports.pop(0))  # the page asked for was not read
                    self.masters_used += 1
                    continue
                self.changes += page["recipients"]
                cursor = page["cursor"]
                if not page["recipients"]:
                    if finishing:
                        return
                    time.sleep(0.05)
        except BaseException as error:
            self.error = error

    async def finish(self) -> list[dict[str, Any]]:
        """Once every write is done: read on to the end, and the changes read."""
        self._finish.set()
        await asyncio.to_thread(self.join, 60)
        assert not self.is_alive(), "the cursor reader did not finish"
        if self.error is not None:
            raise self.error
        return self.changes


def _change_key(change: dict[str, Any]) -> str:
    return json.dumps(change, sort_keys=True, default=str)


def _changes_problems(changes: list[dict[str, Any]], statuses: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with one read of the change log: a change read twice; a recipient of whom a
    change is missing (one change per recorded try, in order: a change skipped leaves a gap) or
    whose last change is not its final status; a change of a recipient never added."""
    problems = []
    repeated = [key for key, seen in Counter(map(_change_key, changes)).items() if seen > 1]
    if repeated:
        problems.append(f"{len(repeated)} changes read twice, e.g. {repeated[:2]}")
    by_recipient: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for change in changes:
        by_recipient[change["id"]].append(change)
    missing, unknown = set(statuses) - set(by_recipient), set(by_recipient) - set(statuses)
    if missing:
        recorded_by = Counter(statuses[rid]["cloud_client"] for rid in missing)
        problems.append(f"no change read for {len(missing)} recipients (recorded for {dict(recorded_by)}), "
                        f"e.g. {sorted(missing)[:3]}")
    if unknown:
        problems.append(f"changes of {len(unknown)} recipients never added, e.g. {sorted(unknown)[:3]}")
    wrong = {}
    for rid, seen in by_recipient.items():
        final = statuses.get(rid)
        if final is None:
            continue
        tries = [change["try_count"] for change in seen]
        if tries != list(range(1, final["try_count"] + 1)) or \
                (seen[-1]["status"], seen[-1]["cloud_client"]) != (final["status"], final["cloud_client"]):
            wrong[rid] = [(change["status"], change["try_count"], change["cloud_client"]) for change in seen]
    if wrong:
        problems.append(f"{len(wrong)} recipients' changes wrong, e.g. {list(wrong.items())[:3]}")
    return problems


async def _check_change_log(key: str, nodes: list[Node], followers: dict[str, Follower],
                            statuses: dict[str, dict[str, Any]]) -> None:
    """The live reads (``followers``) and a whole read through each live master in ``nodes``:
    each exact, and all the same log."""
    reads = {name: await follower.finish() for name, follower in followers.items()}
    for node in nodes:
        reads[f"read through master {node.name} at the end"] = await asyncio.to_thread(_read_changes, key,
                                                                                       node.api_port)
    problems = [f"{where}: {problem}" for where, changes in reads.items()
                for problem in _changes_problems(changes, statuses)]
    keys = {where: list(map(_change_key, changes)) for where, changes in reads.items()}
    first, *others = keys
    for other in others:
        if keys[other] != keys[first]:
            problems.append(f"{other} ({len(keys[other])} changes) and {first} ({len(keys[first])}) read different "
                            f"logs: {len(set(keys[first]) - set(keys[other]))} changes only in the latter, "
                            f"{len(set(keys[other]) - set(keys[first]))} only in the former")
    assert not problems, "the change log read wrong:\n" + "\n".join(problems)


# -- the tests ----------------------------------------------------------------------------------

@aio_test
async def test_two_masters_deliver_one_mailing_exactly_once(cluster, database, sinks):
    """Masters A and B on one database, satellite A linked to A and B to B: a mailing made and
    started through A, and watched through B, is delivered to every recipient exactly once, by
    both satellites; both masters count it the same, and the change log read through either (live
    while both write, and whole at the end) holds every recipient's change exactly once."""
    servers, _ = sinks
    key = await _api_key(database)
    a, b = cluster.node("a", lease_seconds=60), cluster.node("b", lease_seconds=60)
    await cluster.start_master(a)
    await cluster.start_master(b)
    api_a, api_b = cluster.api(a, key), cluster.api(b, key)
    await api_a.cloud_add_satellite(a.serial, {})
    await api_b.cloud_add_satellite(b.serial, {})  # each master registers one: they share the registry
    mailing_id, ids = await _mailing(api_a, RECIPIENTS)
    for node, api in ((a, api_a), (b, api_b)):
        cluster.start_satellite(node)
        await _linked(api, node.serial)
    followers = {"live read through master a": Follower(key, a.api_port),
                 "live read through master b": Follower(key, b.api_port)}
    for follower in followers.values():
        follower.start()

    assert await api_a.start_mailing(mailing_id) == "READY"
    await api_a.mailing_manager_force_check()
    await _finished(api_b, [mailing_id], [a, b])

    delivered = _deliveries(servers)
    assert set(delivered) == set(ids), f"{len(set(ids) - set(delivered))} recipients never delivered"
    twice = {address: helos for address, helos in delivered.items() if len(helos) != 1}
    assert not twice, f"{len(twice)} recipients delivered more than once, e.g. {list(twice.items())[:5]}"
    by_satellite = Counter(helos[0] for helos in delivered.values())
    assert by_satellite[a.helo] > 0 and by_satellite[b.helo] > 0, by_satellite
    assert sum(by_satellite.values()) == RECIPIENTS

    assert await _check_totals(api_a, mailing_id, RECIPIENTS) == await _check_totals(api_b, mailing_id, RECIPIENTS)
    statuses = await _statuses(api_b, list(ids.values()))
    assert await _statuses(api_a, list(ids.values())) == statuses
    _check_final(statuses, {a.serial, b.serial})
    # The outcome recorded for each recipient is the satellite's that delivered it.
    misattributed = [address for address, rid in ids.items()
                     if f"{statuses[rid]['cloud_client']}.test" != delivered[address][0]]
    assert not misattributed, f"{len(misattributed)} recipients recorded for another satellite: {misattributed[:5]}"
    for api in (api_a, api_b):
        sent = Counter()
        for hour in await api.get_hourly_statistics({}):
            sent[f"{hour['sender']}.test"] += hour["sent"]
            assert hour["failed"] == 0 and hour["tries"] == hour["sent"], hour
        assert sent == by_satellite

    await _check_change_log(key, [a, b], followers, statuses)


@aio_test
async def test_a_killed_master_loses_nobody(cluster, database, sinks):
    """Master A and its satellite are killed (``kill -9``, as when their host dies) while both
    sides deliver; master B alone finishes the mailing: the leases satellite A held expire
    (``lease_seconds`` 10) and satellite B delivers their recipients.

    The guarantee asserted (docs/api.md, "At least once", and the dispatcher: an outcome counts
    only for the satellite that holds the recipient's lease): every recipient is delivered and
    ends FINISHED, recorded on its first try; satellite B delivers no recipient twice, and none
    whose outcome from satellite A was recorded. A recipient may reach the sinks twice only once
    from each satellite: satellite A sent it before the kill but its outcome was never recorded
    (still in A's outbox, or in a report master A never wrote), so its lease expired and
    satellite B sent it again; it is then recorded as satellite B's. Satellite A, killed too,
    sends nothing after that. The totals through B, and the change log through B (a live reader
    that began on master A goes on through B with the same cursor) hold every recipient once."""
    servers, _ = sinks
    key = await _api_key(database)
    a, b = cluster.node("a", lease_seconds=10), cluster.node("b", lease_seconds=10)
    await cluster.start_master(a)
    await cluster.start_master(b)
    api_a, api_b = cluster.api(a, key), cluster.api(b, key)
    await api_a.cloud_add_satellite(a.serial, {})
    await api_b.cloud_add_satellite(b.serial, {})
    mailing_id, ids = await _mailing(api_a, RECIPIENTS)
    for node, api in ((a, api_a), (b, api_b)):
        cluster.start_satellite(node)
        await _linked(api, node.serial)
    followers = {"live read through master a, then b": Follower(key, a.api_port, b.api_port),
                 "live read through master b": Follower(key, b.api_port)}
    for follower in followers.values():
        follower.start()

    assert await api_a.start_mailing(mailing_id) == "READY"
    await api_a.mailing_manager_force_check()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:  # both satellites under way, most recipients still to deliver
        by_satellite = Counter(helo for helos in _deliveries(servers).values() for helo in helos)
        if by_satellite[a.helo] >= 100 and by_satellite[b.helo] >= 100 and sum(by_satellite.values()) >= 600:
            break
        assert loop.time() < deadline, f"deliveries did not get under way: {by_satellite}"
        await asyncio.sleep(0.02)
    await _kill(a.master)
    await _kill(a.satellite)
    at_kill = _delivered_count(servers)
    assert at_kill < RECIPIENTS * 0.8, f"{at_kill} delivered before the kill: nothing was left to take over"

    await _finished(api_b, [mailing_id], [b])
    delivered = _deliveries(servers)
    assert set(delivered) == set(ids), f"{len(set(ids) - set(delivered))} recipients never delivered"
    statuses = await _statuses(api_b, list(ids.values()))
    _check_final(statuses, {a.serial, b.serial})
    wrong = {}
    for address, rid in ids.items():
        helos, recorded = Counter(delivered[address]), statuses[rid]["cloud_client"]
        expected_ok = (helos == Counter({a.helo: 1}) if recorded == a.serial
                       else helos in (Counter({b.helo: 1}), Counter({a.helo: 1, b.helo: 1})))
        if not expected_ok:
            wrong[address] = (recorded, dict(helos))
    assert not wrong, f"{len(wrong)} recipients delivered other than once, or once more after a lost outcome " \
                      f"of satellite A: {list(wrong.items())[:5]}"
    await _check_totals(api_b, mailing_id, RECIPIENTS)
    recorded = Counter(status["cloud_client"] for status in statuses.values())
    sent = Counter()
    for hour in await api_b.get_hourly_statistics({}):
        sent[hour["sender"]] += hour["sent"]
    # Satellite B's statistics are whole; satellite A's lack what master A died before adding.
    assert sent[b.serial] == recorded[b.serial] == sum(1 for helos in delivered.values() if b.helo in helos)
    assert sent[a.serial] <= recorded[a.serial]
    await _check_change_log(key, [b], followers, statuses)
    assert followers["live read through master a, then b"].masters_used == 2


@aio_test
async def test_a_master_starting_beside_a_busy_one_undoes_nothing(cluster, database, sinks):
    """Master B starts (its start-up repairs run) while master A delivers a mailing through its
    satellite, with reports, their log pages and counts in flight, and while a client adds
    recipients to a second mailing through A in batches (each all or nothing: a start-up's repair
    of batches a crash cut must leave a live master's batch alone). Satellite B then links to B,
    and the second mailing is started through B. Both mailings finish with every recipient
    (every acknowledged one of the second) delivered exactly once, counted right through both
    masters, and logged once in the change log through either."""
    servers, _ = sinks
    key = await _api_key(database)
    a, b = cluster.node("a", lease_seconds=60), cluster.node("b", lease_seconds=60)
    await cluster.start_master(a)
    api_a = cluster.api(a, key)
    await api_a.cloud_add_satellite(a.serial, {})
    first, ids = await _mailing(api_a, RECIPIENTS)
    second = await api_a.create_mailing(*MAILING)
    cluster.start_satellite(a)
    await _linked(api_a, a.serial)
    followers = {"live read through master a": Follower(key, a.api_port)}
    followers["live read through master a"].start()
    assert await api_a.start_mailing(first) == "READY"
    await api_a.mailing_manager_force_check()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while _delivered_count(servers) < 200:
        assert loop.time() < deadline, "deliveries did not get under way"
        await asyncio.sleep(0.02)

    added: dict[str, str] = {}
    stop_adding = threading.Event()

    def add_batches() -> None:  # a client adding recipients through A, 20 at a time, until told to stop
        client = _client(key, a.api_port)
        for batch in range(200):
            if stop_adding.is_set():
                return
            entries = [{"email": f"v{batch}-{i}@d{i % len(DOMAINS)}.test"} for i in range(20)]
            answer = client.add_recipients(second, entries)
            added.update((entry["email"], entry["id"]) for entry in answer if "id" in entry)
            time.sleep(0.05)

    adding = asyncio.ensure_future(asyncio.to_thread(add_batches))
    try:
        await cluster.start_master(b)  # its start-up repairs run while A writes
        delivered_at_start, still_adding = _delivered_count(servers), not adding.done()
        await asyncio.sleep(0.3)
    finally:
        stop_adding.set()
        await adding
    assert delivered_at_start < RECIPIENTS, "the mailing was delivered before master B had started: no overlap"
    assert still_adding, "the batches were all added before master B had started: no overlap"
    api_b = cluster.api(b, key)
    followers["live read through master b"] = Follower(key, b.api_port)
    followers["live read through master b"].start()
    await api_b.cloud_add_satellite(b.serial, {})
    cluster.start_satellite(b)
    await _linked(api_b, b.serial)
    assert await api_b.start_mailing(second) == "READY"
    await api_b.mailing_manager_force_check()
    await _finished(api_a, [first, second], [a, b])

    everyone = {**ids, **added}
    delivered = _deliveries(servers)
    never, unknown = sorted(set(everyone) - set(delivered)), sorted(set(delivered) - set(everyone))
    assert not never and not unknown, f"never delivered: {never[:5]} ({len(never)}); unknown: {unknown[:5]}"
    twice = {address: helos for address, helos in delivered.items() if len(helos) != 1}
    assert not twice, f"{len(twice)} recipients delivered more than once, e.g. {list(twice.items())[:5]}"
    for api in (api_a, api_b):
        await _check_totals(api, first, RECIPIENTS)
        await _check_totals(api, second, len(added))
    statuses = await _statuses(api_a, list(everyone.values()))
    assert await _statuses(api_b, list(everyone.values())) == statuses
    _check_final(statuses, {a.serial, b.serial})
    await _check_change_log(key, [a, b], followers, statuses)
