"""``cm-admin storage migrate``: a database of the one-document-per-recipient layout, refused by
the master, converted, then served with its statuses, details, counts and cursors intact."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
from pathlib import Path

import pytest
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


# A migration killed anywhere (kill -9) and run again, as often as needed, ends as an
# uninterrupted one: the operation named by a crash point raises instead of running, the
# interrupted process is abandoned, the master is started once (it refuses the database, or takes
# it only when nothing of the old layout is left), then the migration runs again in a new process.

class _Killed(Exception):
    pass


def _unsets(args: tuple) -> bool:
    return "$unset" in args[1]


def _counts(args: tuple) -> bool:
    return any(key.startswith("counts.") for key in args[1].get("$set", {}))


# (collection, operation, which calls of it: a test of its arguments, nth matching call)
_CRASH_POINTS = {
    "block content written, index not": ("recipient_ids", "insert_many", None, 1),
    "log pages written, states not": ("blocks", "insert_one", None, 1),
    "blocks written, counts not": ("mailings", "update_one", _counts, 1),
    "blocks written, bodies not moved": ("mailing_content", "update_one", None, 1),
    "bodies copied, left in the mailing": ("mailings", "update_one", _unsets, 1),
    "one mailing's bodies moved": ("mailing_content", "update_one", None, 2),
    "bodies moved, completion not recorded": ("meta", "replace_one", None, 1),
    "completion recorded, nothing dropped": ("ingest_batches", "drop", None, 1),
    "old journal dropped": ("status_log", "drop", None, 1),
    "old log dropped": ("recipients", "drop", None, 1),
    "old collections dropped": ("meta", "update_one", lambda args: args[0] == {"_id": "layout"}, 1),
    "layout stamped": ("meta", "delete_one", None, 1),
}
_BODIES = {1: {"html": "<p>Hello {{ firstname }}</p>", "plain": "Hello", "rfc822": b"Subject: x\r\n\r\nbody\r\n"},
           2: {"html": "<p>Two</p>", "plain": "Two"}}


class _Tripwire:
    """A collection whose chosen write raises (the process is killed there) instead of running."""

    def __init__(self, collection, operation: str, hit) -> None:
        self._collection, self._operation, self._hit = collection, operation, hit

    def __getattr__(self, name: str):
        attribute = getattr(self._collection, name)
        if name != self._operation:
            return attribute

        async def write(*args, **kwargs):
            self._hit(args)
            return await attribute(*args, **kwargs)

        return write


def _crash_at(database, point: str) -> None:
    collection, operation, which, nth = _CRASH_POINTS[point]
    seen = 0

    def hit(args: tuple) -> None:
        nonlocal seen
        if which is None or which(args):
            seen += 1
            if seen == nth:
                raise _Killed(point)

    real_collection, real_drop = database._collection, database.drop_collection
    database._collection = lambda name: (_Tripwire(real_collection(name), operation, hit) if name == collection
                                         else real_collection(name))

    async def drop(name: str) -> None:
        if (name, operation) == (collection, "drop"):
            hit(())
        await real_drop(name)

    database.drop_collection = drop


async def _write_old_database(database) -> None:
    """Layout 1 with mailing bodies, a kept message, and a batch a crash cut (left out)."""
    await _write_layout_1(database.db)
    await database.meta.delete_many({})  # an old database has no marker (opening it wrote one)
    await database.mailings.update_one({"_id": 1}, {"$set": _BODIES[1]})
    await database.mailings.insert_one({"_id": 2, "status": "FINISHED", "type": "REGULAR", "counts": {},
                                        "mail_from": "b@example.org", "domain_name": "example.org", **_BODIES[2]})
    await database.recipients.insert_many([
        {"_id": "two-0", "mailing_id": 2, "email": "v@example.org", "domain": "example.org", "contact": {},
         "attachments": [], "status": "ERROR", "try_count": 2, "first_try": NOW, "next_try": None,
         "modified": NOW, "test": False, "block": 0, "log_group": 9},
        {"_id": "cut-0", "mailing_id": 2, "email": "w@example.org", "domain": "example.org", "status": "READY",
         "modified": NOW, "test": False, "block": 1, "ingest_batch": "cut"}])
    await database.status_log.insert_one(
        {"_id": 9, "recipient_id": "two-0", "mailing_id": 2, "group": 9, "test": False, "status": "ERROR",
         "logged_at": NOW, "customized_content": b"Subject: kept\r\n\r\n",
         "record": {"email": "v@example.org", "status": "ERROR", "reply_code": 550, "reply_text": "no such user",
                    "modified": NOW, "first_try": NOW, "try_count": 2}})
    await database.ingest_batches.insert_one({"_id": "cut", "mailing_id": 2})


async def _snapshot(database) -> dict[str, list]:
    """Every document of the database, collection by collection."""
    names = sorted(await database.db.list_collection_names())
    dump = {name: [doc async for doc in database.db[name].find({}).sort("_id", 1)] for name in names}
    return {name: docs for name, docs in dump.items() if docs}


async def _check_migrated(database) -> None:
    from cloudmailing.storage.database import check_layout_version
    from cloudmailing.storage.stores import open_stores

    await check_layout_version(database)  # the master takes it
    assert await database.meta.find_one({"_id": "layout"}) == {"_id": "layout", "version": 3}
    assert await database.meta.find_one({"_id": "migration"}) is None
    names = await database.db.list_collection_names()
    assert not {"recipients", "status_log", "ingest_batches"} & set(names)
    stores = await open_stores(database)
    found = await stores.lookup.find(["old-0", "old-1", "old-2", "two-0", "cut-0"])
    assert {rid: r.block.columns.status_of(r.slot) for rid, r in found.items()} == {
        "old-0": "FINISHED", "old-1": "WARNING", "old-2": "READY", "two-0": "ERROR"}
    assert (await stores.mailings.counts([1, 2])) == {1: {"FINISHED": 1, "WARNING": 1, "READY": 1},
                                                      2: {"ERROR": 1}}
    for mailing_id, bodies in _BODIES.items():
        mailing = await stores.mailings.get(mailing_id, with_content=True)
        assert {name: mailing[name] for name in bodies} == bodies
        assert not {"html", "plain", "rfc822"} & set(await database.mailings.find_one({"_id": mailing_id}))
    pages = [doc async for doc in database.db.status_log_0.find({}).sort("_id", 1)]
    assert [(page["_id"], page["last"]) for page in pages] == [(7, 8), (9, 9)]
    assert await database.db.kept_messages_0.count_documents({}) == 1


async def _reference(mongo_url: str) -> dict[str, list]:
    """What an uninterrupted migration leaves."""
    import uuid

    from cloudmailing.storage import migration
    from cloudmailing.storage.database import open_database

    database = await open_database(mongo_url, f"cmtest_{uuid.uuid4().hex[:12]}")
    try:
        await _write_old_database(database)
        assert (await migration.migrate(database, say=lambda line: None)).recipients == 4
        await _check_migrated(database)
        return await _snapshot(database)
    finally:
        await database.client.drop_database(database.db.name)
        await database.close()


async def _start_master_then_migrate(mongo_url: str, db_name: str) -> object:
    """A new process: the master is tried first, then the migration is run again (its report)."""
    from cloudmailing.storage import migration
    from cloudmailing.storage.database import LayoutError, open_database

    try:
        database = await open_database(mongo_url, db_name)
    except LayoutError as refused:
        assert "cm-admin storage migrate" in str(refused)
    else:  # taken only once nothing of the old layout is left (and stamped: the rerun copes)
        try:
            assert not {"recipients", "status_log"} & set(await database.db.list_collection_names())
        finally:
            await database.close()
    database = await open_database(mongo_url, db_name, check_layout=False)
    try:
        return await migration.migrate(database, say=lambda line: None)
    finally:
        await database.close()


@pytest.mark.parametrize("point", list(_CRASH_POINTS))
@aio_test
async def test_a_migration_killed_anywhere_then_run_again_ends_as_an_uninterrupted_one(
        point, mongo_url, db_name, database):
    from cloudmailing.storage import migration

    await _write_old_database(database)
    _crash_at(database, point)
    with pytest.raises(_Killed):
        await migration.migrate(database, say=lambda line: None)
    report = await _start_master_then_migrate(mongo_url, db_name)
    del database._collection, database.drop_collection  # the fixture's connection, for reading
    await _check_migrated(database)
    assert await _snapshot(database) == await _reference(mongo_url)
    assert report is not None  # not "nothing to migrate": the interrupted run's work is finished


@aio_test
async def test_a_migration_killed_at_every_step_in_turn_still_ends_as_an_uninterrupted_one(
        mongo_url, db_name, database):
    from cloudmailing.storage import migration
    from cloudmailing.storage.database import open_database

    await _write_old_database(database)
    for point in _CRASH_POINTS:  # each run goes one step further than the one before
        run = await open_database(mongo_url, db_name, check_layout=False)
        _crash_at(run, point)
        try:
            with pytest.raises(_Killed):
                await migration.migrate(run, say=lambda line: None)
        finally:
            await run.close()
    assert await _start_master_then_migrate(mongo_url, db_name) is not None
    await _check_migrated(database)
    assert await _snapshot(database) == await _reference(mongo_url)
    run = await open_database(mongo_url, db_name, check_layout=False)
    try:
        assert await migration.migrate(run, say=lambda line: None) is None  # nothing left to do
    finally:
        await run.close()
