"""The link's frames: what each decoder accepts and refuses, and that encoding then decoding gives
the frame back. Property tests feed the decoders generated frames, valid and not."""

from __future__ import annotations

import json
from typing import Any, Callable
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cloudmailing.common.link_protocol import (
    HELD_PER_CALL,
    REQUESTS,
    Attachment,
    FrameError,
    Held,
    Hello,
    HelloAnswer,
    LeaseAnswer,
    LeasedRecipient,
    LeaseRequest,
    MailingContent,
    MailingRequest,
    Outcome,
    Report,
    ReportAnswer,
    _plain_outcome,
    _plain_recipient,
)
from cloudmailing.common.statuses import REPORTED_STATUSES
from tests.common.test_link_frames import json_values

RECIPIENT = {"id": "r1", "mailing_id": 3, "email": "a@b.test", "domain": "b.test", "contact": {"name": "A"},
             "test": False, "lease": "L1", "attachments": [{"filename": "f.txt", "content_type": "text/plain",
                                                            "content": "aGk="}]}
OUTCOME = {"recipient_id": "r1", "status": "FINISHED", "reply_code": 250, "reply_enhanced_code": "2.0.0",
           "reply_text": "ok", "smtp_log": ["< 250 ok"], "mx_host": "mx.b.test", "lease": "L1"}


def test_frames_decode_into_their_fields():
    assert Hello.from_wire({"serial": "s", "secret": "x"}) == Hello("s", "x", "", None)
    assert Hello.from_wire({"serial": "s", "secret": "x", "leases": ["L1"]}).leases == ["L1"]
    assert Held.from_wire({"leases": ["L1"], "more": True}) == Held(["L1"], True)
    assert Held.from_wire({"leases": ["L1"] * HELD_PER_CALL}) == Held(["L1"] * HELD_PER_CALL, False)
    recipient = LeasedRecipient.from_wire(RECIPIENT)
    assert recipient.attachments == [Attachment("f.txt", "text/plain", "aGk=")] and recipient.lease == "L1"
    assert Outcome.from_wire(OUTCOME).reply_code == 250
    assert Outcome.from_wire({"recipient_id": "r", "status": "WARNING", "reply_code": None}).lease is None


@pytest.mark.parametrize(("decode", "value", "error"), [
    (Hello.from_wire, {"serial": 1, "secret": "x"}, "hello.serial: expected a string, got int"),
    (Hello.from_wire, {"secret": "x"}, "hello.serial: missing"),
    (Hello.from_wire, {"serial": "s", "secret": "x", "leases": "L1"}, "hello.leases: expected a list"),
    (Hello.from_wire, {"serial": "s", "secret": "x", "leases": [1]}, "hello.leases[0]: expected a string"),
    (Hello.from_wire, {"serial": "s", "secret": "x", "extra": 1}, "hello: unknown field 'extra'"),
    (Hello.from_wire, {"serial": "\ud800", "secret": "x"}, "hello.serial: not valid Unicode"),
    (Held.from_wire, {"leases": ["L1"] * (HELD_PER_CALL + 1)}, f"held.leases: more than {HELD_PER_CALL}"),
    (Held.from_wire, {"leases": ["L1"], "more": 1}, "held.more: expected true or false"),
    (Held.from_wire, {"more": False}, "held.leases: missing"),
    (Held.from_wire, {"leases": [], "serial": "s"}, "held: unknown field 'serial'"),
    (LeaseRequest.from_wire, {"max_recipients": True}, "lease.max_recipients: expected an integer, got bool"),
    (LeaseRequest.from_wire, {"max_recipients": -1}, "lease.max_recipients: -1 is not from 0"),
    (MailingRequest.from_wire, {"mailing_id": "3"}, "mailing.mailing_id: expected an integer, got str"),
    (Report.from_wire, {"outcomes": {}}, "report.outcomes: expected a list, got dict"),
    (Report.from_wire, {"outcomes": [OUTCOME, 5]}, "report.outcomes[1]: expected an object, got int"),
    (Report.from_wire, {"outcomes": [{**OUTCOME, "status": "SENT"}]}, "report.outcomes[0].status: 'SENT' is not"),
    (Report.from_wire, {"outcomes": [{**OUTCOME, "reply_code": "250"}]}, "report.outcomes[0].reply_code"),
    (Report.from_wire, {"outcomes": [{**OUTCOME, "smtp_log": ["a", None]}]}, "report.outcomes[0].smtp_log[1]"),
    (Report.from_wire, {"outcomes": [{**OUTCOME, "lease": 3}]}, "report.outcomes[0].lease"),
    (Report.from_wire, {"outcomes": [{**OUTCOME, "customized_content": "not base64!"}]},
     "report.outcomes[0].customized_content: not base64"),
    (Report.from_wire, {"outcomes": [{**OUTCOME, "x": 1}]}, "report.outcomes[0]: unknown field 'x'"),
    (LeaseAnswer.from_wire, {"recipients": [{**RECIPIENT, "test": "no"}], "lease_seconds": 300},
     "lease answer.recipients[0].test: expected true or false"),
    (LeaseAnswer.from_wire, {"recipients": [{**RECIPIENT, "lease": None}], "lease_seconds": 300},
     "lease answer.recipients[0].lease: expected a string, got null"),
    (LeaseAnswer.from_wire, {"recipients": [{**RECIPIENT, "attachments": [{"filename": "f", "content_type": "a/b",
                                                                          "content": "%%"}]}], "lease_seconds": 1},
     "lease answer.recipients[0].attachments[0].content: not base64"),
    (MailingContent.from_wire, {"id": 1, "mail_from": "a@b.test", "rfc822": 5}, "mailing content.rfc822"),
    (MailingContent.from_wire, {"id": 1, "mail_from": "a@b.test", "dkim": {"enabled": True, "domain": "b.test"}},
     "mailing content.dkim.selector: missing"),
    (HelloAnswer.from_wire, {"satellite_id": "7", "group": ""}, "hello answer.satellite_id"),
    (ReportAnswer.from_wire, {"acknowledged": [1]}, "report answer.acknowledged[0]: expected a string"),
    (ReportAnswer.from_wire, [], "report answer: expected an object, got list"),
])
def test_a_malformed_field_is_refused_by_name(decode: Callable[[Any], Any], value: Any, error: str):
    with pytest.raises(FrameError) as raised:
        decode(value)
    assert str(raised.value).startswith(error), str(raised.value)


def test_answers_ignore_fields_a_newer_master_adds():
    assert ReportAnswer.from_wire({"acknowledged": ["r1"], "later": 1}) == ReportAnswer(["r1"])


# -- properties -----------------------------------------------------------------------------

texts = st.text(max_size=12)
base64_texts = st.binary(max_size=12).map(lambda b: __import__("base64").b64encode(b).decode())
outcomes = st.builds(Outcome, texts, st.sampled_from(REPORTED_STATUSES), st.none() | st.integers(0, 999), texts,
                     texts, st.lists(texts, max_size=3), texts, st.none() | texts, st.none() | base64_texts)
recipients = st.builds(LeasedRecipient, texts, st.integers(0, 2**40), texts, texts,
                       st.dictionaries(texts, texts, max_size=3), st.booleans(), texts,
                       st.lists(st.builds(Attachment, texts, texts, base64_texts), max_size=2))
frames = st.one_of(
    st.builds(Hello, texts, texts, texts, st.none() | st.lists(texts, max_size=3)),
    st.builds(HelloAnswer, st.integers(0, 2**40), texts),
    st.builds(Held, st.lists(texts, max_size=3), st.booleans()),
    st.builds(LeaseRequest, st.integers(0, 2**31)),
    st.builds(LeaseAnswer, st.lists(recipients, max_size=3), st.integers(0, 10**6)),
    st.builds(MailingRequest, st.integers(0, 2**40)),
    st.builds(MailingContent, st.integers(0, 2**40), texts, base64_texts, st.none() | texts, st.none() | texts),
    st.builds(Report, st.lists(outcomes, max_size=3)),
    st.builds(ReportAnswer, st.lists(texts, max_size=3)),
)


@settings(max_examples=200, deadline=None, database=None)
@given(frames)
def test_a_frame_encoded_then_decoded_is_the_same_frame(frame: Any) -> None:
    wire = json.loads(json.dumps(frame.to_wire()))
    assert type(frame).from_wire(wire) == frame


decoders = st.sampled_from([*REQUESTS.values(), HelloAnswer.from_wire, LeaseAnswer.from_wire,
                            MailingContent.from_wire, ReportAnswer.from_wire])
mutated = st.fixed_dictionaries({}, optional={
    "serial": json_values, "secret": json_values, "leases": json_values, "more": json_values,
    "max_recipients": json_values,
    "mailing_id": json_values, "outcomes": st.lists(st.fixed_dictionaries(
        {"recipient_id": json_values, "status": st.sampled_from(REPORTED_STATUSES) | json_values},
        optional={k: json_values for k in OUTCOME if k not in ("recipient_id", "status")}), max_size=3) | json_values,
    "recipients": st.lists(st.fixed_dictionaries({k: json_values for k in RECIPIENT}), max_size=2),
    "id": json_values, "mail_from": json_values, "acknowledged": json_values, "satellite_id": json_values})


@settings(max_examples=300, deadline=None, database=None)
@given(decoders, mutated | json_values)
def test_decoders_raise_only_frame_error(decode: Callable[[Any], Any], value: Any) -> None:
    """Anything else raised fails the test; what is accepted is a frame that survives the wire."""
    try:
        frame = decode(value)
    except FrameError as refused:
        assert str(refused)  # says which field
        return
    assert type(frame).from_wire(frame.to_wire()) == frame


def _field_by_field(value: Any) -> Outcome | FrameError:
    """What the outcome decoder's general path makes of ``value``, without its fast path."""
    try:
        return Outcome.from_wire({**value, "customized_content": None} if isinstance(value, dict) else value)
    except FrameError as refused:
        return refused


# An outcome with a few of its fields changed to anything JSON holds, or to near-misses.
near_misses = st.sampled_from([None, "", "é", "\ud800", 0, True, False, 2**70, -1, 999, 1000, [], ["x"], ["é"],
                               [None], {}])
outcome_variants = st.fixed_dictionaries({}, optional={
    name: json_values | near_misses | st.just(OUTCOME.get(name, "r1")) for name in OUTCOME}) | json_values


@settings(max_examples=500, deadline=None, database=None)
@given(outcome_variants)
@example({"recipient_id": "r1", "lease": [], "status": "FINISHED"})  # a falsy lease once passed the fast check
@example({"recipient_id": "r1", "status": "FINISHED", "reply_code": 2**70})  # more than BSON stores
def test_the_fast_outcome_check_accepts_only_what_the_field_check_accepts(value: Any) -> None:
    assert _plain_outcome(OUTCOME) == _field_by_field(OUTCOME)  # the everyday outcome takes the fast path
    try:
        fast = Outcome.from_wire(value)
    except FrameError:
        fast = None
    general = _field_by_field(value)
    if fast is not None:
        assert general == fast  # same fields; "customized_content": None forces the general path
    else:
        assert isinstance(general, FrameError)


recipient_variants = st.fixed_dictionaries({}, optional={
    name: json_values | near_misses | st.just(RECIPIENT[name] if name != "attachments" else [])
    for name in RECIPIENT}) | json_values


@settings(max_examples=500, deadline=None, database=None)
@given(recipient_variants)
def test_the_fast_recipient_check_accepts_only_what_the_field_check_accepts(value: Any) -> None:
    everyday = {**RECIPIENT, "attachments": []}
    assert _plain_recipient(everyday) == LeasedRecipient.from_wire(everyday)  # it takes the fast path
    try:
        fast = LeasedRecipient.from_wire(value)
    except FrameError:
        fast = None
    with mock.patch("cloudmailing.common.link_protocol._plain_recipient", return_value=None):
        try:
            general: LeasedRecipient | FrameError = LeasedRecipient.from_wire(value)
        except FrameError as refused:
            general = refused
    if fast is not None:
        assert general == fast
    else:
        assert isinstance(general, FrameError)
