"""create_mailing_ext's message decoding, for any input a stranger may send."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudmailing.services.errors import InvalidValue
from cloudmailing.services.mailings import _decode_message

_NAME = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1, max_size=20)
_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
_HEADERS = st.lists(st.tuples(_NAME, _VALUE), min_size=1, max_size=6)
_BODY = st.binary(max_size=300)
_LINE_END = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    end = draw(_LINE_END)
    head = b"".join(f"{name}: {value}".encode() + end for name, value in draw(_HEADERS))
    return head + end + draw(_BODY)


@given(messages())
def test_a_message_and_its_base64_text_decode_to_the_message(raw: bytes) -> None:
    assert _decode_message(raw) == raw
    assert _decode_message(base64.b64encode(raw)) == raw
    assert _decode_message(base64.encodebytes(raw)) == raw
    assert _decode_message(base64.b64encode(raw).decode("ascii")) == raw


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_anything_else_is_refused_or_decodes_to_headers(data: bytes | str) -> None:
    try:
        raw = _decode_message(data)
    except InvalidValue:
        return
    first_line = raw.split(b"\n", 1)[0]
    assert b":" in first_line and first_line[:1] not in (b" ", b"\t")
    if isinstance(data, str):
        assert raw == base64.b64decode(data)


@pytest.mark.parametrize("data", [b"", "", b"hello", "Zm9v\x00", b"From nobody Mon Jan  1\nSubject: x\n\nbody",
                                  b" Subject: folded first\r\n\r\n", b"Subject: x\r\nno colon here\r\n\r\nbody",
                                  12, None, ["Zm9v"]])
def test_refused_inputs(data: object) -> None:
    with pytest.raises(InvalidValue):
        _decode_message(data)
