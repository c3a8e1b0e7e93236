"""Real processes: cm-admin and cm-master started as a user would, and a kill -9 mid-ingest."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import threading
import xmlrpc.client
from pathlib import Path

from tests.conftest import free_port, wait_for_port
from tests.helpers import aio_test


def _config(tmp_path: Path, mongo_url: str, db_name: str, port: int) -> Path:
    path = tmp_path / "cloudmailing.ini"
    path.write_text(f"[database]\nurl = {mongo_url}\nname = {db_name}\n\n[api]\nhost = 127.0.0.1\nport = {port}\n"
                    f"\n[satellite_link]\nhost = 127.0.0.1\nport = 0\n[paths]\ndata_dir = {tmp_path / 'data'}\n")
    return path


def _cli(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"cloudmailing.cli.{module}", *args]


def _start_master(config: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(_cli("master", "--config", str(config)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for_port(port)
    return process


def _proxy(key: str, port: int) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(f"https://admin:{key}@127.0.0.1:{port}/CloudMailing",
                                     context=ssl._create_unverified_context())


def _create_key(config: Path, name: str) -> str:
    result = subprocess.run(_cli("admin", "--config", str(config), "api-key", "create", "--name", name),
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


@aio_test
async def test_admin_keys_and_a_master_process(tmp_path, mongo_url, db_name, database):
    port = free_port()
    config = _config(tmp_path, mongo_url, db_name, port)
    key = await asyncio.to_thread(_create_key, config, "alice")
    assert key.startswith("cm_") and "\n" not in key
    listed = await asyncio.to_thread(subprocess.run, _cli("admin", "--config", str(config), "api-key", "list"),
                                     capture_output=True, text=True, check=True)
    assert "alice" in listed.stdout and key not in listed.stdout
    stored = await database.api_keys.find_one({"name": "alice"})
    assert key not in str(stored) and len(stored["hash"]) == 32
    master = await asyncio.to_thread(_start_master, config, port)
    try:
        api = _proxy(key, port)
        mailing_id = await asyncio.to_thread(api.create_mailing, "news@example.org", "N", "S", "<p>x</p>", "",
                                             "utf-8")
        assert mailing_id == 1
        revoke = await asyncio.to_thread(subprocess.run, _cli("admin", "--config", str(config), "api-key",
                                                              "revoke", "alice"), capture_output=True, text=True)
        assert revoke.returncode == 0
    finally:
        master.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(master.communicate, timeout=30)
    assert "API on https://127.0.0.1:" in output and "api-key create" in output


@aio_test
async def test_kill_9_mid_ingest_keeps_every_acknowledged_batch(tmp_path, mongo_url, db_name):
    port = free_port()
    config = _config(tmp_path, mongo_url, db_name, port)
    key = await asyncio.to_thread(_create_key, config, "ingest")
    master = await asyncio.to_thread(_start_master, config, port)
    api = _proxy(key, port)
    mailing_id = await asyncio.to_thread(api.create_mailing, "news@example.org", "N", "S", "<p>x</p>", "", "utf-8")
    acknowledged: list[str] = []
    stop = threading.Event()

    def ingest() -> None:
        client = _proxy(key, port)
        batch = 0
        while not stop.is_set():
            entries = [{"email": f"u{batch}-{i}@example.org", "tracking_id": f"b{batch}-{i}"} for i in range(200)]
            try:
                answer = client.add_recipients(mailing_id, entries)
            except (OSError, xmlrpc.client.ProtocolError, ConnectionError):
                return  # the master died under us: this batch was never acknowledged
            acknowledged.extend(a["id"] for a in answer if "id" in a)
            batch += 1

    ingesting = threading.Thread(target=ingest)
    ingesting.start()
    while len(acknowledged) < 1000:
        await asyncio.sleep(0.05)
    os.kill(master.pid, signal.SIGKILL)
    await asyncio.to_thread(master.wait)
    stop.set()
    await asyncio.to_thread(ingesting.join)
    master.stdout.close()

    restarted = await asyncio.to_thread(_start_master, config, port)
    try:
        api = _proxy(key, port)
        in_flight = [f"b{len(acknowledged) // 200}-{i}" for i in range(200)]
        found = await asyncio.to_thread(api.get_recipients_status, acknowledged + in_flight, {})
        stored = {record["id"] for record in found}
        assert set(acknowledged) <= stored, "an acknowledged recipient was lost"
        # The batch in flight at the kill is all there (written, its answer lost) or not at all.
        unacknowledged = stored - set(acknowledged)
        assert unacknowledged in (set(), {f"b{len(acknowledged) // 200}-{i}" for i in range(200)}), \
            "part of an unacknowledged batch was kept"
        mailing = (await asyncio.to_thread(api.list_mailings, {"id": [mailing_id]}))[0]
        assert mailing["total_recipient"] == len(stored)
        assert await asyncio.to_thread(api.get_recipients_count, {"mailings": [mailing_id]}) == len(stored)
    finally:
        restarted.terminate()
        await asyncio.to_thread(restarted.communicate, timeout=30)


def test_cm_admin_registers_a_satellite_with_and_without_a_group(tmp_path, mongo_url, db_name, database):
    config = _config(tmp_path, mongo_url, db_name, free_port())
    for args in (("satellite", "add", "sat-1"), ("satellite", "add", "sat-2", "--group", "eu")):
        added = subprocess.run(_cli("admin", "--config", str(config), *args), capture_output=True, text=True)
        assert added.returncode == 0, added.stderr
    listed = subprocess.run(_cli("admin", "--config", str(config), "satellite", "list"), capture_output=True,
                            text=True, check=True).stdout
    assert "sat-1\tenabled=True\tpaired=True\tgroup=\n" in listed and "sat-2" in listed and "group=eu" in listed
