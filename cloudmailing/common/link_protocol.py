"""The satellite link's frames, defined once: what each request and answer carries, and its checks.

``common/link.py`` moves JSON objects; this module says what is in them. Each frame is a
dataclass with ``from_wire`` (a validating decoder: :class:`FrameError`, naming the field, for
anything else than the expected shape) and ``to_wire`` (the JSON object sent). The master decodes
the satellite's requests and the outcomes it reports; the satellite decodes the master's answers.
Requests and outcomes refuse unknown fields (they come from a peer that may be hostile); answers
ignore them (a newer master may add some). Strings must be valid Unicode (no lone surrogates).

Methods the master serves (``master/link_server.py``), request → answer:

- ``hello`` :class:`Hello` → :class:`HelloAnswer`; must come first.
- ``lease`` :class:`LeaseRequest` → :class:`LeaseAnswer` (:class:`LeasedRecipient` each).
- ``mailing`` :class:`MailingRequest` → :class:`MailingContent`.
- ``report`` :class:`Report` (:class:`Outcome` each) → :class:`ReportAnswer`.

The method the satellite serves: ``wake`` :class:`Wake` (no answer awaited): recipients became
deliverable, ask for a lease now rather than at the next idle poll.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, TypeVar

from cloudmailing.common.statuses import REPORTED_STATUSES

T = TypeVar("T")
_INT64 = (-2**63, 2**63 - 1)


class FrameError(ValueError):
    """A frame or one of its fields is not of the link's shape; the message names the field."""


class _Fields:
    """Typed reads from one JSON object, each failure naming the field (``where.name``)."""

    def __init__(self, value: Any, where: str, strict: bool) -> None:
        if not isinstance(value, dict):
            raise FrameError(f"{where}: expected an object, got {_kind(value)}")
        self._value = value
        self._where = where
        self._strict = strict
        self._read: set[str] = set()

    def _get(self, name: str, required: bool) -> Any:
        self._read.add(name)
        if name not in self._value and required:
            raise FrameError(f"{self._where}.{name}: missing")
        return self._value.get(name)

    def _fail(self, name: str, expected: str, value: Any) -> FrameError:
        return FrameError(f"{self._where}.{name}: expected {expected}, got {_kind(value)}")

    def text(self, name: str, required: bool = True, default: str = "") -> str:
        value = self._get(name, required)
        if value is None and not required:
            return default
        return _text(value, f"{self._where}.{name}")

    def optional_text(self, name: str) -> str | None:
        value = self._get(name, False)
        return None if value is None else _text(value, f"{self._where}.{name}")

    def integer(self, name: str, low: int = _INT64[0], high: int = _INT64[1]) -> int:
        value = self._get(name, True)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, "an integer", value)
        if not low <= value <= high:
            raise FrameError(f"{self._where}.{name}: {value} is not from {low} to {high}")
        return value

    def optional_integer(self, name: str, low: int = _INT64[0], high: int = _INT64[1]) -> int | None:
        value = self._get(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(name, "an integer or null", value)
        if not low <= value <= high:
            raise FrameError(f"{self._where}.{name}: {value} is not from {low} to {high}")
        return value

    def flag(self, name: str, required: bool = True) -> bool:
        value = self._get(name, required)
        if value is None and not required:
            return False
        if not isinstance(value, bool):
            raise self._fail(name, "true or false", value)
        return value

    def mapping(self, name: str, required: bool = True) -> dict[str, Any]:
        value = self._get(name, required)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self._fail(name, "an object", value)
        return value

    def items(self, name: str, item: Callable[[Any, str], T], required: bool = True) -> list[T]:
        value = self._get(name, required)
        if value is None and not required:
            return []
        if not isinstance(value, list):
            raise self._fail(name, "a list", value)
        if item is _string_item and all(type(entry) is str and entry.isascii() for entry in value):
            return list(value)  # the common case of an SMTP log, checked at C speed
        return [item(entry, f"{self._where}.{name}[{index}]") for index, entry in enumerate(value)]

    def base64_text(self, name: str, required: bool = True) -> str:
        text = self.text(name, required)
        _check_base64(text, f"{self._where}.{name}")
        return text

    def done(self) -> None:
        """Refuse fields this frame does not have (requests and outcomes only)."""
        unknown = sorted(set(self._value) - self._read) if self._strict else []
        if unknown:
            raise FrameError(f"{self._where}: unknown field {str(unknown[0])[:50]!r}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _shallow(frame: Any) -> dict[str, Any]:
    """A frame as its wire dict: its own fields, nested frames too, values shared, not copied
    (``dataclasses.asdict`` deep-copies every contact: it cost more than the rest of a report)."""
    return {item.name: _wire(getattr(frame, item.name)) for item in fields(frame)}


def _wire(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _shallow(value)
    if isinstance(value, list) and value and is_dataclass(value[0]):
        return [_shallow(item) for item in value]
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise FrameError(f"{where}: expected a string, got {_kind(value)}")
    if value.isascii():  # the common case, checked in C
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError(f"{where}: not valid Unicode (a lone surrogate)") from None
    return value


def _string_item(value: Any, where: str) -> str:
    return _text(value, where)


def _check_base64(text: str, where: str) -> None:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FrameError(f"{where}: not base64") from None


# -- hello --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Who the satellite is; ``leases``: those it still holds recipients of (None: not said; this
    version's satellites name them after the hello, with ``held``)."""

    serial: str
    secret: str
    version: str = ""
    leases: list[str] | None = None

    @classmethod
    def from_wire(cls, value: Any) -> Hello:
        fields = _Fields(value, "hello", strict=True)
        leases = fields.items("leases", _string_item, required=False) if value.get("leases") is not None else None
        hello = cls(fields.text("serial"), fields.text("secret"), fields.text("version", required=False), leases)
        fields.done()
        return hello

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"serial": self.serial, "secret": self.secret, "version": self.version}
        if self.leases is not None:
            wire["leases"] = list(self.leases)
        return wire


@dataclass(frozen=True)
class HelloAnswer:
    satellite_id: int
    group: str

    @classmethod
    def from_wire(cls, value: Any) -> HelloAnswer:
        fields = _Fields(value, "hello answer", strict=False)
        return cls(fields.integer("satellite_id"), fields.text("group", required=False))

    def to_wire(self) -> dict[str, Any]:
        return _shallow(self)


@dataclass(frozen=True)
class Held:
    """Some of the lease ids a satellite still holds recipients of, named after ``hello`` (a hello
    naming them all could pass the pre-authentication frame limit): at most HELD_PER_CALL a call;
    ``more``: further ``held`` calls follow. At the last one the master frees this satellite's
    other leases (but those it granted on this link)."""

    leases: list[str]
    more: bool = False

    @classmethod
    def from_wire(cls, value: Any) -> Held:
        fields = _Fields(value, "held", strict=True)
        leases = fields.items("leases", _string_item)
        if len(leases) > HELD_PER_CALL:
            raise FrameError(f"held.leases: more than {HELD_PER_CALL}")
        held = cls(leases, fields.flag("more", required=False))
        fields.done()
        return held

    def to_wire(self) -> dict[str, Any]:
        return {"leases": list(self.leases), "more": self.more}


HELD_PER_CALL = 1000  # lease ids in one ``held`` call (about 35 KiB)


# -- lease --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRequest:
    max_recipients: int

    @classmethod
    def from_wire(cls, value: Any) -> LeaseRequest:
        fields = _Fields(value, "lease", strict=True)
        request = cls(fields.integer("max_recipients", 0, 2**31))
        fields.done()
        return request

    def to_wire(self) -> dict[str, Any]:
        return _shallow(self)


@dataclass(frozen=True)
class Attachment:
    """One of a recipient's own attachments; ``content`` is base64."""

    filename: str
    content_type: str
    content: str

    @classmethod
    def from_wire(cls, value: Any, where: str) -> Attachment:
        fields = _Fields(value, where, strict=False)
        return cls(fields.text("filename"), fields.text("content_type"), fields.base64_text("content"))


@dataclass(frozen=True)
class LeasedRecipient:
    """A recipient the satellite may deliver until its lease expires."""

    id: str
    mailing_id: int
    email: str
    domain: str
    contact: dict[str, Any]
    test: bool
    lease: str
    attachments: list[Attachment] = field(default_factory=list)

    @classmethod
    def from_wire(cls, value: Any, where: str = "recipient") -> LeasedRecipient:
        plain = _plain_recipient(value)
        if plain is not None:
            return plain
        fields = _Fields(value, where, strict=False)
        return cls(fields.text("id"), fields.integer("mailing_id"), fields.text("email"), fields.text("domain"),
                   fields.mapping("contact", required=False), fields.flag("test"), fields.text("lease"),
                   fields.items("attachments", Attachment.from_wire, required=False))

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "mailing_id": self.mailing_id, "email": self.email, "domain": self.domain,
                "contact": self.contact, "test": self.test, "lease": self.lease,
                "attachments": [_shallow(attachment) for attachment in self.attachments]}


def _plain_recipient(value: Any) -> LeasedRecipient | None:
    """The recipient, if it is of the everyday shape (ASCII texts, no attachments), checked in a
    few operations (a lease carries up to a thousand); else None, for the field-by-field check.
    It accepts only what that check accepts (a property test compares them)."""
    if type(value) is not dict:
        return None
    get = value.get
    recipient_id, mailing_id, email, domain, lease = get("id"), get("mailing_id"), get("email"), get("domain"), \
        get("lease")
    contact, test, attachments = get("contact"), get("test"), get("attachments")
    if (type(mailing_id) is not int or not _INT64[0] <= mailing_id <= _INT64[1] or type(test) is not bool
            or not (contact is None or type(contact) is dict) or not (attachments is None or attachments == [])
            or type(recipient_id) is not str or type(email) is not str or type(domain) is not str
            or type(lease) is not str or not (recipient_id + email + domain + lease).isascii()):
        return None
    return LeasedRecipient(recipient_id, mailing_id, email, domain, contact or {}, test, lease)


@dataclass(frozen=True)
class LeaseAnswer:
    recipients: list[LeasedRecipient]
    lease_seconds: int
    # The content version of each mailing of the lease (a master before them sends none): a
    # satellite holding an older content fetches it again.
    content_versions: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: Any) -> LeaseAnswer:
        fields = _Fields(value, "lease answer", strict=False)
        versions = fields.mapping("content_versions", required=False)
        return cls(fields.items("recipients", LeasedRecipient.from_wire), fields.integer("lease_seconds"),
                   {_mailing_key(key): _Fields(versions, "lease answer.content_versions", strict=False).integer(key)
                    for key in versions})

    def to_wire(self) -> dict[str, Any]:
        return self.wire_of([r.to_wire() for r in self.recipients], self.lease_seconds, self.content_versions)

    @staticmethod
    def wire_of(recipients: list[dict[str, Any]], lease_seconds: int,
                content_versions: dict[int, int]) -> dict[str, Any]:
        """The answer the master sends, from the dispatcher's recipients, already of
        :meth:`LeasedRecipient.to_wire`'s shape (its own output, not decoded again: that cost
        more of the master's CPU than the lease itself; a test keeps the shapes equal)."""
        return {"recipients": recipients, "lease_seconds": lease_seconds,
                "content_versions": {str(key): version for key, version in content_versions.items()}}


def _mailing_key(key: str) -> int:
    """A mailing id that JSON made an object key (a string) back to an int."""
    if not key.isdigit() or len(key) > 18:
        raise FrameError(f"lease answer.content_versions: {key[:40]!r} is not a mailing id")
    return int(key)


# -- mailing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MailingRequest:
    mailing_id: int

    @classmethod
    def from_wire(cls, value: Any) -> MailingRequest:
        fields = _Fields(value, "mailing", strict=True)
        request = cls(fields.integer("mailing_id"))
        fields.done()
        return request

    def to_wire(self) -> dict[str, Any]:
        return _shallow(self)


@dataclass(frozen=True)
class MailingContent:
    """What a satellite needs to build a mailing's messages (``rfc822``: base64 of the source)."""

    id: int
    mail_from: str
    rfc822: str = ""
    sender_name: str | None = None
    subject: str | None = None
    html: str | None = None
    plain: str | None = None
    charset: str | None = None
    tracking_url: str | None = None
    type: str | None = None
    testing: bool = False
    backup_customized_emails: bool = False
    dkim: dict[str, Any] | None = None  # when ``enabled``: ``domain``, ``selector``, ``privkey`` strings
    content_version: int = 0  # moves at each change of the mailing's properties

    @classmethod
    def from_wire(cls, value: Any) -> MailingContent:
        fields = _Fields(value, "mailing content", strict=False)
        texts = {name: fields.optional_text(name)
                 for name in ("sender_name", "subject", "html", "plain", "charset", "tracking_url", "type")}
        dkim = fields.mapping("dkim", required=False) or None
        if dkim is not None and dkim.get("enabled"):
            keys = _Fields(dkim, "mailing content.dkim", strict=False)
            for name in ("domain", "selector", "privkey"):
                keys.text(name)
        return cls(id=fields.integer("id"), mail_from=fields.text("mail_from"),
                   rfc822=fields.base64_text("rfc822", False),
                   testing=fields.flag("testing", False),
                   backup_customized_emails=fields.flag("backup_customized_emails", False), dkim=dkim,
                   content_version=fields.optional_integer("content_version") or 0, **texts)

    def to_wire(self) -> dict[str, Any]:
        return _shallow(self)


# -- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One recipient's delivery verdict; ``lease`` is the lease it came with (absent in reports
    written before leases were named), ``customized_content`` the message sent, base64, when the
    mailing keeps them. The master cuts reply_text and smtp_log to its own limits."""

    recipient_id: str
    status: str  # one of REPORTED_STATUSES
    reply_code: int | None
    reply_enhanced_code: str
    reply_text: str
    smtp_log: list[str] = field(default_factory=list)
    mx_host: str = ""
    lease: str | None = None
    customized_content: str | None = None

    @classmethod
    def from_wire(cls, value: Any, where: str = "outcome") -> Outcome:
        plain = _plain_outcome(value)
        if plain is not None:
            return plain
        fields = _Fields(value, where, strict=True)
        status = fields.text("status")
        if status not in REPORTED_STATUSES:
            raise FrameError(f"{where}.status: {status[:30]!r} is not one of {', '.join(REPORTED_STATUSES)}")
        content = fields.optional_text("customized_content")
        if content is not None:
            _check_base64(content, f"{where}.customized_content")
        outcome = cls(fields.text("recipient_id"), status, fields.optional_integer("reply_code", *REPLY_CODES),
                      fields.text("reply_enhanced_code", required=False), fields.text("reply_text", required=False),
                      fields.items("smtp_log", _string_item, required=False), fields.text("mx_host", required=False),
                      fields.optional_text("lease"), content)
        fields.done()
        return outcome

    def to_wire(self) -> dict[str, Any]:
        wire = {"recipient_id": self.recipient_id, "status": self.status, "reply_code": self.reply_code,
                "reply_enhanced_code": self.reply_enhanced_code, "reply_text": self.reply_text,
                "smtp_log": self.smtp_log, "mx_host": self.mx_host}
        if self.lease is not None:
            wire["lease"] = self.lease
        if self.customized_content is not None:
            wire["customized_content"] = self.customized_content
        return wire


REPLY_CODES = (0, 999)  # an SMTP reply code is three digits (what the master stores and shows)
_OUTCOME_FIELDS = frozenset(("recipient_id", "status", "reply_code", "reply_enhanced_code", "reply_text",
                             "smtp_log", "mx_host", "lease", "customized_content"))


def _plain_outcome(value: Any) -> Outcome | None:
    """The outcome, if it is of the everyday shape: known fields, ASCII texts, no kept message.
    Checked in a few C-speed operations (a report carries up to a thousand); anything else
    returns None and goes through the field-by-field check, which names what is wrong. It
    accepts only what that check accepts (a property test compares them)."""
    if type(value) is not dict or not value.keys() <= _OUTCOME_FIELDS or "customized_content" in value:
        return None
    get = value.get
    recipient_id, status, code, log, lease = get("recipient_id"), get("status"), get("reply_code"), \
        get("smtp_log"), get("lease")
    enhanced, text, mx_host = get("reply_enhanced_code"), get("reply_text"), get("mx_host")
    enhanced, text, mx_host = ("" if enhanced is None else enhanced, "" if text is None else text,
                               "" if mx_host is None else mx_host)
    if (type(recipient_id) is not str or type(status) is not str or status not in REPORTED_STATUSES
            or not (code is None or (type(code) is int and REPLY_CODES[0] <= code <= REPLY_CODES[1]))
            or not (log is None or type(log) is list) or not (lease is None or type(lease) is str)):
        return None
    try:  # joining raises TypeError for anything else than strings
        if not "".join((recipient_id, enhanced, text, mx_host, lease or "", *(log or ()))).isascii():
            return None
    except TypeError:
        return None
    return Outcome(recipient_id, status, code, enhanced, text, log or [], mx_host, lease)


@dataclass(frozen=True)
class Report:
    outcomes: list[Outcome]

    @classmethod
    def from_wire(cls, value: Any) -> Report:
        fields = _Fields(value, "report", strict=True)
        report = cls(fields.items("outcomes", Outcome.from_wire))
        fields.done()
        return report

    def to_wire(self) -> dict[str, Any]:
        return {"outcomes": [o.to_wire() for o in self.outcomes]}


@dataclass(frozen=True)
class Wake:
    """The master has new work (a mailing started, recipients added to one, test recipients)."""

    @classmethod
    def from_wire(cls, value: Any) -> Wake:
        _Fields(value, "wake", strict=True).done()
        return cls()

    def to_wire(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class ReportAnswer:
    """The recipient ids the satellite may forget."""

    acknowledged: list[str]

    @classmethod
    def from_wire(cls, value: Any) -> ReportAnswer:
        fields = _Fields(value, "report answer", strict=False)
        return cls(fields.items("acknowledged", _string_item))

    def to_wire(self) -> dict[str, Any]:
        return _shallow(self)


REQUESTS: dict[str, Callable[[Any], Any]] = {
    "hello": Hello.from_wire, "held": Held.from_wire, "lease": LeaseRequest.from_wire,
    "mailing": MailingRequest.from_wire, "report": Report.from_wire,
}
"""The decoder of each method's parameters (the master's end)."""
