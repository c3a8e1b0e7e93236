"""Reports: recipient statuses, the change cursor, counts and hourly statistics."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from cloudmailing.services import values
from cloudmailing.services.errors import InvalidValue
from cloudmailing.storage.database import Database
from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.recipients import RecipientStore
from cloudmailing.storage.statistics import HourlyStatsStore
from cloudmailing.storage.status_log import CONTENT, STATUS_FIELDS, StatusLog

RECIPIENT_STATUSES = ("READY", "IN PROGRESS", "FINISHED", "WARNING", "ERROR", "GENERAL_ERROR", "TIMEOUT")
MAX_RESULTS = 1000
_CURSOR_PREFIX = "c1:"
_OPTIONS = ("with_contact_data", "with_customized_content", "delete_customized_content")


def encode_cursor(position: int) -> str:
    return f"{_CURSOR_PREFIX}{position}"


def decode_cursor(cursor: Any) -> int:
    """'' or None start from the beginning; anything else must be a cursor we handed out."""
    if cursor is None or cursor == "":
        return 0
    digits = cursor[len(_CURSOR_PREFIX):] if isinstance(cursor, str) and cursor.startswith(_CURSOR_PREFIX) else ""
    if digits.isascii() and digits.isdigit() and len(digits) <= 18:  # ASCII, and always a 64-bit integer
        return int(digits)
    raise InvalidValue("cursor: not a cursor returned by get_recipients_status_updated_since")


class ReportService:
    def __init__(self, database: Database, status_log: StatusLog) -> None:
        self._recipients = RecipientStore(database)
        self._mailings = MailingStore(database)
        self._stats = HourlyStatsStore(database)
        self._status_log = status_log

    async def recipient_query(self, filters: Any, default_statuses: Sequence[str] | None = None,
                              ) -> dict[str, Any]:
        """The query for recipient ``filters``: status, owners, mailings, sender_domains."""
        given: Mapping[str, Any] = {} if filters in (None, "", [], {}) else values.struct("filters", filters)
        unknown = sorted(set(given) - {"status", "owners", "mailings", "sender_domains"})
        if unknown:
            raise InvalidValue(f"filters: unknown key(s) {', '.join(unknown)}")
        query: dict[str, Any] = {"test": False}
        statuses = values.string_list("filters.status", given.get("status")) or list(default_statuses or [])
        bad = sorted(set(statuses) - set(RECIPIENT_STATUSES))
        if bad:
            raise InvalidValue(f"filters.status: unknown status {', '.join(bad)}")
        if statuses:
            query["status"] = {"$in": statuses}
        mailing_ids = await self._mailing_scope(given)
        if mailing_ids is not None:
            query["mailing_id"] = {"$in": mailing_ids}
        return query

    async def _mailing_scope(self, given: Mapping[str, Any]) -> list[int] | None:
        """Mailing ids the filters allow, or None for every mailing."""
        scope: set[int] | None = None
        if "mailings" in given:
            scope = set(values.int_list("filters.mailings", given["mailings"]))
        for key, field_name in (("owners", "owner_guid"), ("sender_domains", "domain_name")):
            if key in given:
                wanted = values.string_list(f"filters.{key}", given[key])
                if key == "sender_domains":
                    wanted = [domain.lower() for domain in wanted]
                ids = set(await self._mailings.ids({field_name: {"$in": wanted}}))
                scope = ids if scope is None else scope & ids
        return None if scope is None else sorted(scope)

    async def count(self, filters: Any) -> int:
        return await self._recipients.count(await self.recipient_query(filters))

    async def statuses(self, recipient_ids: Any, options: Any) -> list[dict[str, Any]]:
        """Current status of each known recipient, in the order asked; unknown ids are left out."""
        ids = values.string_list("recipient_ids", recipient_ids)
        wanted = _options(options)
        found = await self._recipients.get_many(ids)
        details = await self._status_log.details(found.values(), with_content=_wants_content(wanted))
        records = [_current_status(found[rid], details[rid], wanted) for rid in dict.fromkeys(ids) if rid in found]
        await self._drop_content_if_asked(wanted, found.values(), details)
        return records

    async def updated_since(self, cursor: Any, filters: Any, max_results: Any, options: Any) -> dict[str, Any]:
        position = decode_cursor(cursor)
        limit = values.integer("max_results", max_results if max_results not in (None, "") else MAX_RESULTS,
                               minimum=1)
        limit = min(limit, MAX_RESULTS)
        wanted = _options(options)
        query = await self.recipient_query(filters, default_statuses=RECIPIENT_STATUSES[1:])
        entries, next_position = await self._status_log.read_since(position, query, limit)
        recipients = [dict(entry["record"], id=entry["recipient_id"]) for entry in entries]
        if recipients and (wanted.get("with_contact_data") or _wants_content(wanted)):
            # Contacts are read from the recipients, messages from their last change's details.
            docs = await self._recipients.get_many([r["id"] for r in recipients], {"contact": 1, "log_group": 1})
            details = await self._status_log.details(docs.values(), True) if _wants_content(wanted) else {}
            for record in recipients:
                if record["id"] in docs:
                    _add_asked_fields(record, docs[record["id"]], details.get(record["id"], {}), wanted)
            await self._drop_content_if_asked(wanted, docs.values(), details)
        return {"cursor": encode_cursor(next_position), "recipients": recipients}

    async def _drop_content_if_asked(self, wanted: Mapping[str, bool], docs: Iterable[Mapping[str, Any]],
                                     details: Mapping[str, Mapping[str, Any]]) -> None:
        if wanted.get("delete_customized_content"):
            kept = [doc for doc in docs if CONTENT in details.get(doc["_id"], {})]
            await self._status_log.drop_customized_content(kept)

    async def hourly_statistics(self, query: Any) -> list[dict[str, Any]]:
        given = {} if query in (None, "", []) else values.struct("filters", query)
        start = values.optional_datetime("from_date", given.get("from_date"))
        end = values.optional_datetime("to_date", given.get("to_date"))
        senders = values.string_list("senders", given.get("senders"))
        docs = await self._stats.between(start, end, senders)
        return [{"date": doc["hour"], "sender": doc["sender"], "sent": doc.get("sent", 0),
                 "failed": doc.get("failed", 0), "tries": doc.get("tries", 0)} for doc in docs]


def _options(options: Any) -> dict[str, bool]:
    if options in (None, "", [], {}):
        return {}
    given = values.struct("options", options)
    unknown = sorted(set(given) - set(_OPTIONS))
    if unknown:
        raise InvalidValue(f"options: unknown key(s) {', '.join(unknown)}")
    return {key: values.boolean(f"options.{key}", given[key]) for key in given}


def _wants_content(wanted: Mapping[str, bool]) -> bool:
    return bool(wanted.get("with_customized_content") or wanted.get("delete_customized_content"))


def _current_status(doc: Mapping[str, Any], details: Mapping[str, Any], wanted: Mapping[str, bool],
                    ) -> dict[str, Any]:
    record = {name: details.get(name, doc.get(name)) for name in STATUS_FIELDS}
    record["id"] = doc["_id"]
    if doc.get("in_progress") and record["status"] in ("READY", "WARNING"):
        record["status"] = "IN PROGRESS"
    _add_asked_fields(record, doc, details, wanted)
    return record


def _add_asked_fields(record: dict[str, Any], doc: Mapping[str, Any], details: Mapping[str, Any],
                      wanted: Mapping[str, bool]) -> None:
    if wanted.get("with_contact_data"):
        record["contact"] = doc.get("contact", {})
    if wanted.get("with_customized_content"):
        # The message as sent (RFC 822 text); '' when the mailing does not keep them, or not sent yet.
        record["customized_content"] = bytes(details.get(CONTENT) or b"").decode("utf-8", "replace")
