"""XML-RPC requests in, responses out: the standard library's (un)marshaller, made hostile-proof.

Parsing uses expat with the stdlib's ``Unmarshaller`` as target, plus guards: any DOCTYPE is
refused (so no entity expansion, internal or external: XML-RPC never needs one), the nesting of
values is bounded (the body's size is bounded before parsing), and dates are read liberally
(``20261123T10:00:00``, or ISO 8601 with dashes or a zone).
Answers never contain ``<nil/>``: every ``None`` is sent as '' (keys stay, so structs keep one shape),
and are always well-formed XML: characters XML 1.0 forbids (control characters in a stored SMTP
reply, a sender name from older versions...) are sent as U+FFFD, and a CR as ``&#13;`` so that it
survives XML's line-end normalization (see ``xmlrpc_writer``).
"""

from __future__ import annotations

import xmlrpc.client
from typing import Any
from xml.parsers import expat

from cloudmailing.api.xmlrpc_writer import dump_response, xml_safe
from cloudmailing.services.errors import InvalidValue
from cloudmailing.services.values import optional_datetime


class MalformedRequest(ValueError):
    """The body is not a well-formed, acceptable XML-RPC call."""


class _LiberalUnmarshaller(xmlrpc.client.Unmarshaller):
    """The stdlib unmarshaller, reading dates liberally."""

    dispatch = dict(xmlrpc.client.Unmarshaller.dispatch)

    def __init__(self) -> None:
        super().__init__(use_datetime=True, use_builtin_types=True)

    def end_datetime(self, data: str) -> None:
        try:
            value = optional_datetime("dateTime.iso8601", data)
        except InvalidValue as error:
            raise MalformedRequest(str(error)) from None
        self.append(value)
        self._value = False

    dispatch["dateTime.iso8601"] = end_datetime  # type: ignore[assignment]


def _check_depth(params: Any, max_depth: int) -> None:
    """Refuse absurdly nested values, and structs whose keys are not names (checked after parsing:
    per-element hooks would halve the speed)."""
    pending = [(params, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > max_depth:
            raise MalformedRequest(f"values nested deeper than {max_depth} levels")
        if isinstance(value, dict):
            if not all(type(key) is str for key in value):  # a <member> without its <name>
                raise MalformedRequest("a struct member without a name")
            pending.extend((item, depth + 1) for item in value.values() if isinstance(item, (dict, list, tuple)))
        elif isinstance(value, (list, tuple)):
            pending.extend((item, depth + 1) for item in value if isinstance(item, (dict, list, tuple)))


def _refuse_doctype(*_args: Any) -> None:
    raise MalformedRequest("DOCTYPE and entity declarations are not accepted")


def parse_call(body: bytes, max_depth: int = 64) -> tuple[str, tuple[Any, ...]]:
    """Return ``(method name, params)`` of an XML-RPC call, or raise :class:`MalformedRequest`."""
    target = _LiberalUnmarshaller()
    parser = expat.ParserCreate()
    parser.buffer_text = True
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_doctype
    parser.EntityDeclHandler = _refuse_doctype
    target.xml(None, None)  # type: ignore[arg-type]  # as the stdlib parser does: expat decodes
    parser.StartElementHandler = target.start
    parser.EndElementHandler = target.end
    parser.CharacterDataHandler = target.data
    try:
        parser.Parse(body, True)
        params = target.close()
    except MalformedRequest:
        raise
    except (expat.ExpatError, xmlrpc.client.Error, ValueError, TypeError, LookupError,
            AttributeError, OverflowError) as error:  # LookupError: an unknown encoding declaration
        # (xmlrpc.client.Error: a <fault> in a call, which the unmarshaller raises at its end)
        raise MalformedRequest(f"malformed XML-RPC request: {error}") from None
    method = target.getmethodname()
    if not method:
        raise MalformedRequest("not an XML-RPC method call")
    _check_depth(params, max_depth)
    return method, params


__all__ = ["MalformedRequest", "dump_fault", "dump_response", "parse_call"]


def dump_fault(code: int, message: str) -> bytes:
    return xmlrpc.client.dumps(xmlrpc.client.Fault(code, xml_safe(message)), methodresponse=True,
                               encoding="utf-8").encode("utf-8")
