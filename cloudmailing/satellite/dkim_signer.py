"""DKIM signatures (RFC 6376, relaxed/relaxed) made with OpenSSL through `cryptography`.

rsa-sha256 for RSA keys, ed25519-sha256 (RFC 8463) for Ed25519 keys. Canonicalization is
done here on bytes with a few C-level regex/replace passes (no email parsing), so a
~20 KB message costs tens of microseconds plus the signature itself.

Each header named in the signed list is signed as many times as it occurs, plus once more
("over-signing"): a header added later in transit breaks the signature instead of
overriding what the recipient sees.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

log = logging.getLogger("cloudmailing.satellite.dkim_signer")

DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from", "to", "subject", "date", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "reply-to", "cc", "sender", "list-unsubscribe",
    "list-unsubscribe-post", "list-id", "in-reply-to", "references",
)
_FIELD_SPLIT = re.compile(rb"\r\n(?![ \t])")
_WSP_RUN = re.compile(rb"[ \t]+")
_LINE_WIDTH = 76


def canonicalize_header(field: bytes) -> bytes:
    """Relaxed header canonicalization of one field (``Name: value``, maybe folded)."""
    name, _, value = field.partition(b":")
    if b"\r\n" in value or b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b""))
    return name.rstrip(b" \t").lower() + b":" + value.strip(b" ") + b"\r\n"


def canonicalize_body(body: bytes) -> bytes:
    """Relaxed body canonicalization (the message must use CRLF line ends)."""
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    # C-level replace loops, not one regex: ~20x faster on a 20 KB body; and
    # nothing at all for a body without whitespace (base64).
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    if b" " in body:
        while b"  " in body:
            body = body.replace(b"  ", b" ")
        body = body.replace(b" \r\n", b"\r\n")
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def split_message(message: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, each unfolded-able and without final CRLF; body)."""
    if message.startswith(b"\r\n"):
        return [], message[2:]
    head, _, body = message.partition(b"\r\n\r\n")
    return _FIELD_SPLIT.split(head), body


class DkimSigner:
    """Signs messages for one (domain, selector) with an RSA or Ed25519 private key."""

    def __init__(self, domain: str, selector: str, private_key_pem: bytes,
                 signed_headers: Sequence[str] = DEFAULT_SIGNED_HEADERS) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 1024:
                raise ValueError("RSA DKIM keys must have at least 1024 bits (RFC 8301)")
            self.algorithm = "rsa-sha256"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            self.algorithm = "ed25519-sha256"
        else:
            raise ValueError(f"unsupported DKIM key type {type(key).__name__}")
        self._key = key
        self.domain = domain
        self.selector = selector
        self._signed_headers = tuple(name.lower().encode("ascii") for name in signed_headers)
        self._tags = f"v=1; a={self.algorithm}; c=relaxed/relaxed;\r\n\td={domain}; s={selector};"

    def dns_txt_record(self) -> str:
        """TXT record to publish at ``<selector>._domainkey.<domain>``."""
        public = self._key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            der = public.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
            return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"

    def sign(self, message: bytes) -> bytes:
        """`message` (CRLF line ends) with a ``DKIM-Signature`` header prepended.

        A message not ending with CRLF gets one, as SMTP would add it anyway: the
        signed bytes are then exactly the delivered ones.
        """
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        fields, body = split_message(message)
        body_hash = base64.b64encode(hashlib.sha256(canonicalize_body(body)).digest())
        names, signed = self._select_headers(fields)
        header = (b"DKIM-Signature: " + self._tags.encode() + b"\r\n\th="
                  + _fold_list(names) + b";\r\n\tbh=" + body_hash + b";\r\n\tb=")
        data = b"".join(signed) + canonicalize_header(header)[:-2]
        signature = base64.b64encode(self._sign_bytes(data))
        return header + _fold_b64(signature, len(b"\tb=")) + b"\r\n" + message

    def _select_headers(self, fields: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """(h= names, canonical fields in signing order), last occurrence first."""
        by_name: dict[bytes, list[bytes]] = {}
        for field in fields:
            name = field.partition(b":")[0].rstrip(b" \t").lower()
            by_name.setdefault(name, []).append(field)
        names: list[bytes] = []
        signed: list[bytes] = []
        for wanted in self._signed_headers:
            occurrences = by_name.get(wanted, [])
            if not occurrences and wanted != b"from":
                continue
            for field in reversed(occurrences):
                signed.append(canonicalize_header(field))
                names.append(wanted)
            names.append(wanted)  # over-sign: no further instance may be added
        return names, signed

    def _sign_bytes(self, data: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        assert isinstance(self._key, ed25519.Ed25519PrivateKey)
        # RFC 8463: Ed25519 signs the SHA-256 hash of the data, not the data.
        return self._key.sign(hashlib.sha256(data).digest())


def _fold_list(names: list[bytes]) -> bytes:
    """Colon-separated names, folded after a colon before 76 columns."""
    lines: list[bytes] = []
    line = b""
    for name in names:
        if line and len(line) + len(name) + 1 > _LINE_WIDTH - 4:
            lines.append(line + b":")
            line = name
        else:
            line = line + b":" + name if line else name
    lines.append(line)
    return b"\r\n\t".join(lines)


def _fold_b64(data: bytes, first_offset: int) -> bytes:
    first = _LINE_WIDTH - first_offset
    chunks = [data[:first]] + [data[i:i + _LINE_WIDTH - 1]
                               for i in range(first, len(data), _LINE_WIDTH - 1)]
    return b"\r\n\t".join(chunk for chunk in chunks if chunk)
