"""Recipients: validated batch ingestion, test sends and status resets."""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import math
from typing import Any, Callable

from cloudmailing.common.statuses import MAILING_FINISHED, MAILING_READY, READY, RUNNING
from cloudmailing.services import values
from cloudmailing.services.addresses import InvalidAddress, parse_address
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.errors import BadRequest, InvalidValue
from cloudmailing.services.mailings import MailingService
from cloudmailing.storage.blocks import Block
from cloudmailing.storage.ingest import MailingFinished, NewRecipient
from cloudmailing.storage.ledger import Change
from cloudmailing.storage.recipient_index import is_generated
from cloudmailing.storage.status_log import DETAIL_DEFAULTS
from cloudmailing.storage.stores import Stores

log = logging.getLogger(__name__)

MAX_BATCH = 1000
MAX_TRACKING_ID = 128
RESERVED_KEYS = {"email", "tracking_id", "attachments"}
_SCALARS = (str, int, float, bool)


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
        for block_id, slots in by_block.items():
            await self._stores.ledger.edit(block_id, functools.partial(_reset, slots=slots), now)
        if by_block:
            self._work_available()  # those of running mailings are due now, not at the next search
        reopened = []
        for mailing_id in {recipient.block.mailing_id for recipient in found.values()}:
            if await self._stores.mailings.update(mailing_id, {"status": MAILING_READY, "end_time": None},
                                                  only_if_status=[MAILING_FINISHED]):
                reopened.append(mailing_id)
        if reopened:
            log.info("finished mailings %s reopened by a status reset", reopened)


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
        raise EntryError("tracking_id: ids of the form b<number>s<number>-<6 hex digits> are the master's own")
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
    """Per-recipient attachments: a list of ``{filename, content_type, content}`` structs."""
    if value is None or value == "":
        return []
    if not isinstance(value, list):
        raise EntryError("attachments: expected a list of structs")
    attachments = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise EntryError(f"attachments[{index}]: expected a struct")
        try:
            filename = values.text("filename", item.get("filename"), max_length=255, header=True)
            content_type = values.text("content_type", item.get("content_type", "application/octet-stream"),
                                       max_length=100, header=True)
        except InvalidValue as error:
            raise EntryError(f"attachments[{index}]: {error}") from None
        content = item.get("content")
        content = getattr(content, "data", content)
        if isinstance(content, str):  # base64 text, as clients without a Binary type send it
            try:
                content = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise EntryError(f"attachments[{index}]: content is not valid base64") from None
        if not isinstance(content, bytes) or "/" not in content_type or not filename:
            raise EntryError(f"attachments[{index}]: needs filename, content_type and content")
        attachments.append({"filename": filename, "content_type": content_type, "content": content})
    return attachments
