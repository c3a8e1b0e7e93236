"""The dispatcher: leases of queued recipients to satellites, and their reports back.

A satellite takes a *lease* on a batch of deliverable recipients (READY, or WARNING whose
``next_try`` has come) of RUNNING mailings of its group, plus any test recipient. A lease not
reported in time, or held by a satellite that disconnects, ends and its recipients are handed
out again. Reports go through the status log like every status change; the master, not the
satellite, decides when a soft bounce is retried and when it has tried long enough.
"""

from __future__ import annotations

import base64
import datetime
import logging
from collections import Counter
from typing import Any, Mapping, Sequence

from cloudmailing.config.settings import DispatchConfig
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.lease_budget import LeaseBudget
from cloudmailing.services.mailings import RUNNING
from cloudmailing.storage.database import Database
from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.recipients import LEASE_END, LeaseStore
from cloudmailing.storage.statistics import HourlyStatsStore
from cloudmailing.storage.status_log import StatusChange, StatusLog

log = logging.getLogger(__name__)

FINAL_STATUSES = ("FINISHED", "ERROR", "GENERAL_ERROR", "TIMEOUT")
REPORTED_STATUSES = ("FINISHED", "WARNING", "ERROR", "GENERAL_ERROR")
_CONTENT_FIELDS = ("mail_from", "sender_name", "subject", "html", "plain", "charset", "tracking_url", "testing",
                   "type", "dkim", "backup_customized_emails")


def retry_delay(config: DispatchConfig, try_count: int) -> float:
    """Seconds before the next try after ``try_count`` tries: initial × factor^(n-1), capped."""
    delay = config.retry_initial_seconds * config.retry_factor ** max(try_count - 1, 0)
    return float(min(delay, config.retry_max_seconds))


class Dispatcher:
    def __init__(self, database: Database, status_log: StatusLog, clock: SecondsClock,
                 config: DispatchConfig | None = None) -> None:
        self._mailings = MailingStore(database)
        self._leases = LeaseStore(database)
        self._stats = HourlyStatsStore(database)
        self._status_log = status_log
        self._clock = clock
        self.config = config or DispatchConfig()
        # The block of each leased recipient until it is reported or released: a report then
        # finds its recipients by block (see storage.recipients) instead of among all of them.
        self._leased_blocks: dict[str, Any] = {}

    async def lease(self, satellite: Mapping[str, Any], wanted: int) -> list[dict[str, Any]]:
        """Lease up to ``wanted`` recipients to ``satellite`` (its registry document)."""
        now = utc_now(self._clock)
        wanted = max(0, min(wanted, self.config.max_lease_size))
        expires = now + datetime.timedelta(seconds=self.config.lease_seconds)
        owner = satellite["serial"]
        affinity = {"domain": {"$in": satellite["domain_affinity"]}} if satellite.get("domain_affinity") else {}
        tests = {"test": True, "status": "READY", "in_progress": False, **affinity}
        leased = await self._leases.claim(tests, owner, expires, wanted) if wanted else []
        mailing_ids = await self._mailings.ids({"status": RUNNING, "satellite_group": {"$in": _groups(satellite)}})
        if mailing_ids:
            # Due retries first, then fresh recipients. One status per query: FerretDB passes an
            # equality to its backend, which then skips the other statuses for it.
            mailings = {"mailing_id": mailing_ids[0] if len(mailing_ids) == 1 else {"$in": mailing_ids}}
            for status, due in (("WARNING", {"next_try": {"$lte": now}}), ("READY", {})):
                if len(leased) < wanted:
                    query = {**mailings, "test": False, "status": status, "in_progress": False, **due, **affinity}
                    leased += await self._leases.claim(query, owner, expires, wanted - len(leased))
        leased = await self._within_bytes(leased, owner)
        self._leased_blocks.update((doc["_id"], doc.get("block")) for doc in leased)
        if leased:
            log.info("leased %d recipients", len(leased), extra={"satellite": owner})
        return [{"id": doc["_id"], "mailing_id": doc["mailing_id"], "email": doc["email"], "domain": doc["domain"],
                 "contact": doc.get("contact") or {}, "test": bool(doc.get("test")),
                 "attachments": [{"filename": a["filename"], "content_type": a["content_type"],
                                  "content": base64.b64encode(a["content"]).decode("ascii")}
                                 for a in doc.get("attachments") or []]}
                for doc in leased]

    def new_lease_budget(self) -> LeaseBudget:
        """A fresh allowance for a satellite that just connected."""
        return LeaseBudget(self._clock, self.config)

    async def _within_bytes(self, leased: list[dict[str, Any]], owner: str) -> list[dict[str, Any]]:
        """The lease cut where its attachments pass ``max_lease_bytes``; the rest back to the queue."""
        kept, size = 0, 0
        for doc in leased:
            size += sum(len(a["content"]) * 4 // 3 for a in doc.get("attachments") or [])
            if kept and size > self.config.max_lease_bytes:
                break
            kept += 1
        if kept < len(leased):
            await self.release_recipients([doc["_id"] for doc in leased[kept:]])
            log.info("lease cut to %d recipients by their attachments' size", kept, extra={"satellite": owner})
        return leased[:kept]

    async def mailing_content(self, mailing_id: int) -> dict[str, Any] | None:
        mailing = await self._mailings.get(mailing_id)
        if mailing is None:
            return None
        content = {name: mailing.get(name) for name in _CONTENT_FIELDS}
        content.update(id=mailing_id, rfc822=mailing.get("rfc822") or b"")
        return content

    async def report(self, satellite: Mapping[str, Any], outcomes: Sequence[Mapping[str, Any]]) -> list[str]:
        """Record each outcome once; returns the recipient ids the satellite may forget."""
        now = utc_now(self._clock)
        serial = satellite["serial"]
        # The last outcome of a recipient wins (a report may hold a retry's too).
        usable = {o["recipient_id"]: o for o in outcomes
                  if o.get("status") in REPORTED_STATUSES and isinstance(o.get("recipient_id"), str)}
        changes: list[StatusChange] = []

        def decide(current: dict[str, Any]) -> StatusChange:
            changes.append(self._change(usable[current["_id"]], current, serial, now))
            return changes[-1]

        if usable:
            blocks = {rid: self._leased_blocks.pop(rid) for rid in usable if rid in self._leased_blocks}
            await self._status_log.apply_decided(list(usable), decide, now, blocks)
        if changes:
            await self._count(serial, changes, now)
        log.info("%d outcomes recorded", len(changes), extra={"satellite": serial})
        # Unknown (deleted) recipients and unusable entries are acknowledged too: nothing to keep.
        return [str(o.get("recipient_id")) for o in outcomes]

    def _change(self, outcome: Mapping[str, Any], current: Mapping[str, Any], serial: str,
                now: datetime.datetime) -> StatusChange:
        tries = int(current.get("try_count") or 0) + 1
        first_try = current.get("first_try") or now
        status, next_try = outcome["status"], None
        if status == "WARNING":
            next_try = now + datetime.timedelta(seconds=retry_delay(self.config, tries))
            if now - first_try > datetime.timedelta(hours=self.config.retry_max_age_hours):
                status, next_try = "TIMEOUT", None
        fields = {
            "reply_code": outcome.get("reply_code"), "reply_enhanced_code": outcome.get("reply_enhanced_code") or "",
            "reply_text": str(outcome.get("reply_text") or "")[:1000],
            "smtp_log": "\n".join(str(line) for line in outcome.get("smtp_log") or [])[:10000],
            "try_count": tries, "first_try": first_try, "next_try": next_try, "cloud_client": serial,
            **LEASE_END,
        }
        content = _customized_content(outcome)
        if content is not None:
            fields["customized_content"] = content
        return StatusChange(outcome["recipient_id"], status, fields)

    async def _count(self, serial: str, changes: Sequence[StatusChange], now: datetime.datetime) -> None:
        statuses = Counter(change.status for change in changes)
        failed = statuses["ERROR"] + statuses["GENERAL_ERROR"] + statuses["TIMEOUT"]
        hour = now.replace(minute=0, second=0, microsecond=0)
        await self._stats.add(hour, serial, sent=statuses["FINISHED"], failed=failed, tries=len(changes))

    async def expire_leases(self) -> int:
        released = await self._release({"lease_expires": {"$lt": utc_now(self._clock)}})
        if released:
            log.warning("%d expired leases returned to the queue", released)
        return released

    async def release_recipients(self, recipient_ids: Sequence[str]) -> int:
        return await self._release({"_id": {"$in": list(recipient_ids)}}) if recipient_ids else 0

    async def release_satellite(self, serial: str) -> int:
        released = await self._release({"lease_owner": serial})
        if released:
            log.info("%d leased recipients returned to the queue", released, extra={"satellite": serial})
        return released

    async def _release(self, query: Mapping[str, Any]) -> int:
        released = await self._leases.release(query)
        for rid in released:
            self._leased_blocks.pop(rid, None)
        return len(released)


def _customized_content(outcome: Mapping[str, Any]) -> bytes | None:
    """The message as sent, when the mailing keeps them (backup_customized_emails); None if absent or garbled."""
    encoded = outcome.get("customized_content")
    if not isinstance(encoded, str):
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        log.warning("unreadable customized_content dropped", extra={"recipient": outcome.get("recipient_id")})
        return None


def _groups(satellite: Mapping[str, Any]) -> list[str]:
    """A satellite serves mailings of its group; mailings without a group go to any satellite."""
    group = satellite.get("group") or ""
    return ["", group] if group else [""]
