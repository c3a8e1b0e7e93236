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


def _scrypt(secret: str, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=_HASH_BYTES, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(secret.encode("utf-8"))


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
    kdf = Scrypt(salt=salt, length=len(expected), n=n, r=r, p=p)
    return hmac.compare_digest(kdf.derive(secret.encode("utf-8")), expected)
