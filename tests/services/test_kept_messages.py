"""A kept message reaches an XML-RPC client byte for byte, as a string when XML can hold it."""

from __future__ import annotations

import xmlrpc.client

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudmailing.api.xmlrpc_codec import dump_response
from cloudmailing.services.kept_messages import customized_content


def _through_xmlrpc(value: object) -> object:
    (answer,), _ = xmlrpc.client.loads(dump_response(value), use_builtin_types=True)
    return answer


@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda text: text.encode("utf-8", "replace"))))
def test_any_message_comes_back_as_sent(data: bytes) -> None:
    answer = _through_xmlrpc(customized_content(data))
    assert (answer.encode("utf-8") if isinstance(answer, str) else answer) == data


@pytest.mark.parametrize(("data", "kind"), [
    (b"Subject: x\r\n\r\nBonjour \xc3\xa0 tous\r\n", str),  # 8-bit UTF-8, CR LF kept
    (b"Subject: x\r\n\r\n\x1b$B$3$s$K$A$O\x1b(B\r\n", bytes),  # ISO-2022-JP: ESC is not XML
    (b"Subject: x\r\n\r\nD\xe9j\xe0 vu\r\n", bytes),  # Latin-1: not UTF-8
    (None, str),  # nothing kept: ''
])
def test_text_when_xml_can_hold_it_else_base64(data: bytes | None, kind: type) -> None:
    assert isinstance(_through_xmlrpc(customized_content(data)), kind)
