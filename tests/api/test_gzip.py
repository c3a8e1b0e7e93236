"""Large answers go gzipped to clients that accept gzip (xmlrpc.client does), plain to the others."""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import ssl
import xmlrpc.client

import pytest

from cloudmailing.api.resource import accepts_gzip
from tests.helpers import aio_test


def _post(port: int, key: str, body: bytes, accept_encoding: str | None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=ssl._create_unverified_context(),
                                             timeout=30)
    headers = {"Content-Type": "text/xml",
               "Authorization": "Basic " + base64.b64encode(f"admin:{key}".encode()).decode()}
    if accept_encoding is not None:
        headers["Accept-Encoding"] = accept_encoding
    try:
        connection.request("POST", "/CloudMailing", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Encoding", ""), response.read()
    finally:
        connection.close()


@aio_test
async def test_a_large_answer_is_gzipped_only_for_a_client_that_accepts_it(running_master):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "A", "S", "<p>x</p>", "", "utf-8")
    port, key = running_master.master.api_port, running_master.key
    answers = {}
    for number, accept in enumerate(("gzip", None, "gzip;q=0, identity")):
        call = xmlrpc.client.dumps((mailing_id, [{"email": f"u{i}@batch{number}.example.org"} for i in range(1000)]),
                                   "add_recipients").encode()
        status, encoding, body = await asyncio.to_thread(_post, port, key, call, accept)
        assert status == 200
        answers[accept] = (encoding, gzip.decompress(body) if encoding == "gzip" else body)
    assert [encoding for encoding, _ in answers.values()] == ["gzip", "", ""]
    for accept, (_, xml) in answers.items():
        (added,), _ = xmlrpc.client.loads(xml)
        assert len(added) == 1000 and all("id" in entry for entry in added), accept
    small = await asyncio.to_thread(_post, port, key, xmlrpc.client.dumps((), "get_mailings_count").encode(), "gzip")
    assert small[:2] == (200, "")  # a small answer is not worth compressing


@pytest.mark.parametrize(("header", "accepted"), [
    (b"gzip", True), (b"deflate, gzip;q=1.0", True), (b"x-gzip", True), (b"*", True), (b"GZIP", True),
    (b"gzip;q=0", False), (b"gzip; q=0.0, deflate", False), (b"identity", False), (b"", False), (None, False),
])
def test_accept_encoding(header, accepted):
    assert accepts_gzip(header) is accepted
