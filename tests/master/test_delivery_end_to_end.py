"""A mailing from start_mailing to a final status for every recipient: master, satellite, a
DNS server and SMTP servers on 127.0.0.x, all real, all on loopback."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cloudmailing.config.settings import DispatchConfig
from cloudmailing.satellite.dkim_signer import DkimSigner
from tests.helpers import aio_test, satellite_running
from tests.satellite.dns_server import DnsTestServer
from tests.satellite.smtp_servers import Behaviour, start_servers

DOMAINS = {"ok.test": ("127.0.0.2", Behaviour()), "reject.test": ("127.0.0.3", Behaviour(rcpt_code=550)),
           "later.test": ("127.0.0.4", Behaviour(tempfail_first=True)),
           "hang.test": ("127.0.0.5", Behaviour(hang_at="mail")), "drop.test": ("127.0.0.6", Behaviour(drop_at="mail"))}
# hang.test and drop.test soft-bounce on every try until the retry age runs out: TIMEOUT.
EXPECTED = {"ok.test": "FINISHED", "reject.test": "ERROR", "later.test": "FINISHED", "nomail.test": "ERROR",
            "hang.test": "TIMEOUT", "drop.test": "TIMEOUT"}


@pytest.fixture
def settings(settings):
    # Soft bounces are retried after 1 s here, not 5 minutes, and given up after 3.6 s, not 48 h.
    from dataclasses import replace
    return replace(settings, dispatch=DispatchConfig(retry_initial_seconds=1, retry_max_age_hours=0.001,
                                                     lease_seconds=60))


@pytest.fixture
def dns():
    with DnsTestServer() as server:
        for domain, (address, _) in DOMAINS.items():
            server.add_mail_domain(domain, address)
        server.add_null_mx("nomail.test")
        yield server


def _private_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


async def _wait_finished(api, mailing_id: int, seconds: float = 90.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        await api.mailing_manager_force_check()
        mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
        if mailing["status"] == "FINISHED":
            return mailing
        await asyncio.sleep(0.3)
    raise AssertionError(f"mailing not finished: {mailing}")


@aio_test
async def test_a_mailing_runs_to_finished_with_the_right_status_for_everyone(running_master, dns, tmp_path: Path):

    servers, smtp_port = start_servers({address: behaviour for address, behaviour in DOMAINS.values()})
    api = running_master.proxy()
    privkey = _private_key()
    mailing_id = await api.create_mailing("news@sender.test", "Société Test", "Bonjour {{ firstname }}",
                                          "<p>Hello {{ firstname }}, {{ 100 // n }} points</p>", "", "utf-8")
    await api.set_mailing_properties(mailing_id, {
        "tracking_url": "https://t.sender.test", "backup_customized_emails": True,
        "dkim": {"enabled": True, "selector": "s1", "domain": "sender.test", "privkey": privkey}})
    entries = [{"email": f"user{i}@{domain}", "firstname": f"Zoé{i}", "n": 1 + i}
               for i in range(6) for domain in EXPECTED]
    entries.append({"email": "broken@ok.test", "firstname": "Broken", "n": 0})  # 100 // 0 fails
    answer = await api.add_recipients(mailing_id, entries)
    ids = {a["email"]: a["id"] for a in answer}
    await api.cloud_add_satellite("sat-e2e", {})
    assert await api.start_mailing(mailing_id) == "READY"

    try:
        async with satellite_running(running_master.master, tmp_path / "satellite", "sat-e2e", dns, smtp_port,
                                     lease_size=20, reply_timeout=1, compose_workers=2):
            mailing = await _wait_finished(api, mailing_id)
    finally:
        for server in servers.values():
            await server.stop()

    assert mailing["total_recipient"] == len(entries)
    assert mailing["total_sent"] == 12 and mailing["total_error"] == 25 and mailing["total_pending"] == 0
    statuses = await api.get_recipients_status(list(ids.values()), {})
    by_id = {s["id"]: s for s in statuses}
    for address, recipient_id in ids.items():
        expected = "GENERAL_ERROR" if address == "broken@ok.test" else EXPECTED[address.split("@")[1]]
        assert by_id[recipient_id]["status"] == expected, address
        assert by_id[recipient_id]["cloud_client"] == "sat-e2e"
    later = [by_id[ids[f"user{i}@later.test"]] for i in range(6)]
    assert all(s["try_count"] == 2 for s in later)  # 451 first, accepted on the retry
    assert by_id[ids["user0@reject.test"]]["reply_code"] == 550
    assert "division" in by_id[ids["broken@ok.test"]]["reply_text"].lower()

    # Every status change reached the cursor once (the 451s as WARNING, then their final status).
    changes, cursor = [], ""
    while True:
        page = await api.get_recipients_status_updated_since(cursor, {"mailings": [mailing_id]}, 7)
        cursor = page["cursor"]
        if not page["recipients"]:
            break
        changes.extend((r["id"], r["status"]) for r in page["recipients"])
    retried = sum(by_id[ids[f"user{i}@{d}"]]["try_count"] - 1 for i in range(6) for d in ("later.test",
                                                                                           "hang.test", "drop.test"))
    assert len(changes) == len(entries) + retried  # every change once: first tries, then each retry
    timed_out = [by_id[ids[f"user{i}@hang.test"]] for i in range(6)]
    assert all(s["try_count"] >= 2 and s["reply_text"] for s in timed_out)

    txt = DkimSigner("sender.test", "s1", privkey.encode()).dns_txt_record().encode()
    accepted = servers["127.0.0.2"].messages + servers["127.0.0.4"].messages
    assert len(accepted) == 12
    for received in accepted:
        message = email.message_from_bytes(received.data, policy=email.policy.default)
        index = int(received.rcpt_to[0].split("@")[0].removeprefix("user"))
        assert message["Subject"] == f"Bonjour Zoé{index}"
        assert f"Hello Zoé{index}, {100 // (1 + index)} points" in message.get_body(("html",)).get_content()
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert received.mail_from.startswith("bounce-") and received.mail_from.endswith("@sender.test")
        assert dkim.verify(received.data, dnsfunc=lambda name, timeout=5: txt)
    await _check_customized_content(api, ids["user1@ok.test"], servers["127.0.0.2"].messages)
    hourly = await api.get_hourly_statistics({"senders": ["sat-e2e"]})
    assert sum(h["sent"] for h in hourly) == 12 and sum(h["tries"] for h in hourly) == len(entries) + retried


async def _check_customized_content(api, recipient_id: str, received) -> None:
    """backup_customized_emails: the master kept the message as sent, until asked to drop it."""
    (sent,) = [m.data for m in received if m.rcpt_to == ["user1@ok.test"]]
    (status,) = await api.get_recipients_status([recipient_id], {"with_customized_content": True})
    assert status["customized_content"].encode() == sent  # byte for byte, CR LF included
    page = await api.get_recipients_status_updated_since("", {"status": ["FINISHED"]}, 1000,
                                                         {"with_customized_content": True,
                                                          "delete_customized_content": True})
    (logged,) = [r for r in page["recipients"] if r["id"] == recipient_id]
    assert logged["customized_content"] == status["customized_content"]
    (status,) = await api.get_recipients_status([recipient_id], {"with_customized_content": True})
    assert status["customized_content"] == ""


@aio_test
async def test_a_lease_of_big_messages_is_composed_within_the_byte_bound(running_master, dns, tmp_path: Path):

    servers, smtp_port = start_servers({"127.0.0.2": Behaviour()})
    api = running_master.proxy()
    body = "Dear {{ firstname }}\n" + ("0123456789" * 7 + "\n") * 8000  # ~570 KB per message
    mailing_id = await api.create_mailing("news@sender.test", "S", "Big {{ firstname }}", "", body, "utf-8")
    await api.add_recipients(mailing_id, [{"email": f"user{i}@ok.test", "firstname": f"F{i}"} for i in range(40)])
    await api.cloud_add_satellite("sat-big", {})
    assert await api.start_mailing(mailing_id) == "READY"
    bound = 2 * 1024 * 1024
    try:
        async with satellite_running(running_master.master, tmp_path / "satellite", "sat-big", dns, smtp_port,
                                     lease_size=40, compose_workers=2, max_composed_bytes=bound) as satellite:
            mailing = await _wait_finished(api, mailing_id)
    finally:
        for server in servers.values():
            await server.stop()
    received = servers["127.0.0.2"].messages
    assert mailing["total_sent"] == 40 and len(received) == 40
    largest = max(len(message.data) for message in received)
    assert largest > 500_000
    # The whole lease (40 × ~570 KB) was never composed at once: at most the bound and one message.
    assert 0 < satellite.ahead.peak_bytes <= bound + largest
    assert satellite.ahead.composed_bytes == 0


@aio_test
async def test_an_idle_satellite_is_woken_when_a_mailing_starts_and_when_test_recipients_come(
        running_master, dns, tmp_path: Path, monkeypatch):
    from cloudmailing.satellite import daemon

    monkeypatch.setattr(daemon, "IDLE_POLL", 120.0)  # only a wake from the master can start it in time
    servers, smtp_port = start_servers({"127.0.0.2": Behaviour()})
    api = running_master.proxy()
    mailing_id = await api.create_mailing("news@sender.test", "S", "Hi {{ firstname }}", "", "Hello", "utf-8")
    await api.add_recipients(mailing_id, [{"email": f"user{i}@ok.test", "firstname": f"F{i}"} for i in range(5)])
    await api.cloud_add_satellite("sat-idle", {})
    loop = asyncio.get_running_loop()
    try:
        async with satellite_running(running_master.master, tmp_path / "satellite", "sat-idle", dns, smtp_port):
            while running_master.master.link_factory.sessions.get("sat-idle") is None:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # it asked for a lease, got none: idle now
            await api.send_test(mailing_id, [{"email": "qa@ok.test", "firstname": "QA"}])
            started = loop.time()
            while not any(m.rcpt_to == ["qa@ok.test"] for m in servers["127.0.0.2"].messages):
                assert loop.time() - started < 15, "the test recipient waited for the idle poll"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            assert await api.start_mailing(mailing_id) == "READY"
            await api.mailing_manager_force_check()  # RUNNING: the satellites are told
            started = loop.time()
            while len(servers["127.0.0.2"].messages) < 6:
                assert loop.time() - started < 15, "the started mailing waited for the idle poll"
                await asyncio.sleep(0.05)
    finally:
        for server in servers.values():
            await server.stop()
