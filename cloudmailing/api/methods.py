"""The CloudMailing API methods: argument shapes in, service calls, results out.

Each public coroutine of :class:`CloudMailingApi` is an XML-RPC method of the same name; its
docstring is what ``system.methodHelp`` answers and ``SIGNATURES`` what
``system.methodSignature`` answers. Validation of values lives in the services.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from cloudmailing.services.dispatcher import Dispatcher
from cloudmailing.services.lifecycle import MailingLifecycle
from cloudmailing.services.mailings import MailingService
from cloudmailing.services.recipients import RecipientService
from cloudmailing.services.reports import ReportService
from cloudmailing.services.satellites import SatelliteService

ApiMethod = Callable[..., Awaitable[Any]]

# XML-RPC signatures: [return type, argument types...], one list per accepted form.
SIGNATURES: dict[str, list[list[str]]] = {
    "create_mailing": [["int", "string", "string", "string", "string", "string"],
                       ["int", "string", "string", "string", "string", "string", "string"]],
    "create_mailing_ext": [["int", "string"], ["int", "base64"]],
    "set_mailing_properties": [["int", "int", "struct"]],
    "start_mailing": [["string", "int"]],
    "pause_mailing": [["string", "int"]],
    "delete_mailing": [["int", "int"]],
    "delete_all_mailings_for_domain": [["int", "string"]],
    "list_mailings": [["array"], ["array", "struct"], ["array", "string"]],
    "get_mailings_count": [["int"], ["int", "struct"], ["int", "string"]],
    "add_recipients": [["array", "int", "array"]],
    "send_test": [["array", "int", "array"]],
    "get_recipients_count": [["int"], ["int", "struct"]],
    "get_recipients_status": [["array", "array"], ["array", "array", "struct"]],
    "get_recipients_status_updated_since": [["struct", "string", "struct", "int", "struct"],
                                            ["struct", "string", "struct", "int"]],
    "reset_recipients_status": [["int", "array"]],
    "get_hourly_statistics": [["array", "struct"]],
    "cloud_get_satellites_count": [["int"]],
    "cloud_list_satellites": [["array"]],
    "cloud_add_satellite": [["int", "string"], ["int", "string", "struct"]],
    "cloud_set_satellite_properties": [["int", "int", "struct"]],
    "cloud_delete_satellite": [["int", "int"]],
    "update_statistics": [["int"]],
    "mailing_manager_force_check": [["int"]],
    "force_purge_empty_mailings": [["int"]],
}


@dataclass
class Services:
    mailings: MailingService
    recipients: RecipientService
    reports: ReportService
    satellites: SatelliteService
    lifecycle: MailingLifecycle
    dispatcher: Dispatcher | None = None
    connected_satellites: Callable[[], set[str]] = set


class CloudMailingApi:
    """The API's methods, bound to the domain services."""

    def __init__(self, services: Services) -> None:
        self._s = services

    # -- mailings ---------------------------------------------------------------------------

    async def create_mailing(self, mail_from: Any, sender_name: Any, subject: Any, html: Any, plain: Any,
                             charset: Any = "utf-8") -> int:
        """create_mailing(mail_from, sender_name, subject, html, plain, charset='utf-8') -> mailing id.

        Creates a mailing in FILLING_RECIPIENTS status. Subject and bodies are Jinja2 templates
        personalized per recipient. An empty plain part is derived from the HTML."""
        return await self._s.mailings.create(mail_from, sender_name, subject, html, plain, charset)

    async def create_mailing_ext(self, message: Any) -> int:
        """create_mailing_ext(rfc822 message: base64 string, or Binary of the message or of its base64 text) -> id.

        The message's own headers and MIME tree (attachments, inline images) are kept; mail_from,
        sender_name, subject and domain_name come from its headers."""
        return await self._s.mailings.create_from_message(message)

    async def set_mailing_properties(self, mailing_id: Any, properties: Any) -> int:
        """set_mailing_properties(mailing_id, struct) -> 0.

        Keys: type, satellite_group, mail_from, sender_name, tracking_url, backup_customized_emails,
        owner_guid, scheduled_start, scheduled_end, scheduled_duration, dont_close_if_empty,
        subject/html_content/plain_content (with charset), read_tracking, click_tracking,
        dkim {enabled, selector, domain, privkey}, url_encoding, testing. Unknown key or bad value: 406."""
        await self._s.mailings.set_properties(mailing_id, properties)
        return 0

    async def start_mailing(self, mailing_id: Any) -> str:
        """start_mailing(mailing_id) -> new status. Makes the mailing eligible for sending
        (READY, then RUNNING once its scheduled_start is reached)."""
        return await self._s.mailings.start(mailing_id)

    async def pause_mailing(self, mailing_id: Any) -> str:
        """pause_mailing(mailing_id) -> new status (PAUSED). No new recipients are handed out;
        those in flight finish."""
        return await self._s.mailings.pause(mailing_id)

    async def delete_mailing(self, mailing_id: Any) -> int:
        """delete_mailing(mailing_id) -> 0. Deletes the mailing, its recipients and their history."""
        await self._s.mailings.delete(mailing_id)
        return 0

    async def delete_all_mailings_for_domain(self, domain: Any) -> int:
        """delete_all_mailings_for_domain(domain) -> number of mailings deleted."""
        return await self._s.mailings.delete_for_domain(domain)

    async def list_mailings(self, filters: Any = None) -> list[dict[str, Any]]:
        """list_mailings(filters) -> mailings sorted by id.

        filters: a struct with lists under id, domain, status, owner_guid, satellite_group; or a
        sender domain string; or empty. Each mailing has its settings and its totals."""
        return await self._s.mailings.list(filters)

    async def get_mailings_count(self, filters: Any = None) -> int:
        """get_mailings_count(filters) -> number of mailings matching (filters as list_mailings)."""
        return await self._s.mailings.count(filters)

    # -- recipients --------------------------------------------------------------------------

    async def add_recipients(self, mailing_id: Any, recipients: Any) -> list[dict[str, Any]]:
        """add_recipients(mailing_id, [struct, ...]) -> [{email, id} or {email, error}, ...].

        At most 1000 entries per call (else Fault 400). Each struct needs 'email'; 'tracking_id'
        becomes the recipient id (else a UUID); 'attachments' is a list of {filename,
        content_type, content} (or the original's {filename, content-type, charset, data};
        filename optional); every other key is personalization data."""
        return await self._s.recipients.add(mailing_id, recipients)

    async def send_test(self, mailing_id: Any, recipients: Any) -> list[dict[str, Any]]:
        """send_test(mailing_id, [struct, ...]) -> as add_recipients. These recipients are sent at
        once, even before the mailing starts, and are not counted in the mailing's totals."""
        return await self._s.recipients.add(mailing_id, recipients, test=True)

    async def get_recipients_count(self, filters: Any = None) -> int:
        """get_recipients_count(filters) -> int. Filters: status, owners, mailings, sender_domains."""
        return await self._s.reports.count(filters)

    async def get_recipients_status(self, recipient_ids: Any, options: Any = None) -> list[dict[str, Any]]:
        """get_recipients_status([recipient id, ...], options) -> status structs of the known ids.

        Options: with_contact_data, with_customized_content, delete_customized_content."""
        return await self._s.reports.statuses(recipient_ids, options)

    async def get_recipients_status_updated_since(self, cursor: Any, filters: Any = None,
                                                  max_results: Any = 1000, options: Any = None,
                                                  ) -> dict[str, Any]:
        """get_recipients_status_updated_since(cursor, filters, max_results, options) -> {cursor, recipients}.

        Every status change since cursor ('' first), oldest first, each exactly once, at most
        max_results (<= 1000). Pass the returned cursor to the next call; it survives restarts.
        Default status filter: every status but READY."""
        return await self._s.reports.updated_since(cursor, filters, max_results, options)

    async def reset_recipients_status(self, recipient_ids: Any) -> int:
        """reset_recipients_status([recipient id, ...]) -> 0. Puts them back to READY."""
        await self._s.recipients.reset(recipient_ids)
        return 0

    async def get_hourly_statistics(self, query: Any = None) -> list[dict[str, Any]]:
        """get_hourly_statistics({from_date, to_date, senders}) -> [{date, sender, sent, failed, tries}].

        One entry per hour and per sending satellite (sender = its serial)."""
        return await self._s.reports.hourly_statistics(query)

    # -- satellites --------------------------------------------------------------------------

    async def cloud_get_satellites_count(self) -> int:
        """cloud_get_satellites_count() -> number of registered satellites."""
        return await self._s.satellites.count()

    async def cloud_list_satellites(self) -> list[dict[str, Any]]:
        """cloud_list_satellites() -> [{id, serial, enabled, paired, connected, group,
        domain_affinity, version, last_seen, in_flight}, ...]."""
        return await self._s.satellites.list(self._s.connected_satellites())

    async def cloud_add_satellite(self, serial: Any, properties: Any = None) -> int:
        """cloud_add_satellite(serial, {enabled, paired, group, domain_affinity}) -> satellite id."""
        return await self._s.satellites.add(serial, properties)

    async def cloud_set_satellite_properties(self, satellite_id: Any, properties: Any) -> int:
        """cloud_set_satellite_properties(id, {enabled, paired, group, domain_affinity}) -> id."""
        return await self._s.satellites.set_properties(satellite_id, properties)

    async def cloud_delete_satellite(self, satellite_id: Any) -> int:
        """cloud_delete_satellite(id) -> 0."""
        await self._s.satellites.delete(satellite_id)
        return 0

    # -- kept for old clients ----------------------------------------------------------------

    async def update_statistics(self) -> int:
        """update_statistics() -> 0. Statistics are always up to date; kept for old clients."""
        return 0

    async def mailing_manager_force_check(self) -> int:
        """mailing_manager_force_check() -> 0. Runs the mailings' life-cycle check now."""
        await self._s.lifecycle.tick()
        return 0

    async def force_purge_empty_mailings(self) -> int:
        """force_purge_empty_mailings() -> 0. Finishes started mailings that have no recipient."""
        await self._s.lifecycle.close_empty_mailings()
        return 0

    def methods(self) -> dict[str, ApiMethod]:
        """The API's method table: XML-RPC name -> bound coroutine function."""
        return {name: getattr(self, name) for name in SIGNATURES}


def method_help(method: ApiMethod) -> str:
    return inspect.cleandoc(method.__doc__ or "")
