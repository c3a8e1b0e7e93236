"""Compose benchmark: personalized, DKIM-signed ~20 KB messages per second, on one core and on all.

The satellite's CPU work per message is building it from the mailing's byte template and
signing it. This measures that work alone (no database, no network), through the satellite's
own ``ComposePool``:

* ``in-process`` (``compose_chunk`` in the benchmark's own process, no limits): the reference, one core;
* ``pool`` with ``--workers`` processes (default: one per core);
* and, for scale, the bare signing rate of ``cryptography`` on one core (the floor of the cost).

Printed: each rate, the pool's ratio to the in-process reference measured in the same run, and
CPU milliseconds per message.

    .venv/bin/python bench/compose.py [--messages N] [--size BYTES] [--workers N] [--ed25519]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from delivery import DOMAINS, MAIL_FROM, contact, filler_for, mailing_content, private_key  # noqa: E402

from cloudmailing.satellite.compose_pool import ComposePool, MailingSource, compose_chunk  # noqa: E402
from cloudmailing.satellite.composer import prepare  # noqa: E402


def mailing(size: int, privkey: str) -> MailingSource:
    subject, html, plain = mailing_content(filler_for(size, privkey))
    return MailingSource.from_content({
        "id": 1, "mail_from": MAIL_FROM, "sender_name": "Bench", "subject": subject, "html": html,
        "plain": plain, "charset": "utf-8", "testing": False, "rfc822": "",
        "dkim": {"enabled": True, "selector": "s1", "domain": "sender.bench.test", "privkey": privkey}})


def recipients(count: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "email": person["email"], "domain": DOMAINS[i % len(DOMAINS)][0], "contact": person}
            for i in range(count) for person in [contact(i)]]


async def compose_rate(pool: ComposePool, source: MailingSource, leased: list[dict[str, object]]) -> tuple[float, int]:
    """Messages per second through ``pool``, and the bytes made (checked: every message built)."""
    async for _ in pool.compose(source, leased[:200]):  # warm up: workers started, mailing compiled
        pass
    started, made, size = time.perf_counter(), 0, 0
    async for composed in pool.compose(source, leased):
        assert not composed.failures, composed.failures[:1]
        made += len(composed.jobs)
        size += sum(len(job.data) for job in composed.jobs)
    assert made == len(leased)
    return made / (time.perf_counter() - started), size // made


def in_process_rate(source: MailingSource, leased: list[dict[str, object]]) -> tuple[float, int]:
    """Messages per second composed in this process, one core (the reference), and their size."""
    mailing = prepare(source.content)
    compose_chunk(mailing, leased[:200])  # warm up
    started = time.perf_counter()
    composed = compose_chunk(mailing, leased)
    assert not composed.failures and len(composed.jobs) == len(leased), composed.failures[:1]
    return len(leased) / (time.perf_counter() - started), sum(len(j.data) for j in composed.jobs) // len(leased)


def sign_rate(privkey: str, seconds: float = 2.0) -> float:
    """Bare signatures per second on one core (what DKIM's header signature costs at least)."""
    key = serialization.load_pem_private_key(privkey.encode(), password=None)
    data, count, started = b"x" * 500, 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            key.sign(data)
        else:
            assert isinstance(key, rsa.RSAPrivateKey)
            key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        count += 1
    return count / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=20_000, help="bytes per message (default 20000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ed25519", action="store_true", help="sign with Ed25519 instead of RSA-2048")
    args = parser.parse_args()

    privkey = private_key(args.ed25519)
    source, leased = mailing(args.size, privkey), recipients(args.messages)
    algorithm = "Ed25519" if args.ed25519 else "RSA-2048"
    cpu_started = time.process_time()
    single, size = in_process_rate(source, leased)
    single_cpu_ms = (time.process_time() - cpu_started) / (args.messages + 200) * 1000
    pool = ComposePool(args.workers)
    try:
        pooled, _ = await compose_rate(pool, source, leased)
    finally:
        pool.close()
    signing = sign_rate(privkey)
    print(f"{args.messages} messages of ~{size} bytes, personalized and {algorithm} DKIM-signed; "
          f"{os.cpu_count()} cores")
    print(f"bare {algorithm} signatures, one core:     {signing:10,.0f} /s")
    print(f"in-process (reference, one core):        {single:10,.0f} messages/s   "
          f"({single_cpu_ms:.2f} ms CPU per message)")
    print(f"pool of {args.workers} worker processes:           {pooled:10,.0f} messages/s   "
          f"ratio {pooled / single:.2f} to in-process")


if __name__ == "__main__":
    asyncio.run(main())
