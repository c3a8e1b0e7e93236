"""Calls a review session found answered with an internal error (500), a wrong fault, or a
mailing left stuck: each now gets the client's fault, or the behaviour docs/api.md states."""

from __future__ import annotations

import base64
import logging
import xmlrpc.client

import pytest

from tests.api.test_security import fault_of, post
from tests.helpers import aio_test


@pytest.fixture
def tracebacks(caplog):
    """Log records above WARNING or with a traceback, while the test runs."""
    caplog.set_level(logging.INFO)
    found = []

    class _Catch(logging.Handler):
        def emit(self, record):
            if record.levelno > logging.WARNING or record.exc_info:
                found.append(record)

    handler = _Catch()
    logging.getLogger().addHandler(handler)
    yield found
    logging.getLogger().removeHandler(handler)


FAULT_IN_CALL = (b"<?xml version='1.0'?><methodCall><methodName>get_mailings_count</methodName>"
                 b"<fault><value><struct>"
                 b"<member><name>faultCode</name><value><int>1</int></value></member>"
                 b"<member><name>faultString</name><value><string>x</string></value></member>"
                 b"</struct></value></fault></methodCall>")


@aio_test
async def test_a_fault_element_inside_a_method_call_is_fault_400(running_master, tracebacks):
    status, answer = await post(running_master, FAULT_IN_CALL)
    assert status == 200 and fault_of(answer).faultCode == 400
    assert tracebacks == []


def _struct_with_nameless_member(method: str, before: bytes = b"") -> bytes:
    # <member> without <name>: the standard unmarshaller pairs the values up, an int as the key.
    return (b"<?xml version='1.0'?><methodCall><methodName>" + method.encode() + b"</methodName><params>"
            + before + b"<param><value><struct>"
            b"<member><value><int>5</int></value></member><member><value><int>6</int></value></member>"
            b"</struct></value></param></params></methodCall>")


@aio_test
async def test_a_struct_member_without_a_name_is_fault_400_for_every_method(running_master, tracebacks):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "N", "S", "<p>x</p>", "", "utf-8")
    one = b"<param><value><int>%d</int></value></param>" % mailing_id
    codes = {}
    for method, before in (("list_mailings", b""), ("get_mailings_count", b""), ("get_recipients_count", b""),
                           ("set_mailing_properties", one),
                           ("cloud_add_satellite", b"<param><value><string>sat-k</string></value></param>")):
        _, answer = await post(running_master, _struct_with_nameless_member(method, before))
        codes[method] = fault_of(answer).faultCode
    assert set(codes.values()) == {400}, codes
    assert tracebacks == []


@aio_test
async def test_create_mailing_ext_with_an_unreadable_from_header_is_fault_406(running_master, tracebacks):
    api = running_master.proxy()
    codes = {}
    for header in (b"From: <", b"From: a@[", b"From: b.:q", b"From: ,<\"", b"From: a@[\t"):
        raw = header + b"\r\nSubject: s\r\n\r\nbody\r\n"
        with pytest.raises(xmlrpc.client.Fault) as refused:
            await api.create_mailing_ext(base64.b64encode(raw).decode())
        codes[header] = refused.value.faultCode
    assert set(codes.values()) == {406}, codes
    assert tracebacks == []


@aio_test
async def test_a_duration_past_a_century_is_refused_and_a_mailing_always_finishes(running_master, tracebacks):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "N", "S", "<p>x</p>", "", "utf-8")
    with pytest.raises(xmlrpc.client.Fault, match="scheduled_duration: must be at most") as refused:
        await api.set_mailing_properties(mailing_id, {"scheduled_duration": str(10**10)})
    assert refused.value.faultCode == 406
    assert await api.set_mailing_properties(mailing_id, {"scheduled_duration": 100 * 365 * 24 * 60}) == 0
    await api.start_mailing(mailing_id)
    await api.mailing_manager_force_check()
    assert (await api.list_mailings({"id": [mailing_id]}))[0]["status"] == "FINISHED"  # empty: at once
    assert tracebacks == []


@aio_test
async def test_a_nil_charset_means_not_given(running_master):
    api = running_master.proxy(allow_none=True)
    mailing_id = await api.create_mailing("a@example.org", "N", "S", "<p>x</p>", "", None)
    assert mailing_id > 0  # created, with utf-8 (what an empty charset means)


@aio_test
async def test_the_introspection_methods_listed_are_described_too(running_master):
    api = running_master.proxy()
    for name in ("system.listMethods", "system.methodHelp", "system.methodSignature"):
        assert name in await api.system.listMethods()
        assert await api.system.methodHelp(name)
        assert await api.system.methodSignature(name)


@aio_test
async def test_a_database_away_during_the_key_check_is_the_retry_fault(running_master, monkeypatch, tracebacks):
    from pymongo.errors import AutoReconnect

    from cloudmailing.api.auth import Authenticator

    async def away(self, key):
        raise AutoReconnect("connection refused")

    monkeypatch.setattr(Authenticator, "_check_key", away)
    status, answer = await post(running_master, FAULT_IN_CALL, key="cm_0123456789ab_not-yet-checked")
    fault = fault_of(answer)
    assert (status, fault.faultCode, fault.faultString) == (200, 500, "database unavailable, please retry")
    assert not [record for record in tracebacks if record.exc_info]  # a log line, no traceback


@aio_test
async def test_create_mailing_ext_holds_its_sender_name_and_subject_to_create_mailings_bounds(running_master):
    api = running_master.proxy()
    for header, name in ((b"From: " + b"N" * 201 + b" <a@example.org>", "sender_name"),
                         (b"From: a@example.org\r\nSubject: " + b"s" * 1001, "subject")):
        raw = header + b"\r\n\r\nbody\r\n"
        with pytest.raises(xmlrpc.client.Fault, match=name) as refused:
            await api.create_mailing_ext(base64.b64encode(raw).decode())
        assert refused.value.faultCode == 406


@aio_test
async def test_id_and_filter_lists_past_ten_thousand_items_are_fault_400(running_master, tracebacks):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("a@example.org", "N", "S", "<p>x</p>", "", "utf-8")
    [added] = await api.add_recipients(mailing_id, [{"email": "r@example.com", "tracking_id": "known"}])
    ten_thousand = ["known"] + [f"unknown-{i}" for i in range(9_999)]
    assert [entry["id"] for entry in await api.get_recipients_status(ten_thousand)] == [added["id"]]
    assert await api.reset_recipients_status(ten_thousand) == 0
    too_many = [*ten_thousand, "one-more"]
    calls = {"get_recipients_status": lambda: api.get_recipients_status(too_many),
             "get_recipients_status (a comma-separated string)": lambda: api.get_recipients_status(",".join(too_many)),
             "reset_recipients_status": lambda: api.reset_recipients_status(too_many),
             "get_recipients_count": lambda: api.get_recipients_count({"owners": too_many}),
             "list_mailings": lambda: api.list_mailings({"id": list(range(1, 10_002))})}
    for call, make in calls.items():
        with pytest.raises(xmlrpc.client.Fault, match=r"too many items in one call: 10001 > 10000") as refused:
            await make()
        assert refused.value.faultCode == 400, call
    assert tracebacks == []
