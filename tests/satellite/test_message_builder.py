"""Tests of the byte-level message builder (cloudmailing.satellite.message_builder).

Every built message is parsed back with the stdlib parser (policy=default), which is
independent of the byte-level code under test.
"""

from __future__ import annotations

import random
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

import pytest
from twisted.internet.task import Clock

from cloudmailing.satellite.message_builder import (
    BuiltMessage,
    InvalidRecipientError,
    MailingContent,
    MailingMessageTemplate,
    encode_body,
    encode_header_text,
    verp_address,
)
from cloudmailing.satellite.templates import TemplateRenderError

HTML = ("<html><body><h1>Bonjour {{ firstname }}</h1>\n"
        "<p>Votre ville : {{ city }}. Code {{ code }}.</p>\n"
        "<a href=\"{{ unsubscribe }}\">désinscription</a></body></html>\n")
PLAIN = "Bonjour {{ firstname }},\nvotre ville : {{ city }}, code {{ code }}.\n"
CONTACT = {"firstname": "Zoé", "city": "Paris", "code": "A1"}


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def make(clock: Clock | None = None, **fields: object) -> MailingMessageTemplate:
    values: dict[str, object] = {
        "mailing_id": 42, "mail_from": "news@example.com", "sender_name": "Shop",
        "subject": "Hello {{ firstname }}", "html": HTML, "plain": PLAIN,
        "tracking_url": "https://t.example.com/ct"}
    values.update(fields)
    clock = clock or Clock()
    return MailingMessageTemplate(MailingContent(**values),  # type: ignore[arg-type]
                                  clock=clock, rng=random.Random(7))


def assert_wire_format(data: bytes) -> None:
    """CRLF line ends only, no line over 998 octets."""
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def body_of(message: EmailMessage, ctype: str) -> str:
    part = message.get_body(preferencelist=(ctype.split("/")[1],))
    assert part is not None and part.get_content_type() == ctype
    return str(part.get_content()).replace("\r\n", "\n")  # canonical CRLF -> text


def test_multipart_alternative_personalized_in_every_part() -> None:
    built = make().build("rcpt-1", "zoe@example.org", CONTACT)
    assert isinstance(built, BuiltMessage)
    assert_wire_format(built.data)
    message = parse(built.data)
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert body_of(message, "text/plain") == "Bonjour Zoé,\nvotre ville : Paris, code A1.\n"
    html = body_of(message, "text/html")
    assert "<h1>Bonjour Zoé</h1>" in html
    assert 'href="https://t.example.com/ct/unsubscribe/rcpt-1"' in html
    assert message["Subject"] == "Hello Zoé"
    assert message.defects == [] and all(p.defects == [] for p in message.walk())


def test_headers() -> None:
    clock = Clock()
    clock.advance(1_700_000_000.5)
    built = make(clock).build("rcpt-1", "zoe@example.org", CONTACT)
    message = parse(built.data)
    assert message["From"] == "Shop <news@example.com>"
    assert built.data.startswith(b'From: "Shop" <news@example.com>\r\n')
    assert message["To"] == "zoe@example.org"
    assert message["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(message["Date"]).timestamp() == 1_700_000_000
    assert re.fullmatch(r"<42\.[0-9a-f]+\.[0-9a-f]+@example\.com>", message["Message-ID"])
    assert message["List-Unsubscribe"] == "<https://t.example.com/ct/unsubscribe/rcpt-1>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert built.recipient == "zoe@example.org"
    assert built.envelope_from == "bounce-42-rcpt-1@example.com"
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"):
        assert len(message.get_all(name) or []) == 1, name


def test_no_list_unsubscribe_without_tracking_url() -> None:
    built = make(tracking_url="", html=HTML).build("r", "a@example.org", CONTACT)
    message = parse(built.data)
    assert "List-Unsubscribe" not in message and "List-Unsubscribe-Post" not in message
    assert 'href=""' in body_of(message, "text/html")


def test_tracking_url_is_percent_encoded() -> None:
    built = make(tracking_url="https://t.example.com/é x\r\n").build("a b", "a@x.org", {})
    message = parse(built.data)
    assert message["List-Unsubscribe"] == "<https://t.example.com/%C3%A9%20x/unsubscribe/a%20b>"


def test_message_ids_are_unique() -> None:
    template = make()
    other = MailingMessageTemplate(MailingContent(42, "news@example.com"), clock=Clock(), rng=random.Random())
    ids = {parse(template.build(f"r{i}", "a@example.org", {}).data)["Message-ID"]
           for i in range(200)}
    ids.add(parse(other.build("r0", "a@example.org", {}).data)["Message-ID"])
    assert len(ids) == 201


def test_non_ascii_headers_are_rfc2047_encoded_and_folded() -> None:
    subject = "Offre spéciale pour {{ firstname }} — " + "très " * 30 + "longue ✓"
    built = make(subject=subject, sender_name='Équipe "Ventes" ✉').build(
        "r", "a@example.org", CONTACT)
    head = built.data.split(b"\r\n\r\n")[0]
    assert head.isascii()
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    message = parse(built.data)
    assert message["Subject"] == "Offre spéciale pour Zoé — " + "très " * 30 + "longue ✓"
    assert message["From"].addresses[0].display_name == 'Équipe "Ventes" ✉'
    assert message["From"].addresses[0].addr_spec == "news@example.com"


def test_long_ascii_subject_is_folded_at_spaces() -> None:
    words = " ".join(f"word{i}" for i in range(60))
    built = make(subject=words).build("r", "a@example.org", {})
    head = built.data.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert parse(built.data)["Subject"] == words


def test_ascii_name_with_quotes_is_escaped() -> None:
    built = make(sender_name='Bob "The" Builder \\o/').build("r", "a@example.org", {})
    assert parse(built.data)["From"].addresses[0].display_name == 'Bob "The" Builder \\o/'


@pytest.mark.parametrize("evil", [
    "x\r\nBcc: victim@example.net", "x\nBcc: victim@example.net",
    "x\rBcc: victim@example.net", "=?utf-8?q?x=0D=0ABcc:_v@example.net?=",
])
def test_header_injection_through_contact_data_is_impossible(evil: str) -> None:
    built = make().build("r", "a@example.org", {"firstname": evil})
    message = parse(built.data)
    assert "Bcc" not in message
    assert "\n" not in message["Subject"] and "\r" not in message["Subject"]
    assert "victim" in message["Subject"] or "v@example.net" in message["Subject"]
    assert list(message.keys())[:3] == ["From", "To", "Subject"]


@pytest.mark.parametrize("address", [
    "a@example.org\r\nBcc: v@example.net", "a@example.org>\r\nX: y", "no-at-sign",
    "a b@example.org", "@example.org", "a@",
])
def test_invalid_recipient_address_is_refused(address: str) -> None:
    with pytest.raises(InvalidRecipientError):
        make().build("r", address, {})


def test_invalid_sender_is_refused_at_mailing_level() -> None:
    with pytest.raises(ValueError):
        make(mail_from="not an address")
    with pytest.raises(ValueError):
        make(charset="utf-16")


def test_failing_template_fails_that_recipient_only() -> None:
    template = make(html="<p>{{ 100 // n }}</p>")
    assert "<p>25</p>" in body_of(parse(template.build("a", "a@x.org", {"n": 4}).data),
                                  "text/html")
    with pytest.raises(TemplateRenderError):
        template.build("b", "b@x.org", {"n": 0})
    assert "<p>50</p>" in body_of(parse(template.build("c", "c@x.org", {"n": 2}).data),
                                  "text/html")


def test_undefined_variable_renders_empty() -> None:
    built = make(subject="Hi {{ nobody }}!").build("r", "a@example.org", {})
    message = parse(built.data)
    assert message["Subject"] == "Hi !"
    assert "<h1>Bonjour </h1>" in body_of(message, "text/html")


def test_encodings_7bit_when_possible_else_base64() -> None:
    template = make(html="<p>{{ v }}</p>", plain="{{ v }}")
    ascii_message = parse(template.build("r", "a@x.org", {"v": "plain ascii"}).data)
    assert [p["Content-Transfer-Encoding"] for p in ascii_message.iter_parts()] == ["7bit"] * 2
    long_line = "x" * 5000
    for value in ("é", long_line, "nul\x00byte"):
        data = template.build("r", "a@x.org", {"v": value}).data
        assert_wire_format(data)
        message = parse(data)
        assert [p["Content-Transfer-Encoding"] for p in message.iter_parts()] == ["base64"] * 2
        assert body_of(message, "text/plain") == value


def test_boundary_in_contact_data_cannot_break_the_mime_tree() -> None:
    template = make(html="<p>{{ v }}</p>", plain="{{ v }}")
    first = template.build("r", "a@x.org", {"v": "x"}).data
    boundary = parse(first).get_boundary()
    assert boundary
    attack = f"x\r\n--{boundary}\r\nContent-Type: text/html\r\n\r\n<script>evil</script>\r\n"
    message = parse(template.build("r", "a@x.org", {"v": attack}).data)
    assert len(list(message.iter_parts())) == 2
    assert body_of(message, "text/plain") == attack.replace("\r\n", "\n")


def test_bare_newlines_from_contact_data_become_crlf() -> None:
    data = make(plain="{{ v }}").build("r", "a@x.org", {"v": "a\nb\rc\r\nd"}).data
    assert_wire_format(data)
    assert body_of(parse(data), "text/plain") == "a\nb\nc\nd"


@pytest.mark.parametrize(("text", "expected"), [
    ("a\r\nb\r\n", b"a\r\nb\r\n"), ("a\nb", b"a\r\nb"), ("a\rb", b"a\r\nb"),
    ("a\r\n\n", b"a\r\n\r\n"), ("a\n\r\n", b"a\r\n\r\n"), ("\r\r\n", b"\r\n\r\n"),
    ("a\r", b"a\r\n"), ("", b""), ("\n", b"\r\n"), ("a", b"a"),
])
def test_encode_body_normalizes_line_breaks(text: str, expected: bytes) -> None:
    assert encode_body(text, "utf-8", False, ()) == (b"7bit", expected)


def test_charset_without_some_characters() -> None:
    template = make(charset="iso-8859-1", subject="{{ v }}", html="<p>{{ v }}</p>",
                    plain="{{ v }}")
    message = parse(template.build("r", "a@x.org", {"v": "é€"}).data)
    assert message["Subject"] == "é€"
    assert body_of(message, "text/plain") == "é?"
    assert "<p>é&#8364;</p>" in body_of(message, "text/html")
    assert all(p.get_content_charset() == "iso-8859-1" for p in message.iter_parts())


def test_html_only_mailing_derives_plain_text() -> None:
    template = make(plain="", html="<html><head><style>p {}</style></head><body>"
                    "<p>Hello {{ firstname }}</p><p>Bye&nbsp;now</p></body></html>")
    message = parse(template.build("r", "a@x.org", CONTACT).data)
    assert body_of(message, "text/plain") == "Hello Zoé\n\nBye\xa0now\n"


def test_plain_only_mailing_is_a_single_part() -> None:
    message = parse(make(html="", plain="Hi {{ firstname }}").build("r", "a@x.org", CONTACT).data)
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "Hi Zoé"


def test_constant_subject_is_encoded_once() -> None:
    template = make(subject="Ça va ?")
    first = template.build("r1", "a@x.org", {}).data
    second = template.build("r2", "b@x.org", {}).data
    assert parse(first)["Subject"] == parse(second)["Subject"] == "Ça va ?"


# ------------------------------------------------------------------ VERP


@pytest.mark.parametrize("recipient_id", [
    "3f2a9c1e-0b7d-4c1a-9e6f-2a4b8c0d1e2f", "ABC", "a@b.c", "a=b", "é ü/ñ", "--", "",
    "x" * 40, "\r\n<evil>",
])
def test_verp_round_trip(recipient_id: str) -> None:
    address = verp_address("bounce", 42, recipient_id, "example.com")
    local = address.rpartition("@")[0]
    assert re.fullmatch(r"[a-z0-9=-]+", local) and local.startswith("bounce-42-")
    assert address != verp_address("bounce", 42, recipient_id + "x", "example.com")


def test_verp_keeps_uuid_local_part_short() -> None:
    address = verp_address("bounce", 123456, "3f2a9c1e-0b7d-4c1a-9e6f-2a4b8c0d1e2f", "x.org")
    assert len(address.rpartition("@")[0]) <= 64


def test_envelope_sender_policy() -> None:
    assert make(bounce_domain="bounces.example.net").build(
        "R1", "a@x.org", {}).envelope_from == "bounce-42-=521@bounces.example.net"
    assert make(verp=False).build("r", "a@x.org", {}).envelope_from == "news@example.com"


def test_encode_header_text_never_emits_line_breaks_in_values() -> None:
    value = encode_header_text("a" * 2000, 9)
    assert all(len(line) <= 998 for line in value.split(b"\r\n"))
    assert all(line.startswith(b" ") for line in value.split(b"\r\n")[1:])


# ------------------------------------------------------------------ rfc822 mailings


def original_message() -> bytes:
    message = EmailMessage()
    message["From"] = "Boutique <shop@example.com>"
    message["To"] = "list@example.com"
    message["Cc"] = "boss@example.com"
    message["Bcc"] = "secret@example.com"
    message["Subject"] = "Soldes pour {{ firstname }}"
    message["Message-ID"] = "<original@example.com>"
    message["Date"] = "Mon, 01 Jan 2024 00:00:00 +0000"
    message["Reply-To"] = "help@example.com"
    message["X-Campaign"] = "spring"
    message.set_content("Bonjour {{ firstname }} de {{ city }}\n", charset="iso-8859-1",
                        cte="quoted-printable")
    message.add_alternative("<p>Bonjour {{ firstname }} <img src=\"cid:logo\"></p>\n",
                            subtype="html")
    html_part = message.get_payload()[1]  # type: ignore[index]
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image", "png",
                          cid="<logo>")
    message.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="pdf",
                           filename="tarifs.pdf")
    message.add_attachment("{{ firstname }} stays raw\n", filename="notes.txt")
    return message.as_bytes(policy=policy.SMTP)


def rfc822_template(**fields: object) -> MailingMessageTemplate:
    values: dict[str, object] = {"subject": "", "html": "", "plain": "",
                                 "sender_name": "Boutique", "mail_from": "shop@example.com",
                                 "rfc822": original_message()}
    values.update(fields)
    return make(None, **values)


def test_rfc822_mailing_keeps_tree_and_attachments() -> None:
    built = rfc822_template().build("r9", "zoe@example.org", CONTACT)
    assert_wire_format(built.data)
    message = parse(built.data)
    original = parse(original_message())
    assert ([p.get_content_type() for p in message.walk()]
            == [p.get_content_type() for p in original.walk()])
    attachments = {p.get_filename(): p.get_content() for p in message.iter_attachments()}
    assert attachments["tarifs.pdf"] == bytes(range(256)) * 40
    assert attachments["notes.txt"] == "{{ firstname }} stays raw\r\n"
    images = [p for p in message.walk() if p.get_content_type() == "image/png"]
    assert images[0].get_content() == b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    assert images[0]["Content-ID"] == "<logo>"
    assert body_of(message, "text/plain") == "Bonjour Zoé de Paris\n"
    assert "<p>Bonjour Zoé <img" in body_of(message, "text/html")


def test_rfc822_mailing_headers_are_replaced() -> None:
    built = rfc822_template().build("r9", "zoe@example.org", CONTACT)
    message = parse(built.data)
    assert message["Subject"] == "Soldes pour Zoé"
    assert message["To"] == "zoe@example.org"
    assert message["From"] == "Boutique <shop@example.com>"
    assert "Bcc" not in message and "Cc" not in message
    assert message["Message-ID"] != "<original@example.com>"
    assert message["Date"] != "Mon, 01 Jan 2024 00:00:00 +0000"
    assert message["Reply-To"] == "help@example.com"
    assert message["X-Campaign"] == "spring"
    assert message["List-Unsubscribe"] == "<https://t.example.com/ct/unsubscribe/r9>"
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version"):
        assert len(message.get_all(name) or []) == 1, name


def test_rfc822_mailing_overrides() -> None:
    template = rfc822_template(subject="Autre {{ firstname }}", html="<b>{{ city }}</b>")
    message = parse(template.build("r9", "zoe@example.org", CONTACT).data)
    assert message["Subject"] == "Autre Zoé"
    assert body_of(message, "text/html") == "<b>Paris</b>"
    assert body_of(message, "text/plain") == "Bonjour Zoé de Paris\n"


def test_rfc822_single_part_message() -> None:
    raw = (b"From: a@example.com\r\nSubject: Hi {{ firstname }}\r\nX-Keep: yes\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n"
           b"Content-Transfer-Encoding: 7bit\r\n\r\nDear {{ firstname }}\r\n")
    template = make(subject="", html="", plain="", rfc822=raw)
    message = parse(template.build("r", "z@example.org", CONTACT).data)
    assert message["Subject"] == "Hi Zoé"
    assert message["X-Keep"] == "yes"
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "Dear Zoé\r\n"
    assert len(message.get_all("Content-Transfer-Encoding") or []) == 1


def test_rfc822_mailing_8bit_attachments_go_out_in_base64() -> None:
    """A server without 8BITMIME must get 7-bit data: what the client's message carries in 8bit
    or binary is re-encoded, and decodes to the same bytes."""
    raw = (b"From: a@example.com\r\nSubject: Hi\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
           b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\nCher {{ firstname }}, caf\xc3\xa9\r\n"
           b"--XX\r\nContent-Type: text/plain; charset=utf-8; name=note.txt\r\n"
           b"Content-Disposition: attachment; filename=note.txt\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\nd\xc3\xa9j\xc3\xa0 vu\r\n"
           b"--XX\r\nContent-Type: application/octet-stream; name=blob.bin\r\n"
           b"Content-Disposition: attachment; filename=blob.bin\r\n"
           b"Content-Transfer-Encoding: binary\r\n\r\n\x80\xff\xfe plain tail\r\n"
           b"--XX--\r\n")
    data = make(subject="", html="", plain="", rfc822=raw).build("r", "z@example.org", CONTACT).data
    assert data.isascii()
    assert_wire_format(data)
    message = parse(data)
    assert body_of(message, "text/plain") == "Cher Zoé, café"  # the last CRLF is the boundary's
    attachments = {p.get_filename(): p for p in message.iter_attachments()}
    assert attachments["note.txt"].get_content() == "déjà vu"
    assert attachments["blob.bin"].get_content() == b"\x80\xff\xfe plain tail"
    assert all(p["Content-Transfer-Encoding"] == "base64" for p in attachments.values())


def test_random_contact_values_always_give_valid_messages() -> None:
    rng = random.Random(99)
    template = make(subject="S {{ v }}", html="<p>{{ v }}</p>", plain="{{ v }}")
    alphabet = ["a", " ", "\t", "\r", "\n", "\r\n", "é", "✉", "\x00", "\x1b", "=?", "?=",
                "--", "<", ">", '"', "x" * 300, ".", "From "]
    for i in range(300):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        data = template.build(f"r{i}", "a@x.org", {"v": value}).data
        assert_wire_format(data)
        message = parse(data)
        expected = re.sub(r"\r\n|\r|\n", "\n", value)
        assert body_of(message, "text/plain") == expected
        subject = str(message["Subject"])
        assert not re.search(r"[\x00-\x1f\x7f]", subject)
        assert re.sub(r"[\x00-\x20\x7f]", "", subject) == "S" + re.sub(r"[\x00-\x20\x7f]", "", value)


# -- review fixes: header line length, IDN headers, charset names, derived plain part --------------


def test_a_long_tracking_url_folds_list_unsubscribe_within_the_brackets() -> None:
    """A tracking_url the API takes (up to 2000 characters) made a line over RFC 5322's 998 octets."""
    tracking_url = "https://t.example.com/" + "a" * 1500
    data = make(tracking_url=tracking_url).build("r1", "ann@example.org", CONTACT).data
    assert_wire_format(data)
    head = data.partition(b"\r\n\r\n")[0]
    [field] = [f for f in re.split(rb"\r\n(?![ \t])", head) if f.startswith(b"List-Unsubscribe:")]
    lines = field.split(b"\r\n")
    assert len(lines) > 1 and max(len(line) for line in lines) <= 78
    # RFC 2369: whitespace within the angle brackets is ignored.
    url = re.sub(rb"\s", b"", field.partition(b":")[2]).decode()
    assert url == f"<{tracking_url}/unsubscribe/r1>"
    assert parse(data)["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_a_usual_list_unsubscribe_stays_on_one_line() -> None:
    data = make(tracking_url="https://t.example.com/" + "b" * 900).build("r1", "a@example.org", {}).data
    assert re.search(rb"\r\nList-Unsubscribe: <https://t\.example\.com/b{900}/unsubscribe/r1>\r\n", data)


def test_a_folded_list_unsubscribe_is_dkim_signed_and_verifies() -> None:
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cloudmailing.satellite.dkim_signer import DkimSigner

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    signer = DkimSigner("example.com", "s1", key)
    data = make(tracking_url="https://t.example.com/" + "c" * 1990).build("r1", "ann@example.org", CONTACT).data
    signed = signer.sign(data)
    assert_wire_format(signed)
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: signer.dns_txt_record().encode())


def _head(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[0]


def test_an_idn_domain_with_an_ascii_local_part_is_written_as_its_a_label() -> None:
    """As the envelope is (smtp_client): the message needs neither SMTPUTF8 nor 8BITMIME."""
    built = make(mail_from="news@exämple.test", sender_name="Shop").build("r1", "rcpt@bücher.test", CONTACT)
    head = _head(built.data)
    assert head.isascii(), [line for line in head.split(b"\r\n") if not line.isascii()]
    message = parse(built.data)
    assert message["To"] == "rcpt@xn--bcher-kva.test"
    assert message["From"] == "Shop <news@xn--exmple-cua.test>"
    assert message["Message-ID"].endswith("@xn--exmple-cua.test>")
    assert built.recipient == "rcpt@bücher.test"  # the SMTP client converts the envelope itself


def test_a_non_ascii_local_part_keeps_its_address_raw() -> None:
    """Sent with SMTPUTF8 (RFC 6532), where UTF-8 headers are allowed."""
    built = make(mail_from="ñews@exämple.test").build("r1", "zoé@bücher.test", CONTACT)
    assert "<zoé@bücher.test>".encode() in _head(built.data)
    assert "<ñews@exämple.test>".encode() in _head(built.data)
    assert b"@xn--exmple-cua.test>\r\n" in _head(built.data)  # the Message-ID's domain


@pytest.mark.parametrize("label, name", [("latin-1", "iso-8859-1"), ("utf_8", "utf-8"), ("u8", "utf-8"),
                                         ("iso8859_15", "iso-8859-15"), ("cp1252", "windows-1252")])
def test_content_type_names_the_charset_by_its_mime_name(label: str, name: str) -> None:
    """Python's aliases are no charset names MIME readers know (a mailing stored before the API
    mapped them still goes out right)."""
    data = make(charset=label, plain="café {{ firstname }}", html="<p>café</p>").build("r1", "a@x.org", CONTACT).data
    content_types = [line.lower() for line in data.split(b"\r\n") if line.lower().startswith(b"content-type: text/")]
    assert len(content_types) == 2
    assert all(f'charset="{name}"'.encode() in line for line in content_types), content_types
    assert body_of(parse(data), "text/plain") == "café Zoé"


def test_the_plain_part_derived_from_html_keeps_its_jinja_syntax() -> None:
    """The HTML parser took '<limit %}...' for a tag: the derived plain template was broken."""
    html = ('<p>Hello {{ firstname }}</p>{% if stock<limit %}<p>Only {{ stock }} left!</p>{% endif %}'
            '<a href="{{ unsubscribe }}" {% if red %}style="color: red"{% endif %}>stop</a>'
            '<!-- {% if false %} -->{# a<b #}<p>hidden</p><!-- {% endif %} --><p>&#123;&#123; literal</p>')
    template = make(plain="", html=html)
    message = parse(template.build("r1", "a@x.org", dict(CONTACT, stock=3, limit=5, red=True)).data)
    assert body_of(message, "text/plain") == (
        "Hello Zoé\n\nOnly 3 left!\nstop (https://t.example.com/ct/unsubscribe/r1)\n{{ literal\n")
    assert "Only 3 left!" in body_of(message, "text/html")
    message = parse(template.build("r2", "a@x.org", dict(CONTACT, stock=9, limit=5)).data)
    assert "left" not in body_of(message, "text/plain")
