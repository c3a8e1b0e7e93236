"""bin/embedded-db: FerretDB on a private PostgreSQL cluster, created from nothing, surviving kill -9."""

from __future__ import annotations

import functools
import os
import pwd
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from pymongo import MongoClient

from cloudmailing.common.embedded_db import ferretdb_socket, mongodb_url
from tests.conftest import ROOT
from tests.embedded_db import EmbeddedDatabase


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "db"


@pytest.fixture
def start(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., EmbeddedDatabase]:
    """Starts the embedded database in ``data_dir``: ``start(port=None)``."""
    return functools.partial(EmbeddedDatabase, data_dir, searchable_from=tmp_path_factory.getbasetemp().parent)


def _client(url: str) -> MongoClient:
    return MongoClient(url, serverSelectionTimeoutMS=10_000)


def _psql(data_dir: Path, query: str) -> str:
    """A query straight to the cluster, through its socket."""
    cluster = data_dir / "postgresql"
    psql = f"/usr/lib/postgresql/{(cluster / 'PG_VERSION').read_text().strip()}/bin/psql"
    return subprocess.run([psql, "-h", str(cluster), "-U", "ferretdb", "-d", "postgres", "-Atc", query],
                          capture_output=True, text=True, check=True).stdout.strip()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while _running(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def test_data_survives_kill_9_of_postgresql_and_ferretdb(data_dir, start):
    first = start()
    _client(first.url).shop.orders.insert_many([{"n": n} for n in range(100)])  # acknowledged: on disk
    postgres, ferretdb = first.postgres_pid, first.ferretdb_pid
    os.kill(postgres, signal.SIGKILL)
    os.kill(ferretdb, signal.SIGKILL)

    assert first.process.wait(timeout=30) == 1  # the starter saw one die and stopped
    assert "exited (killed by signal 9)" in first.stop()[1]
    assert (data_dir / "postgresql" / "postmaster.pid").exists()  # stale, like the socket
    assert (data_dir / "postgresql" / ".s.PGSQL.5432").exists()
    with start() as second:
        assert second.postgres_pid != postgres
        assert sorted(d["n"] for d in _client(second.url).shop.orders.find()) == list(range(100))


def test_killing_the_starter_stops_both_and_a_new_start_just_works(data_dir, start):
    first = start()
    _client(first.url).shop.orders.insert_one({"n": 1})
    postgres, ferretdb = first.postgres_pid, first.ferretdb_pid
    first.process.kill()
    first.process.wait()

    _wait_gone(postgres)
    _wait_gone(ferretdb)
    with start() as second:
        assert _client(second.url).shop.orders.count_documents({}) == 1


def test_a_start_waits_for_the_killed_servers_last_processes(data_dir, start):
    first = start()
    _client(first.url).shop.orders.insert_one({"n": 1})
    postgres = first.postgres_pid
    straggler = int(Path(f"/proc/{postgres}/task/{postgres}/children").read_text().split()[0])
    os.kill(straggler, signal.SIGSTOP)  # a server process slow to leave: it keeps the shared memory
    for pid in (first.process.pid, postgres, first.ferretdb_pid):
        os.kill(pid, signal.SIGKILL)
    first.process.wait()

    release = threading.Timer(2.0, os.kill, (straggler, signal.SIGKILL))
    release.start()
    with start() as second:
        assert not release.is_alive()  # it waited for the straggler
        assert _client(second.url).shop.orders.count_documents({}) == 1
    assert "is still in use" in (data_dir / "postgresql.log").read_text()


def test_a_killed_server_not_yet_reaped_does_not_block_a_start(data_dir, start):
    with start() as first:
        _client(first.url).shop.orders.insert_one({"n": 1})
        command = Path(f"/proc/{first.postgres_pid}/cmdline").read_bytes().split(b"\0")[:-1]
    owner = pwd.getpwuid((data_dir / "postgresql").stat().st_uid)
    # The same server, this test its parent: killed and never waited for, it stays a zombie.
    server = subprocess.Popen(command, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              **({"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
                                 if os.geteuid() == 0 else {}))
    try:
        _wait_ready(data_dir, server.pid)
        os.kill(server.pid, signal.SIGKILL)
        _wait_zombie(server.pid)

        with start() as second:
            assert _client(second.url).shop.orders.count_documents({}) == 1
        assert Path(f"/proc/{server.pid}/stat").read_text().split(") ")[1][0] == "Z"  # all along
    finally:
        server.kill()
        server.wait()


def _wait_ready(data_dir: Path, pid: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        pid_file = data_dir / "postgresql" / "postmaster.pid"
        lines = pid_file.read_text().splitlines() if pid_file.exists() else []
        if len(lines) >= 8 and lines[0] == str(pid) and lines[7].strip() == "ready":
            return
        assert time.monotonic() < deadline, "the server never got ready"
        time.sleep(0.05)


def _wait_zombie(pid: int) -> None:
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline, f"{pid} never died"
        time.sleep(0.05)


def test_sigterm_stops_both_cleanly(data_dir, start):
    database = start()
    postgres, ferretdb = database.postgres_pid, database.ferretdb_pid

    assert database.stop() == (0, "")
    assert not _running(postgres) and not _running(ferretdb)
    assert not (data_dir / "postgresql" / "postmaster.pid").exists()  # a clean shutdown removes it
    assert "database system is shut down" in (data_dir / "postgresql.log").read_text()


def test_the_cluster_is_private_and_never_runs_as_root(data_dir, start):
    with start() as database:
        owner = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
        assert Path(f"/proc/{database.postgres_pid}").stat().st_uid == owner
        assert (data_dir / "postgresql").stat().st_uid == owner
        assert (data_dir / "postgresql").stat().st_mode & 0o777 == 0o700
        assert _psql(data_dir, "SHOW listen_addresses") == ""  # the unix socket only
        assert _psql(data_dir, "SHOW fsync") == "on"


def test_everything_in_the_data_dir_is_private_from_the_start(data_dir, start):
    with start():
        others = 0o001 if os.geteuid() == 0 else 0  # as root: searchable for the cluster's user
        assert data_dir.stat().st_mode & 0o777 == 0o700 | others
        for path in [data_dir / "lock", data_dir / "postgresql.log", data_dir / "ferretdb.log",
                     data_dir / "ferretdb.pid", data_dir / "ferretdb", *(data_dir / "ferretdb").rglob("*")]:
            assert path.stat().st_mode & 0o077 == 0, path


def test_ferretdb_answers_only_on_a_socket_other_users_cannot_reach(data_dir, start):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with start(port=port) as database:  # where it used to listen; given by an older caller, now ignored
        path = database.socket_path
        assert database.url == "mongodb://" + urllib.parse.quote(str(path), safe="") + "/"
        assert path == data_dir / "socket" / "ferretdb.sock"
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert path.parent.stat().st_uid == os.geteuid()
        assert path.parent.stat().st_mode & 0o777 == 0o700  # only its owner enters: no password is asked
        assert _client(database.url).admin.command("ping")["ok"] == 1
        _client(database.url).shop.orders.insert_one({"n": 1})
        assert _client(database.url).shop.orders.count_documents({}) == 1

        ferretdb = database.ferretdb_pid
        assert not _tcp_listeners(ferretdb)  # nothing on 127.0.0.1, where it used to listen
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        if os.geteuid() == 0:  # another user is refused at the socket's directory
            assert _connect_as("nobody", path) == "PermissionError"
    with start() as again:
        assert again.url == database.url  # the same at every start: a client's URL stays good
        assert _client(again.url).shop.orders.count_documents({}) == 1


def _connect_as(user: str, path: Path) -> str:
    """Connects to the unix socket ``path`` as ``user`` (from a forked child): "connected" or the error."""
    account = pwd.getpwnam(user)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        outcome = "connected"
        try:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
        except OSError as error:
            outcome = type(error).__name__
        os.write(writer, outcome.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as said:
        outcome = said.read()
    os.waitpid(child, 0)
    return outcome


def _tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets ``pid`` listens on (state 0A in /proc/net/tcp*), by inode."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.append(fields[1])
    return found


def test_a_socket_directory_of_another_user_is_refused(data_dir, start):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    (data_dir / "socket").mkdir(parents=True)
    nobody = pwd.getpwnam("nobody")
    os.chown(data_dir / "socket", nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(RuntimeError, match="is not a directory of this user's"):
        start()


def test_a_second_start_gets_a_clear_error(data_dir, start):
    with start():
        with pytest.raises(RuntimeError, match=f"already running on {data_dir}"):
            start()


def test_a_data_dir_with_a_comma_gives_a_working_database(tmp_path, tmp_path_factory):
    """FerretDB's driver (pgx) splits the host it is given on commas: the cluster's socket then goes
    to a private temporary directory, and the database works (``url`` says so: it pings)."""
    data_dir = tmp_path / "data,2026" / "db"
    data_dir.parent.mkdir()
    data_dir.parent.chmod(0o755)
    with EmbeddedDatabase(data_dir, searchable_from=tmp_path_factory.getbasetemp().parent) as database:
        _client(database.url).shop.orders.insert_one({"n": 1})
        assert _client(database.url).shop.orders.count_documents({}) == 1
        url = subprocess.run([str(ROOT / "bin" / "embedded-db"), "url", str(data_dir)], capture_output=True,
                             text=True, timeout=30)
        assert (url.returncode, url.stdout.strip()) == (0, database.url)


def test_missing_parents_are_made_as_the_caller_makes_directories(tmp_path, tmp_path_factory):
    """Only the data directory is private; its missing parents get the caller's umask: as root, the
    user postgres must pass through them (made 0700, the start was refused)."""
    data_dir = tmp_path / "new" / "sub" / "db"
    umask = os.umask(0o022)
    try:
        database = EmbeddedDatabase(data_dir, searchable_from=tmp_path_factory.getbasetemp().parent)
    finally:
        os.umask(umask)
    with database:
        assert (tmp_path / "new").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "new" / "sub").stat().st_mode & 0o777 == 0o755
        assert data_dir.stat().st_mode & 0o777 == (0o701 if os.geteuid() == 0 else 0o700)
        assert _client(database.url).admin.command("ping")["ok"] == 1


def test_url_wants_a_real_answer_not_just_a_socket_accepting_connections(tmp_path):
    """``url`` (which bin/quickstart asks) and a start's readiness check send ``ping``, which FerretDB
    answers after a round trip to PostgreSQL: something that merely accepts connections on the
    socket (a FerretDB that cannot reach its cluster) is not a running database."""
    data_dir = tmp_path / "db"
    path = ferretdb_socket(data_dir)
    path.parent.mkdir(parents=True)
    stopping = threading.Event()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(0.1)

        def accept_and_close() -> None:
            while not stopping.is_set():
                try:
                    listener.accept()[0].close()
                except TimeoutError:
                    continue

        acceptor = threading.Thread(target=accept_and_close)
        acceptor.start()
        try:
            url = subprocess.run([str(ROOT / "bin" / "embedded-db"), "url", str(data_dir)], capture_output=True,
                                 text=True, timeout=30)
        finally:
            stopping.set()
            acceptor.join()
    assert url.stdout.strip() == mongodb_url(path)
    assert url.returncode == 1
