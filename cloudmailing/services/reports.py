"""Reports: recipient statuses, the change cursor, counts and hourly statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from cloudmailing.common.statuses import IN_PROGRESS, PENDING_STATUSES, READY, RECIPIENT_STATUSES
from cloudmailing.services import values
from cloudmailing.services.clock import SecondsClock
from cloudmailing.services.errors import InvalidValue
from cloudmailing.services.kept_messages import customized_content
from cloudmailing.services.read_ahead import ReadAhead
from cloudmailing.storage.mailings import MailingFilter
from cloudmailing.storage.recipients import FoundRecipient
from cloudmailing.storage.stores import Stores

MAX_RESULTS = 1000
_OPTIONS = ("with_contact_data", "with_customized_content", "delete_customized_content")


@dataclass(frozen=True)
class Cursor:
    """Where a reader is in the change log: after change ``seq``, found on page ``page`` (0: unknown)."""

    page: int = 0
    seq: int = 0

    def encode(self) -> str:
        return f"c2:{self.page}.{self.seq}"

    @classmethod
    def decode(cls, text: Any) -> Cursor:
        """'' or None start from the beginning; else a cursor we handed out (``c1:`` ones of
        earlier versions included)."""
        if text is None or text == "":
            return cls()
        if isinstance(text, str) and len(text) < 60 and text.isascii():
            # Digits only, and at most 18 of them: always a 64-bit integer.
            if text.startswith("c1:") and _number(text[3:]):
                return cls(0, int(text[3:]))
            page, _, seq = text[3:].partition(".")
            if text.startswith("c2:") and _number(page) and _number(seq):
                return cls(int(page), int(seq))
        raise InvalidValue("cursor: not a cursor returned by get_recipients_status_updated_since")


def _number(text: str) -> bool:
    return text.isdigit() and len(text) <= 18


@dataclass(frozen=True)
class RecipientFilter:
    """Which recipient changes a reader wants: statuses (None: any) of mailings (None: any)."""

    statuses: frozenset[str] | None
    mailing_ids: frozenset[int] | None


class ReportService:
    def __init__(self, stores: Stores, clock: SecondsClock,
                 prepare: Callable[[dict[str, Any]], dict[str, Any]] = lambda answer: answer) -> None:
        self._stores = stores
        self._read_ahead = ReadAhead(clock)
        self._prepare = prepare  # applied to a page read ahead (the API writes its XML then)

    async def recipient_filter(self, filters: Any, default_statuses: Sequence[str] | None = None) -> RecipientFilter:
        """The ``filters`` of a recipient query: status, owners, mailings, sender_domains."""
        given: Mapping[str, Any] = ({} if filters in (None, "", [], {})
                                    else values.given(values.struct("filters", filters)))
        unknown = sorted(set(given) - {"status", "owners", "mailings", "sender_domains"})
        if unknown:
            raise InvalidValue(f"filters: unknown key(s) {', '.join(unknown)}")
        statuses = values.string_list("filters.status", given.get("status")) or list(default_statuses or [])
        bad = sorted(set(statuses) - set(RECIPIENT_STATUSES))
        if bad:
            raise InvalidValue(f"filters.status: unknown status {', '.join(bad)}")
        return RecipientFilter(frozenset(statuses) or None, await self._mailing_scope(given))

    async def _mailing_scope(self, given: Mapping[str, Any]) -> frozenset[int] | None:
        """Mailing ids the filters allow, or None for every mailing."""
        scope: set[int] | None = None
        if "mailings" in given:
            scope = set(values.int_list("filters.mailings", given["mailings"]))
        if "owners" in given:
            ids = await self._stores.mailings.ids(MailingFilter(owners=values.string_list("filters.owners",
                                                                                         given["owners"])))
            scope = set(ids) if scope is None else scope & set(ids)
        if "sender_domains" in given:
            domains = values.domain_list("filters.sender_domains", given["sender_domains"])
            ids = await self._stores.mailings.ids(MailingFilter(domains=domains))
            scope = set(ids) if scope is None else scope & set(ids)
        return None if scope is None else frozenset(scope)

    async def count(self, filters: Any) -> int:
        """Recipients in the given statuses, summed from the mailings' counts (kept up to date by
        every change: no recipient, no block read)."""
        wanted = await self.recipient_filter(filters)
        mailing_ids = None if wanted.mailing_ids is None else sorted(wanted.mailing_ids)
        total = 0
        for counts in (await self._stores.mailings.counts(mailing_ids)).values():
            total += sum(n for status, n in counts.items() if wanted.statuses is None or status in wanted.statuses)
        return total

    async def statuses(self, recipient_ids: Any, options: Any) -> list[dict[str, Any]]:
        """Current status of each known recipient, in the order asked; unknown ids are left out."""
        ids = values.string_list("recipient_ids", recipient_ids)
        wanted = _options(options)
        found = await self._stores.lookup.find(ids)
        by_block: dict[int, list[FoundRecipient]] = {}
        for recipient in found.values():
            by_block.setdefault(recipient.block.id, []).append(recipient)
        records: dict[str, dict[str, Any]] = {}
        for in_block in by_block.values():
            details = await self._stores.ledger.details(in_block[0].block, [r.slot for r in in_block])
            records.update((r.id, _status_record(r, details[r.slot])) for r in in_block)
        listed = [records[rid] for rid in dict.fromkeys(ids) if rid in records]
        places = {rid: (found[rid].block.id, found[rid].slot) for rid in records}
        await self._add_asked_fields(listed, places, wanted)
        return listed

    async def updated_since(self, cursor: Any, filters: Any, max_results: Any, options: Any) -> dict[str, Any]:
        position = Cursor.decode(cursor)
        limit = min(values.integer("max_results", max_results if max_results not in (None, "") else MAX_RESULTS,
                                   minimum=1), MAX_RESULTS)
        wanted = _options(options)
        which = await self.recipient_filter(filters, default_statuses=[s for s in RECIPIENT_STATUSES if s != READY])
        request = (position, which, limit, tuple(sorted(wanted.items())))
        answer = await self._read_ahead.take(request)
        if answer is None:
            answer = await self._read_since(position, which, limit, wanted)
        if len(answer["recipients"]) == limit and not _wants_content(wanted):
            # A full page: the reader will want the next one; read it while it parses this one
            # (never when reading has an effect: delete_customized_content).
            following = Cursor.decode(answer["cursor"])
            self._read_ahead.start((following, *request[1:]), self._read_ahead_page(following, which, limit, wanted))
        return answer

    async def _read_ahead_page(self, position: Cursor, which: RecipientFilter, limit: int,
                               wanted: Mapping[str, bool]) -> dict[str, Any]:
        return self._prepare(await self._read_since(position, which, limit, wanted))

    async def _read_since(self, position: Cursor, which: RecipientFilter, limit: int,
                          wanted: Mapping[str, bool]) -> dict[str, Any]:
        statuses = which.statuses

        def accept(entry: Mapping[str, Any]) -> bool:
            return statuses is None or entry["r"]["status"] in statuses

        entries, page, seq = await self._stores.status_log.read_since(
            position.page, position.seq, limit,
            set(which.mailing_ids) if which.mailing_ids is not None else None, accept)
        records = [dict(entry["r"], id=entry["id"]) for entry in entries]
        places = {entry["id"]: (entry["b"], entry["s"]) for entry in entries}
        await self._add_asked_fields(records, places, wanted)
        return {"cursor": Cursor(page, seq).encode(), "recipients": records}

    async def _add_asked_fields(self, records: list[dict[str, Any]], places: Mapping[str, tuple[int, int]],
                                wanted: Mapping[str, bool]) -> None:
        if not records or not (wanted.get("with_contact_data") or _wants_content(wanted)):
            return
        asked = [places[record["id"]] for record in records]
        contacts = await self._stores.lookup.contacts(asked) if wanted.get("with_contact_data") else {}
        kept = await self._stores.kept.get(asked) if _wants_content(wanted) else {}
        for record in records:
            place = places[record["id"]]
            if wanted.get("with_contact_data"):
                record["contact"] = contacts.get(place, {})
            if wanted.get("with_customized_content"):
                # The message as sent (text, or bytes if XML cannot carry it); '' when not kept, or not sent yet.
                record["customized_content"] = customized_content(kept.get(place))
        if wanted.get("delete_customized_content") and kept:
            await self._stores.kept.drop(list(kept))

    async def hourly_statistics(self, query: Any) -> list[dict[str, Any]]:
        given = {} if query in (None, "", []) else values.struct("filters", query)
        start = values.optional_datetime("from_date", given.get("from_date"))
        end = values.optional_datetime("to_date", given.get("to_date"))
        senders = values.string_list("senders", given.get("senders"))
        docs = await self._stores.stats.between(start, end, senders)
        return [{"date": doc["hour"], "sender": doc["sender"], "sent": doc.get("sent", 0),
                 "failed": doc.get("failed", 0), "tries": doc.get("tries", 0)} for doc in docs]


def _status_record(recipient: FoundRecipient, details: Mapping[str, Any]) -> dict[str, Any]:
    record = {name: details.get(name) for name in ("status", "reply_code", "reply_enhanced_code", "reply_text",
                                                   "smtp_log", "modified", "first_try", "next_try", "try_count",
                                                   "in_progress", "cloud_client")}
    record.update(id=recipient.id, email=recipient.email)
    if record["in_progress"] and record["status"] in PENDING_STATUSES:
        record["status"] = IN_PROGRESS
    return record


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
