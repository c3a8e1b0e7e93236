"""What existing clients rely on, checked on real deliveries (master, satellite, DNS and SMTP
servers on loopback): a dkim struct without ``enabled`` signs, and a kept message
(``backup_customized_emails``) is the message the SMTP server received, byte for byte."""

from __future__ import annotations

import asyncio
import base64
import xmlrpc.client
from pathlib import Path

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cloudmailing.satellite.dkim_signer import DkimSigner
from tests.helpers import aio_test, satellite_running
from tests.satellite.dns_server import DnsTestServer
from tests.satellite.smtp_servers import Behaviour, start_servers

MX_ADDRESS = "127.0.0.2"
HTML = "<p>Hé {{ firstname }}, ça coûte 5 € — à bientôt ! 日本語</p>"
PLAIN = "Hé {{ firstname }}, ça coûte 5 € — à bientôt ! 日本語\n"
# A create_mailing_ext message with a header it carries as is, in 8-bit text: 8-bit on the wire
# (its 8-bit attachment goes out in base64).
EXT_MESSAGE = (b"From: Ext <news@sender.test>\r\nSubject: Pi\xc3\xa8ce jointe\r\nX-Note: %s\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
               b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBonjour {{ firstname }}\r\n"
               b"--b1\r\nContent-Type: text/plain; charset=%s\r\nContent-Transfer-Encoding: 8bit\r\n"
               b"Content-Disposition: attachment; filename=\"notes.txt\"\r\n\r\n%s\r\n--b1--\r\n")
UTF8_ATTACHMENT = EXT_MESSAGE % ("Déjà vu — 5 € 日本語".encode(), b"utf-8", "Déjà vu — 5 € 日本語".encode())
LATIN1_ATTACHMENT = EXT_MESSAGE % ("Déjà vu, ça coûte".encode("latin-1"), b"iso-8859-1",
                                   "Déjà vu, ça coûte".encode("latin-1"))


@pytest.fixture
def dns_server():
    with DnsTestServer() as server:
        server.add_mail_domain("ok.test", MX_ADDRESS)
        yield server


def _private_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _txt_lookup(server: DnsTestServer):
    """A dkimpy ``dnsfunc`` asking the test DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [server.host], server.port

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(record.strings) for record in answer)

    return lookup


async def _deliver(running_master, dns_server: DnsTestServer, smtp_port: int, tmp_path: Path,
                   mailing_ids: list[int]) -> None:
    """Start the mailings and run a satellite until they are all FINISHED."""
    api = running_master.proxy()
    await api.cloud_add_satellite("sat-compat", {})
    for mailing_id in mailing_ids:
        await api.start_mailing(mailing_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    async with satellite_running(running_master.master, tmp_path / "satellite", "sat-compat", dns_server, smtp_port):
        while loop.time() < deadline:
            await api.mailing_manager_force_check()
            mailings = await api.list_mailings({"id": mailing_ids})
            if all(m["status"] == "FINISHED" for m in mailings):
                assert all(m["total_sent"] == 1 for m in mailings), mailings
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"mailings not finished: {mailings}")


@aio_test
async def test_dkim_struct_without_enabled_signs_and_enabled_false_does_not(running_master, dns_server, tmp_path):
    servers, smtp_port = start_servers({MX_ADDRESS: Behaviour()})
    api = running_master.proxy()
    privkey = _private_key()
    dns_server.add_txt("s1._domainkey.sender.test", DkimSigner("sender.test", "s1", privkey.encode()).dns_txt_record())
    key_only = {"selector": "s1", "domain": "sender.test", "privkey": privkey}
    ids = {}
    for name, settings in (("signed", key_only), ("unsigned", dict(key_only, enabled=False))):
        ids[name] = await api.create_mailing("news@sender.test", "News", "Hi", "<p>Hi</p>", "", "utf-8")
        await api.set_mailing_properties(ids[name], {"dkim": settings})
        await api.add_recipients(ids[name], [{"email": f"{name}@ok.test"}])
    listed = {m["id"]: m["dkim"] for m in await api.list_mailings({"id": list(ids.values())})}
    assert listed[ids["signed"]] == {"enabled": True, "selector": "s1", "domain": "sender.test"}
    assert listed[ids["unsigned"]]["enabled"] is False
    with pytest.raises(xmlrpc.client.Fault) as raised:  # on by default, so the key is checked
        await api.set_mailing_properties(ids["signed"], {"dkim": dict(key_only, privkey="junk")})
    assert raised.value.faultCode == 406
    try:
        await _deliver(running_master, dns_server, smtp_port, tmp_path, list(ids.values()))
    finally:
        await servers[MX_ADDRESS].stop()

    received = {m.rcpt_to[0]: m.data for m in servers[MX_ADDRESS].messages}
    assert received["signed@ok.test"].startswith(b"DKIM-Signature: ")
    assert dkim.verify(received["signed@ok.test"], dnsfunc=_txt_lookup(dns_server))
    assert b"DKIM-Signature" not in received["unsigned@ok.test"]


@aio_test
async def test_kept_messages_are_the_bytes_the_smtp_server_received(running_master, dns_server, tmp_path):
    servers, smtp_port = start_servers({MX_ADDRESS: Behaviour()})
    api = running_master.proxy()
    privkey = _private_key()
    dkim_on = {"selector": "s1", "domain": "sender.test", "privkey": privkey}
    mailings = {
        "text": await api.create_mailing("news@sender.test", "Zoé", "Été {{ firstname }}", HTML, PLAIN, "utf-8"),
        "utf8": await api.create_mailing_ext(base64.b64encode(UTF8_ATTACHMENT)),
        "latin1": await api.create_mailing_ext(base64.b64encode(LATIN1_ATTACHMENT)),
    }
    ids = {}
    for name, mailing_id in mailings.items():
        await api.set_mailing_properties(mailing_id, {"backup_customized_emails": True, "dkim": dkim_on})
        (added,) = await api.add_recipients(mailing_id, [{"email": f"{name}@ok.test", "firstname": "Zoé"}])
        ids[name] = added["id"]
    try:
        await _deliver(running_master, dns_server, smtp_port, tmp_path, list(mailings.values()))
    finally:
        await servers[MX_ADDRESS].stop()

    received = {m.rcpt_to[0].split("@")[0]: m.data for m in servers[MX_ADDRESS].messages}
    assert received["utf8"].decode("utf-8") and not received["utf8"].isascii()  # 8-bit UTF-8 went out
    assert b"D\xe9j\xe0 vu" in received["latin1"]  # 8-bit, not UTF-8
    statuses = {s["id"]: s for s in await api.get_recipients_status(list(ids.values()),
                                                                     {"with_customized_content": True})}
    page = await api.get_recipients_status_updated_since("", {"status": ["FINISHED"]}, 1000,
                                                         {"with_customized_content": True})
    logged = {r["id"]: r for r in page["recipients"]}
    for name, recipient_id in ids.items():
        sent = received[name]
        assert sent.startswith(b"DKIM-Signature: "), name  # kept after signing
        for kept in (statuses[recipient_id]["customized_content"], logged[recipient_id]["customized_content"]):
            if name == "latin1":  # not UTF-8: no XML string can hold it, so it comes as base64
                assert kept == sent
            else:
                assert isinstance(kept, str) and kept.encode("utf-8") == sent, name


@aio_test
async def test_send_test_recipients_are_delivered_and_reported_but_not_counted(running_master, dns_server,
                                                                              tmp_path):
    servers, smtp_port = start_servers({MX_ADDRESS: Behaviour()})
    api = running_master.proxy()
    mailing_id = await api.create_mailing("news@sender.test", "News", "Test", "<p>Hi</p>", "", "utf-8")
    await api.add_recipients(mailing_id, [{"email": "later@ok.test"}])
    tests = await api.send_test(mailing_id, [{"email": "qa1@ok.test"}, {"email": "qa2@ok.test"}])
    cursor = (await api.get_recipients_status_updated_since("", [], 1000))["cursor"]
    await api.cloud_add_satellite("sat-test", {})
    try:
        async with satellite_running(running_master.master, tmp_path / "satellite", "sat-test", dns_server,
                                     smtp_port):
            for _ in range(200):
                statuses = await api.get_recipients_status([t["id"] for t in tests], {})
                if all(s["status"] == "FINISHED" for s in statuses):
                    break
                await asyncio.sleep(0.1)
            await api.mailing_manager_force_check()
            mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
    finally:
        await servers[MX_ADDRESS].stop()
    # Not in the totals (API.md); the mailing itself is not started: its recipient waits.
    assert (mailing["status"], mailing["total_recipient"], mailing["total_sent"], mailing["total_pending"]) == \
        ("FILLING_RECIPIENTS", 1, 0, 1)
    assert sorted(m.rcpt_to[0] for m in servers[MX_ADDRESS].messages) == ["qa1@ok.test", "qa2@ok.test"]
    page = await api.get_recipients_status_updated_since(cursor, [], 1000)
    assert sorted((r["id"], r["status"]) for r in page["recipients"]) == \
        sorted((t["id"], "FINISHED") for t in tests)
