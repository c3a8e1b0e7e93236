"""The programs' exit status, which the systemd units' restart policy relies on: 2 for a usage or
configuration error (not restarted), 1 for a program that stopped on an error (restarted), 0 for
one stopped on request."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _run(module: str, config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"cloudmailing.cli.{module}", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.ini"
    path.write_text("[dispatch]\nlease_seconds = 0\n")
    return path


@pytest.mark.parametrize(("module", "args"), [("satellite", ()), ("master", ()), ("admin", ("config", "show"))])
def test_a_configuration_error_exits_2(tmp_path: Path, module: str, args: tuple[str, ...]) -> None:
    done = _run(module, _bad_config(tmp_path), *args)
    assert done.returncode == 2, done.stderr
    assert "configuration error: [dispatch] lease_seconds: must be from 1 to 604800, not 0" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["satellite", "master", "admin"])
@pytest.mark.parametrize(("content", "error"), [
    (b"lease_size = 10\n", "line 1: a setting before any [section] header"),
    (b"[satellite]\nlease_size = 10\nlease_size = 20\n", "line 3: [satellite] lease_size is given twice"),
    (b"[satellite]\nserial = caf\xe9\n", "line 2: not UTF-8 text (byte 0xe9)"),
    (b"[satellite]\nlease_size = 1" + b"0" * 400 + b"\n", "[satellite] lease_size: must be more than 0"),
], ids=["no-section", "duplicate-key", "not-utf8", "huge-int"])
def test_a_malformed_configuration_file_exits_2(tmp_path: Path, module: str, content: bytes, error: str) -> None:
    path = tmp_path / "c.ini"
    path.write_bytes(content)
    done = _run(module, path, *(("config", "show") if module == "admin" else ()))
    assert done.returncode == 2, done.stderr
    assert "configuration error: " in done.stderr and error in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_configuration_file_exits_2(tmp_path: Path) -> None:
    done = _run("satellite", tmp_path / "absent.ini")
    assert done.returncode == 2
    assert "configuration error" in done.stderr


def test_a_log_file_that_cannot_be_opened_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text(f"[logging]\nfile = {tmp_path / 'absent' / 'satellite.log'}\n")
    done = _run("satellite", path)
    assert done.returncode == 2, done.stderr
    assert "configuration error: [logging] file: cannot open" in done.stderr


def test_a_satellite_that_cannot_create_its_data_directory_exits_1(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "c.ini"
    path.write_text(f"[paths]\ndata_dir = {tmp_path / 'a-file'}\n[satellite]\nmaster_port = 9\n")
    done = _run("satellite", path)
    assert done.returncode == 1, done.stderr
    assert "satellite failed to start" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("content", "problem"), [(b"\xff\xfe\x00garbage\n", "is damaged (not UTF-8 text)"),
                                                  (b"\n", "is empty")])
def test_a_satellite_whose_kept_secret_is_damaged_exits_1(tmp_path: Path, content: bytes, problem: str) -> None:
    data = tmp_path / "data"
    (data / "satellite").mkdir(parents=True, mode=0o700)
    (data / "satellite" / "satellite.secret").write_bytes(content)
    path = tmp_path / "c.ini"
    path.write_text(f"[paths]\ndata_dir = {data}\n[satellite]\nmaster_port = 9\nserial = sat-x\n"
                    "dns_servers = 127.0.0.1:9\n")
    done = _run("satellite", path)
    assert done.returncode == 1, done.stderr
    assert f"satellite failed to start: {data / 'satellite' / 'satellite.secret'} {problem}: " in done.stderr
    assert "cm-admin satellite add sat-x" in done.stderr
    assert "Traceback" not in done.stderr
    assert (data / "satellite" / "satellite.secret").read_bytes() == content


def test_a_satellite_whose_daemon_stops_on_an_error_exits_1(tmp_path: Path) -> None:
    """The real program, its daemon's run() failing: Restart=on-failure must see a failure."""
    path = tmp_path / "c.ini"
    path.write_text(f"[paths]\ndata_dir = {tmp_path / 'data'}\n[satellite]\nmaster_port = 9\nsecret = s\n"
                    "dns_servers = 127.0.0.1:9\n")
    probe = ("import sys\n"
             "from cloudmailing.satellite.daemon import SatelliteDaemon\n"
             "async def broken(self):\n"
             "    raise RuntimeError('the daemon broke')\n"
             "SatelliteDaemon.run = broken\n"
             "from cloudmailing.cli.satellite import main\n"
             f"sys.exit(main(['--config', {str(path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "satellite stopped: the daemon broke" in done.stderr


def test_a_satellite_stopped_by_sigterm_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text(f"[paths]\ndata_dir = {tmp_path / 'data'}\n[satellite]\nmaster_port = 9\nsecret = s\n"
                    "dns_servers = 127.0.0.1:9\n")
    satellite = subprocess.Popen([sys.executable, "-m", "cloudmailing.cli.satellite", "--config", str(path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert satellite.stdout is not None and satellite.stderr is not None
        assert satellite.stdout.readline().startswith("CloudMailing satellite")
        for line in satellite.stderr:  # its reactor runs (and handles SIGTERM) once it tried the master
            if "cannot reach the master" in line:
                break
        satellite.send_signal(signal.SIGTERM)
        assert satellite.wait(timeout=60) == 0
    finally:
        if satellite.poll() is None:
            satellite.kill()
            satellite.wait()
        for stream in (satellite.stdout, satellite.stderr):
            if stream is not None:
                stream.close()
