"""Tests of the DKIM signer, verified by an independent implementation (dkimpy)."""

from __future__ import annotations

import random

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from twisted.internet.task import Clock

from cloudmailing.satellite.dkim_signer import (
    DkimSigner,
    canonicalize_body,
    canonicalize_header,
)
from cloudmailing.satellite.message_builder import MailingContent, MailingMessageTemplate

DOMAIN = "example.com"
SELECTOR = "s2024"


def pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


KEYS = {
    "rsa-sha256": pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    "ed25519-sha256": pem(ed25519.Ed25519PrivateKey.generate()),
}


@pytest.fixture(params=sorted(KEYS))
def signer(request: pytest.FixtureRequest) -> DkimSigner:
    signer = DkimSigner(DOMAIN, SELECTOR, KEYS[request.param])
    assert signer.algorithm == request.param
    return signer


def verify(signer: DkimSigner, message: bytes) -> bool:
    """dkimpy's verdict, with DNS answered from the signer's own TXT record."""
    record = signer.dns_txt_record().encode()
    asked: list[bytes] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        asked.append(name)
        return record

    verdict = bool(dkim.verify(message, dnsfunc=dnsfunc))
    assert asked == [f"{SELECTOR}._domainkey.{DOMAIN}.".encode()]
    return verdict


def built_message(subject: str, html: str) -> bytes:
    content = MailingContent(
        mailing_id=7, mail_from="news@example.com", sender_name="Équipe ✉ Ventes",
        subject=subject, html=html, plain="Hi {{ name }}\n\n\n",
        tracking_url="https://t.example.com/ct/")
    template = MailingMessageTemplate(content, clock=Clock(), rng=random.Random(3))
    return template.build("r-1", "zoe@example.org", {"name": "Zoé"}).data


def test_signs_built_message_with_non_ascii_subject_and_folded_headers(
        signer: DkimSigner) -> None:
    message = built_message("Offre très spéciale pour {{ name }} " + "— encore " * 20,
                            "<p>{{ name }}</p>\n")
    head = message.split(b"\r\n\r\n")[0]
    assert b"\r\n " in head  # the subject really is folded
    signed = signer.sign(message)
    assert signed.endswith(message)
    assert signed.startswith(b"DKIM-Signature: v=1; a=" + signer.algorithm.encode())
    assert max(len(line) for line in signed.split(b"\r\n")) <= 78
    assert verify(signer, signed)


RAW = (b"From: Someone  <a@example.com>\r\n"
       b"To:   b@example.org \r\n"
       b"Subject: lots \t of   whitespace,\r\n\t folded  \r\n  twice \r\n"
       b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
       b"Message-ID: <x@example.com>\r\n"
       b"X-Unsigned: whatever\r\n"
       b"\r\n"
       b"line  with \t runs   \r\n"
       b" leading space\r\n"
       b"\r\n"
       b"tab\tinside\r\n"
       b"\r\n\r\n   \r\n\r\n")


def test_raw_message_with_whitespace_runs_and_trailing_blank_lines(signer: DkimSigner) -> None:
    assert verify(signer, signer.sign(RAW))


@pytest.mark.parametrize("body", [b"", b"no final newline  ", b"\r\n\r\n", b"x\r\n"])
def test_edge_case_bodies(signer: DkimSigner, body: bytes) -> None:
    message = b"From: a@example.com\r\nSubject: s\r\n\r\n" + body
    signed = signer.sign(message)
    assert signed.endswith(b"\r\n")  # as SMTP delivers it: the bytes signed are those sent
    assert verify(signer, signed)


def test_relaxed_body_canonicalization_may_change_whitespace(signer: DkimSigner) -> None:
    signed = signer.sign(RAW)
    reformatted = signed.replace(b"line  with \t runs   \r\n", b"line with runs\r\n")
    assert reformatted != signed
    assert verify(signer, reformatted + b"\r\n\r\n")


@pytest.mark.parametrize("tamper", [
    lambda m: m.replace(b"leading space", b"leading spaces"),
    lambda m: m.replace(b"tab\tinside", b"tabinside"),
    lambda m: m.replace(b"Subject: lots", b"Subject: lot"),
    lambda m: m.replace(b"To:   b@example.org", b"To: c@example.org"),
    lambda m: m + b"appended\r\n",
])
def test_tampered_message_fails(signer: DkimSigner, tamper: object) -> None:
    signed = signer.sign(RAW)
    assert callable(tamper)
    changed = tamper(signed)
    assert changed != signed
    assert not verify(signer, changed)


def test_tampered_built_body_fails(signer: DkimSigner) -> None:
    signed = signer.sign(built_message("Hello", "<p>{{ name }}</p>\n"))
    head, _, body = signed.partition(b"\r\n\r\n")
    tampered = head + b"\r\n\r\n" + body.replace(b"SGkgWm", b"SGkgWn", 1)
    assert tampered != signed
    assert not verify(signer, tampered)


@pytest.mark.parametrize("position", ["top", "bottom"])
def test_added_from_header_breaks_signature(signer: DkimSigner, position: str) -> None:
    signed = signer.sign(RAW)
    forged_header = b"From: evil@example.net\r\n"
    if position == "top":  # only over-signing catches this one
        forged = forged_header + signed
    else:
        head, _, body = signed.partition(b"\r\n\r\n")
        forged = head + b"\r\n" + forged_header + b"\r\n" + body
    assert not verify(signer, forged)


def test_unsigned_header_may_be_added(signer: DkimSigner) -> None:
    signed = signer.sign(RAW)
    assert verify(signer, b"Received: from relay\r\n" + signed)
    assert b"x-unsigned" not in signed.split(b"DKIM-Signature")[1].split(b"bh=")[0]


def test_signed_header_list(signer: DkimSigner) -> None:
    signed = signer.sign(built_message("Hi", "<p>x</p>"))
    tags = signed.split(b"\r\n\r\n")[0].split(b"; bh=")[0].replace(b"\r\n\t", b"")
    names = tags.split(b"h=")[1].split(b";")[0].split(b":")
    for name in (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                 b"content-type", b"list-unsubscribe", b"list-unsubscribe-post"):
        assert names.count(name) == 2, name  # signed once, over-signed once


def test_canonicalization_matches_rfc6376_example() -> None:
    # RFC 6376 section 3.4.6
    assert canonicalize_header(b"A: X") == b"a:X\r\n"
    assert canonicalize_header(b"B : Y\t\r\n\tZ  ") == b"b:Y Z\r\n"
    assert canonicalize_body(b" C \r\nD \t E\r\n\r\n\r\n") == b" C\r\nD E\r\n"


def test_rejects_unsupported_keys() -> None:
    with pytest.raises(ValueError):
        DkimSigner(DOMAIN, SELECTOR, pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ValueError):
        DkimSigner(DOMAIN, SELECTOR, b"not a key")


def test_dns_txt_records() -> None:
    rsa_record = DkimSigner(DOMAIN, SELECTOR, KEYS["rsa-sha256"]).dns_txt_record()
    assert rsa_record.startswith("v=DKIM1; k=rsa; p=MII")
    ed_record = DkimSigner(DOMAIN, SELECTOR, KEYS["ed25519-sha256"]).dns_txt_record()
    assert ed_record.startswith("v=DKIM1; k=ed25519; p=") and len(ed_record) == 22 + 44


def test_canonicalization_agrees_with_dkimpy_on_random_input() -> None:
    relaxed = dkim.canonicalization.Relaxed
    rng = random.Random(2024)
    alphabet = [b" ", b"\t", b"a", b"b", b"\r\n", b"  ", b"\t \t"]
    for _ in range(2000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30))) + b"\r\n"
        assert canonicalize_body(body) == relaxed.canonicalize_body(body), body
        value = b"".join(rng.choice([b" ", b"\t", b"x", b"\r\n ", b"\r\n\t"])
                         for _ in range(rng.randrange(1, 12)))
        name, canonical = relaxed.canonicalize_headers([(b"X-Test ", value)])[0]
        assert canonicalize_header(b"X-Test :" + value) == name + b":" + canonical, value
