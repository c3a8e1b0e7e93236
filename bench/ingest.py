"""Ingest benchmark: 100,000 recipients through ``add_recipients`` in batches of 1,000.

Prints the rate seen by a separate client process and its ratio to two references measured in
the same run: the same recipients written with ``insert_many`` straight into the same database,
one document per recipient (the plainest layout, indexed by mailing), and the standard library's
XML-RPC parse rate of the same request bodies (one core). Target: at least 0.5 of the lower
reference.

    .venv/bin/python bench/ingest.py [--recipients N] [--batch N]

Uses CM_MONGODB_URL when set, else starts the embedded database (bin/embedded-db: FerretDB on a
private PostgreSQL cluster) in a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import os
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
import xmlrpc.client
from pathlib import Path

from pymongo import MongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, wait_for_port  # noqa: E402
from tests.embedded_db import EmbeddedDatabase  # noqa: E402


def batches(total: int, size: int) -> list[list[dict[str, str]]]:
    people = [{"email": f"user{i}@example{i % 50}.org", "firstname": f"First{i}", "lastname": f"Last{i}",
               "city": "Paris"} for i in range(total)]
    return [people[i:i + size] for i in range(0, total, size)]


def client_run(url: str, mailing_id: int, total: int, size: int) -> None:
    """Runs in its own process: send every batch, print the elapsed seconds."""
    proxy = xmlrpc.client.ServerProxy(url, context=ssl._create_unverified_context())
    work = batches(total, size)
    started = time.perf_counter()
    refused = 0
    for batch in work:
        refused += sum("error" in answer for answer in proxy.add_recipients(mailing_id, batch))
    print(f"{time.perf_counter() - started} {refused}")


def parse_reference(total: int, size: int) -> float:
    bodies = [xmlrpc.client.dumps((1, batch), "add_recipients").encode() for batch in batches(total, size)]
    started = time.perf_counter()
    for body in bodies:
        xmlrpc.client.loads(body, use_builtin_types=True)
    return total / (time.perf_counter() - started)


def recipient_document(person: dict[str, str], now: datetime.datetime) -> dict[str, object]:
    """One recipient as a one-document-per-recipient layout stores it."""
    contact = {key: value for key, value in person.items() if key != "email"}
    return {"_id": uuid.uuid4().hex, "mailing_id": 1, "email": person["email"], "domain": person["email"].split("@")[1],
            "contact": contact, "attachments": [], "status": "READY", "try_count": 0, "first_try": None,
            "next_try": None, "modified": now}


def insert_reference(mongo_url: str, total: int, size: int) -> float:
    """The same recipients, one document each, into an indexed collection, straight."""
    client = MongoClient(mongo_url)
    database = client[f"bench_ref_{uuid.uuid4().hex[:8]}"]
    database.recipients.create_index("mailing_id")
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    documents = [[recipient_document(person, now) for person in batch] for batch in batches(total, size)]
    started = time.perf_counter()
    for batch in documents:
        database.recipients.insert_many(batch, ordered=False)
    elapsed = time.perf_counter() - started
    client.drop_database(database.name)
    return total / elapsed


def start_database(tmp: Path) -> tuple[str, EmbeddedDatabase | None]:
    if os.environ.get("CM_MONGODB_URL"):
        return os.environ["CM_MONGODB_URL"], None
    database = EmbeddedDatabase(tmp / "db", searchable_from=tmp)
    return database.url, database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--client", nargs=2, help=argparse.SUPPRESS)  # internal: the client process
    args = parser.parse_args()
    if args.client:
        client_run(args.client[0], int(args.client[1]), args.recipients, args.batch)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        mongo_url, database = start_database(tmp)
        db_name = f"bench_{uuid.uuid4().hex[:8]}"
        port = free_port()
        config = tmp / "bench.ini"
        config.write_text(f"[database]\nurl = {mongo_url}\nname = {db_name}\n[api]\nhost = 127.0.0.1\n"
                          f"port = {port}\n[satellite_link]\nhost = 127.0.0.1\nport = 0\n"
                          f"[paths]\ndata_dir = {tmp / 'data'}\n[logging]\nlevel = WARNING\n")
        python = sys.executable
        key = subprocess.run([python, "-m", "cloudmailing.cli.admin", "--config", str(config), "api-key", "create",
                              "--name", "bench"], capture_output=True, text=True, check=True).stdout.strip()
        master = subprocess.Popen([python, "-m", "cloudmailing.cli.master", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            url = f"https://admin:{key}@127.0.0.1:{port}/CloudMailing"
            proxy = xmlrpc.client.ServerProxy(url, context=ssl._create_unverified_context())
            mailing_id = proxy.create_mailing("bench@example.org", "Bench", "Hi {{ firstname }}", "<p>x</p>", "",
                                              "utf-8")
            output = subprocess.run([python, __file__, "--recipients", str(args.recipients), "--batch",
                                     str(args.batch), "--client", url, str(mailing_id)],
                                    capture_output=True, text=True, check=True).stdout.split()
            elapsed, refused = float(output[0]), int(output[1])
            stored = proxy.list_mailings({"id": [mailing_id]})[0]["total_recipient"]
        finally:
            master.terminate()
            master.wait()
        api_rate = args.recipients / elapsed
        insert_rate = insert_reference(mongo_url, args.recipients, args.batch)
        parse_rate = parse_reference(args.recipients, args.batch)
        MongoClient(mongo_url).drop_database(db_name)
        if database is not None:
            database.stop()
    lower = min(insert_rate, parse_rate)
    backend = "MongoDB (CM_MONGODB_URL)" if os.environ.get("CM_MONGODB_URL") else "FerretDB/PostgreSQL"
    print(f"database: {backend}; {args.recipients} recipients in batches of {args.batch}; "
          f"stored {stored}, refused {refused}")
    print(f"add_recipients over HTTPS:   {api_rate:10,.0f} recipients/s")
    print(f"reference insert_many:       {insert_rate:10,.0f} recipients/s   ratio {api_rate / insert_rate:.2f}")
    print(f"reference stdlib XML parse:  {parse_rate:10,.0f} recipients/s   ratio {api_rate / parse_rate:.2f}")
    print(f"ratio to the lower reference: {api_rate / lower:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
