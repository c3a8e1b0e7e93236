"""Checks and conversions of client-supplied values, shared by the services.

XML-RPC clients in other languages send what their library makes of a value: strings as
Binary, dates as ISO strings or ``dateTime.iso8601``, booleans as 0/1. These helpers accept
those forms and raise :class:`InvalidValue` (Fault 406) with the field name otherwise.
"""

from __future__ import annotations

import codecs
import datetime
from typing import Any

from cloudmailing.services.errors import InvalidValue

_ISO_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y%m%dT%H:%M:%S", "%Y%m%dT%H%M%S",
                "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def text(name: str, value: Any, *, max_length: int | None = None, header: bool = False,
         allow_none: bool = False) -> str:
    """A string (``Binary``/bytes decoded as UTF-8); ``header`` refuses CR/LF (header injection)."""
    if value is None and allow_none:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidValue(f"{name}: not valid UTF-8") from None
    elif hasattr(value, "data") and isinstance(value.data, bytes):  # xmlrpc.client.Binary
        return text(name, value.data, max_length=max_length, header=header)
    if not isinstance(value, str):
        raise InvalidValue(f"{name}: expected a string, got {type(value).__name__}")
    if header and ("\r" in value or "\n" in value or "\0" in value):
        raise InvalidValue(f"{name}: line breaks are not allowed in a header value")
    if max_length is not None and len(value) > max_length:
        raise InvalidValue(f"{name}: longer than {max_length} characters")
    return value


def boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidValue(f"{name}: expected a boolean, got {value!r}")


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidValue(f"{name}: expected an integer, got {type(value).__name__}")
    try:
        number = int(value)
    except ValueError:
        raise InvalidValue(f"{name}: expected an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise InvalidValue(f"{name}: must be at least {minimum}")
    return number


def optional_datetime(name: str, value: Any) -> datetime.datetime | None:
    """A UTC datetime from ``dateTime.iso8601`` or an ISO string; '' or None mean none."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime.datetime):
        return _naive_utc(value)
    if isinstance(value, str):
        candidate = value.strip()
        try:
            return _naive_utc(datetime.datetime.fromisoformat(candidate.replace("Z", "+00:00")))
        except ValueError:
            pass
        for fmt in _ISO_FORMATS:
            try:
                return datetime.datetime.strptime(candidate, fmt)
            except ValueError:
                continue
    raise InvalidValue(f"{name}: expected a date (ISO 8601), got {value!r}")


def _naive_utc(value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is not None:
        value = value.astimezone(datetime.UTC).replace(tzinfo=None)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def charset(name: str, value: Any) -> str:
    label = text(name, value, max_length=40).strip() or "utf-8"
    try:
        codecs.lookup(label)
    except LookupError:
        raise InvalidValue(f"{name}: unknown charset {label!r}") from None
    return label.lower()


def string_list(name: str, value: Any) -> list[str]:
    """A list of strings; a single string (or comma-separated string) is accepted too."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [text(f"{name}[{i}]", item) for i, item in enumerate(value)]
    raise InvalidValue(f"{name}: expected a list of strings")


def int_list(name: str, value: Any) -> list[int]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [integer(f"{name}[{i}]", item) for i, item in enumerate(items)]


def struct(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidValue(f"{name}: expected a struct, got {type(value).__name__}")
    return value
