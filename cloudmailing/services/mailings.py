"""Mailings: creation, properties, life cycle, listing and deletion."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import email.utils
import logging
import re
from typing import Any, Callable, Mapping

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from cloudmailing.common.html_text import html_template_to_text
from cloudmailing.common.statuses import ERROR_STATUSES, FILLING, PAUSED, RUNNING, WARNING
from cloudmailing.common.statuses import FINISHED as SENT
from cloudmailing.common.statuses import MAILING_FINISHED as FINISHED
from cloudmailing.common.statuses import MAILING_READY as READY
from cloudmailing.services import values
from cloudmailing.services.addresses import InvalidAddress, parse_address
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.errors import BadRequest, InvalidValue, NotFound
from cloudmailing.services.templates import check_template
from cloudmailing.storage.mailings import MailingFilter
from cloudmailing.storage.stores import Stores

log = logging.getLogger(__name__)

REGULAR, OPENED = "REGULAR", "OPENED"

LISTED_FIELDS = ("domain_name", "satellite_group", "mail_from", "sender_name", "subject", "status", "type",
                 "tracking_url", "submit_time", "scheduled_start", "scheduled_end", "scheduled_duration",
                 "start_time", "end_time", "read_tracking", "click_tracking", "url_encoding")


def _dkim(value: Any) -> dict[str, Any]:
    """The dkim property. As in the original server, a struct without ``enabled`` (or with nil)
    means enabled when it gives a private key; ``enabled: False`` switches signing off."""
    settings = values.struct("dkim", value)
    unknown = set(settings) - {"enabled", "selector", "domain", "privkey"}
    if unknown:
        raise InvalidValue(f"dkim: unknown key(s) {', '.join(sorted(unknown))}")
    enabled = settings.get("enabled")
    result: dict[str, Any] = {
        "enabled": bool(settings.get("privkey")) if enabled is None else values.boolean("dkim.enabled", enabled),
        "selector": values.text("dkim.selector", settings.get("selector", ""), max_length=63, header=True),
        "domain": values.text("dkim.domain", settings.get("domain", ""), max_length=253, header=True),
        "privkey": values.text("dkim.privkey", settings.get("privkey", ""), max_length=20000),
    }
    if result["enabled"]:
        if not (result["selector"] and result["domain"] and result["privkey"]):
            raise InvalidValue("dkim: enabled needs selector, domain and privkey")
        try:
            key = load_pem_private_key(str(result["privkey"]).encode(), password=None)
        except (ValueError, TypeError):
            raise InvalidValue("dkim.privkey: not a PEM private key without passphrase") from None
        if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise InvalidValue("dkim.privkey: only RSA and Ed25519 keys are supported")
    return result


def _mail_from(value: Any) -> str:
    mail_from = values.text("mail_from", value, max_length=254, header=True).strip()
    try:
        parse_address(mail_from)
    except InvalidAddress as error:
        raise InvalidValue(f"mail_from: {error}") from None
    return mail_from


def _mailing_type(value: Any) -> str:
    kind = values.text("type", value).upper()
    if kind not in (REGULAR, OPENED):
        raise InvalidValue("type: must be REGULAR or OPENED")
    return kind


def _tracking_url(value: Any) -> str:
    url = values.text("tracking_url", value, max_length=2000, header=True, allow_none=True).strip()
    if url and not url.lower().startswith(("http://", "https://")):
        raise InvalidValue("tracking_url: must be an http:// or https:// URL")
    return url


# One checker per settable property: each returns the value to store.
MAX_DURATION_MINUTES = 100 * 366 * 24 * 60  # a century: the deadline stays a date

PROPERTY_CHECKS: dict[str, Callable[[Any], Any]] = {
    "type": _mailing_type,
    "satellite_group": lambda v: values.text("satellite_group", v, max_length=100, allow_none=True),
    "mail_from": _mail_from,
    "sender_name": lambda v: values.text("sender_name", v, max_length=200, header=True, allow_none=True),
    "tracking_url": _tracking_url,
    "backup_customized_emails": lambda v: values.boolean("backup_customized_emails", v),
    "owner_guid": lambda v: values.text("owner_guid", v, max_length=50, allow_none=True),
    "scheduled_start": lambda v: values.optional_datetime("scheduled_start", v),
    "scheduled_end": lambda v: values.optional_datetime("scheduled_end", v),
    # At most a century: a start plus the duration must stay a date (the life cycle's deadline).
    "scheduled_duration": lambda v: values.integer("scheduled_duration", v or 0, minimum=0,
                                                   maximum=MAX_DURATION_MINUTES),
    "dont_close_if_empty": lambda v: values.boolean("dont_close_if_empty", v),
    "subject": lambda v: values.text("subject", v, max_length=1000, header=True),
    "html_content": lambda v: values.text("html_content", v),
    "plain_content": lambda v: values.text("plain_content", v),
    "charset": lambda v: values.charset("charset", v),
    "read_tracking": lambda v: values.boolean("read_tracking", v),
    "click_tracking": lambda v: values.boolean("click_tracking", v),
    "dkim": _dkim,
    "url_encoding": lambda v: values.text("url_encoding", v, max_length=50, allow_none=True),
    "testing": lambda v: values.boolean("testing", v),
}
CONTENT_PROPERTIES = ("subject", "html_content", "plain_content")
STORED_NAMES = {"html_content": "html", "plain_content": "plain"}


class MailingService:
    def __init__(self, stores: Stores, clock: SecondsClock, work_available: Callable[[], None] = lambda: None) -> None:
        self._stores = stores
        self._store = stores.mailings
        self._clock = clock
        self._work_available = work_available  # a mailing resumed: idle satellites may lease at once

    async def create(self, mail_from: Any, sender_name: Any, subject: Any, html: Any, plain: Any,
                     charset: Any = "utf-8") -> int:
        fields: dict[str, Any] = {
            "mail_from": _mail_from(mail_from),
            "sender_name": values.text("sender_name", sender_name, max_length=200, header=True, allow_none=True),
            "subject": values.text("subject", subject, max_length=1000, header=True),
            "html": values.text("html", html, allow_none=True),
            "plain": values.text("plain", plain, allow_none=True),
            "charset": values.charset("charset", charset),
            "rfc822": None,
        }
        if not fields["html"] and not fields["plain"]:
            raise InvalidValue("html and plain: at least one body is needed")
        if not fields["plain"]:
            fields["plain"] = html_template_to_text(fields["html"])
        for name in ("subject", "html", "plain"):
            await check_template(name, fields[name], html=name == "html")
        return await self._insert(fields)

    async def create_from_message(self, message: Any) -> int:
        """A mailing from a whole RFC 822 message (base64 text or Binary); its MIME tree is kept."""
        raw = _decode_message(message)
        sender_name, mail_from, subject = _from_and_subject(raw)
        if not mail_from:
            raise InvalidValue("message: no From address")
        fields = {
            "mail_from": _mail_from(mail_from),
            "sender_name": values.text("sender_name", sender_name, max_length=200, header=True),
            "subject": values.text("subject", subject, max_length=1000, header=True),
            "html": "", "plain": "", "charset": "utf-8",
            "rfc822": raw,
        }
        return await self._insert(fields)

    async def _insert(self, fields: dict[str, Any]) -> int:
        now = utc_now(self._clock)
        mailing_id = await self._store.next_id()
        document = {
            **fields,
            "domain_name": parse_address(fields["mail_from"]).domain,
            "status": FILLING, "type": REGULAR, "satellite_group": "", "tracking_url": "",
            "backup_customized_emails": False, "owner_guid": "", "scheduled_start": None,
            "scheduled_end": None, "scheduled_duration": 0, "dont_close_if_empty": False,
            "read_tracking": True, "click_tracking": False, "url_encoding": "", "testing": False,
            "dkim": {"enabled": False, "selector": "", "domain": "", "privkey": ""},
            "submit_time": now, "start_time": None, "end_time": None,
        }
        await self._store.insert(mailing_id, document)
        log.info("mailing created", extra={"mailing": mailing_id})
        return mailing_id

    async def get(self, mailing_id: Any) -> dict[str, Any]:
        mailing = await self._store.get(values.integer("mailing_id", mailing_id))
        if mailing is None:
            raise NotFound(f"mailing {mailing_id} not found")
        return mailing

    async def set_properties(self, mailing_id: Any, properties: Any) -> None:
        mailing = await self.get(mailing_id)
        given = values.struct("properties", properties)
        unknown = sorted(set(given) - set(PROPERTY_CHECKS))
        if unknown:
            raise InvalidValue(f"unknown property: {', '.join(unknown)}")
        changes = {STORED_NAMES.get(key, key): PROPERTY_CHECKS[key](value) for key, value in given.items()}
        if any(key in given for key in CONTENT_PROPERTIES) and "charset" not in given:
            raise InvalidValue("charset: mandatory when subject, html_content or plain_content change")
        for name in ("subject", "html", "plain"):
            if name in changes:
                await check_template(name, changes[name], html=name == "html")
        if "mail_from" in changes:
            changes["domain_name"] = parse_address(changes["mail_from"]).domain
        await self._store.update(mailing["_id"], changes, new_content=True)

    async def start(self, mailing_id: Any) -> str:
        mailing = await self.get(mailing_id)
        status = mailing["status"]
        if status == FINISHED:
            raise BadRequest(f"mailing {mailing['_id']} is finished")
        if status == PAUSED and mailing.get("start_time"):  # it ran before: resumed at once
            if await self._store.update(mailing["_id"], {"status": RUNNING}, only_if_status=[PAUSED]):
                log.info("mailing resumed", extra={"mailing": mailing["_id"]})
                self._work_available()
                return RUNNING
            return await self._status_now(mailing["_id"])  # changed meanwhile
        if status in (FILLING, PAUSED):
            if not await self._store.update(mailing["_id"], {"status": READY}, only_if_status=[FILLING, PAUSED]):
                return await self._status_now(mailing["_id"])  # finished by its deadline meanwhile
            status = READY
            log.info("mailing started", extra={"mailing": mailing["_id"]})
        return status

    async def pause(self, mailing_id: Any) -> str:
        mailing = await self.get(mailing_id)
        status = mailing["status"]
        if status == FINISHED:
            raise BadRequest(f"mailing {mailing['_id']} is finished")
        if status in (READY, RUNNING):
            if not await self._store.update(mailing["_id"], {"status": PAUSED}, only_if_status=[READY, RUNNING]):
                return await self._status_now(mailing["_id"])  # finished by its last report meanwhile
            status = PAUSED
            log.info("mailing paused", extra={"mailing": mailing["_id"]})
        return status

    async def _status_now(self, mailing_id: int) -> str:
        """The status a mailing moved to while this call was deciding: FINISHED is refused as
        when the call came after it (Fault 400)."""
        status = str((await self.get(mailing_id))["status"])
        if status == FINISHED:
            raise BadRequest(f"mailing {mailing_id} is finished")
        return status

    async def delete(self, mailing_id: Any) -> None:
        mailing = await self.get(mailing_id)
        await self._delete_ids([mailing["_id"]])

    async def delete_for_domain(self, domain: Any) -> int:
        names = values.domain_list("domain", [values.text("domain", domain, max_length=253)])
        ids = await self._store.ids(MailingFilter(domains=names))
        await self._delete_ids(ids)
        return len(ids)

    async def _delete_ids(self, mailing_ids: list[int]) -> None:
        # Recipients and their log first, the mailing last: an interrupted delete can be redone.
        for mailing_id in mailing_ids:
            await self._stores.delete_mailing(mailing_id)
            log.info("mailing deleted", extra={"mailing": mailing_id})

    async def list(self, filters: Any) -> list[dict[str, Any]]:
        return [_listed(doc) async for doc in self._store.find(mailing_filter(filters))]

    async def count(self, filters: Any) -> int:
        return await self._store.count(mailing_filter(filters))


_FILTER_KEYS = {"id": "ids", "domain": "domains", "status": "statuses", "owner_guid": "owners",
                "satellite_group": "groups"}


def mailing_filter(filters: Any) -> MailingFilter:
    """The mailings ``list_mailings`` filters choose (struct of lists, a domain string, or empty)."""
    if filters is None or filters == "" or filters == [] or filters == {}:
        return MailingFilter()
    if isinstance(filters, str):
        return MailingFilter(domains=values.domain_list("filters", [values.text("filters", filters, max_length=253)]))
    given = values.given(values.struct("filters", filters))
    unknown = sorted(set(given) - set(_FILTER_KEYS))
    if unknown:
        raise InvalidValue(f"filters: unknown key(s) {', '.join(unknown)}")
    chosen: dict[str, list[Any]] = {}
    for key, name in _FILTER_KEYS.items():
        if key == "id" and key in given:
            chosen[name] = values.int_list("filters.id", given[key])
        elif key == "domain" and key in given:
            chosen[name] = values.domain_list("filters.domain", given[key])
        elif key in given:
            chosen[name] = values.string_list(f"filters.{key}", given[key])
    return MailingFilter(**chosen)


def totals(counts: Mapping[str, int]) -> dict[str, int]:
    """A mailing's totals from its per-status recipient counts."""
    total = sum(counts.values())
    sent = counts.get(SENT, 0)
    error = sum(counts.get(status, 0) for status in ERROR_STATUSES)
    return {"total_recipient": total, "total_sent": sent, "total_error": error,
            "total_softbounce": counts.get(WARNING, 0), "total_pending": total - sent - error}


def _listed(doc: Mapping[str, Any]) -> dict[str, Any]:
    listed: dict[str, Any] = {"id": doc["_id"]}
    listed.update({name: doc.get(name) for name in LISTED_FIELDS})
    dkim = doc.get("dkim") or {}
    listed["dkim"] = {"enabled": bool(dkim.get("enabled")), "selector": dkim.get("selector", ""),
                      "domain": dkim.get("domain", "")}  # never the private key
    listed.update(totals(doc.get("counts") or {}))
    return listed


# A header field line ("Name: value", RFC 5322 ftext) or the folded continuation of one.
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:|[ \t]")
_BASE64_WHITESPACE = re.compile(rb"[ \t\r\n]+")


def _from_and_subject(raw: bytes) -> tuple[str, str, str]:
    """(sender name, From address, Subject) of a message; the parser's own errors on a malformed
    header (it raises a few kinds) are the client's: Fault 406."""
    try:
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        sender_name, mail_from = email.utils.parseaddr(str(parsed.get("From", "")))
        return sender_name, mail_from, str(parsed.get("Subject", ""))
    except Exception as error:  # noqa: BLE001 - IndexError, AttributeError... from email's header parser
        raise InvalidValue(f"message: unreadable From or Subject header ({type(error).__name__})") from None


def _decode_message(message: Any) -> bytes:
    """The raw message of ``create_mailing_ext``.

    A ``base64`` value (bytes) holds either the message itself or base64 text of it: Python 3
    clients calling ``create_mailing_ext(base64.b64encode(raw))`` send the latter. A string
    must be base64 text. A message always has a ``Name:`` header line, and ``:`` is not in the
    base64 alphabet, so the two readings never both succeed.
    """
    if isinstance(message, (bytes, bytearray)):
        data = bytes(message)
    elif isinstance(getattr(message, "data", None), bytes):
        data = message.data
    elif isinstance(message, str):
        if not message.isascii():
            raise InvalidValue("message: a string must be the base64 text of the message")
        data = message.encode("ascii")
    else:
        raise InvalidValue("message: expected a base64 string or Binary")
    if not data.strip():
        raise InvalidValue("message: empty")
    decoded = _strict_base64(data)
    if decoded is not None and _looks_like_message(decoded):
        return decoded
    if not isinstance(message, str) and _looks_like_message(data):
        return data
    raise InvalidValue("message: neither an RFC 822 message nor the base64 text of one")


def _strict_base64(data: bytes) -> bytes | None:
    """``data`` decoded as base64 (line breaks allowed, nothing else outside the alphabet), or None."""
    try:
        return base64.b64decode(_BASE64_WHITESPACE.sub(b"", data), validate=True)
    except binascii.Error:
        return None


def _looks_like_message(raw: bytes) -> bool:
    """True when ``raw`` starts with a header section: field lines, maybe folded, up to a blank line."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    if not lines[0] or lines[0][:1] in b" \t":
        return False
    return all(_HEADER_LINE.match(line) for line in lines if line)
