"""Authentication, throttling and hostile requests, over a real HTTPS socket."""

from __future__ import annotations

import asyncio
import base64
import http.client
import ssl
import time
import xmlrpc.client

import pytest

from cloudmailing.services.api_keys import ApiKeyService
from tests.helpers import aio_test


def _post(port: int, body: bytes, key: str | None, path: str = "/CloudMailing",
          extra_headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    context = ssl._create_unverified_context()
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    headers = {"Content-Type": "text/xml"}
    if key is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"admin:{key}".encode()).decode()
    headers.update(extra_headers or {})
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    except (ConnectionError, http.client.HTTPException):
        return 0, b""
    finally:
        connection.close()


async def post(master, body: bytes, key: str | None = "default", **kwargs) -> tuple[int, bytes]:
    key = master.key if key == "default" else key
    return await asyncio.to_thread(_post, master.master.api_port, body, key, **kwargs)


def fault_of(body: bytes) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as raised:
        xmlrpc.client.loads(body)
    return raised.value


CALL = xmlrpc.client.dumps((), "get_mailings_count").encode()


@aio_test
async def test_missing_or_wrong_key_is_401_with_a_fault(running_master):
    for key in (None, "wrong", running_master.key + "x", "cm_deadbeef_secret"):
        status, body = await post(running_master, CALL, key=key)
        assert status == 401
        assert fault_of(body).faultCode == 401
    status, body = await post(running_master, CALL)
    assert status == 200 and xmlrpc.client.loads(body)[0] == (0,)


@aio_test
async def test_rpc2_path_and_unknown_path(running_master):
    assert (await post(running_master, CALL, path="/RPC2"))[0] == 200
    assert (await post(running_master, CALL, path="/other"))[0] == 404


@aio_test
async def test_revoked_key_stops_working(running_master, database):
    service = ApiKeyService(database, running_master.master.reactor)
    key = await service.create("temp")
    assert await service.revoke("temp") == 1
    assert (await post(running_master, CALL, key=key))[0] == 401


@aio_test
async def test_repeated_failures_are_slowed_down(running_master):
    timings = []
    for _ in range(7):
        started = time.monotonic()
        status, _ = await post(running_master, CALL, key="cm_bad_bad")
        timings.append(time.monotonic() - started)
        assert status == 401
    # Five free failures, then 1 s and 2 s of delay.
    assert max(timings[:5]) < 0.9
    assert timings[5] >= 0.95 and timings[6] >= 1.9


@aio_test
async def test_entity_expansion_and_external_entities_are_refused(running_master):
    laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
              b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
              b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
              b'<methodCall><methodName>create_mailing_ext</methodName><params><param><value>'
              b'<string>&lol3;</string></value></param></params></methodCall>')
    external = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY ext SYSTEM "file:///etc/passwd">]>'
                b'<methodCall><methodName>create_mailing_ext</methodName><params><param><value>'
                b'<string>&ext;</string></value></param></params></methodCall>')
    for body in (laughs, external):
        status, answer = await post(running_master, body)
        assert status == 200
        fault = fault_of(answer)
        assert fault.faultCode == 400 and "DOCTYPE" in fault.faultString


@aio_test
async def test_absurd_nesting_and_garbage_are_refused_without_traceback(running_master):
    deep = (b"<methodCall><methodName>list_mailings</methodName><params><param>"
            + b"<value><array><data>" * 500 + b"</data></array></value>" * 500 + b"</param></params></methodCall>")
    for body in (deep, b"<methodCall><methodName>x</methodName><params>", b"\x00\xff garbage",
                 b"<methodCall><params/></methodCall>"):
        status, answer = await post(running_master, body)
        assert status == 200
        fault = fault_of(answer)
        assert fault.faultCode == 400 and "Traceback" not in fault.faultString
    assert (await post(running_master, CALL))[0] == 200  # and the master still answers


@aio_test
async def test_oversized_bodies_are_refused_before_reading(running_master):
    limit = running_master.master.settings.api.max_request_bytes
    status, _ = await post(running_master, b"x" * 1024, extra_headers={"Content-Length": str(limit + 1)})
    assert status in (413, 0)  # 413, or the connection closed on us while we were still sending
    assert (await post(running_master, CALL))[0] == 200


@aio_test
async def test_liberal_dates_and_binary_strings_are_accepted(running_master):
    api = running_master.proxy()
    mailing_id = await api.create_mailing(xmlrpc.client.Binary(b"news@example.org"), "N", "S", "<p>x</p>", "", "utf-8")
    body = (f"<?xml version='1.0'?><methodCall><methodName>set_mailing_properties</methodName><params>"
            f"<param><value><int>{mailing_id}</int></value></param><param><value><struct><member>"
            f"<name>scheduled_start</name><value><dateTime.iso8601>2030-01-02T03:04:05Z</dateTime.iso8601>"
            f"</value></member></struct></value></param></params></methodCall>").encode()
    status, answer = await post(running_master, body)
    assert status == 200 and xmlrpc.client.loads(answer)[0] == (0,)
    mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
    assert mailing["scheduled_start"].isoformat() == "2030-01-02T03:04:05"
