"""The satellite link against a hostile peer, over real TLS: oversized and malformed frames,
silent connections. The link's timeouts run on a fake clock injected into the master's factory."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task

from cloudmailing.common.link import LinkError, LinkProtocol
from tests.common.properties import on_loop, run_property
from tests.helpers import aio_test
from tests.master.test_link_server import _connect, _registered_link


class RecordingLink(LinkProtocol):
    """A client end that also keeps every frame the master sent."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        super().__init__(reactor)
        self.received: list[Any] = []

    def frameReceived(self, data: bytes) -> None:
        self.received.append(json.loads(data))
        super().frameReceived(data)


async def _recording(master: Any) -> RecordingLink:
    from twisted.internet import reactor
    from twisted.internet import ssl as tssl
    from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

    from cloudmailing.common.aio import wait_deferred

    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", master.satellite_port, tssl.CertificateOptions(verify=False))
    return await wait_deferred(connectProtocol(endpoint, RecordingLink()))


def _frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def _closed(link: LinkProtocol, seconds: float = 5.0) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(link.closed_future), seconds)
    except TimeoutError:
        return False
    return True


def _link_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("cloudmailing.common.link")]


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r for r in caplog.records if r.exc_info or r.levelno > logging.WARNING] == []


@aio_test
async def test_a_large_frame_before_hello_is_refused_at_its_header(running_master, caplog):
    caplog.set_level(logging.INFO)
    link = await _recording(running_master.master)
    link.transport.write(struct.pack("!I", 64 * 1024 * 1024) + b"{" * 4096)
    assert await _closed(link)
    assert [m["error"]["code"] for m in link.received] == ["frame_too_large"]
    assert [r.levelname for r in _link_records(caplog)] == ["WARNING"]
    _no_tracebacks(caplog)


@aio_test
async def test_a_small_frame_before_hello_is_fine_and_the_limit_grows_after_hello(running_master):
    await running_master.proxy().cloud_add_satellite("sat-big", {})
    link = await _connect(running_master.master)
    answer = await link.call("hello", serial="sat-big", secret="pw")
    assert answer["satellite_id"] > 0
    # 1 MiB of parameters: far over the hello limit, fine once authenticated (and still checked).
    with pytest.raises(LinkError) as raised:
        await link.call("mailing", mailing_id=1, padding="x" * (1024 * 1024))
    assert raised.value.code == "bad_request"
    assert not link.closed_future.done()
    link.close()


@aio_test
async def test_malformed_frames_before_hello_get_an_error_and_the_link_closes(running_master, caplog):
    caplog.set_level(logging.INFO)
    for payload in (b"[1, 2, 3]", b"\xff\xfe not json", json.dumps({"id": 1, "method": "hello",
                    "params": {"serial": "s", "secret": "x", "version": "1", "extra": True}}).encode(),
                    json.dumps({"id": 1, "method": "no_such_method"}).encode(), b"[" * 100_000):
        caplog.clear()
        link = await _recording(running_master.master)
        link.transport.write(_frame(payload))
        assert await _closed(link), payload[:30]
        assert len(link.received) == 1 and "error" in link.received[0]
        assert len(_link_records(caplog)) == 1 and _link_records(caplog)[0].levelname == "WARNING"
        _no_tracebacks(caplog)


@aio_test
async def test_malformed_frames_after_hello_get_an_error_and_the_link_stays(running_master, caplog):
    caplog.set_level(logging.INFO)
    link = await _registered_link(running_master, "sat-m")
    caplog.clear()
    for method, params in (("no_such_method", {}), ("hello", {"serial": "sat-m", "secret": "pw", "extra": 1}),
                           ("lease", {"max_recipients": "many"}), ("mailing", {"mailing_id": [1]}),
                           ("lease", {}), ("report", {"outcomes": "x"}), ("lease", {"max_recipients": 2**70})):
        with pytest.raises(LinkError) as raised:
            await link.call(method, **params)
        assert raised.value.code in ("unknown_method", "bad_request"), (method, raised.value)
    link.transport.write(_frame(b'["not", "an", "object"]') + _frame(b'{"id": 1, "result": NaN}'))
    assert (await link.call("lease", max_recipients=1))["recipients"] == []  # still served
    assert [r.levelname for r in _link_records(caplog)] == ["WARNING"] * 9
    _no_tracebacks(caplog)
    link.close()


@aio_test
async def test_a_connection_without_hello_is_closed_after_the_hello_timeout(running_master, caplog):
    caplog.set_level(logging.INFO)
    clock = task.Clock()
    running_master.master.link_factory.clock = clock
    link = await _connect(running_master.master)
    await asyncio.sleep(0.1)  # the master has accepted it
    clock.advance(29)
    assert not await _closed(link, 0.3)
    clock.advance(2)
    assert await _closed(link)
    assert any("no hello" in r.getMessage() for r in _link_records(caplog))


@aio_test
async def test_an_idle_link_is_closed_after_the_idle_timeout(running_master):
    clock = task.Clock()
    running_master.master.link_factory.clock = clock
    link = await _registered_link(running_master, "sat-idle")
    clock.advance(31)  # past the hello timeout: authenticated, so no effect
    assert not await _closed(link, 0.3)
    await link.call("lease", max_recipients=1)  # activity: the idle count starts again
    clock.advance(899)
    assert not await _closed(link, 0.3)
    clock.advance(2)
    assert await _closed(link)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3),
    max_leaves=12)
outcome = st.fixed_dictionaries({}, optional={
    "recipient_id": json_values, "status": st.sampled_from(["FINISHED", "ERROR", "WARNING", "GENERAL_ERROR", "x"])
    | json_values, "reply_code": json_values, "reply_text": json_values, "reply_enhanced_code": json_values,
    "smtp_log": json_values, "customized_content": json_values})
calls = st.sampled_from(["hello", "lease", "mailing", "report", "nope"]).flatmap(lambda method: st.tuples(
    st.just(method),
    st.dictionaries(st.sampled_from(["serial", "secret", "version", "max_recipients", "mailing_id", "outcomes",
                                     "other"]),
                    json_values | st.lists(outcome, max_size=3), max_size=3)))
# "disconnected": the master closes a link after MAX_BAD_FRAMES bad requests (the test reconnects).
LINK_ERRORS = {"bad_request", "unknown_method", "not_found", "unauthorized", "not_paired", "disconnected"}


@aio_test
async def test_generated_requests_from_a_satellite_get_answers_or_errors(running_master, caplog):
    caplog.set_level(logging.INFO)
    links = [await _registered_link(running_master, "sat-fuzz")]
    loop = asyncio.get_running_loop()

    async def answer(method: str, params: dict[str, Any]) -> Any:
        if links[-1].closed_future.done():  # closed after MAX_BAD_FRAMES: a satellite reconnects
            links.append(await _connect(running_master.master))
            await links[-1].call("hello", serial="sat-fuzz", secret="pw")
        try:
            return await links[-1].call(method, **params)
        except LinkError as error:
            return error

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(calls)
    def check(call: tuple[str, dict[str, Any]]) -> None:
        seen = len(caplog.records)
        method, params = call
        if method == "hello":
            params = {**params, "serial": "sat-fuzz", "secret": "pw"}  # stay the satellite we are
        result = on_loop(loop, answer(method, params))
        if isinstance(result, LinkError):
            assert result.code in LINK_ERRORS, result
        bad = [r for r in caplog.records[seen:] if r.exc_info or r.levelno > logging.WARNING]
        assert bad == [], [r.getMessage() for r in bad]

    await run_property(check)
    assert (await answer("lease", {"max_recipients": 1}))["recipients"] == []  # still served
    links[-1].close()


@aio_test
async def test_a_stranger_sends_one_request_at_a_time(running_master):
    link = await _recording(running_master.master)
    hello = {"method": "hello", "params": {"serial": "s", "secret": "x"}}
    link.transport.write(b"".join(_frame(json.dumps({"id": i, **hello}).encode()) for i in range(20)))
    assert await _closed(link)
    codes = [m["error"]["code"] for m in link.received]
    assert codes[0] == "bad_request" and len(codes) <= 2  # the second hello; perhaps the first's answer


@aio_test
async def test_a_report_with_a_malformed_outcome_is_refused_by_field_and_records_nothing(running_master, caplog):
    from tests.helpers import running_mailing

    api = running_master.proxy()
    await running_mailing(api, 2)
    link = await _registered_link(running_master, "sat-o")
    leased = (await link.call("lease", max_recipients=10))["recipients"]
    good = {"recipient_id": leased[0]["id"], "status": "FINISHED", "reply_code": 250, "lease": leased[0]["lease"]}
    caplog.set_level(logging.INFO)
    caplog.clear()
    for bad, field in (({"reply_code": "250"}, "reply_code"), ({"smtp_log": "x"}, "smtp_log"),
                       ({"reply_text": "\ud800"}, "reply_text"), ({"customized_content": "??"}, "customized_content")):
        with pytest.raises(LinkError) as raised:
            await link.call("report", outcomes=[good, {**good, "recipient_id": leased[1]["id"], **bad}])
        assert raised.value.code == "bad_request" and f"report.outcomes[1].{field}" in raised.value.message
    assert [r.levelname for r in _link_records(caplog)] == ["WARNING"] * 4
    _no_tracebacks(caplog)
    statuses = await api.get_recipients_status([r["id"] for r in leased], {})
    assert [s["status"] for s in statuses] == ["IN PROGRESS"] * 2  # the whole report was refused
    assert (await link.call("report", outcomes=[good]))["acknowledged"] == [leased[0]["id"]]  # still served
    link.close()
