"""Recipients: validated batch ingestion, test sends and status resets."""

from __future__ import annotations

import base64
import binascii
import email.message
import functools
import logging
import math
import mimetypes
import re
from typing import Any, Callable

from cloudmailing.common.attachments import attachment_problem
from cloudmailing.common.statuses import MAILING_FINISHED, MAILING_READY, READY, RUNNING
from cloudmailing.services import values
from cloudmailing.services.addresses import InvalidAddress, parse_address
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.errors import BadRequest, InvalidValue, NotFound
from cloudmailing.services.mailings import MailingService
from cloudmailing.storage.blocks import Block
from cloudmailing.storage.ingest import MailingFinished, MailingGone, NewRecipient
from cloudmailing.storage.ledger import Change
from cloudmailing.storage.recipient_index import is_generated
from cloudmailing.storage.status_log import DETAIL_DEFAULTS
from cloudmailing.storage.stores import Stores

log = logging.getLogger(__name__)

MAX_BATCH = 1000
MAX_TRACKING_ID = 128
RESERVED_KEYS = {"email", "tracking_id", "attachments"}
_SCALARS = (str, int, float, bool)
DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_CHARSET = 40
_CHARSET = re.compile(r"[A-Za-z0-9!#$%&'+^_`{}~-]+")  # an RFC 2978 charset name: no quote, space nor ';'
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,10}")
_MIME_TYPES = mimetypes.MimeTypes()  # Python's own table only (no /etc/mime.types): the same names on every host


class EntryError(ValueError):
    """One entry of a batch is unusable; the others go on."""


class RecipientService:
    def __init__(self, stores: Stores, mailings: MailingService, clock: SecondsClock,
                 work_available: Callable[[], None] = lambda: None) -> None:
        self._stores = stores
        self._work_available = work_available  # deliverable now: satellites may lease at once
        self._mailings = mailings
        self._clock = clock

    async def add(self, mailing_id: Any, entries: Any, *, test: bool = False) -> list[dict[str, Any]]:
        """Store a batch; the answer has one ``{email, id}`` or ``{email, error}`` per entry, in order.
        Test recipients (``send_test``) are delivered at once, whatever the mailing's status."""
        if not isinstance(entries, (list, tuple)):
            raise InvalidValue("recipients: expected a list of structs")
        if len(entries) > MAX_BATCH:
            raise BadRequest(f"too many recipients in one call: {len(entries)} > {MAX_BATCH}")
        mailing = await self._mailings.get(mailing_id)
        if mailing["status"] == MAILING_FINISHED and not test:
            raise BadRequest(f"mailing {mailing['_id']} is finished")
        answers: list[dict[str, Any]] = []
        accepted: list[NewRecipient] = []
        positions: list[int] = []  # answer index of each accepted recipient
        for entry in entries:
            try:
                recipient = _new_recipient(entry)
            except EntryError as error:
                answers.append({"email": _given_email(entry), "error": str(error)})
                continue
            positions.append(len(answers))
            accepted.append(recipient)
            answers.append({"email": entry["email"]})
        try:
            ids = await self._stores.writer.append(mailing["_id"], test, accepted, utc_now(self._clock))
        except MailingGone:  # deleted while this batch waited its turn: nothing stored
            raise NotFound(f"mailing {mailing['_id']} not found") from None
        except MailingFinished:  # it finished while this batch waited its turn: nothing stored
            raise BadRequest(f"mailing {mailing['_id']} is finished") from None
        for position, recipient_id in zip(positions, ids, strict=True):
            if recipient_id is None:
                answers[position]["error"] = "a recipient with this id (tracking_id) already exists"
            else:
                answers[position]["id"] = recipient_id
        stored = sum(1 for recipient_id in ids if recipient_id is not None)
        if stored and (test or mailing["status"] == RUNNING):
            self._work_available()
        log.info("%d recipients added, %d refused", stored, len(entries) - stored, extra={"mailing": mailing["_id"]})
        return answers

    async def reset(self, recipient_ids: Any) -> None:
        """Put recipients back to READY, to be delivered again."""
        ids = values.string_list("recipient_ids", recipient_ids)
        found = await self._stores.lookup.find(ids)
        now = utc_now(self._clock)
        by_block: dict[int, set[int]] = {}
        for recipient in found.values():
            by_block.setdefault(recipient.block.id, set()).add(recipient.slot)
        # Test recipients are not part of their mailing's totals: resetting one reopens nothing.
        mailing_ids = sorted({recipient.block.mailing_id for recipient in found.values() if not recipient.block.test})
        # Reopened first: a crash during the edits leaves an unfinished mailing, which the
        # master's start-up repairs and recounts (a finished one's blocks it does not look at);
        # and again after, in case a life-cycle tick finished it before the edits were in.
        reopened = await self._reopen(mailing_ids)
        for block_id, slots in by_block.items():
            await self._stores.ledger.edit(block_id, functools.partial(_reset, slots=slots), now)
        # The message kept of a send the reset undid is not this recipient's message any more.
        await self._stores.kept.drop([(recipient.block.id, recipient.slot) for recipient in found.values()])
        reopened |= await self._reopen(mailing_ids)
        if by_block:
            self._work_available()  # those of running mailings are due now, not at the next search
        if reopened:
            log.info("finished mailings %s reopened by a status reset", sorted(reopened))

    async def _reopen(self, mailing_ids: list[int]) -> set[int]:
        """READY again, those of ``mailing_ids`` that are FINISHED; their ids."""
        return {mailing_id for mailing_id in mailing_ids
                if await self._stores.mailings.update(mailing_id, {"status": MAILING_READY, "end_time": None},
                                                      only_if_status=[MAILING_FINISHED])}


def _reset(block: Block, slots: set[int]) -> list[Change]:
    return [Change(slot, READY, 0, details=DETAIL_DEFAULTS) for slot in sorted(slots)]


def _given_email(entry: Any) -> str:
    email = entry.get("email") if isinstance(entry, dict) else None
    return email if isinstance(email, str) else ""


def _new_recipient(entry: Any) -> NewRecipient:
    if not isinstance(entry, dict):
        raise EntryError("expected a struct with an 'email' field")
    email = entry.get("email")
    if not isinstance(email, str) or not email.strip():
        raise EntryError("missing e-mail address")
    try:
        address = parse_address(email)
    except InvalidAddress as error:
        raise EntryError(f"invalid e-mail address: {error}") from None
    contact = {key: value for key, value in entry.items() if key not in RESERVED_KEYS}
    _check_contact(contact)
    return NewRecipient(email=address.email, domain=address.domain, contact=contact,
                        attachments=_attachments(entry.get("attachments")),
                        client_id=_client_id(entry.get("tracking_id")))


def _client_id(tracking_id: Any) -> str | None:
    """The client's own id for a recipient (None: the master makes one)."""
    if tracking_id is None or tracking_id == "":
        return None
    if isinstance(tracking_id, bool) or not isinstance(tracking_id, (str, int)):
        raise EntryError("tracking_id: expected a string")
    recipient_id = str(tracking_id).strip()
    if not recipient_id or len(recipient_id) > MAX_TRACKING_ID:
        raise EntryError(f"tracking_id: 1 to {MAX_TRACKING_ID} characters")
    if is_generated(recipient_id):
        raise EntryError("tracking_id: version 8 UUIDs in lower case and ids of the form "
                         "b<number>s<number>-<6 hex digits> are the master's own")
    return recipient_id


def _check_contact(data: Any, path: str = "") -> None:
    """Personalization data must be storable as is: plain values, lists and structs of them."""
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str) or not key or key.startswith("$") or "." in key or "\0" in key:
                raise EntryError(f"field name {path}{key!r} is not allowed")
            _check_contact(value, f"{path}{key}.")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, list):  # FerretDB cannot store them, MongoDB can: refused alike
                raise EntryError(f"field {path.rstrip('.')}: lists of lists are not supported")
            _check_contact(item, path)
    elif isinstance(data, float) and not math.isfinite(data):  # the database refuses NaN and infinity
        raise EntryError(f"field {path.rstrip('.')}: not a finite number")
    elif isinstance(data, int) and not values.INT64_MIN <= data <= values.INT64_MAX:
        raise EntryError(f"field {path.rstrip('.')}: integer out of range (64-bit integers only)")
    elif data is not None and not isinstance(data, (*_SCALARS, bytes)) and not hasattr(data, "isoformat"):
        raise EntryError(f"field {path.rstrip('.')}: unsupported value type {type(data).__name__}")


def _attachments(value: Any) -> list[dict[str, Any]]:
    """Per-recipient attachments: a list of structs, each normalized by :func:`parse_attachment`."""
    if value is None or value == "":
        return []
    if not isinstance(value, list):
        raise EntryError("attachments: expected a list of structs")
    attachments = []
    for index, item in enumerate(value):
        try:
            attachments.append(parse_attachment(item))
        except EntryError as error:
            raise EntryError(f"attachments[{index}]: {error}") from None
    return attachments


def parse_attachment(item: Any) -> dict[str, Any]:
    """One attachment as stored: ``{filename, content_type, content}``, ``content`` in bytes.

    Both spellings are accepted: ours (``content_type``, ``content``) and the original CloudMailing's
    (``content-type``, ``data``); giving both of one field with different values is an error. ``filename``
    is optional (default ``attachment`` plus an extension guessed from the type). A ``charset`` of a
    ``text/*`` attachment becomes a ``charset`` parameter of its content type; others ignore it.
    ``multipart/*`` and ``message/*`` types but ``message/rfc822`` in 7-bit data are refused
    (:mod:`cloudmailing.common.attachments`). Raises EntryError (only) for anything unusable."""
    if not isinstance(item, dict):
        raise EntryError("expected a struct")
    content_type = _one_of(item, ("content_type", "content-type"), _content_type) or DEFAULT_CONTENT_TYPE
    content = _one_of(item, ("content", "data"), _content, absent=())  # "" is an empty file
    if content is None:
        raise EntryError("needs content (or data): base64 text or Binary")
    problem = attachment_problem(content_type, content)
    if problem:
        raise EntryError(problem)
    filename = _one_of(item, ("filename",), _filename) or _default_filename(content_type)
    charset = item.get("charset")
    if charset is not None and charset != "" and _is_text(content_type):
        content_type = _with_charset(content_type, _charset(charset))
    return {"filename": filename, "content_type": content_type, "content": content}


def _one_of(item: dict[str, Any], names: tuple[str, ...], parse: Callable[[str, Any], Any],
            absent: tuple[str, ...] = ("",)) -> Any:
    """The value of a field that clients may spell several ways (None: not given)."""
    found = {name: parse(name, item[name]) for name in names
             if item.get(name) is not None and not (item[name] == "" and "" in absent)}
    given = list(found.values())
    if any(value != given[0] for value in given[1:]):
        raise EntryError(f"{' and '.join(found)} differ: give one of them")
    return given[0] if given else None


def _header_text(name: str, value: Any, max_length: int) -> str:
    """``values.text`` of a header-like field, its refusal as this recipient's entry error."""
    try:
        return values.text(name, value, max_length=max_length, header=True)
    except InvalidValue as error:
        raise EntryError(str(error)) from None


def _filename(name: str, value: Any) -> str:
    return _header_text(name, value, 255)


def _content_type(name: str, value: Any) -> str:
    content_type = _header_text(name, value, 100)
    if "/" not in content_type:
        raise EntryError(f"{name}: expected a MIME type such as application/pdf")
    return content_type


def _content(name: str, value: Any) -> bytes:
    value = getattr(value, "data", value)  # xmlrpc.client.Binary
    if isinstance(value, str):  # base64 text, as clients without a Binary type send it
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise EntryError(f"{name} is not valid base64") from None
    if not isinstance(value, bytes):
        raise EntryError(f"{name}: expected base64 text or Binary")
    return value


def _charset(value: Any) -> str:
    charset = _header_text("charset", value, MAX_CHARSET)
    if not _CHARSET.fullmatch(charset):
        raise EntryError("charset: expected a charset name such as utf-8")
    return charset


def _is_text(content_type: str) -> bool:
    return content_type.partition("/")[0].strip().lower() == "text"


def _with_charset(content_type: str, charset: str) -> str:
    """The content type with this charset parameter (kept as is when it already has the same one)."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    given = header.get_param("charset")
    if given is None:
        return f"{content_type}; charset={charset}"
    if not isinstance(given, str) or given.strip().lower() != charset.lower():
        raise EntryError("charset differs from the charset parameter of the content type")
    return content_type


def _default_filename(content_type: str) -> str:
    """``attachment`` and an extension for the type (``attachment.bin`` when none is known)."""
    extension = _MIME_TYPES.guess_extension(content_type.partition(";")[0].strip().lower(), strict=False)
    return "attachment" + (extension if extension and _EXTENSION.fullmatch(extension) else ".bin")
