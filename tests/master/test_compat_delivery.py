"""What existing clients rely on, checked on real deliveries (master, satellite, DNS and SMTP
servers on loopback): a dkim struct without ``enabled`` signs."""

from __future__ import annotations

import asyncio
import random
import xmlrpc.client
from pathlib import Path

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cloudmailing.config.settings import SatelliteConfig
from cloudmailing.satellite.daemon import SatelliteDaemon
from cloudmailing.satellite.dkim_signer import DkimSigner
from tests.helpers import aio_test
from tests.satellite.dns_server import DnsTestServer
from tests.satellite.smtp_servers import Behaviour, start_servers

MX_ADDRESS = "127.0.0.2"


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
    from twisted.internet import reactor

    config = SatelliteConfig(master_port=running_master.master.satellite_port, serial="sat-compat",
                             secret="s3cret", helo_hostname="sat.test", dns_servers=dns_server.nameserver,
                             smtp_port=smtp_port, connect_timeout=5, reply_timeout=5, compose_workers=1)
    satellite = SatelliteDaemon(config, tmp_path / "satellite", reactor, random.Random(1))
    running = asyncio.ensure_future(satellite.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    try:
        while loop.time() < deadline:
            await api.mailing_manager_force_check()
            mailings = await api.list_mailings({"id": mailing_ids})
            if all(m["status"] == "FINISHED" for m in mailings):
                assert all(m["total_sent"] == 1 for m in mailings), mailings
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"mailings not finished: {mailings}")
    finally:
        await satellite.stop()
        running.cancel()


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
