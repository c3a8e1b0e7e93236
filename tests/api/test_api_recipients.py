"""Recipient methods end to end over HTTPS, including the seed client's polling loop."""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
import xmlrpc.client
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudmailing.services.recipients import EntryError, parse_attachment
from tests.helpers import aio_test, set_statuses


async def _mailing(api) -> int:
    return await api.create_mailing("news@example.org", "News", "Hi {{ firstname }}", "<p>x</p>", "x", "UTF-8")


@aio_test
async def test_add_recipients_answers_in_order_with_per_entry_errors(running_master):
    api = running_master.proxy()
    mailing_id = await _mailing(api)
    answer = await api.add_recipients(mailing_id, [
        {"email": "john.doe@example.org", "firstname": "John", "lastname": "DOE"},
        {"email": "not an address"},
        {"firstname": "no email"},
        {"email": "jose@bücher.de", "tracking_id": "T-1"},
        {"email": "dup@example.org", "tracking_id": "T-1"},
        {"email": "x@example.org", "bad.key": 1},
        {"email": "y@example.org", "attachments": [{"filename": "a.txt", "content_type": "text/plain",
                                                     "content": xmlrpc.client.Binary(b"hello")}]},
        {"email": "z@example.org", "attachments": [{"filename": "a.txt"}]},
    ])
    assert [a["email"] for a in answer] == ["john.doe@example.org", "not an address", "", "jose@bücher.de",
                                            "dup@example.org", "x@example.org", "y@example.org", "z@example.org"]
    ok = [i for i, a in enumerate(answer) if "id" in a]
    assert ok == [0, 3, 6]
    assert all(("id" in a) != ("error" in a) for a in answer)
    assert answer[3]["id"] == "T-1" and "already exists" in answer[4]["error"]
    mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
    assert mailing["total_recipient"] == 3 and mailing["total_pending"] == 3
    assert await api.get_recipients_count({"mailings": [mailing_id]}) == 3
    status = await api.get_recipients_status([answer[0]["id"], "unknown-id"], {"with_contact_data": True})
    assert len(status) == 1
    assert status[0]["status"] == "READY" and status[0]["contact"] == {"firstname": "John", "lastname": "DOE"}


@aio_test
async def test_add_recipients_accepts_the_original_attachment_spelling(running_master):
    api = running_master.proxy()
    mailing_id = await _mailing(api)
    latin1 = base64.b64encode("café".encode("latin-1")).decode()
    answer = await api.add_recipients(mailing_id, [
        # The original server's struct: content-type, charset, data (base64), no filename.
        {"email": "a@example.org", "attachments": [{"content-type": "text/plain", "charset": "iso-8859-1",
                                                     "data": latin1}]},
        {"email": "b@example.org", "attachments": [{"filename": "a.pdf", "content-type": "application/pdf",
                                                     "data": xmlrpc.client.Binary(b"%PDF")}]},
        # Ours, as before.
        {"email": "c@example.org", "attachments": [{"filename": "a.txt", "content_type": "text/plain",
                                                     "content": "aGVsbG8="}]},
        # Both spellings of a field: fine when they agree, an entry error naming the field when not.
        {"email": "d@example.org", "attachments": [{"content_type": "text/plain", "content-type": "text/plain",
                                                     "content": "aGVsbG8=", "data": xmlrpc.client.Binary(b"hello")}]},
        {"email": "e@example.org", "attachments": [{"content_type": "text/plain", "content-type": "text/html",
                                                     "data": "aGVsbG8="}]},
        {"email": "f@example.org", "attachments": [{"content": "aGVsbG8=", "data": "aGk="}]},
        {"email": "g@example.org", "attachments": [{"content-type": "text/plain", "charset": "bad charset",
                                                     "data": latin1}]},
        {"email": "h@example.org", "attachments": [{"filename": "a.txt", "content-type": "text/plain"}]},
    ])
    assert [("id" in a) for a in answer] == [True, True, True, True, False, False, False, False]
    errors = [a["error"] for a in answer[4:]]
    assert errors[0] == "attachments[0]: content_type and content-type differ: give one of them"
    assert errors[1] == "attachments[0]: content and data differ: give one of them"
    assert errors[2].startswith("attachments[0]: charset:")
    assert errors[3] == "attachments[0]: needs content (or data): base64 text or Binary"
    test = await api.send_test(mailing_id, [{"email": "qa@example.org", "attachments": [{"data": latin1}]}])
    assert "id" in test[0]


def test_attachment_defaults_and_normalized_form():
    assert parse_attachment({"data": "AAE="}) == {
        "filename": "attachment.bin", "content_type": "application/octet-stream", "content": b"\0\1"}
    assert parse_attachment({"content-type": "application/pdf", "data": "", "filename": ""})["filename"] == \
        "attachment.pdf"
    assert parse_attachment({"content-type": "application/x-unknown", "data": ""})["filename"] == "attachment.bin"
    text = parse_attachment({"content-type": "text/html", "charset": "utf-8", "data": "", "filename": "a.htm"})
    assert text == {"filename": "a.htm", "content_type": "text/html; charset=utf-8", "content": b""}
    # charset only applies to text/*; repeating the type's own charset parameter is fine.
    assert parse_attachment({"content-type": "image/png", "charset": "utf-8", "data": ""})["content_type"] == \
        "image/png"
    assert parse_attachment({"content-type": "text/plain; charset=UTF-8", "charset": "utf-8",
                             "data": ""})["content_type"] == "text/plain; charset=UTF-8"
    with pytest.raises(EntryError, match="charset differs"):
        parse_attachment({"content-type": "text/plain; charset=utf-8", "charset": "latin-1", "data": ""})
    for bad in ({"filename": "a\r\nBcc: x", "data": ""}, {"content-type": "nope", "data": ""},
                {"content-type": "x/" + "y" * 100, "data": ""}, {"filename": "f" * 256, "data": ""},
                {"data": "not base64!"}, {"data": 12}, "not a struct"):
        with pytest.raises(EntryError):
            parse_attachment(bad)


_ANY = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=12)
        | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _mostly(usable: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usable values three times in four, anything else the fourth."""
    return st.sampled_from([usable, usable, usable, _ANY]).flatmap(lambda strategy: strategy)


_CONTENTS = _mostly(st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode())
                    | st.binary(max_size=12).map(xmlrpc.client.Binary))
_TYPES = _mostly(st.sampled_from(["text/plain", "TEXT/HTML; charset=utf-8", "text/plain; charset*=utf-8''x",
                                  "image/png", "application/x-unknown", "text/", "/", "", "nope", "x/" + "y" * 99]))
_STRUCTS = st.fixed_dictionaries({}, optional={
    "filename": _mostly(st.sampled_from(["a.txt", "", "a\nb"])), "content_type": _TYPES, "content-type": _TYPES,
    "content": _CONTENTS, "data": _CONTENTS, "content-id": _ANY,
    "charset": _mostly(st.sampled_from(["utf-8", "ISO-8859-1", "a;b", "", "x" * 41]))})


@settings(max_examples=300, deadline=None, database=None)
@given(_mostly(_STRUCTS))
def test_attachment_parser_gives_an_attachment_or_an_error(item: Any):
    try:
        attachment = parse_attachment(item)
    except EntryError as error:
        assert str(error)
        return
    assert set(attachment) == {"filename", "content_type", "content"}
    assert isinstance(attachment["content"], bytes) and "/" in attachment["content_type"]
    assert isinstance(attachment["filename"], str) and attachment["filename"]
    if item.get("filename") in (None, ""):
        assert re.fullmatch(r"attachment\.[A-Za-z0-9]+", attachment["filename"])


@aio_test
async def test_add_recipients_limits_and_unknown_mailing(running_master):
    api = running_master.proxy()
    mailing_id = await _mailing(api)
    with pytest.raises(xmlrpc.client.Fault) as raised:
        await api.add_recipients(mailing_id, [{"email": f"u{i}@example.org"} for i in range(1001)])
    assert raised.value.faultCode == 400
    with pytest.raises(xmlrpc.client.Fault) as raised:
        await api.add_recipients(987654, [{"email": "a@example.org"}])
    assert raised.value.faultCode == 404
    assert await api.get_recipients_count({"mailings": [mailing_id]}) == 0


@aio_test
async def test_send_test_recipients_are_not_counted_and_the_mailing_keeps_its_status(running_master):
    """API.md: test recipients are "not counted in the mailing's totals"."""
    api = running_master.proxy()
    mailing_id = await _mailing(api)
    answer = await api.send_test(mailing_id, [{"email": "qa@example.org"}])
    assert "id" in answer[0]
    mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
    assert (mailing["total_recipient"], mailing["total_pending"], mailing["status"]) == (0, 0, "FILLING_RECIPIENTS")
    assert await api.get_recipients_count({"mailings": [mailing_id]}) == 0
    assert (await api.get_recipients_status([answer[0]["id"]], {}))[0]["status"] == "READY"  # it is there
    await api.mailing_manager_force_check()
    assert (await api.list_mailings({"id": [mailing_id]}))[0]["status"] == "FILLING_RECIPIENTS"


@aio_test
async def test_seed_client_polling_loop_sees_each_change_once(running_master):
    api = running_master.proxy()
    mailing_id = await _mailing(api)
    answer = await api.add_recipients(mailing_id, [{"email": f"u{i}@example.org"} for i in range(7)])
    ids = [a["id"] for a in answer]
    result = await api.get_recipients_status_updated_since("", [], 1000)
    assert result["recipients"] == []  # READY is not reported by default
    cursor = result["cursor"]
    await set_statuses(running_master.master.stores, ids[:5], "FINISHED", {"reply_code": 250})
    collected = []
    while True:
        page = await api.get_recipients_status_updated_since(cursor, [], 2)
        cursor = page["cursor"]
        if not page["recipients"]:
            break
        collected.extend(page["recipients"])
    assert [r["id"] for r in collected] == ids[:5]
    assert all(r["status"] == "FINISHED" and r["reply_code"] == 250 for r in collected)
    # A reset is a change too, reported when READY is asked for.
    assert await api.reset_recipients_status(ids[:1]) == 0
    page = await api.get_recipients_status_updated_since(cursor, {"status": ["READY"]}, 10)
    assert [(r["id"], r["status"]) for r in page["recipients"]] == [(ids[0], "READY")]
    mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
    assert (mailing["total_sent"], mailing["total_pending"]) == (4, 3)
    with pytest.raises(xmlrpc.client.Fault) as raised:
        await api.get_recipients_status_updated_since("garbage", [], 10)
    assert raised.value.faultCode == 406


@aio_test
async def test_recipient_filters(running_master):
    api = running_master.proxy()
    first = await _mailing(api)
    second = await api.create_mailing("a@other.example", "A", "S", "<p>x</p>", "x", "utf-8")
    await api.set_mailing_properties(second, {"owner_guid": "owner-2"})
    await api.add_recipients(first, [{"email": "a@example.org"}])
    await api.add_recipients(second, [{"email": "b@example.org"}, {"email": "c@example.org"}])
    assert await api.get_recipients_count({"owners": ["owner-2"]}) == 2
    assert await api.get_recipients_count({"sender_domains": ["other.example"]}) == 2
    assert await api.get_recipients_count({"status": ["READY"], "mailings": [first]}) == 1
    assert await api.get_recipients_count([]) == 3
    with pytest.raises(xmlrpc.client.Fault) as raised:
        await api.get_recipients_count({"status": ["SENT"]})
    assert raised.value.faultCode == 406


@aio_test
async def test_satellite_registry(running_master):
    api = running_master.proxy()
    sat_id = await api.cloud_add_satellite("sat-1", {"group": "eu", "domain_affinity": ["Example.org", "Bücher.de"]})
    assert await api.cloud_get_satellites_count() == 1
    listed = await api.cloud_list_satellites()
    # As recipients' domains are kept: lower-case, an internationalized one as its A-label.
    assert listed[0]["serial"] == "sat-1" and listed[0]["domain_affinity"] == ["example.org", "xn--bcher-kva.de"]
    assert listed[0]["connected"] is False and listed[0]["in_flight"] == 0
    assert await api.cloud_set_satellite_properties(sat_id, {"enabled": False}) == sat_id
    assert (await api.cloud_list_satellites())[0]["enabled"] is False
    for call, args, code in ((api.cloud_add_satellite, ("sat-1", {}), 400),
                             (api.cloud_set_satellite_properties, (sat_id, {"colour": 1}), 406),
                             (api.cloud_set_satellite_properties, (999, {"enabled": True}), 404),
                             (api.cloud_delete_satellite, (999,), 404)):
        with pytest.raises(xmlrpc.client.Fault) as raised:
            await call(*args)
        assert raised.value.faultCode == code
    assert await api.cloud_delete_satellite(sat_id) == 0
    assert await api.cloud_get_satellites_count() == 0


@aio_test
async def test_hourly_statistics_empty_without_deliveries(running_master):
    api = running_master.proxy()
    assert await api.get_hourly_statistics({"from_date": "2026-01-01T00:00:00", "to_date": "2026-12-31",
                                            "senders": []}) == []


@aio_test
async def test_totals_never_lose_an_add_recipients_racing_the_life_cycle_check(running_master):
    """Each round: a started, empty mailing kept open (dont_close_if_empty) takes batches while the
    life cycle checks it, the moment a count-then-overwrite of the totals used to lose a batch."""
    api = running_master.proxy()
    for round_number in range(12):
        mailing_id = await _mailing(api)
        await api.set_mailing_properties(mailing_id, {"dont_close_if_empty": True})
        await api.start_mailing(mailing_id)
        batch = [{"email": f"r{round_number}-{i}@example.org"} for i in range(150)]
        clients = [running_master.proxy() for _ in range(5)]  # one connection each, as five clients
        checks = [client.mailing_manager_force_check() for client in clients[:3]]
        await asyncio.gather(checks[0], clients[3].add_recipients(mailing_id, batch), checks[1],
                             clients[4].add_recipients(mailing_id, batch[:50]), checks[2])
        mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
        assert mailing["total_recipient"] == 200 == await api.get_recipients_count({"mailings": [mailing_id]})
        assert mailing["status"] == "RUNNING"


@aio_test
async def test_a_tracking_id_of_the_masters_own_forms_is_an_entry_error(running_master):
    api = running_master.proxy()
    mailing_id = await _mailing(api)
    made = (await api.add_recipients(mailing_id, [{"email": "a@example.org"}]))[0]["id"]
    assert uuid.UUID(made).version == 8 and str(uuid.UUID(made)) == made
    answer = await api.add_recipients(mailing_id, [
        {"email": "b@example.org", "tracking_id": made}, {"email": "c@example.org", "tracking_id": "b1s0-abcdef"},
        {"email": "d@example.org", "tracking_id": str(uuid.uuid4())}])
    assert ["master's own" in a.get("error", "") for a in answer] == [True, True, False]


EML = b"From: someone@example.net\r\nSubject: the forwarded one\r\n\r\nhello\r\n"


def test_message_and_multipart_attachment_types():
    """message/rfc822 must go out in 7bit/8bit/binary (RFC 2046 5.2.1), so only 7-bit data is
    taken; any other message/* and every multipart/* (RFC 2045 6.4) cannot be attached."""
    assert parse_attachment({"content_type": "message/rfc822", "content": base64.b64encode(EML).decode()}) == {
        "filename": "attachment.eml", "content_type": "message/rfc822", "content": EML}
    for content_type in ("multipart/mixed", "Multipart/Alternative; boundary=x", "message/delivery-status",
                         "message/partial", "message/global"):
        with pytest.raises(EntryError, match=f"^content type {content_type.split(';')[0].lower()} is not supported"):
            parse_attachment({"content_type": content_type, "data": base64.b64encode(EML).decode()})
    for content in (EML.replace(b"hello", "héllo".encode()), EML.replace(b"hello", b"h\0llo"),
                    EML.replace(b"hello", b"h" * 999)):
        with pytest.raises(EntryError, match="^a message/rfc822 attachment must be 7-bit data"):
            parse_attachment({"content_type": "message/rfc822", "data": xmlrpc.client.Binary(content)})


@aio_test
async def test_unsupported_attachment_types_are_entry_errors(running_master):
    api = running_master.proxy()
    mailing_id = await _mailing(api)
    eml = base64.b64encode(EML).decode()
    answer = await api.add_recipients(mailing_id, [
        {"email": "a@example.org", "attachments": [{"content_type": "message/rfc822", "content": eml}]},
        {"email": "b@example.org", "attachments": [{"filename": "a.pdf", "content_type": "application/pdf",
                                                     "content": eml},
                                                    {"content-type": "multipart/mixed", "data": eml}]},
        {"email": "c@example.org", "attachments": [{"content_type": "message/delivery-status", "content": eml}]},
    ])
    assert "id" in answer[0]
    assert answer[1] == {"email": "b@example.org", "error": "attachments[1]: content type multipart/mixed is not "
                         "supported (a multipart entity cannot be attached)"}
    assert answer[2]["email"] == "c@example.org" and "message/delivery-status" in answer[2]["error"]
    test = await api.send_test(mailing_id, [{"email": "qa@example.org", "attachments": [
        {"content_type": "message/rfc822", "content": base64.b64encode("é".encode()).decode()}]}])
    assert "7-bit" in test[0]["error"]
