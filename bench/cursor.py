"""Cursor benchmark: reading N recipient status changes through get_recipients_status_updated_since.

A mailing of N recipients is written straight through the storage layer (blocks of 500), and
every recipient gets one FINISHED change with a reply and an SMTP log, as a satellite's reports
would leave them. Then a real ``cm-master`` serves them, and a client reads the whole change log
with ``get_recipients_status_updated_since(cursor, [], 1000)`` until it is empty, twice:

- as the server sees it: a client that reads each whole answer over HTTPS and takes the next
  cursor out of it, without building Python objects (the server's own rate);
- as a Python client does it, with ``xmlrpc.client`` (the server's work plus the client's parse).

Printed: both rates, their ratio to the target (10,000/s), and the reference measured in the same
run: how many records per second ``xmlrpc.client`` alone parses from those very answers, with no
server at all (a Python client's own ceiling).

    .venv/bin/python bench/cursor.py [--changes N]

Uses CM_MONGODB_URL when set, else the embedded database (FerretDB on a private PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import http.client
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cloudmailing.storage.database import open_database  # noqa: E402
from cloudmailing.storage.ingest import NewRecipient  # noqa: E402
from cloudmailing.storage.ledger import Change  # noqa: E402
from cloudmailing.storage.stores import open_stores  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402
from tests.embedded_db import EmbeddedDatabase  # noqa: E402

TARGET = 10_000
PAGE = 1000
NOW = datetime.datetime(2027, 1, 15, 12, 0, 0)


async def write_changes(url: str, db_name: str, total: int) -> None:
    """A mailing of ``total`` recipients, each with one FINISHED change."""
    database = await open_database(url, db_name)
    stores = await open_stores(database)
    await stores.mailings.insert(1, {"status": "RUNNING", "type": "REGULAR", "satellite_group": ""})
    for start in range(0, total, 500):
        people = [NewRecipient(f"user{i}@example{i % 50}.org", f"example{i % 50}.org", {"firstname": f"F{i}"}, [])
                  for i in range(start, min(start + 500, total))]
        await stores.writer.append(1, False, people, NOW)
    async for summary in stores.blocks.of_mailing(1):
        changes = [Change(slot, "FINISHED", 1, NOW, None,
                          {"reply_code": 250, "reply_enhanced_code": "2.0.0", "reply_text": f"queued as Q{slot}",
                           "smtp_log": "> MAIL FROM:<news@example.org>\n< 250 2.1.0 Ok\n> RCPT TO:<x>\n< 250 2.1.5 Ok\n"
                                       "> DATA\n< 354 End data\n< 250 2.0.0 Ok: queued", "cloud_client": "sat-1"})
                   for slot in range(summary["n"])]
        await stores.ledger.edit(summary["_id"], lambda block, changes=changes: changes, NOW)
    await database.close()


def read_as_server(host: str, port: int, key: str) -> tuple[int, float, list[bytes]]:
    """Changes read by whole answers, seconds taken, and some answers kept for the reference."""
    connection = http.client.HTTPSConnection(host, port, context=ssl._create_unverified_context())
    credentials = base64.b64encode(f"admin:{key}".encode()).decode()
    headers = {"Content-Type": "text/xml", "Authorization": f"Basic {credentials}"}
    cursor, count, kept = "", 0, []
    started = time.monotonic()
    while True:
        body = xmlrpc.client.dumps((cursor, [], PAGE), "get_recipients_status_updated_since")
        connection.request("POST", "/CloudMailing", body, headers)
        answer = connection.getresponse().read()
        records = answer.count(b"<name>cloud_client</name>")
        if not records:
            return count, time.monotonic() - started, kept
        if len(kept) < 20:
            kept.append(answer)
        count += records
        found = _CURSOR.search(answer)
        assert found is not None
        cursor = found.group(1).decode()


_CURSOR = re.compile(rb"<name>cursor</name>\n<value><string>([^<]*)</string>")


def read_with_xmlrpc_client(proxy: xmlrpc.client.ServerProxy) -> tuple[int, float]:
    cursor, count = "", 0
    started = time.monotonic()
    while True:
        page = proxy.get_recipients_status_updated_since(cursor, [], PAGE)
        if not page["recipients"]:
            return count, time.monotonic() - started
        count += len(page["recipients"])
        cursor = page["cursor"]


def client_parse_rate(answers: list[bytes]) -> float:
    """Records per second ``xmlrpc.client`` parses from these answers (no server involved)."""
    started, records = time.monotonic(), 0
    for _ in range(3):
        for answer in answers:
            (page,), _ = xmlrpc.client.loads(answer, use_builtin_types=True)
            records += len(page["recipients"])
    return records / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cm-bench-cursor-") as tmp_dir:
        tmp = Path(tmp_dir)
        embedded = None if os.environ.get("CM_MONGODB_URL") else EmbeddedDatabase(tmp / "db", searchable_from=tmp)
        url = os.environ.get("CM_MONGODB_URL") or (embedded.url if embedded else "")
        db_name = f"bench_cursor_{os.getpid()}"
        master = None
        try:
            started = time.monotonic()
            asyncio.run(write_changes(url, db_name, args.changes))
            print(f"wrote {args.changes:,} recipients and their changes in {time.monotonic() - started:.1f} s")
            port = free_port()
            config = tmp / "master.ini"
            config.write_text(f"[database]\nurl = {url}\nname = {db_name}\n[api]\nhost = 127.0.0.1\nport = {port}\n"
                              f"[satellite_link]\nhost = 127.0.0.1\nport = 0\n[paths]\ndata_dir = {tmp / 'data'}\n"
                              f"[logging]\nlevel = WARNING\n")
            admin = [sys.executable, "-m", "cloudmailing.cli.admin", "--config", str(config)]
            key = subprocess.run([*admin, "api-key", "create", "--name", "bench"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            master = subprocess.Popen([sys.executable, "-m", "cloudmailing.cli.master", "--config", str(config)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port(port, timeout=60)
            served, served_seconds, answers = read_as_server("127.0.0.1", port, key)
            proxy = xmlrpc.client.ServerProxy(f"https://admin:{key}@127.0.0.1:{port}/CloudMailing",
                                              context=ssl._create_unverified_context(), use_builtin_types=True)
            count, seconds = read_with_xmlrpc_client(proxy)
            server_rate, client_rate, reference = served / served_seconds, count / seconds, client_parse_rate(answers)
            print(f"served {served:,} changes in {served_seconds:.1f} s: {server_rate:,.0f} changes/s "
                  f"(target {TARGET:,}/s: ratio {server_rate / TARGET:.2f})")
            print(f"read with xmlrpc.client: {count:,} changes in {seconds:.1f} s: {client_rate:,.0f} changes/s "
                  f"(ratio to the target {client_rate / TARGET:.2f})")
            print(f"reference, xmlrpc.client alone parsing the same answers: {reference:,.0f} records/s; "
                  f"ratio {client_rate / reference:.2f}")
            return 0 if count == served == args.changes else 1
        finally:
            if master is not None:
                master.terminate()
                master.wait(timeout=30)
            if embedded is not None:
                embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
