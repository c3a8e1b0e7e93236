"""Hostile or absurd values over a real HTTPS socket: every answer is well-formed XML, every client
mistake a 4xx fault naming the field, and nothing is logged as a traceback."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import xmlrpc.client
from typing import Any

import pytest

from tests.api.test_security import CALL, fault_of, post
from tests.helpers import aio_test, running_mailing
from tests.master.test_link_server import _registered_link

CONTROL_REPLY = "550 5.1.1 no such user\x0b\x1b[31m\x01 here"


def _call(method: str, *params: Any) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=False).encode()


async def _fault_code(api_call: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(xmlrpc.client.Fault) as raised:
        await api_call(*args)
    return raised.value.faultCode, raised.value.faultString


@pytest.fixture
def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Log records above INFO or carrying a traceback, filled while the test runs."""
    caplog.set_level(logging.INFO)
    found: list[logging.LogRecord] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno > logging.WARNING or record.exc_info or "Traceback" in record.getMessage():
                found.append(record)

    handler = _Catch()
    logging.getLogger().addHandler(handler)
    yield found
    logging.getLogger().removeHandler(handler)


# -- 1. answers are XML whatever was stored ---------------------------------------------------

@aio_test
async def test_a_stored_reply_with_control_characters_is_answered_as_xml(running_master):
    api = running_master.proxy()
    await running_mailing(api, 1)
    link = await _registered_link(running_master, "sat-x")
    leased = (await link.call("lease", max_recipients=5))["recipients"]
    await link.call("report", outcomes=[{"recipient_id": leased[0]["id"], "status": "ERROR", "reply_code": 550,
                                         "reply_text": CONTROL_REPLY}])
    link.close()
    statuses = await api.get_recipients_status([leased[0]["id"]], {})
    assert statuses[0]["reply_text"] == CONTROL_REPLY.replace("\x0b", "\ufffd").replace(
        "\x1b", "\ufffd").replace("\x01", "\ufffd")
    since = await api.get_recipients_status_updated_since("", {}, 10)
    assert "\ufffd" in since["recipients"][-1]["reply_text"]


@aio_test
async def test_a_stored_sender_name_with_control_characters_is_answered_as_xml(running_master, database):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "Name", "Subject", "<p>x</p>", "", "utf-8")
    # As stored by an older version, before the API refused them.
    await database.mailings.update_one({"_id": mailing_id}, {"$set": {"sender_name": "A\x01B", "subject": "\x1bS"}})
    listed = (await api.list_mailings({"id": [mailing_id]}))[0]
    assert (listed["sender_name"], listed["subject"]) == ("A\ufffdB", "\ufffdS")


@aio_test
async def test_control_characters_in_header_fields_are_refused(running_master):
    api = running_master.proxy()
    binary = xmlrpc.client.Binary  # XML cannot carry most control characters: a Binary can
    for sender_name, subject in ((binary(b"A\x01B"), "S"), (binary(b"A\x1bB"), "S"), ("N", "S\x7f"),
                                 ("N", xmlrpc.client.Binary(b"S\x0bS")), ("N", "S\x85")):
        code, message = await _fault_code(api.create_mailing, "a@example.org", sender_name, subject, "h", "", "utf-8")
        assert code == 406 and ("sender_name" in message or "subject" in message)
    mailing_id = await api.create_mailing("a@example.org", "Tab\tis fine", "S", "<p>x</p>", "", "utf-8")
    for properties in ({"sender_name": binary(b"x\x01")}, {"subject": binary(b"x\x02"), "charset": "utf-8"}):
        assert (await _fault_code(api.set_mailing_properties, mailing_id, properties))[0] == 406


# -- 2. request size ------------------------------------------------------------------------

def _raw_https(port: int, head: bytes, chunks: list[bytes], wait_seconds: float = 10.0) -> tuple[bytes, bool]:
    """Send ``head`` then each chunk over a fresh TLS socket: (what the server said until it closed,
    whether every chunk could be sent)."""
    context = ssl._create_unverified_context()
    sent_all = True
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_seconds) as raw:
        with context.wrap_socket(raw) as sock:
            sock.sendall(head)
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
            except OSError:
                sent_all = False  # the server closed (or stopped reading) while we were still sending
            try:
                while data := sock.recv(65536):
                    answer += data
            except (OSError, ssl.SSLError):
                pass  # a reset: the server closed with our unread data in its buffers
    return answer, sent_all


def _auth_header(key: str) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"admin:{key}".encode()) + b"\r\n"


@aio_test
async def test_a_chunked_body_over_the_limit_is_refused_and_not_executed(running_master):
    limit = 64 * 1024
    running_master.master.api_site.requestFactory.max_body = limit
    body = _call("create_mailing", "a@example.org", "N", "S", "<p>" + "x" * (2 * limit) + "</p>", "", "utf-8")
    head = (b"POST /CloudMailing HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n" + _auth_header(running_master.key)
            + b"Transfer-Encoding: chunked\r\n\r\n")
    chunks = [b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192]) for i in range(0, len(body), 8192)]
    answer, _ = await asyncio.to_thread(_raw_https, running_master.master.api_port, head, chunks + [b"0\r\n\r\n"])
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413")  # empty: reset before we read it
    assert b"200 OK" not in answer
    await asyncio.sleep(0.3)
    assert await running_master.proxy().get_mailings_count() == 0


@aio_test
async def test_an_oversized_content_length_is_one_info_line(running_master, tracebacks, caplog):
    limit = running_master.master.settings.api.max_request_bytes
    head = (b"POST /CloudMailing HTTP/1.1\r\nHost: x\r\n" + _auth_header(running_master.key)
            + b"Content-Length: %d\r\n\r\n" % (limit + 1))
    answer, _ = await asyncio.to_thread(_raw_https, running_master.master.api_port, head, [])
    assert answer.startswith(b"HTTP/1.1 413")
    await asyncio.sleep(0.2)
    assert tracebacks == []
    assert [r.levelname for r in caplog.records if "refused request" in r.getMessage()] == ["INFO"]


@aio_test
async def test_a_large_body_is_not_read_before_the_key_is_checked(running_master):
    size = 30 * 1024 * 1024  # under the 32 MiB limit, and far more than the kernel buffers hold
    head = (b"POST /CloudMailing HTTP/1.1\r\nHost: x\r\n" + _auth_header("cm_bad_bad")
            + b"Content-Length: %d\r\n\r\n" % size)
    answer, sent_all = await asyncio.to_thread(_raw_https, running_master.master.api_port, head,
                                               [b"x" * 65536] * (size // 65536))
    assert not sent_all  # the server stopped reading, answered and closed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 401")
    # A good key gets a large body read in full.
    api = running_master.proxy()
    assert await api.create_mailing("a@example.org", "N", "S", "<p>" + "y" * 4_000_000 + "</p>", "", "utf-8") > 0


# -- 4. client mistakes are 4xx, not 500 ------------------------------------------------------

MARK = 987654321  # replaced by an integer beyond 64 bits in the XML sent


def _with_huge(method: str, *params: Any) -> bytes:
    huge = str(2**70).encode()
    return _call(method, *params).replace(b"<int>987654321</int>", b"<int>" + huge + b"</int>").replace(
        b"<int>-987654321</int>", b"<int>-" + huge + b"</int>")


def _datetime_call(value: str) -> bytes:
    return (b"<?xml version='1.0'?><methodCall><methodName>set_mailing_properties</methodName><params>"
            b"<param><value><int>1</int></value></param><param><value><struct><member><name>scheduled_start"
            b"</name><value><dateTime.iso8601>" + value.encode() + b"</dateTime.iso8601></value></member>"
            b"</struct></value></param></params></methodCall>")


@aio_test
async def test_edge_dates_huge_integers_and_odd_encodings_are_client_mistakes(running_master, tracebacks):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "N", "S", "<p>x</p>", "", "utf-8")
    for value in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00"):
        status, answer = await post(running_master, _datetime_call(value))
        fault = fault_of(answer)
        assert status == 200 and fault.faultCode == 400 and "out of range" in fault.faultString
        code, message = await _fault_code(api.set_mailing_properties, mailing_id, {"scheduled_end": value})
        assert code == 406 and "scheduled_end" in message
    # Integers beyond 64 bits: xmlrpc.client refuses to send them, raw XML does.
    for method, params, field in (("list_mailings", ({"id": [MARK]},), "filters.id"),
                                  ("delete_mailing", (MARK,), "mailing_id"),
                                  ("cloud_delete_satellite", (-MARK,), "id"),
                                  ("get_recipients_count", ({"mailings": [MARK]},), "filters.mailings")):
        fault = fault_of((await post(running_master, _with_huge(method, *params)))[1])
        assert fault.faultCode == 406 and field in fault.faultString
    entries = [{"email": "a@example.org", "n": MARK}, {"email": "b@example.org", "n": [1, {"m": -MARK}]}]
    answer = xmlrpc.client.loads((await post(running_master, _with_huge("add_recipients", mailing_id, entries)))[1])
    assert ["integer out of range" in entry.get("error", "") for entry in answer[0][0]] == [True, True]
    unknown = b'<?xml version="1.0" encoding="x-unknown"?>' + CALL.partition(b"?>")[2]
    fault = fault_of((await post(running_master, unknown))[1])
    assert fault.faultCode == 400 and "encoding" in fault.faultString
    big = "d" * (31 * 1024 * 1024)
    for call, field in ((api.list_mailings, "filters"), (api.get_mailings_count, "filters"),
                        (api.delete_all_mailings_for_domain, "domain")):
        code, message = await _fault_code(call, big)
        assert code == 406 and message.startswith(field) and len(message) < 200
    code, message = await _fault_code(api.get_recipients_count, {"sender_domains": [big]})
    assert code == 406 and "filters.sender_domains" in message
    assert tracebacks == []


# -- 5. NaN, infinity, and what the database cannot store --------------------------------

@aio_test
async def test_nan_infinity_and_nested_lists_are_refused_per_entry(running_master, tracebacks):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "N", "S", "<p>x</p>", "", "utf-8")
    answer = await api.add_recipients(mailing_id, [
        {"email": "nan@example.org", "score": float("nan")},
        {"email": "ok@example.org", "score": 1.5},
        {"email": "inf@example.org", "deep": {"list": [float("-inf")]}},
        {"email": "nested@example.org", "grid": [[1, 2], [3]]},  # found by tests/api/test_fuzz.py
    ])
    assert ["error" in a for a in answer] == [True, False, True, True]
    assert "score" in answer[0]["error"] and "deep.list" in answer[2]["error"] and "grid" in answer[3]["error"]
    assert await api.get_recipients_count({"mailings": [mailing_id]}) == 1  # and the database is still there
    assert tracebacks == []


# -- 6. charsets ----------------------------------------------------------------------------

@aio_test
async def test_only_ascii_compatible_charsets_are_accepted(running_master):
    api = running_master.proxy()
    for charset in ("utf-16", "UTF-32", "utf_16_le", "utf-7", "rot13", "hex", "x-no-such"):
        code, message = await _fault_code(api.create_mailing, "a@example.org", "N", "S", "h", "", charset)
        assert code == 406 and "charset" in message
    mailing_id = await api.create_mailing("a@example.org", "N", "S", "<p>x</p>", "", "ISO-8859-15")
    assert (await api.list_mailings({"id": [mailing_id]}))[0]["id"] == mailing_id
    code, _ = await _fault_code(api.set_mailing_properties, mailing_id, {"subject": "S", "charset": "utf-16"})
    assert code == 406
    for charset in ("utf-8", "windows-1252", "iso-2022-jp", "shift_jis"):
        assert await api.set_mailing_properties(mailing_id, {"subject": "S", "charset": charset}) == 0


@aio_test
async def test_forged_cursors_are_refused(running_master, tracebacks):
    api = running_master.proxy()
    for cursor in ("c1:" + "9" * 5000, "c1:" + "9" * 30, "c1:\u00b2", "c1:-1", "c1:"):
        code, message = await _fault_code(api.get_recipients_status_updated_since, cursor, {}, 10)
        assert code == 406 and message.startswith("cursor")
    assert (await api.get_recipients_status_updated_since("c1:12", {}, 10))["recipients"] == []
    assert tracebacks == []
