"""Recipients: validated batch ingestion, test sends and status resets."""

from __future__ import annotations

import base64
import binascii
import logging
import math
import uuid
from typing import Any, Sequence

from cloudmailing.services import values
from cloudmailing.services.addresses import InvalidAddress, parse_address
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.errors import BadRequest, InvalidValue
from cloudmailing.services.mailings import FINISHED, READY, MailingService
from cloudmailing.storage.database import Database
from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.recipients import RecipientStore
from cloudmailing.storage.status_log import DETAIL_DEFAULTS, StatusChange, StatusLog

log = logging.getLogger(__name__)

MAX_BATCH = 1000
MAX_TRACKING_ID = 128
RESERVED_KEYS = {"email", "tracking_id", "attachments"}
_SCALARS = (str, int, float, bool)


class EntryError(ValueError):
    """One entry of a batch is unusable; the others go on."""


class RecipientService:
    def __init__(self, database: Database, status_log: StatusLog, mailings: MailingService,
                 clock: SecondsClock) -> None:
        self._store = RecipientStore(database)
        self._mailing_store = MailingStore(database)
        self._status_log = status_log
        self._mailings = mailings
        self._clock = clock

    async def add(self, mailing_id: Any, entries: Any, *, test: bool = False) -> list[dict[str, Any]]:
        """Store a batch; the answer has one ``{email, id}`` or ``{email, error}`` per entry, in order."""
        if not isinstance(entries, (list, tuple)):
            raise InvalidValue("recipients: expected a list of structs")
        if len(entries) > MAX_BATCH:
            raise BadRequest(f"too many recipients in one call: {len(entries)} > {MAX_BATCH}")
        mailing = await self._mailings.get(mailing_id)
        if mailing["status"] == FINISHED and not test:
            raise BadRequest(f"mailing {mailing['_id']} is finished")
        now = utc_now(self._clock)
        answers: list[dict[str, Any]] = []
        documents: list[dict[str, Any]] = []
        positions: list[int] = []  # answer index of each document
        for entry in entries:
            try:
                document = _recipient_document(mailing["_id"], entry, now, test)
            except EntryError as error:
                answers.append({"email": _given_email(entry), "error": str(error)})
                continue
            positions.append(len(answers))
            documents.append(document)
            answers.append({"email": entry["email"], "id": document["_id"]})
        result = await self._store.insert_batch(mailing["_id"], documents, now)
        for index, reason in result.errors.items():
            answer = answers[positions[index]]
            answers[positions[index]] = {"email": answer["email"], "error": reason}
        if result.inserted and not test:
            await self._mailing_store.add_counts(mailing["_id"], {READY: result.inserted})
        log.info("%d recipients added, %d refused", result.inserted, len(entries) - result.inserted,
                 extra={"mailing": mailing["_id"]})
        return answers

    async def reset(self, recipient_ids: Any) -> None:
        """Put recipients back to READY, to be delivered again."""
        ids = values.string_list("recipient_ids", recipient_ids)
        fields = {"next_try": None, "in_progress": False, **DETAIL_DEFAULTS}
        changes = [StatusChange(recipient_id, READY, fields) for recipient_id in dict.fromkeys(ids)]
        if not changes:
            return
        await self._status_log.apply(changes, utc_now(self._clock))
        reopened = await self._reopen_finished_mailings(ids)
        if reopened:
            log.info("finished mailings %s reopened by a status reset", reopened)

    async def _reopen_finished_mailings(self, recipient_ids: Sequence[str]) -> list[int]:
        found = await self._store.get_many(recipient_ids, {"mailing_id": 1})
        reopened = []
        for mailing_id in {doc["mailing_id"] for doc in found.values()}:
            if await self._mailing_store.update(mailing_id, {"status": READY, "end_time": None},
                                                only_if_status=[FINISHED]):
                reopened.append(mailing_id)
        return reopened


def _given_email(entry: Any) -> str:
    email = entry.get("email") if isinstance(entry, dict) else None
    return email if isinstance(email, str) else ""


def _recipient_document(mailing_id: int, entry: Any, now: Any, test: bool) -> dict[str, Any]:
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
    return {
        "_id": _recipient_id(entry.get("tracking_id")), "mailing_id": mailing_id,
        "email": address.email, "domain": address.domain, "contact": contact,
        "attachments": _attachments(entry.get("attachments")),
        "status": READY, "in_progress": False, "try_count": 0, "first_try": None, "next_try": None,
        "cloud_client": "", "modified": now, "test": test,  # replies: in the status log (DETAIL_DEFAULTS)
    }


def _recipient_id(tracking_id: Any) -> str:
    if tracking_id is None or tracking_id == "":
        return uuid.uuid4().hex
    if isinstance(tracking_id, bool) or not isinstance(tracking_id, (str, int)):
        raise EntryError("tracking_id: expected a string")
    recipient_id = str(tracking_id).strip()
    if not recipient_id or len(recipient_id) > MAX_TRACKING_ID:
        raise EntryError(f"tracking_id: 1 to {MAX_TRACKING_ID} characters")
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
