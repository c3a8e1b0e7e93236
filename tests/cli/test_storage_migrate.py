"""``cm-admin storage migrate``: a database of the one-document-per-recipient layout, refused by
the master, converted, then served with its statuses, details, counts and cursors intact."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
from pathlib import Path

from pymongo import AsyncMongoClient

from tests.conftest import free_port
from tests.helpers import aio_test

NOW = datetime.datetime(2027, 1, 15, 12, 0, 0)


def _config(tmp_path: Path, mongo_url: str, db_name: str, port: int) -> Path:
    path = tmp_path / "cloudmailing.ini"
    path.write_text(f"[database]\nurl = {mongo_url}\nname = {db_name}\n\n[api]\nhost = 127.0.0.1\nport = {port}\n"
                    f"\n[satellite_link]\nhost = 127.0.0.1\nport = 0\n[paths]\ndata_dir = {tmp_path / 'data'}\n")
    return path


def _run(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"cloudmailing.cli.{args[0]}", "--config", str(config), *args[1:]],
                          capture_output=True, text=True, timeout=timeout)


async def _write_layout_1(db) -> None:
    """What CloudMailing wrote before blocks: one document per recipient and per change."""
    await db.mailings.insert_one({"_id": 1, "status": "RUNNING", "type": "REGULAR", "mail_from": "a@example.org",
                                  "domain_name": "example.org", "satellite_group": "", "counts": {"READY": 9}})
    recipients = []
    for i in range(3):
        recipients.append({"_id": f"old-{i}", "mailing_id": 1, "email": f"u{i}@example.org", "domain": "example.org",
                           "contact": {"firstname": f"F{i}"}, "attachments": [], "status": "READY",
                           "in_progress": i == 2, "try_count": 0, "first_try": None, "next_try": None,
                           "cloud_client": "", "modified": NOW, "test": False, "block": 0, "ingest_batch": "x"})
    recipients[0].update(status="FINISHED", try_count=1, first_try=NOW, log_group=7)
    recipients[1].update(status="WARNING", try_count=1, first_try=NOW, next_try=NOW, log_group=8)
    await db.recipients.insert_many(recipients)
    record = {"email": "u0@example.org", "status": "FINISHED", "reply_code": 250, "reply_enhanced_code": "2.0.0",
              "reply_text": "queued", "smtp_log": "< 250 queued", "modified": NOW, "first_try": NOW,
              "next_try": None, "try_count": 1, "in_progress": False, "cloud_client": "sat-a"}
    await db.status_log.insert_many([
        {"_id": 7, "recipient_id": "old-0", "mailing_id": 1, "group": 7, "test": False, "status": "FINISHED",
         "logged_at": NOW, "record": record},
        {"_id": 8, "recipient_id": "old-1", "mailing_id": 1, "group": 8, "test": False, "status": "WARNING",
         "logged_at": NOW, "record": {**record, "email": "u1@example.org", "status": "WARNING", "reply_code": 451,
                                      "reply_text": "greylisted", "next_try": NOW}}])
    await db.counters.insert_one({"_id": "status_seq", "value": 1000})


@aio_test
async def test_an_old_database_is_refused_then_migrated_and_served(tmp_path, mongo_url, db_name):
    client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=False)
    try:
        await _write_layout_1(client[db_name])
        config = _config(tmp_path, mongo_url, db_name, free_port())
        refused = await asyncio.to_thread(_run, config, "master")
        assert refused.returncode != 0 and "cm-admin storage migrate" in refused.stderr
        migrated = await asyncio.to_thread(_run, config, "admin", "storage", "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert "placed 3 recipients" in migrated.stdout and "converted 2 status changes" in migrated.stdout
        again = await asyncio.to_thread(_run, config, "admin", "storage", "migrate")
        assert "nothing to migrate" in again.stdout
        assert "recipients" not in await client[db_name].list_collection_names()
        await _check_served(tmp_path, mongo_url, db_name)
    finally:
        await client.drop_database(db_name)
        await client.close()


async def _check_served(tmp_path: Path, mongo_url: str, db_name: str) -> None:
    from twisted.internet import reactor

    from cloudmailing.config.settings import ApiConfig, DatabaseConfig, PathsConfig, SatelliteLinkConfig, Settings
    from cloudmailing.master.app import Master
    from cloudmailing.services.api_keys import ApiKeyService
    from tests.conftest import RunningMaster

    settings = Settings(database=DatabaseConfig(url=mongo_url, name=db_name), api=ApiConfig(host="127.0.0.1", port=0),
                        satellite_link=SatelliteLinkConfig(host="127.0.0.1", port=0),
                        paths=PathsConfig(data_dir=str(tmp_path / "data2")))
    master = Master(settings, reactor)
    await master.start()
    try:
        assert master.database is not None
        key = await ApiKeyService(master.database, reactor).create("tests")
        api = RunningMaster(master, f"https://127.0.0.1:{master.api_port}", key).proxy()
        statuses = {s["id"]: s for s in await api.get_recipients_status(["old-0", "old-1", "old-2"],
                                                                            {"with_contact_data": True})}
        assert (statuses["old-0"]["status"], statuses["old-0"]["reply_text"]) == ("FINISHED", "queued")
        assert (statuses["old-1"]["status"], statuses["old-1"]["reply_code"]) == ("WARNING", 451)
        assert statuses["old-2"]["status"] == "READY" and statuses["old-2"]["contact"] == {"firstname": "F2"}
        mailing = (await api.list_mailings({"id": [1]}))[0]
        assert (mailing["total_recipient"], mailing["total_sent"], mailing["total_softbounce"]) == (3, 1, 1)
        # A cursor handed out before the migration (after change 7) goes on with change 8.
        page = await api.get_recipients_status_updated_since("c1:7", [], 10)
        assert [(r["id"], r["status"]) for r in page["recipients"]] == [("old-1", "WARNING")]
        assert (await api.get_recipients_status_updated_since(page["cursor"], [], 10))["recipients"] == []
    finally:
        await master.stop()


@aio_test
async def test_storage_recount_repairs_totals_from_the_blocks(tmp_path, mongo_url, db_name, database):
    from cloudmailing.storage.stores import open_stores
    from tests.storage.world import NOW, recipients

    stores = await open_stores(database)
    await stores.mailings.insert(7, {"status": "RUNNING", "type": "REGULAR", "satellite_group": ""})
    await stores.writer.append(7, False, recipients(5), NOW)
    await database.mailings.update_one({"_id": 7}, {"$set": {"counts.READY": 2, "counts.FINISHED": 9}})
    config = _config(tmp_path, mongo_url, db_name, free_port())
    repaired = await asyncio.to_thread(_run, config, "admin", "storage", "recount", "7")
    assert repaired.returncode == 0 and "recounted 1 mailings" in repaired.stdout, repaired.stderr
    assert (await database.mailings.find_one({"_id": 7}))["counts"] == {"READY": 5, "FINISHED": 0}


@aio_test
async def test_a_layout_2_database_is_refused_then_its_mailing_bodies_moved(tmp_path, mongo_url, db_name, database):
    from cloudmailing.storage.stores import open_stores

    html, rfc822 = "<p>Hello {{ firstname }}</p>", b"Subject: x\r\n\r\nbody\r\n"
    await database.mailings.insert_one({"_id": 4, "status": "RUNNING", "type": "REGULAR", "counts": {},
                                        "html": html, "plain": "Hello", "rfc822": rfc822})
    await database.meta.replace_one({"_id": "layout"}, {"version": 2}, upsert=True)
    config = _config(tmp_path, mongo_url, db_name, free_port())
    refused = await asyncio.to_thread(_run, config, "master")
    assert refused.returncode != 0 and "layout 2" in refused.stderr and "cm-admin storage migrate" in refused.stderr
    migrated = await asyncio.to_thread(_run, config, "admin", "storage", "migrate")
    assert migrated.returncode == 0 and "moved the bodies of 1 mailings" in migrated.stdout, migrated.stderr
    assert "html" not in await database.mailings.find_one({"_id": 4})
    mailing = await (await open_stores(database)).mailings.get(4, with_content=True)
    assert (mailing["html"], mailing["plain"], mailing["rfc822"], mailing["status"]) == (html, "Hello", rfc822,
                                                                                         "RUNNING")
    again = await asyncio.to_thread(_run, config, "admin", "storage", "migrate")
    assert "nothing to migrate" in again.stdout
