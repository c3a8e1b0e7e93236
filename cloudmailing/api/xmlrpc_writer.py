"""Writing XML-RPC answers: a marshaller for the values the API answers with.

The standard library's ``Marshaller`` is generic and slow for our largest answers (a thousand
status structs per cursor page: it encoded about 11,000 structs per second, the cursor's
ceiling). This one writes the same XML-RPC, with the API's own rules folded in:

- ``None`` is sent as '' (never ``<nil/>``: strict clients refuse it), keys stay;
- integers beyond XML-RPC's 32 bits are sent as doubles, as the API always did (as digits
  beyond a double's range);
- characters XML 1.0 cannot carry (control characters of a stored SMTP reply...) become U+FFFD,
  and a CR is sent as ``&#13;`` (a raw one reaches clients as LF: kept messages must not change);
- dates with a zone are sent in UTC.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import re
import xmlrpc.client
from typing import Any, Callable

# Characters XML 1.0 cannot carry, replaced in each text written (the markup has none); among
# ASCII texts, the common case, only control characters can be such.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ASCII_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_INT32 = range(-2**31, 2**31)


def xml_text(value: str) -> str:
    """``value`` escaped for XML character data: a CR as ``&#13;``, a character XML 1.0 cannot
    carry as U+FFFD."""
    pattern = _ASCII_NOT_XML if value.isascii() else _NOT_XML
    if pattern.search(value):
        value = pattern.sub("\ufffd", value)
    value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return value.replace("\r", "&#13;") if "\r" in value else value


def xml_safe(document: str) -> str:
    """``document`` with every character XML 1.0 cannot carry replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", document) if _NOT_XML.search(document) else document


GZIP_AT_LEAST = 64 * 1024  # answers this large go gzipped to clients that accept it


def gzipped(body: bytes) -> bytes:
    """``body`` gzipped (fast: level 1), or as it was written ahead."""
    return getattr(body, "gzipped", b"") or gzip.compress(body, compresslevel=1, mtime=0)


class WrittenXml(bytes):
    """A ``methodResponse`` written ahead, and its gzip form when large enough to be sent so."""

    gzipped: bytes = b""


class Written(dict[str, Any]):
    """An answer whose ``methodResponse`` was written ahead (``xml``): a cursor page read ahead
    is also written (and gzipped) ahead, while the client still parses the page before."""

    xml: bytes = b""


def written_ahead(answer: dict[str, Any]) -> Written:
    """``answer`` with its ``methodResponse`` written now."""
    xml = WrittenXml(dump_response(answer))
    if len(xml) >= GZIP_AT_LEAST:
        xml.gzipped = gzipped(xml)
    written = Written(answer)
    written.xml = xml
    return written


def dump_response(result: Any) -> bytes:
    """A ``methodResponse`` holding ``result``."""
    if type(result) is Written and result.xml:
        return result.xml
    out = ["<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n"]
    _write(result, out.append)
    out.append("</param>\n</params>\n</methodResponse>\n")
    return "".join(out).encode("utf-8")  # every text went through xml_text


def _write(value: Any, write: Callable[[str], Any]) -> None:
    if isinstance(value, str):
        write(f"<value><string>{xml_text(value)}</string></value>\n")
    elif value is None:
        write("<value><string></string></value>\n")
    elif isinstance(value, bool):
        write("<value><boolean>1</boolean></value>\n" if value else "<value><boolean>0</boolean></value>\n")
    elif isinstance(value, int):
        write(f"<value><int>{value}</int></value>\n" if value in _INT32 else _big_int(value))
    elif isinstance(value, float):
        write(f"<value><double>{value!r}</double></value>\n")
    elif isinstance(value, dict):
        write("<value><struct>\n")
        for key, item in value.items():
            write(f"<member>\n<name>{xml_text(str(key))}</name>\n")
            _write(item, write)
            write("</member>\n")
        write("</struct></value>\n")
    elif isinstance(value, (list, tuple)):
        write("<value><array><data>\n")
        for item in value:
            _write(item, write)
        write("</data></array></value>\n")
    elif isinstance(value, datetime.datetime):
        write(f"<value><dateTime.iso8601>{_iso8601(value)}</dateTime.iso8601></value>\n")
    elif isinstance(value, (bytes, bytearray, xmlrpc.client.Binary)):
        data = value.data if isinstance(value, xmlrpc.client.Binary) else bytes(value)
        write(f"<value><base64>\n{base64.b64encode(data).decode('ascii')}\n</base64></value>\n")
    else:
        raise TypeError(f"cannot answer a {type(value).__name__} in XML-RPC")


def _big_int(value: int) -> str:
    """Beyond 32 bits: a double, or its digits as a string beyond a double's range."""
    try:
        return f"<value><double>{float(value)!r}</double></value>\n"
    except OverflowError:
        return f"<value><string>{value}</string></value>\n"


def _iso8601(moment: datetime.datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.UTC).replace(tzinfo=None)
    text = moment.isoformat()  # YYYY-MM-DDTHH:MM:SS[.ffffff], in C: the fastest way here
    return text[0:4] + text[5:7] + text[8:10] + text[10:19]
