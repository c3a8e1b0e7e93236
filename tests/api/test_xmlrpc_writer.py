"""Our XML-RPC answer writer says what the standard library's marshaller says, under the API's rules."""

from __future__ import annotations

import datetime
import xmlrpc.client

import hypothesis.strategies as st
from hypothesis import given, settings

from cloudmailing.api.xmlrpc_writer import dump_response, written_ahead

scalars = (st.text() | st.none() | st.booleans() | st.integers(-2**40, 2**40)
           | st.floats(allow_nan=False) | st.binary(max_size=40)
           | st.datetimes(min_value=datetime.datetime(1000, 1, 1), max_value=datetime.datetime(9999, 12, 31))
           .map(lambda moment: moment.replace(microsecond=0)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)


def _expected(value):
    """The value a client reads back, by the API's rules, from the standard library's own output."""
    if isinstance(value, str):
        return "".join(ch if ch in "\t\n\r" or ch >= " " and ch not in "\ufffe\uffff" and not "\ud800" <= ch <= "\udfff"
                       else "\ufffd" for ch in value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -2**31 <= value < 2**31:
        return float(value)
    if isinstance(value, dict):
        return {_expected(str(key)): _expected(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expected(item) for item in value]
    return value


@settings(max_examples=300)
@given(values)
def test_answers_parse_back_to_the_value(value):
    (parsed,), _ = xmlrpc.client.loads(dump_response(value), use_builtin_types=True)
    assert parsed == _expected(value)


def test_control_characters_and_cr_survive_as_the_api_promises():
    text = "550 no such user\x0b\x1b[31m\x01 here\r\nnext"
    (parsed,), _ = xmlrpc.client.loads(dump_response({"reply_text": text}), use_builtin_types=True)
    assert parsed == {"reply_text": "550 no such user\ufffd\ufffd[31m\ufffd here\r\nnext"}


def test_big_integers_and_zoned_dates():
    zoned = datetime.datetime(2027, 1, 15, 13, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    (parsed,), _ = xmlrpc.client.loads(dump_response([2**40, 10**400, zoned]), use_builtin_types=True)
    assert parsed == [float(2**40), str(10**400), datetime.datetime(2027, 1, 15, 12, 0)]


def test_an_answer_written_ahead_is_the_same_answer():
    page = {"cursor": "c2:1.2", "recipients": [{"id": "r1", "status": "FINISHED", "reply_code": 250,
                                                "modified": datetime.datetime(2027, 1, 15, 12, 0)}]}
    written = written_ahead(page)
    assert written == page and written.xml == dump_response(page)
    written["cursor"] = "changed after it was written"  # what was written is what is sent
    assert dump_response(written) == dump_response(page)
