"""Cursor benchmark: reading N recipient status changes through get_recipients_status_updated_since.

A mailing of N recipients is written straight through the storage layer (blocks of 500), and
every recipient gets one FINISHED change with a reply and an SMTP log, as a satellite's reports
would leave them. Then a real ``cm-master`` serves them, and a client reads the whole change log
with ``get_recipients_status_updated_since(cursor, [], 1000)`` until it is empty, as a polling
client does. Printed: the rate (changes per second), its ratio to the target (10,000/s), and to
the reference measured in the same run: the standard library alone encoding and parsing the same
pages of records as XML-RPC (what any server and client must pay, with no database at all).

    .venv/bin/python bench/cursor.py [--changes N]

Uses CM_MONGODB_URL when set, else the embedded database (FerretDB on a private PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
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


def read_all(proxy: xmlrpc.client.ServerProxy) -> tuple[int, float, list[list[dict]]]:
    """Changes read, seconds taken, and a few pages kept for the reference."""
    cursor, count, kept = "", 0, []
    started = time.monotonic()
    while True:
        page = proxy.get_recipients_status_updated_since(cursor, [], PAGE)
        if not page["recipients"]:
            return count, time.monotonic() - started, kept
        if len(kept) < 20:
            kept.append(page["recipients"])
        count += len(page["recipients"])
        cursor = page["cursor"]


def reference_rate(pages: list[list[dict]]) -> float:
    """Records per second the standard library encodes as an XML-RPC answer and parses back."""
    started, records = time.monotonic(), 0
    for _ in range(3):
        for page in pages:
            body = xmlrpc.client.dumps(({"cursor": "c2:1.1", "recipients": page},), methodresponse=True,
                                       allow_none=True)
            xmlrpc.client.loads(body, use_builtin_types=True)
            records += len(page)
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
            proxy = xmlrpc.client.ServerProxy(f"https://admin:{key}@127.0.0.1:{port}/CloudMailing",
                                              context=ssl._create_unverified_context(), use_builtin_types=True)
            count, seconds, pages = read_all(proxy)
            rate, reference = count / seconds, reference_rate(pages)
            print(f"read {count:,} changes in {seconds:.1f} s: {rate:,.0f} changes/s "
                  f"(target {TARGET:,}/s: ratio {rate / TARGET:.2f})")
            print(f"reference, the standard library's XML-RPC encode + parse of the same records: {reference:,.0f}/s;"
                  f" ratio {rate / reference:.2f}")
            return 0 if count == args.changes else 1
        finally:
            if master is not None:
                master.terminate()
                master.wait(timeout=30)
            if embedded is not None:
                embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
