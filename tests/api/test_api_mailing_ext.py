"""create_mailing_ext as existing clients call it: base64 text in a Binary, the message in a Binary,
or a base64 string; anything else gets Fault 406."""

from __future__ import annotations

import base64
import xmlrpc.client

import pytest

from tests.helpers import aio_test

MESSAGE = (b"From: =?utf-8?q?Soci=C3=A9t=C3=A9?= <news@example.org>\r\nSubject: Ext\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\nBonjour \xc3\xa0 tous\r\n")


async def _sender_and_subject(api, mailing_id: int) -> tuple[str, str, str]:
    mailing = (await api.list_mailings({"id": [mailing_id]}))[0]
    return mailing["mail_from"], mailing["sender_name"], mailing["subject"]


async def _fault_code(api, message) -> int:
    with pytest.raises(xmlrpc.client.Fault) as raised:
        await api.create_mailing_ext(message)
    return raised.value.faultCode


@aio_test
async def test_every_form_an_existing_client_sends_is_the_same_message(running_master):
    api = running_master.proxy()
    expected = ("news@example.org", "Société", "Ext")
    forms = {
        # A Python 3 client's create_mailing_ext(base64.b64encode(raw)): bytes go as <base64>,
        # so the server gets base64 text inside base64 (the original decoded it once more).
        "Binary of base64 text": base64.b64encode(MESSAGE),
        "Binary of wrapped base64 text": base64.encodebytes(MESSAGE),
        "Binary of the message": xmlrpc.client.Binary(MESSAGE),
        "base64 string": base64.b64encode(MESSAGE).decode("ascii"),
    }
    for form, message in forms.items():
        mailing_id = await api.create_mailing_ext(message)
        assert await _sender_and_subject(api, mailing_id) == expected, form


@aio_test
async def test_what_is_neither_a_message_nor_base64_of_one_gets_406(running_master):
    api = running_master.proxy()
    garbage = [
        b"\x00\xff\x10 not a message",                        # Binary of garbage
        base64.b64encode(b"hello, no header here"),          # Binary of base64 text of garbage
        base64.b64encode(b"hello, no header here").decode(),  # base64 string of garbage
        "not base64 at all!",                                 # a string that is not base64
        MESSAGE.decode("utf-8"),                              # a string must be base64, not the message
        base64.b64encode(MESSAGE).decode()[:-3],              # truncated base64
        b"   \r\n",                                           # empty
        base64.b64encode(b"Subject: x\r\n\r\nno from"),      # a message, but no From address
    ]
    for message in garbage:
        assert await _fault_code(api, message) == 406, message
    assert await api.get_mailings_count() == 0
