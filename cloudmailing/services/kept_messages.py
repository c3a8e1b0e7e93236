"""A recipient's kept message (``backup_customized_emails``) as the API returns it."""

from __future__ import annotations

import re

# What XML 1.0 cannot hold, even as a character reference: most C0 controls, U+FFFE, U+FFFF.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def customized_content(data: bytes | None) -> str | bytes:
    """The message exactly as sent: a string when it is UTF-8 that XML can carry (any 7-bit or
    UTF-8 message without control characters), else its bytes (sent as ``base64``)."""
    raw = bytes(data or b"")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    return raw if _NOT_XML.search(text) else text
