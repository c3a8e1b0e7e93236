"""Property tests: generated values, structures and raw bytes thrown at every API method of one
running master, over a real HTTPS socket.

Whatever is sent, the answer is HTTP 200 with well-formed XML: a result, or a Fault whose code is
one of the documented client faults (400, 404, 406); nothing is logged above WARNING or with a
traceback, and the master still answers afterwards. Sizes are bounded, and calls that store
data get a fresh mailing, so the examples do not pile up data.
"""

from __future__ import annotations

import datetime
import logging
import xmlrpc.client
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudmailing.api.methods import SIGNATURES
from tests.api.test_security import _post
from tests.common.properties import run_property
from tests.helpers import aio_test

CLIENT_FAULTS = {400, 404, 406}
METHODS = sorted(SIGNATURES) + ["system.listMethods", "system.methodHelp", "system.methodSignature", "no_such"]
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# What an XML-RPC client can send. Text is any Unicode XML can carry; Binary any bytes.
xml_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff"),
                   max_size=40).map(lambda s: "".join(c for c in s if c in "\t\n\r" or ord(c) >= 0x20))
scalars = (st.none() | st.booleans() | st.integers(-2**31, 2**31 - 1) | st.floats(allow_nan=True)
           | xml_text | st.binary(max_size=40).map(xmlrpc.client.Binary)
           | st.datetimes(min_value=datetime.datetime(1, 1, 2), max_value=datetime.datetime(9999, 12, 30)))
xmlrpc_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(xml_text, children, max_size=4),
    max_leaves=12)


class Checker:
    """Sends calls to the running master and checks the answers and the log."""

    def __init__(self, port: int, key: str, caplog: pytest.LogCaptureFixture) -> None:
        self.port, self.key, self.caplog = port, key, caplog
        self.calls = 0

    def post(self, body: bytes) -> Any:
        """The answer's value (or the Fault), after checking everything the properties promise."""
        self.calls += 1
        seen = len(self.caplog.records)
        status, answer = _post(self.port, body, self.key)
        assert status == 200, (status, answer[:200])
        try:
            value = xmlrpc.client.loads(answer, use_builtin_types=True)[0][0]
        except xmlrpc.client.Fault as fault:
            assert fault.faultCode in CLIENT_FAULTS, (fault.faultCode, fault.faultString)
            value = fault
        bad = [r for r in self.caplog.records[seen:] if r.exc_info or r.levelno > logging.WARNING]
        assert bad == [], [r.getMessage() for r in bad]
        return value

    def call(self, method: str, *params: Any) -> Any:
        return self.post(xmlrpc.client.dumps(tuple(params), method, allow_none=True).encode("utf-8"))

    def fresh_mailing(self) -> int:
        mailing_id = self.call("create_mailing", "fuzz@example.org", "Fuzz", "Subject", "<p>x</p>", "", "utf-8")
        assert isinstance(mailing_id, int)
        return mailing_id


async def _property(running_master: Any, caplog: pytest.LogCaptureFixture,
                    test: Callable[[Checker], Callable[[], None]]) -> None:
    caplog.set_level(logging.INFO)
    checker = Checker(running_master.master.api_port, running_master.key, caplog)
    await run_property(test(checker))
    assert checker.calls >= FUZZ.max_examples  # the examples did reach the master


async def _still_answers(running_master: Any) -> None:
    assert isinstance(await running_master.proxy().get_mailings_count(), int)


@aio_test
async def test_any_values_to_any_method(running_master, caplog):
    def test(checker: Checker) -> Callable[[], None]:
        @FUZZ
        @given(st.sampled_from(METHODS), st.lists(xmlrpc_values, max_size=5))
        def check(method: str, params: list[Any]) -> None:
            if method in ("delete_all_mailings_for_domain",) and params and isinstance(params[0], str):
                params[0] = "fuzz-" + params[0]  # never the domain of the other examples' mailings
            checker.call(method, *params)
        return check

    await _property(running_master, caplog, test)
    await _still_answers(running_master)


properties = st.dictionaries(
    st.sampled_from(["type", "satellite_group", "mail_from", "sender_name", "tracking_url", "owner_guid",
                     "backup_customized_emails", "scheduled_start", "scheduled_end", "scheduled_duration",
                     "dont_close_if_empty", "subject", "html_content", "plain_content", "charset", "read_tracking",
                     "click_tracking", "dkim", "url_encoding", "testing", "unknown"]),
    xmlrpc_values, max_size=4)
entries = st.lists(st.dictionaries(st.sampled_from(["email", "tracking_id", "attachments", "name", "n"]),
                                   xmlrpc_values, max_size=4)
                   | st.fixed_dictionaries({"email": st.emails() | xml_text}, optional={"data": xmlrpc_values}),
                   max_size=4)
filters = st.dictionaries(st.sampled_from(["id", "domain", "status", "owner_guid", "satellite_group", "mailings",
                                           "owners", "sender_domains", "bad"]), xmlrpc_values, max_size=3)


@aio_test
async def test_structured_calls_on_a_fresh_mailing(running_master, caplog):
    def test(checker: Checker) -> Callable[[], None]:
        @FUZZ
        @given(properties, entries, filters, xmlrpc_values)
        def check(props: dict[str, Any], recipients: list[Any], wanted: dict[str, Any], anything: Any) -> None:
            mailing_id = checker.fresh_mailing()
            checker.call("set_mailing_properties", mailing_id, props)
            answer = checker.call("add_recipients", mailing_id, recipients)
            if not isinstance(answer, xmlrpc.client.Fault):
                assert len(answer) == len(recipients)
                assert all(("id" in a) != ("error" in a) for a in answer)
                ids = [a["id"] for a in answer if "id" in a]
                checker.call("get_recipients_status", ids, {"with_contact_data": True})
            checker.call("list_mailings", wanted)
            checker.call("get_recipients_count", wanted)
            checker.call("get_recipients_status_updated_since", anything, wanted, 10, {})
            checker.call("get_hourly_statistics", {"from_date": anything})
            assert not isinstance(checker.call("list_mailings", {"id": [mailing_id]}), xmlrpc.client.Fault)
            checker.call("delete_mailing", mailing_id)
        return check

    await _property(running_master, caplog, test)
    await _still_answers(running_master)


def _mutated(body: bytes, data: st.DataObject) -> bytes:
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = data.draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
            [b"<", b">", b"&", b"<value>", b"</value>", b"<int>", b"<i8>99999999999999999999999</i8>",
             b"<double>nan</double>", b"<dateTime.iso8601>0001-01-01T00:00:00+01:00</dateTime.iso8601>",
             b"<base64>@@</base64>", b"<struct>", b"<array><data>", b"&#1;", b"&amp;", b"]]>", b"<![CDATA[x"]))
        if action == "insert":
            body = body[:at] + piece + body[at:]
        elif action == "delete":
            body = body[:at] + body[at + len(piece):]
        else:
            body = body[:at] + piece + body[at + len(piece):]
    return body


@aio_test
async def test_raw_and_mutated_bodies(running_master, caplog):
    def test(checker: Checker) -> Callable[[], None]:
        @FUZZ
        @given(st.sampled_from(METHODS), st.lists(xmlrpc_values, max_size=3), st.data())
        def check(method: str, params: list[Any], data: st.DataObject) -> None:
            if method == "delete_all_mailings_for_domain":
                method = "get_mailings_count"
            valid = xmlrpc.client.dumps(tuple(params), method, allow_none=True).encode("utf-8")
            body = data.draw(st.just(valid).map(lambda b: _mutated(b, data)) | st.binary(max_size=200))
            checker.post(body)
        return check

    await _property(running_master, caplog, test)
    await _still_answers(running_master)
