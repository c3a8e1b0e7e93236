"""bin/quickstart from a scratch data directory (the database, the master and a satellite), and
the systemd units' hardening.

The quick starts here run on ports chosen free for them (given in a configuration file), never
on 33610, and in pytest's temporary directory."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port
from tests.embedded_db import searchable

QUICKSTART = str(ROOT / "bin" / "quickstart")
BANNER = "Ctrl-C stops everything."

# A TLS handshake as the master and the satellite make them (pyOpenSSL through Twisted): the master's
# certificate and options, the satellite's pinning client options; in memory, no socket.
HANDSHAKE = textwrap.dedent("""
    import ctypes, sys
    from pathlib import Path
    # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: the kernel's form of systemd's MemoryDenyWriteExecute=yes
    # (both refuse memory both writable and executable).
    if sys.argv[1] == "mdwe" and ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
        print("PR_SET_MDWE unsupported")
        sys.exit(0)
    from OpenSSL import SSL
    from twisted.internet import ssl
    from cloudmailing.common.tls import ensure_certificate
    from cloudmailing.satellite.master_identity import master_options
    data = Path(sys.argv[2])
    tls = ensure_certificate("", "", data)
    pem = tls.cert_path.read_bytes() + tls.key_path.read_bytes()
    server = SSL.Connection(ssl.PrivateCertificate.loadPEM(pem).options().getContext(), None)
    client = SSL.Connection(master_options("", data).getContext(), None)
    server.set_accept_state()
    client.set_connect_state()
    done = set()
    for _ in range(20):
        for me, peer in ((client, server), (server, client)):
            try:
                me.do_handshake()
                done.add(me)
            except SSL.WantReadError:
                pass
            try:
                peer.bio_write(me.bio_read(1 << 16))
            except SSL.WantReadError:
                pass
    assert len(done) == 2, "no handshake"
    print("handshake", client.get_peer_certificate().digest("sha256").decode() == tls.fingerprint_sha256())
""")


def test_the_units_leave_tls_the_writable_executable_memory_it_needs(tmp_path: Path) -> None:
    """pyOpenSSL's callbacks are cffi callbacks, made in writable+executable memory: with
    MemoryDenyWriteExecute=yes (here its kernel form, PR_SET_MDWE) no TLS handshake of the master's
    or the satellite's gets through, so the units must not set it."""
    def handshake(mode: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / mode).mkdir()
        return subprocess.run([sys.executable, "-c", HANDSHAKE, mode, str(tmp_path / mode)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    plain = handshake("plain")
    assert (plain.returncode, plain.stdout.strip()) == (0, "handshake True"), plain.stderr[-2000:]
    denied = handshake("mdwe")
    if denied.stdout.strip() != "PR_SET_MDWE unsupported":  # then the units alone are checked
        assert denied.returncode != 0 and "MemoryError" in denied.stderr, denied.stdout + denied.stderr[-2000:]

    for unit in sorted((ROOT / "systemd").glob("*.service")):
        text = unit.read_text()
        assert not re.search(r"(?m)^\s*MemoryDenyWriteExecute\s*=", text), unit.name
        assert "Documentation=file:///opt" not in text, unit.name  # not installed there
        assert "27117" not in text, unit.name  # the embedded FerretDB has a unix socket, no TCP port


@pytest.fixture
def scratch(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory to run quick starts from, with a configuration file giving them free ports. As
    root, the cluster's user postgres can pass through tmp_path's parents (pytest makes them 0700)."""
    if os.geteuid() == 0:
        searchable(tmp_path, tmp_path_factory.getbasetemp().parent)
    here = tmp_path / "else where"
    here.mkdir()
    here.chmod(0o755)
    link = free_port()
    (here / "my.ini").write_text(f"[api]\nhost = 127.0.0.1\nport = {free_port()}\n"
                                 f"[satellite_link]\nhost = 127.0.0.1\nport = {link}\n"
                                 f"[satellite]\nmaster_port = {link}\nserial = quickstart-test\n")
    return here


def _environment(**cm: str) -> dict[str, str]:
    """This process's environment without CM_* settings, plus ``cm``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CM_")}, **cm}


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return [descendant for child in children for descendant in [child, *_descendants(child)]]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (said := log.read_text(errors="replace")):
        assert process.poll() is None, f"quickstart exited ({process.returncode}):\n{said[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout:.0f} s:\n{said[-3000:]}"
        time.sleep(0.1)
    return said


class Started:
    """The quick starts a test starts, and the processes they started, as the test saw them."""

    def __init__(self) -> None:
        self.quickstarts: list[subprocess.Popen[bytes]] = []
        self.family: set[int] = set()

    def start(self, **popen: Any) -> subprocess.Popen[bytes]:
        self.quickstarts.append(subprocess.Popen([QUICKSTART], **popen))
        return self.quickstarts[-1]

    def family_of(self, quickstart: subprocess.Popen[bytes]) -> list[int]:
        found = _descendants(quickstart.pid)
        self.family.update(found)
        return found


@pytest.fixture
def started() -> Iterator[Started]:
    """Stops every quick start of the test at its end, and whatever they started."""
    started = Started()
    yield started
    for quickstart in started.quickstarts:
        started.family_of(quickstart)
        if quickstart.poll() is None:
            quickstart.terminate()
            try:
                quickstart.wait(60)
            except subprocess.TimeoutExpired:
                quickstart.kill()
                quickstart.wait()
    for pid in started.family:  # still running only when quickstart failed to stop them
        if _running(pid):
            os.kill(pid, signal.SIGTERM)


def test_quickstart_from_another_directory(scratch: Path, started: Started) -> None:
    """Run from another directory with relative CM_DATA_DIR (with a space, parents missing) and
    CM_CONFIG: both are taken from there; the parents are made as any directory (as root the user
    postgres must pass through them), the data directory private; the key commands printed work as
    printed from anywhere; a second quick start on the same data directory is refused while the
    first runs; and kill -9 of quickstart stops everything it started."""
    log = scratch.parent / "quickstart.log"
    environment = _environment(CM_DATA_DIR="new parent/data", CM_CONFIG="my.ini")
    with open(log, "wb") as output:
        quickstart = started.start(cwd=scratch, env=environment, stdout=output, stderr=subprocess.STDOUT, umask=0o022)
    said = _wait_for(log, BANNER, quickstart)

    data = scratch / "new parent" / "data"
    assert (data / "db" / "postgresql" / "PG_VERSION").exists()
    assert not (ROOT / "new parent").exists()
    assert (scratch / "new parent").stat().st_mode & 0o777 == 0o755
    assert data.stat().st_mode & 0o777 == (0o701 if os.geteuid() == 0 else 0o700)

    printed = re.search(r"^Create an API key \(printed once\):  (.+ --name me)$", said, re.M)
    hint = re.search(r"^Create an API key with: (.+ --name )NAME$", said, re.M)
    assert printed and hint, said[-3000:]
    for command in (printed[1], hint[1] + "other"):
        created = subprocess.run(["bash", "-c", command], cwd="/", env=_environment(), capture_output=True,
                                 text=True, timeout=60)
        assert created.returncode == 0 and created.stdout.startswith("cm_"), (command, created.stderr[-2000:])

    second = subprocess.run([QUICKSTART], cwd=scratch, env=environment, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"the database in {data / 'db'} already runs" in second.stderr, second.stdout + second.stderr
    assert "API on" not in second.stdout
    assert quickstart.poll() is None

    family = started.family_of(quickstart)
    assert len(family) >= 5  # the database's starter, PostgreSQL, FerretDB, the master, the satellite
    quickstart.kill()
    quickstart.wait()
    deadline = time.monotonic() + 20
    while left := [pid for pid in family if _running(pid)]:
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80] for pid in left]
        assert time.monotonic() < deadline, f"still running after kill -9 of quickstart: {commands}"
        time.sleep(0.1)


def test_quickstart_stops_when_the_master_does_not_start(scratch: Path, started: Started) -> None:
    """The API's port taken: the master exits; quickstart says so and stops, with no satellite
    started and no "ready" banner."""
    api = re.search(r"port = (\d+)", (scratch / "my.ini").read_text())
    assert api
    port = int(api[1])
    log = scratch.parent / "quickstart.log"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with open(log, "wb") as output:
            quickstart = started.start(cwd=scratch, stdout=output, stderr=subprocess.STDOUT,
                                       env=_environment(CM_DATA_DIR=str(scratch / "data"),
                                                        CM_CONFIG=str(scratch / "my.ini")))
        assert quickstart.wait(timeout=90) == 1
    said = log.read_text(errors="replace")
    assert "quickstart: the master did not start (it exited with status 1" in said, said[-3000:]
    assert f"is port {port} free?" in said
    assert "CloudMailing satellite" not in said and BANNER not in said
