"""From a leased recipient to a signed message, per-recipient attachments included."""

from __future__ import annotations

import base64
import email
import email.policy

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet import reactor

from cloudmailing.satellite.composer import build_failure, compose, prepare
from cloudmailing.satellite.dkim_signer import DkimSigner
from cloudmailing.satellite.outcomes import FINISHED
from cloudmailing.satellite.smtp_client import SmtpClientOptions, SmtpConnection
from tests.helpers import aio_test
from tests.satellite.smtp_servers import Behaviour, SmtpTestServer

KEY = ed25519.Ed25519PrivateKey.generate().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
CONTENT = {"id": 7, "mail_from": "news@sender.test", "sender_name": "News", "subject": "Hi {{ name }}",
           "html": "<p>Dear {{ name }}</p>", "plain": "Dear {{ name }}", "charset": "utf-8", "tracking_url": "",
           "testing": False, "rfc822": "", "dkim": {"enabled": True, "selector": "s", "domain": "sender.test",
                                                   "privkey": KEY}}


def _txt(name: bytes, timeout: int = 5) -> bytes:
    assert name == b"s._domainkey.sender.test."
    return DkimSigner("sender.test", "s", KEY.encode()).dns_txt_record().encode()


def test_a_recipient_with_attachments_gets_them_signed():
    mailing = prepare(CONTENT)
    recipient = {"id": "r1", "email": "ann@one.test", "domain": "one.test", "contact": {"name": "Ann"},
                 "attachments": [{"filename": "invoice.pdf", "content_type": "application/pdf",
                                  "content": base64.b64encode(b"%PDF-1.4 ann").decode()}]}
    job = compose(mailing, recipient)
    message = email.message_from_bytes(job.data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/mixed" and message["Subject"] == "Hi Ann"
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_filename() == "invoice.pdf" and attachment.get_content() == b"%PDF-1.4 ann"
    assert "Dear Ann" in message.get_body(("plain",)).get_content()
    assert dkim.verify(job.data, dnsfunc=_txt)
    assert b"\r\n" in job.data and b"\n" not in job.data.replace(b"\r\n", b"")


def test_a_recipient_without_attachments_keeps_the_fast_path():
    job = compose(prepare(CONTENT), {"id": "r2", "email": "bob@two.test", "domain": "two.test",
                                     "contact": {"name": "Bob"}, "attachments": []})
    message = email.message_from_bytes(job.data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/alternative"
    assert dkim.verify(job.data, dnsfunc=_txt)


def test_a_template_failure_fails_that_recipient_alone():
    mailing = prepare(dict(CONTENT, subject="{{ 1 // n }}"))
    try:
        compose(mailing, {"id": "r3", "email": "c@one.test", "domain": "one.test", "contact": {"n": 0}})
    except Exception as error:  # noqa: BLE001 - the daemon turns any build error into GENERAL_ERROR
        outcome = build_failure("r3", error)
    else:
        raise AssertionError("the template should have failed")
    assert outcome["status"] == "GENERAL_ERROR" and "division" in outcome["reply_text"].lower()
    ok = compose(mailing, {"id": "r4", "email": "d@one.test", "domain": "one.test", "contact": {"n": 2}})
    assert ok.recipient == "d@one.test"


def _with_an_attachment(sender_name: str, address: str) -> bytes:
    attachment = {"filename": "a.pdf", "content_type": "application/pdf", "content": base64.b64encode(b"x").decode()}
    job = compose(prepare(dict(CONTENT, sender_name=sender_name)),
                  {"id": "r1", "email": address, "domain": address.rpartition("@")[2], "contact": {"name": "A"},
                   "attachments": [attachment]})
    return job.data


def test_a_long_sender_name_stays_one_display_name_when_attachments_are_added():
    """Adding a recipient's attachments re-reads the message: refolding its headers dropped the
    quotes of a long display name, so that From named another address (and was then signed)."""
    name = "Ann <ann@evil.test> via the weekly newsletter of Example Co and all its friends, partners"
    message = email.message_from_bytes(_with_an_attachment(name, "ann@example.org"), policy=email.policy.default)
    sender = message["From"].addresses
    assert [(a.display_name, a.addr_spec) for a in sender] == [(name, "news@sender.test")]


def test_a_long_utf8_address_with_attachments_is_built():
    address = "jürgen." + "a" * 70 + "@example.org"
    headers = _with_an_attachment("News", address).partition(b"\r\n\r\n")[0]
    assert b"\r\nTo: <" + address.encode() + b">\r\n" in headers  # as built: SMTPUTF8, unfolded


EML = b"From: someone@example.net\r\nSubject: the forwarded one\r\n\r\nhello\r\n"


def _with_attachment(content_type: str, content: bytes, **overrides: object) -> bytes:
    recipient = {"id": "r4", "email": "ann@one.test", "domain": "one.test", "contact": {"name": "Ann"},
                 "attachments": [{"filename": "a.eml", "content_type": content_type,
                                  "content": base64.b64encode(content).decode()}]}
    job = compose(prepare(dict(CONTENT, **overrides)), recipient)
    assert dkim.verify(job.data, dnsfunc=_txt)
    assert max(len(line) for line in job.data.split(b"\r\n")) <= 998
    return job.data


def test_an_attached_message_is_a_message_part_in_7bit():
    """RFC 2046 5.2.1: no base64 for message/rfc822 (a reader showed the base64 text as its headers)."""
    message = email.message_from_bytes(_with_attachment("message/rfc822", EML), policy=email.policy.default)
    [attached] = list(message.iter_attachments())
    assert attached.get_content_type() == "message/rfc822" and attached["Content-Transfer-Encoding"] == "7bit"
    assert attached.get_filename() == "a.eml"
    [inner] = attached.get_payload()
    assert inner["Subject"] == "the forwarded one" and inner.get_content().rstrip() == "hello"
    assert all(part.defects == [] for part in message.walk())


def test_an_attachment_type_the_api_now_refuses_goes_out_as_its_bytes():
    """Stored before add_recipients refused them: multipart/*, message/* but 7-bit message/rfc822."""
    for content_type, content in (("multipart/mixed", b"--zz\r\n\r\nx\r\n--zz--\r\n"),
                                  ("message/delivery-status", b"Reporting-MTA: dns; mx.example.com\r\n"),
                                  ("message/rfc822", EML.replace(b"hello", "héllo".encode()))):
        message = email.message_from_bytes(_with_attachment(content_type, content), policy=email.policy.default)
        [attached] = list(message.iter_attachments())
        assert attached.get_content_type() == "application/octet-stream", content_type
        assert attached.get_content() == content and attached.get_filename() == "a.eml"
        assert all(part.defects == [] for part in message.walk())


def test_a_long_tracking_url_is_folded_and_still_signed_with_attachments():
    data = _with_attachment("application/pdf", b"%PDF", tracking_url="https://t.example.com/" + "a" * 1990)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert "".join(message["List-Unsubscribe"].split()) == f"<https://t.example.com/{'a' * 1990}/unsubscribe/r4>"


@aio_test
async def test_an_idn_recipient_gets_a_7bit_message_from_a_server_without_smtputf8_or_8bitmime():
    """The envelope went with the A-label (no SMTPUTF8), but To carried the raw U-label: 8-bit
    header bytes sent without SMTPUTF8 or 8BITMIME (RFC 6532, RFC 6152)."""
    server = SmtpTestServer(Behaviour(smtputf8=False, eightbitmime=False), None)
    port = server.listen("127.0.0.2", 0)
    try:
        job = compose(prepare(dict(CONTENT, mail_from="news@exämple.test")),
                      {"id": "r5", "email": "rcpt@bücher.test", "domain": "xn--bcher-kva.test",
                       "contact": {"name": "Ann"}})
        connection = SmtpConnection(SmtpClientOptions("client.example.test", connect_timeout=5, reply_timeout=5),
                                    "mx.bücher.test", reactor)
        await connection.connect("127.0.0.2", port)
        outcome = await connection.send(job.envelope_from, job.recipient, job.data, "r5")
        await connection.close()
        assert outcome.status == FINISHED
        [received] = server.messages
        assert received.mail_params == [] and received.rcpt_to == ["rcpt@xn--bcher-kva.test"]
        assert received.data.isascii(), [line for line in received.data.split(b"\r\n") if not line.isascii()]
        assert b"\r\nTo: <rcpt@xn--bcher-kva.test>\r\n" in received.data
    finally:
        await server.stop()
