"""API keys and satellite secrets: generation, salted scrypt hashing, constant-time checks.

A key reads ``cm_<key id>_<secret>``: the key id (public, stored in clear) finds the one stored
hash to check, so verifying costs one scrypt, not one per key on file.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_PREFIX = "cm"


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str


def generate_key() -> tuple[str, str]:
    """Return ``(key_id, full_key)`` for a new random API key."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(30)
    return key_id, f"{_PREFIX}_{key_id}_{secret}"


def parse_key(key: str) -> ParsedKey | None:
    """Split a presented key into id and secret; ``None`` when it has not our shape."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != _PREFIX or not parts[1] or not parts[2]:
        return None
    return ParsedKey(key_id=parts[1], secret=parts[2])


def _scrypt(secret: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
            length: int = _HASH_BYTES) -> bytes:
    """The one place a secret is hashed (tests count the calls)."""
    return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(secret.encode("utf-8"))


# Checked when there is no record to check against: costs one scrypt like a real one, never matches.
_DUMMY_RECORD: dict[str, object] = {"salt": bytes(_SALT_BYTES), "hash": secrets.token_bytes(_HASH_BYTES),
                                    "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}


def hash_secret(secret: str) -> dict[str, bytes | int]:
    """A storable record of ``secret``: salt, scrypt parameters and digest."""
    salt = secrets.token_bytes(_SALT_BYTES)
    return {"salt": salt, "hash": _scrypt(secret, salt), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}


def verify_secret(secret: str, record: dict[str, object]) -> bool:
    """Check ``secret`` against a record made by :func:`hash_secret`, in constant time."""
    salt, expected = record.get("salt"), record.get("hash")
    if not isinstance(salt, bytes) or not isinstance(expected, bytes):
        return False
    n, r, p = (int(record.get(k, d)) for k, d in (("n", SCRYPT_N), ("r", SCRYPT_R), ("p", SCRYPT_P)))  # type: ignore[call-overload]
    return hmac.compare_digest(_scrypt(secret, salt, n, r, p, len(expected)), expected)


def verify_secret_or_dummy(secret: str, record: dict[str, object] | None) -> bool:
    """:func:`verify_secret`, or False after the same work when there is no ``record`` (an
    unknown id): the time taken does not tell an unknown id from a wrong secret."""
    if record is None:
        verify_secret(secret, _DUMMY_RECORD)
        return False
    return verify_secret(secret, record)
