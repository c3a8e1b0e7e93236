"""Mailing methods end to end: a real xmlrpc.client over HTTPS against an in-process master."""

from __future__ import annotations

import asyncio
import base64
import datetime
import resource
import time
import xmlrpc.client

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.helpers import aio_test, set_statuses


async def _fault(call, *args) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as raised:
        await call(*args)
    return raised.value


def _create_args(**overrides) -> dict:
    args = {"mail_from": "news@example.org", "sender_name": "News", "subject": "Hi {{ firstname }}",
            "html": "<h1>Title</h1><p>Coucou</p>", "plain": "Title\nCoucou\n", "charset": "UTF-8"}
    args.update(overrides)
    return args


async def _new(api, **overrides) -> int:
    return await api.create_mailing(*_create_args(**overrides).values())


@aio_test
async def test_create_mailing_and_list_it(running_master):
    api = running_master.proxy()
    first = await _new(api)
    second = await _new(api, mail_from="promo@Shop.example.com", plain="")
    assert second > first >= 1
    listed = await api.list_mailings({"id": [second]})
    assert len(listed) == 1
    mailing = listed[0]
    assert mailing["id"] == second and mailing["domain_name"] == "shop.example.com"
    assert mailing["status"] == "FILLING_RECIPIENTS" and mailing["type"] == "REGULAR"
    assert mailing["total_recipient"] == 0 and mailing["read_tracking"] is True
    assert isinstance(mailing["submit_time"], datetime.datetime)
    assert mailing["dkim"] == {"enabled": False, "selector": "", "domain": ""}
    assert mailing["scheduled_start"] == ""  # None is never sent as <nil/>
    assert [m["id"] for m in await api.list_mailings([])] == [first, second]
    assert [m["id"] for m in await api.list_mailings("shop.example.com")] == [second]
    assert await api.get_mailings_count({"domain": ["example.org"]}) == 1
    assert await api.get_mailings_count() == 2


@aio_test
async def test_create_mailing_refuses_bad_values(running_master):
    api = running_master.proxy()
    assert (await _fault(api.create_mailing, "not-an-address", "N", "S", "<p>x</p>", "x", "utf-8")).faultCode == 406
    assert (await _fault(api.create_mailing, "a@example.org", "N", "S\r\nBcc: x@evil.test", "h", "p", "utf-8")
            ).faultCode == 406
    assert (await _fault(api.create_mailing, "a@example.org", "N\nX", "S", "h", "p", "utf-8")).faultCode == 406
    assert (await _fault(api.create_mailing, "a@example.org", "N", "S", "h", "p", "no-such-charset")).faultCode == 406
    assert (await _fault(api.create_mailing, "a@example.org", "N", "{% if %}", "h", "p", "utf-8")).faultCode == 406
    fault = await _fault(api.create_mailing, "a@example.org")
    assert fault.faultCode == 400 and "arguments" in fault.faultString


@pytest.mark.parametrize(("field", "template", "reason"), [
    ("subject", "{% if %}", "subject: template syntax error line 1"),
    ("html", "<p>{{ ''.ljust(10**9) }}</p>", "html: template over its limits: ljust() larger than 1000000"),
    ("plain", "{{ 2 ** 100000000 }}", "plain: template over its limits: integer result"),
    ("plain", "{% for i in range(10**6) %}x{% endfor %}", "plain: template over its limits: range() over 100000 items"),
    ("html", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "html: template over its limits: CPU time over 2 s (rendered with no recipient data)"),
    ("subject", "{{ x.__class__ }}", "subject: template not allowed: access to attribute '__class__'"),
])
@aio_test
async def test_a_template_that_cannot_render_is_refused_at_once(running_master, field, template, reason):
    api = running_master.proxy()
    fault = await _fault(api.create_mailing, *_create_args(**{field: template}).values())
    assert fault.faultCode == 406 and fault.faultString.startswith(reason), fault.faultString
    mailing_id = await _new(api)
    property_name = {"html": "html_content", "plain": "plain_content"}.get(field, field)
    fault = await _fault(api.set_mailing_properties, mailing_id, {property_name: template, "charset": "utf-8"})
    assert fault.faultCode == 406 and fault.faultString.startswith(reason), fault.faultString
    assert (await api.list_mailings({"id": [mailing_id]}))[0]["subject"] == "Hi {{ firstname }}"


@aio_test
async def test_templates_that_fail_only_without_data_are_accepted(running_master):
    # The division, the loop over a field: with no recipient data they fail or do nothing; with data they may not.
    api = running_master.proxy()
    assert await _new(api, subject="{{ 100 // n }} points", plain="{% for i in range(count) %}*{% endfor %}")


@aio_test
async def test_create_mailing_ext_keeps_the_message(running_master):
    api = running_master.proxy()
    message = (b"From: =?utf-8?q?Soci=C3=A9t=C3=A9?= <news@example.org>\r\nSubject: Ext\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBody\r\n")
    mailing_id = await api.create_mailing_ext(base64.b64encode(message).decode())
    mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
    assert (mailing["mail_from"], mailing["sender_name"], mailing["subject"]) == ("news@example.org", "Société", "Ext")
    binary_id = await api.create_mailing_ext(xmlrpc.client.Binary(message))
    assert binary_id == mailing_id + 1
    assert (await _fault(api.create_mailing_ext, base64.b64encode(b"Subject: x\r\n\r\nno from").decode())
            ).faultCode == 406


@aio_test
async def test_set_mailing_properties_checks_types(running_master):
    api = running_master.proxy()
    mailing_id = await _new(api)
    start = datetime.datetime(2030, 5, 1, 8, 0, 0)
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    assert await api.set_mailing_properties(mailing_id, {
        "scheduled_start": start, "scheduled_end": "2030-05-02T08:00:00Z", "scheduled_duration": 1440,
        "click_tracking": True, "owner_guid": "owner-1", "type": "OPENED", "satellite_group": "eu",
        "tracking_url": "https://t.example.org/", "dkim": {"enabled": True, "selector": "s1",
                                                         "domain": "example.org", "privkey": key},
        "subject": "New {{ x }}", "charset": "utf-8", "testing": True}) == 0
    mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
    assert mailing["scheduled_start"] == start
    assert mailing["scheduled_end"] == datetime.datetime(2030, 5, 2, 8, 0, 0)
    assert (mailing["click_tracking"], mailing["type"], mailing["satellite_group"]) == (True, "OPENED", "eu")
    assert mailing["subject"] == "New {{ x }}"
    assert mailing["dkim"] == {"enabled": True, "selector": "s1", "domain": "example.org"}  # no private key
    assert await api.get_mailings_count({"owner_guid": ["owner-1"]}) == 1
    for bad in ({"unknown_key": 1}, {"type": "WEEKLY"}, {"owner_guid": "x" * 51},
                {"scheduled_start": "tomorrow"}, {"click_tracking": "maybe"}, {"subject": "no charset"},
                {"dkim": {"enabled": True, "selector": "s", "domain": "d", "privkey": "junk"}},
                {"mail_from": "bad"}, {"sender_name": "a\r\nb"}, {"scheduled_duration": -1}):
        assert (await _fault(api.set_mailing_properties, mailing_id, bad)).faultCode == 406, bad
    assert (await _fault(api.set_mailing_properties, 999999, {"type": "REGULAR"})).faultCode == 404


@aio_test
async def test_start_pause_delete(running_master):
    api = running_master.proxy()
    mailing_id = await _new(api)
    assert await api.start_mailing(mailing_id) == "READY"
    assert await api.pause_mailing(mailing_id) == "PAUSED"
    assert await api.start_mailing(mailing_id) == "READY"
    assert await api.delete_mailing(mailing_id) == 0
    for method in (api.start_mailing, api.pause_mailing, api.delete_mailing):
        assert (await _fault(method, mailing_id)).faultCode == 404
    assert (await _fault(api.start_mailing, "abc")).faultCode == 406


@aio_test
async def test_delete_all_mailings_for_domain(running_master):
    api = running_master.proxy()
    await _new(api, mail_from="a@one.example")
    await _new(api, mail_from="b@one.example")
    kept = await _new(api, mail_from="c@two.example")
    assert await api.delete_all_mailings_for_domain("one.example") == 2
    assert [m["id"] for m in await api.list_mailings()] == [kept]


@aio_test
async def test_introspection_and_legacy_methods(running_master):
    api = running_master.proxy()
    methods = await api.system.listMethods()
    assert "add_recipients" in methods and "get_recipients_status_updated_since" in methods
    assert "cursor" in await api.system.methodHelp("get_recipients_status_updated_since")
    assert (await api.system.methodSignature("start_mailing")) == [["string", "int"]]
    assert (await _fault(api.system.methodHelp, "nope")).faultCode == 404
    assert (await _fault(api.no_such_method)).faultCode == 404
    for legacy in (api.update_statistics, api.mailing_manager_force_check, api.force_purge_empty_mailings):
        assert await legacy() == 0


@aio_test
async def test_force_purge_closes_started_empty_regular_mailings_only(running_master):
    """As the original server: not a mailing kept open on purpose, nor a transactional stream."""
    api = running_master.proxy()
    regular, kept_open, stream = await _new(api), await _new(api), await _new(api)
    await api.set_mailing_properties(kept_open, {"dont_close_if_empty": True})
    await api.set_mailing_properties(stream, {"type": "OPENED"})
    for mailing_id in (regular, kept_open, stream):
        await api.start_mailing(mailing_id)
    await api.pause_mailing(regular)  # not finished by count while paused
    await api.mailing_manager_force_check()
    await api.force_purge_empty_mailings()
    statuses = {m["id"]: m["status"] for m in await api.list_mailings({"id": [regular, kept_open, stream]})}
    assert statuses == {regular: "FINISHED", kept_open: "RUNNING", stream: "RUNNING"}


@aio_test
async def test_dont_close_if_empty_keeps_a_mailing_open_between_batches(running_master):
    """A client feeding recipients in batches: the first batch delivered must not close it."""
    api = running_master.proxy()
    mailing_id = await _new(api)
    await api.set_mailing_properties(mailing_id, {"dont_close_if_empty": 1})
    await api.start_mailing(mailing_id)
    [first] = await api.add_recipients(mailing_id, [{"email": "u0@example.org"}])
    await set_statuses(running_master.master.stores, [first["id"]], "FINISHED")
    await api.mailing_manager_force_check()
    assert (await api.list_mailings({"id": [mailing_id]}))[0]["status"] == "RUNNING"
    assert "id" in (await api.add_recipients(mailing_id, [{"email": "u1@example.org"}]))[0]


@aio_test
async def test_a_paused_mailing_that_ran_resumes_running_at_once(running_master):
    api = running_master.proxy()
    mailing_id = await _new(api)
    await api.add_recipients(mailing_id, [{"email": "u0@example.org"}])
    assert await api.start_mailing(mailing_id) == "READY"
    await api.mailing_manager_force_check()
    assert await api.pause_mailing(mailing_id) == "PAUSED"
    assert await api.start_mailing(mailing_id) == "RUNNING"  # RUNNING <-> PAUSED (API.md)
    assert (await api.list_mailings({"id": [mailing_id]}))[0]["status"] == "RUNNING"


# One operation the sandbox does not count ('in' over a huge list compares each item in C, holding
# the GIL): ~13 s of CPU time in one render. The check runs in a child process under a CPU timer.
_GIL_HOG = ("{% set a = 'x'*1000000 %}{% set b = 'x'*999999 ~ 'y' %}"
            + "{{ b in [a]*150000 }}" * 4)


@aio_test
async def test_a_template_over_the_cpu_limit_is_refused_while_the_master_goes_on(running_master):
    api = running_master.proxy()
    await _new(api)  # the checking process is started
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beating = asyncio.ensure_future(heartbeat())
    started = time.monotonic()
    checking = asyncio.ensure_future(_fault(api.create_mailing, *_create_args(html=_GIL_HOG).values()))
    await asyncio.sleep(1.0)
    assert not checking.done()
    assert await running_master.proxy().get_mailings_count() == 1  # another API call answers meanwhile
    fault = await checking
    elapsed = time.monotonic() - started
    beating.cancel()
    assert fault.faultCode == 406, fault.faultString
    assert fault.faultString.startswith("html: template over its limits: CPU time over the limit"), fault.faultString
    assert elapsed < 10.0
    assert max(gaps) < 0.5, max(gaps)  # the event loop was never frozen


@pytest.mark.parametrize("count", [600, 1_000_000])
@aio_test
async def test_a_template_whose_text_is_huge_is_refused_without_master_memory(running_master, count):
    # A list of `count` references to one 1 MB string: its length is within the value limit, its text is not.
    api = running_master.proxy()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fault = await _fault(api.create_mailing, *_create_args(plain="{{ ['x'*1000000]*" + str(count) + " }}").values())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024  # KiB
    assert fault.faultCode == 406, fault.faultString
    assert fault.faultString.startswith("plain: template over its limits: value larger than 1000000"), fault.faultString


@aio_test
async def test_an_html_only_mailing_derives_a_plain_template_that_keeps_its_jinja(running_master):
    """The derived plain part was html_to_text of the template source: '{% if stock<limit %}' lost
    '<limit %}...' to the HTML parser, and create_mailing answered Fault 406 for a plain part the
    client never sent."""
    api = running_master.proxy()
    html = "<p>Hello {{ name }}</p>{% if stock<limit %}<p>Only {{ stock }} left!</p>{% endif %}"
    mailing_id = await api.create_mailing("news@example.org", "N", "S", html, "", "utf-8")
    stored = await running_master.master.stores.mailings.get(mailing_id, with_content=True)
    assert stored["plain"] == "Hello {{ name }}\n{% if stock<limit %}\nOnly {{ stock }} left!\n{% endif %}\n"


@aio_test
async def test_a_charset_is_stored_as_its_preferred_mime_name(running_master):
    """Python's aliases (latin-1, utf_8, u8...) went into Content-Type as given: no MIME reader knows them."""
    api = running_master.proxy()
    stores = running_master.master.stores
    for label, name in (("latin-1", "iso-8859-1"), ("u8", "utf-8"), ("iso8859_15", "iso-8859-15"),
                        ("UTF-8", "utf-8"), ("cp1252", "windows-1252"), ("", "utf-8")):
        mailing_id = await api.create_mailing("news@example.org", "N", "S", "<p>x</p>", "", label)
        assert (await stores.mailings.get(mailing_id, with_content=True))["charset"] == name, label
    assert await api.set_mailing_properties(mailing_id, {"subject": "S", "charset": "utf_8"}) == 0
    assert (await stores.mailings.get(mailing_id, with_content=True))["charset"] == "utf-8"


@aio_test
async def test_a_sender_domain_written_in_unicode_finds_its_mailings(running_master):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("news@bücher.de", "News", "Hi", "<p>x</p>", "", "utf-8")
    await api.add_recipients(mailing_id, [{"email": "a@example.org"}])
    assert [m["domain_name"] for m in await api.list_mailings("Bücher.de")] == ["xn--bcher-kva.de"]
    assert await api.get_mailings_count({"domain": ["bücher.de"]}) == 1
    assert await api.get_recipients_count({"sender_domains": "BÜCHER.de"}) == 1
    assert await api.get_mailings_count({"domain": ["xn--bcher-kva.de"]}) == 1  # as it is listed
    assert await api.delete_all_mailings_for_domain("bücher.de") == 1
    assert await api.get_mailings_count() == 0


@aio_test
async def test_a_nil_or_empty_filter_criterion_is_left_out_and_an_empty_list_matches_nothing(running_master):
    api = running_master.proxy(allow_none=True)
    mailing_id = await api.create_mailing("news@example.org", "News", "Hi", "<p>x</p>", "", "utf-8")
    await api.add_recipients(mailing_id, [{"email": "a@example.org"}])
    listed = await api.list_mailings({"id": [mailing_id], "status": None, "owner_guid": ""})
    assert [m["id"] for m in listed] == [mailing_id]
    assert await api.get_mailings_count({"domain": None, "satellite_group": None}) == 1
    assert await api.get_recipients_count({"mailings": [mailing_id], "owners": None, "sender_domains": ""}) == 1
    assert await api.get_recipients_count({"mailings": None, "status": None}) == 1
    assert await api.get_mailings_count({"id": []}) == 0
    assert await api.get_recipients_count({"mailings": []}) == 0
