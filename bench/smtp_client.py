"""Throughput of the SMTP client on loopback (a measurement, not a test).

    .venv/bin/python bench/smtp_client.py [--messages 5000] [--size 20000] [--connections 10]

Starts the counting sink of ``smtp_servers`` in a child process (its own core), then sends
prebuilt messages over N connections, raw (``SmtpConnection``) and through ``DeliveryScheduler``,
and prints messages/s for each.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cloudmailing.cli.runtime import install_reactor  # noqa: E402

install_reactor()  # the satellite's own reactor and event loop: the reference runs the same code

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from cloudmailing.satellite.delivery import DeliveryConfig, DeliveryJob, DeliveryScheduler  # noqa: E402
from cloudmailing.satellite.mx_resolver import MailHost  # noqa: E402
from cloudmailing.satellite.smtp_client import SmtpClientOptions, SmtpConnection  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def make_messages(count: int, size: int) -> list[bytes]:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem\r\n"
    body = line * (size // len(line))
    return [b"Subject: message %d\r\nTo: <r%d@bench.test>\r\n\r\n" % (i, i) + body for i in range(count)]


async def raw(port: int, messages: list[bytes], connections: int) -> float:
    options = SmtpClientOptions("bench.client")
    queue = list(reversed(messages))

    async def worker() -> None:
        conn = SmtpConnection(options, "sink", reactor)
        await conn.connect(HOST, port)
        while queue:
            data = queue.pop()
            outcome = await conn.send("bounce@bench.test", "rcpt@bench.test", data)
            assert outcome.status == "FINISHED", outcome
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return time.perf_counter() - start


class OneHost:
    async def resolve(self, domain: str) -> list[MailHost]:
        return [MailHost("sink", HOST, 10)]


async def scheduled(port: int, messages: list[bytes], connections: int) -> float:
    config = DeliveryConfig(helo_hostname="bench.client", smtp_port=port,
                            max_connections_per_host=connections, max_messages_per_connection=10**9)
    statuses: dict[str, int] = {}

    def on_outcome(job: DeliveryJob, outcome: object) -> None:
        status = outcome.status  # type: ignore[attr-defined]
        statuses[status] = statuses.get(status, 0) + 1

    scheduler = DeliveryScheduler(config, OneHost(), on_outcome, reactor)
    start = time.perf_counter()
    for i, data in enumerate(messages):
        scheduler.submit(DeliveryJob(str(i), "bench.test", "bounce@bench.test", f"r{i}@bench.test", data))
    await scheduler.drain()
    elapsed = time.perf_counter() - start
    await scheduler.close()
    assert statuses == {"FINISHED": len(messages)}, statuses
    return elapsed


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "tests.satellite.smtp_servers", f"{HOST}:{port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        sink.stdout.readline()  # "listening on ..."
        messages = make_messages(args.messages, args.size)
        best: dict[str, float] = {}
        for name, run in (("raw SmtpConnection", raw), ("DeliveryScheduler", scheduled)):
            for _ in range(args.rounds):
                cpu = time.process_time()
                elapsed = await run(port, messages, args.connections)
                cpu = time.process_time() - cpu
                best[name] = max(best.get(name, 0.0), len(messages) / elapsed)
                print(f"{name:20s} {len(messages)} x {args.size} B over {args.connections} connections:"
                      f" {len(messages) / elapsed:8.0f} msg/s, client CPU {cpu / elapsed:4.0%},"
                      f" {cpu / len(messages) * 1e6:5.0f} us/msg", flush=True)
        # The reference is the bare connection: what routing, pooling and back-off cost on top.
        print(f"DeliveryScheduler best {best['DeliveryScheduler']:,.0f} msg/s, ratio "
              f"{best['DeliveryScheduler'] / best['raw SmtpConnection']:.2f} to raw SmtpConnection")
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    done = Deferred.fromFuture(asyncio.ensure_future(main(arguments)))
    done.addErrback(lambda f: f.printTraceback())
    done.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
