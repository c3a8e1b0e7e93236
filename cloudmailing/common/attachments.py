"""Which per-recipient attachments a message can carry as they are given (API and satellite alike).

An attachment is a leaf added to the recipient's message, base64-encoded, except:

* ``message/rfc822``, which RFC 2046 5.2.1 allows no encoding but 7bit, 8bit or binary: it is
  attached as the message it is, parsed, in ``7bit``; so its bytes must be 7-bit data (ASCII,
  no NUL, lines of at most 998 octets): 8-bit data would need 8BITMIME of every server, and most
  do not say whether they take it;
* other ``message/*`` types (RFC 2046 and RFC 5322 give each its own structure) and every
  ``multipart/*`` type (RFC 2045 6.4: never base64; and its boundary would have to be the one of
  the bytes given): not supported.
"""

from __future__ import annotations

MAX_LINE = 998


def media_type(content_type: str) -> tuple[str, str]:
    """(main type, subtype) of a content type, lower case, parameters left out."""
    maintype, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
    return maintype.strip(), subtype.strip()


def is_7bit(data: bytes) -> bool:
    """7-bit data (RFC 2045 2.7): ASCII without NUL, lines of at most 998 octets."""
    if not data.isascii() or b"\x00" in data:
        return False
    return len(data) <= MAX_LINE or max(map(len, data.splitlines())) <= MAX_LINE


def attachment_problem(content_type: str, content: bytes) -> str | None:
    """Why an attachment of this type and content cannot be sent (None: it can)."""
    maintype, subtype = media_type(content_type)
    if maintype == "multipart":
        return f"content type {maintype}/{subtype} is not supported (a multipart entity cannot be attached)"
    if maintype == "message":
        if subtype != "rfc822":
            return f"content type {maintype}/{subtype} is not supported (of message types, only message/rfc822)"
        if not is_7bit(content):
            return ("a message/rfc822 attachment must be 7-bit data (ASCII, no NUL, lines of at most "
                    "998 octets): encode its 8-bit parts in base64 or quoted-printable")
    return None
