"""Checks and conversions of client-supplied values, shared by the services.

XML-RPC clients in other languages send what their library makes of a value: strings as
Binary, dates as ISO strings or ``dateTime.iso8601``, booleans as 0/1. These helpers accept
those forms and raise :class:`InvalidValue` (Fault 406) with the field name otherwise.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from cloudmailing.common.charsets import mime_charset
from cloudmailing.common.idn import ascii_domain_name
from cloudmailing.services.errors import BadRequest, InvalidValue

# Ids and counters are stored as BSON int64: a larger integer is a client mistake, not a crash.
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
# The most ids, statuses or domains one argument may list: each is looked up and answered, so
# a 32 MiB request of ids would otherwise cost minutes of database reads and a reply of gigabytes.
MAX_LIST_ITEMS = 10_000
# C0 controls but tab, DEL and C1 controls: meaningless (or harmful) in a header or a display name.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_ISO_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y%m%dT%H:%M:%S", "%Y%m%dT%H%M%S",
                "%Y-%m-%dT%H:%M", "%Y-%m-%d")


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a fault quotes the client's value, not 30 MiB of it."""
    described = repr(value) if not isinstance(value, (str, bytes)) or len(value) <= limit else repr(value[:limit])
    return described if len(described) <= limit + 3 else described[:limit] + "..."


def text(name: str, value: Any, *, max_length: int | None = None, header: bool = False,
         allow_none: bool = False) -> str:
    """A string (``Binary``/bytes decoded as UTF-8).

    ``header`` refuses line breaks (header injection) and every other control character but tab."""
    if value is None and allow_none:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidValue(f"{name}: not valid UTF-8") from None
    elif hasattr(value, "data") and isinstance(value.data, bytes):  # xmlrpc.client.Binary
        return text(name, value.data, max_length=max_length, header=header, allow_none=allow_none)
    if not isinstance(value, str):
        raise InvalidValue(f"{name}: expected a string, got {type(value).__name__}")
    if header and _CONTROL_CHARACTERS.search(value):
        raise InvalidValue(f"{name}: line breaks and control characters are not allowed in a header value")
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
    raise InvalidValue(f"{name}: expected a boolean, got {shown(value)}")


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidValue(f"{name}: expected an integer, got {type(value).__name__}")
    try:
        number = int(value)
    except ValueError:
        raise InvalidValue(f"{name}: expected an integer, got {shown(value)}") from None
    if minimum is not None and number < minimum:
        raise InvalidValue(f"{name}: must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise InvalidValue(f"{name}: must be at most {maximum}")
    if not INT64_MIN <= number <= INT64_MAX:
        raise InvalidValue(f"{name}: out of range (64-bit integers only)")
    return number


def optional_datetime(name: str, value: Any) -> datetime.datetime | None:
    """A UTC datetime from ``dateTime.iso8601`` or an ISO string; '' or None mean none."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime.datetime):
        return _naive_utc(name, value)
    if isinstance(value, str):
        candidate = value.strip()
        try:
            parsed = datetime.datetime.fromisoformat(candidate.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return _naive_utc(name, parsed)
        for fmt in _ISO_FORMATS:
            try:
                return datetime.datetime.strptime(candidate, fmt)
            except ValueError:
                continue
    raise InvalidValue(f"{name}: expected a date (ISO 8601), got {shown(value)}")


def _naive_utc(name: str, value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is not None:
        try:
            value = value.astimezone(datetime.UTC).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
            raise InvalidValue(f"{name}: {shown(value.isoformat())} is out of range in UTC") from None
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


_ASCII_PROBE = "From: Aa Zz 09 <a@b.c>; [x=y] {~}\r\n"


def charset(name: str, value: Any) -> str:
    """A charset a message can be sent in: known to Python and ASCII-compatible (not UTF-16/32).

    Answered as its preferred MIME name (``latin-1`` and ``iso8859_1`` give ``iso-8859-1``): the
    name stored, returned by ``list_mailings`` and written in each message's Content-Type."""
    label = text(name, "" if value is None else value, max_length=40).strip() or "utf-8"  # nil: not given
    try:
        mime_name = mime_charset(label)
        compatible = _ASCII_PROBE.encode(mime_name) == _ASCII_PROBE.encode("ascii")
    except (LookupError, UnicodeError, TypeError, ValueError):
        raise InvalidValue(f"{name}: unknown charset {shown(label)}") from None
    if not compatible:
        raise InvalidValue(f"{name}: charset {shown(label)} is not ASCII-compatible (mail headers need it)")
    return mime_name


def string_list(name: str, value: Any, *, max_length: int = 1000) -> list[str]:
    """A list of at most :data:`MAX_LIST_ITEMS` strings of at most ``max_length`` characters each
    (ids, domains, statuses...); a single string (or comma-separated string) is accepted too."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items: Any = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise InvalidValue(f"{name}: expected a list of strings")
    _check_count(name, items)
    return [text(f"{name}[{i}]", item, max_length=max_length) for i, item in enumerate(items)]


def domain_list(name: str, value: Any) -> list[str]:
    """A :func:`string_list` of domain names as they are stored: lower-case, an internationalized
    one as its IDNA A-label (``bücher.de`` is ``xn--bcher-kva.de``)."""
    return [ascii_domain_name(domain.strip().lower()).lower() for domain in string_list(name, value)]


def given(struct_value: dict[str, Any]) -> dict[str, Any]:
    """The keys of a filter struct that were given: a nil or ``''`` value (some clients' way to
    leave a criterion out) is as if the key were absent. An explicit ``[]`` matches nothing."""
    return {key: value for key, value in struct_value.items() if value is not None and value != ""}


def int_list(name: str, value: Any) -> list[int]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    _check_count(name, items)
    return [integer(f"{name}[{i}]", item) for i, item in enumerate(items)]


def _check_count(name: str, items: Any) -> None:
    if len(items) > MAX_LIST_ITEMS:
        raise BadRequest(f"{name}: too many items in one call: {len(items)} > {MAX_LIST_ITEMS}")


def struct(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidValue(f"{name}: expected a struct, got {type(value).__name__}")
    return value
