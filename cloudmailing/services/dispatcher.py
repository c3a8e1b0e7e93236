"""The dispatcher: leases of queued recipients to satellites, and their reports back.

A satellite takes a *lease* on blocks of deliverable recipients (READY, or WARNING whose retry is
due) of RUNNING mailings of its group, and on any block of test recipients (``send_test``): it
holds them until it reports each one, or until the lease expires or it disconnects, when they go
back to the queue. A report is recorded for recipients the reporting satellite holds, and for
those still pending that no satellite holds (an outbox reported after the lease ended): a
report repeated after a lost acknowledgement records nothing new, and no satellite can write
over another's recipients. The master, not the satellite, decides when a soft bounce is retried
and when it has been tried long enough.
"""

from __future__ import annotations

import base64
import datetime
import logging
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Container, Mapping, Sequence

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.common.recent import keep_recent
from cloudmailing.common.statuses import ERROR_STATUSES, FINISHED, PENDING_STATUSES, READY, TIMEOUT, WARNING
from cloudmailing.config.settings import DispatchConfig
from cloudmailing.services.clock import SecondsClock, utc_now
from cloudmailing.services.lease_budget import LeaseBudget
from cloudmailing.storage.block_codec import from_millis
from cloudmailing.storage.blocks import Block, Lease
from cloudmailing.storage.ledger import Change
from cloudmailing.storage.stores import Stores

log = logging.getLogger(__name__)

# A block that had nothing for a satellite's domain affinity is not read again for it this long
# (what comes due meanwhile waits at most that much: recipients added or reset clear it at once).
_PASSED_OVER_SECONDS = 30.0
_AFFINITIES_KEPT = 64

_CONTENT_FIELDS = ("mail_from", "sender_name", "subject", "html", "plain", "charset", "tracking_url", "testing",
                   "type", "dkim", "backup_customized_emails")


def retry_delay(config: DispatchConfig, try_count: int) -> float:
    """Seconds before the next try after ``try_count`` tries: initial × factor^(n-1), capped."""
    try:
        delay = config.retry_initial_seconds * config.retry_factor ** max(try_count - 1, 0)
    except OverflowError:  # past the float range (a thousand tries and more): the cap, surely
        return float(config.retry_max_seconds)
    return float(min(delay, config.retry_max_seconds))


@dataclass(frozen=True)
class Reported:
    """What :meth:`Dispatcher.report` did with a report: the ids acknowledged (all it named), and
    those whose outcome was recorded (see :func:`_recordable`)."""

    acknowledged: list[str]
    recorded: list[str]


@dataclass(frozen=True)
class _Held:
    """Where a leased recipient is, and under which lease."""

    block_id: int
    slot: int
    lease_id: str
    owner: str  # the satellite's serial
    until: datetime.datetime  # when the lease ends: then forgotten (a late report finds it by the index)


class Dispatcher:
    def __init__(self, stores: Stores, clock: SecondsClock, config: DispatchConfig | None = None) -> None:
        self._stores = stores
        self._blocks = stores.blocks
        self._ledger = stores.ledger
        self._clock = clock
        self.config = config or DispatchConfig()
        # The recipients this master leased, until reported or released: a report finds them
        # here (after a restart, through the recipient index).
        self._held: dict[str, _Held] = {}
        # For each domain affinity of a satellite, the blocks that lately had nothing for it, and
        # when: its leases pass them over, without reading them, for _PASSED_OVER_SECONDS.
        self._passed_over: OrderedDict[frozenset[str], dict[int, float]] = OrderedDict()
        self._work_listeners: list[Callable[[], None]] = []
        self._settled_listeners: list[Callable[[set[int]], Awaitable[None]]] = []

    def on_work(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever recipients become deliverable (see :meth:`work_available`)."""
        self._work_listeners.append(listener)

    def work_available(self) -> None:
        """Recipients became deliverable (a mailing started, recipients were added to a running
        one, test recipients): the listeners (the satellite link) wake idle satellites, which
        would otherwise ask again only at their next idle poll."""
        self._blocks.forget_free()
        self._passed_over.clear()
        for listener in self._work_listeners:
            listener()

    def on_settled(self, listener: Callable[[set[int]], Awaitable[None]]) -> None:
        """Await ``listener`` with the ids of the mailings a report gave final statuses to: the
        life cycle finishes those with nothing left pending at once, not at its next tick."""
        self._settled_listeners.append(listener)

    def new_lease_budget(self) -> LeaseBudget:
        """A fresh allowance for a satellite that just connected."""
        return LeaseBudget(self._clock, self.config)

    # -- leases -------------------------------------------------------------------------------

    async def lease(self, satellite: Mapping[str, Any], wanted: int) -> list[dict[str, Any]]:
        """Lease whole blocks to ``satellite`` (its registry document) until about ``wanted``
        recipients (at least one block when ``wanted`` > 0) or ``max_lease_bytes`` of attachments."""
        wanted = max(0, min(wanted, self.config.max_lease_size))
        if not wanted:
            return []
        now = utc_now(self._clock)
        until = now + datetime.timedelta(seconds=self.config.lease_seconds)
        lease = Lease(uuid.uuid4().hex, satellite["serial"], until)
        affinity = set(satellite.get("domain_affinity") or [])
        groups = _groups(satellite)
        mailing_ids = await self._stores.mailings.running_for_groups(groups)
        leased = await self._fill(wanted, [(None, True), (mailing_ids, False)], lease, now, affinity, groups)
        if leased:
            log.info("leased %d recipients", len(leased), extra={"satellite": lease.owner})
        return leased

    async def _fill(self, wanted: int, scopes: list[tuple[list[int] | None, bool]], lease: Lease,
                    now: datetime.datetime, affinity: set[str], groups: list[str]) -> list[dict[str, Any]]:
        """Blocks of each scope (mailings, test or not) in turn, until ``wanted`` recipients or the
        attachments' byte bound; test blocks only of mailings of the satellite's ``groups``."""
        leased: list[dict[str, Any]] = []
        size = 0
        passed_over = self._passed_over_by(affinity) if affinity else None  # read once a lease
        for mailing_ids, test in scopes:
            if len(leased) >= wanted:
                break
            handed_back: list[int] = []  # free blocks taken from the shared search and not used
            try:
                async for block_id in self._blocks.leasable(mailing_ids, test, now):
                    if test and not await self._in_groups(block_id, groups):
                        self._blocks.forget_free()  # handed out from a search all satellites share
                        continue
                    got = await self._lease_matching(block_id, lease, now, affinity, passed_over)
                    if got is None:
                        handed_back.append(block_id)
                        continue
                    got_size = sum(_attachments_size(recipient) for recipient in got)
                    if leased and size + got_size > self.config.max_lease_bytes:
                        await self.release_recipients([recipient["id"] for recipient in got])
                        return leased
                    leased += got
                    size += got_size
                    if len(leased) >= wanted:  # before taking another block id: it stays for the next lease
                        return leased
            finally:
                self._blocks.put_back(mailing_ids, test, handed_back)
        return leased

    async def _lease_matching(self, block_id: int, lease: Lease, now: datetime.datetime, affinity: set[str],
                              passed_over: dict[int, float] | None) -> list[dict[str, Any]] | None:
        """Lease the block's deliverable recipients (those of ``affinity``'s domains when it names
        any, ``passed_over`` the blocks that lately gave it nothing); None when the affinity made
        it give nothing: others may still want it."""
        if passed_over is not None and block_id in passed_over:
            return None
        got = await self._lease_block(block_id, await self._blocks.content(block_id), lease, now, affinity)
        if passed_over is not None and not got:
            passed_over[block_id] = self._clock.seconds()
            return None
        return got

    def _passed_over_by(self, affinity: set[str]) -> dict[int, float]:
        """The blocks that gave this affinity nothing in the last _PASSED_OVER_SECONDS."""
        key = frozenset(affinity)
        since = self._clock.seconds() - _PASSED_OVER_SECONDS
        passed_over = {block_id: at for block_id, at in self._passed_over.get(key, {}).items() if at > since}
        keep_recent(self._passed_over, key, passed_over, _AFFINITIES_KEPT)
        return passed_over

    async def _in_groups(self, block_id: int, groups: list[str]) -> bool:
        """Whether the block's mailing is of one of ``groups`` (its content, DKIM key included,
        goes to whoever holds a lease on it). Asked of test blocks only: they are few."""
        block = await self._blocks.load(block_id, cached=True)
        mailing = await self._stores.mailings.get(block.mailing_id) if block is not None else None
        return mailing is not None and (mailing.get("satellite_group") or "") in groups

    async def _lease_block(self, block_id: int, content: list[dict[str, Any]], lease: Lease,
                           now: datetime.datetime, affinity: set[str]) -> list[dict[str, Any]]:
        chosen: list[int] = []

        def take(block: Block) -> list[Change] | None:
            if block.lease is not None and block.lease.until >= now:
                return None  # another satellite's, or taken since the search
            _end_lease(block)
            slots = [slot for slot in block.deliverable(now)
                     if slot < len(content) and (not affinity or content[slot]["domain"] in affinity)]
            if not slots:
                return None
            for slot in slots:
                block.columns.leased[slot] = 1
            block.lease = lease
            chosen[:] = slots
            return []

        written = await self._ledger.edit(block_id, take, now)
        if written is None:
            return []
        block = written[0]
        self._held.update((content[slot]["id"], _Held(block_id, slot, lease.id, lease.owner, lease.until))
                          for slot in chosen)
        return [_leased_recipient(block, content[slot], lease.id) for slot in chosen]

    async def mailing_content(self, mailing_id: int, satellite: Mapping[str, Any] | None = None,
                              ) -> dict[str, Any] | None:
        """What a satellite needs to build a mailing's messages; only for a satellite holding a
        lease on some of its recipients (None: unknown mailing, or none held)."""
        if satellite is not None:
            held = {summary["m"] for summary in await self._blocks.held_by(satellite["serial"])}
            if mailing_id not in held:
                return None
        mailing = await self._stores.mailings.get(mailing_id, with_content=True)
        if mailing is None:
            return None
        content = {name: mailing.get(name) for name in _CONTENT_FIELDS}
        content.update(id=mailing_id, rfc822=mailing.get("rfc822") or b"",
                       content_version=mailing.get("content_version") or 0)
        return content

    async def content_versions(self, recipients: Sequence[Mapping[str, Any]]) -> dict[int, int]:
        """The content version of each mailing of these leased recipients (a read per mailing:
        a lease spans one or a few)."""
        versions: dict[int, int] = {}
        for mailing_id in {recipient["mailing_id"] for recipient in recipients}:
            mailing = await self._stores.mailings.get(mailing_id)
            if mailing is not None:
                versions[mailing_id] = mailing.get("content_version") or 0
        return versions

    # -- reports ------------------------------------------------------------------------------

    async def report(self, satellite: Mapping[str, Any], outcomes: Sequence[Outcome]) -> Reported:
        """Record each outcome of a recipient the satellite holds, or that is still pending and
        held by no other satellite (see :func:`_recordable`). ``acknowledged``: the recipient
        ids it may forget (every id it sent: the others have nothing left to record); ``recorded``:
        those whose outcome was recorded."""
        now = utc_now(self._clock)
        serial = satellite["serial"]
        usable = {o.recipient_id: o for o in outcomes}  # the last outcome of a recipient wins
        recorded: list[Change] = []
        recorded_ids: list[str] = []
        settled: set[int] = set()  # mailings some of whose recipients reached a final status
        for block_id, outcomes_by_slot in (await self._by_block(usable)).items():
            mailing_id, changes = await self._record(block_id, outcomes_by_slot, serial, now)
            recorded += changes
            recorded_ids += [outcomes_by_slot[change.slot][0] for change in changes]
            if any(change.status not in PENDING_STATUSES for change in changes):
                settled.add(mailing_id)
        if recorded:
            await self._count(serial, recorded, now)
        if settled:
            await self._tell_settled(settled)
        ignored = len(usable) - len(recorded)
        log.info("%d outcomes recorded%s", len(recorded),
                 f", {ignored} held by another satellite or reported already ignored" if ignored else "",
                 extra={"satellite": serial})
        return Reported([o.recipient_id for o in outcomes], recorded_ids)

    async def leased_count(self, serial: str) -> int:
        """How many recipients ``serial`` holds now."""
        return await self._blocks.leased_count(serial)

    async def _by_block(self, outcomes: Mapping[str, Outcome]) -> dict[int, dict[int, tuple[str, Outcome]]]:
        """The outcomes by block and slot."""
        unknown = [rid for rid in outcomes if rid not in self._held]
        places = {rid: (place.block_id, place.slot)
                  for rid, place in (await self._stores.index.locate(unknown)).items()} if unknown else {}
        places.update((rid, (self._held[rid].block_id, self._held[rid].slot)) for rid in outcomes if rid in self._held)
        grouped: dict[int, dict[int, tuple[str, Outcome]]] = {}
        for rid, (block_id, slot) in places.items():
            grouped.setdefault(block_id, {})[slot] = (rid, outcomes[rid])
        return grouped

    async def _tell_settled(self, mailing_ids: set[int]) -> None:
        for listener in self._settled_listeners:
            try:
                await listener(mailing_ids)
            except Exception:  # recorded all the same: the life cycle's next tick does it
                log.exception("finishing the reported mailings failed", extra={"mailing": sorted(mailing_ids)})

    async def _record(self, block_id: int, outcomes: Mapping[int, tuple[str, Outcome]], serial: str,
                      now: datetime.datetime) -> tuple[int, list[Change]]:
        """The block's mailing, and the changes recorded in the block."""
        addresses = await self._blocks.addresses(block_id, max(outcomes, default=-1) + 1)

        # The leases this master gave, still remembered (until their end), of recipients freed
        # since (the reconnect grace): their outcomes count, once.
        held = ((rid, self._held.get(rid)) for rid, _ in outcomes.values())
        given = {rid: place.lease_id for rid, place in held if place is not None and place.owner == serial}

        def decide(block: Block) -> list[Change] | None:
            size = min(len(block.columns), len(addresses))
            changes = [self._change(block, slot, outcome, serial, now) for slot, (rid, outcome) in outcomes.items()
                       if slot < size and addresses[slot][0] == rid
                       and _recordable(block, slot, outcome, serial, given.get(rid))]
            return changes or None  # recording a slot takes it out of its lease (ledger)

        written = await self._ledger.edit(block_id, decide, now)
        for rid, _ in outcomes.values():
            self._held.pop(rid, None)
        if written and written[0].lease is None and written[0].columns.counts().get(READY):
            self._blocks.forget_free()  # its lease ended with recipients left to send: free again
        return (written[0].mailing_id, written[1]) if written else (0, [])

    def _change(self, block: Block, slot: int, outcome: Outcome, serial: str, now: datetime.datetime) -> Change:
        tries = int(block.columns.tries[slot]) + 1
        first_try = from_millis(block.columns.first_try[slot]) or now
        status, next_try = outcome.status, None
        if status == WARNING:
            next_try = now + datetime.timedelta(seconds=retry_delay(self.config, tries))
            if now - first_try > datetime.timedelta(hours=self.config.retry_max_age_hours):
                status, next_try = TIMEOUT, None
        details = {
            "reply_code": outcome.reply_code, "reply_enhanced_code": outcome.reply_enhanced_code,
            "reply_text": outcome.reply_text[:1000], "smtp_log": "\n".join(outcome.smtp_log)[:10000],
            "cloud_client": serial,
        }
        return Change(slot, status, tries, first_try, next_try, details, _customized_content(outcome))

    async def _count(self, serial: str, changes: Sequence[Change], now: datetime.datetime) -> None:
        statuses = Counter(change.status for change in changes)
        failed = sum(statuses[status] for status in ERROR_STATUSES)
        hour = now.replace(minute=0, second=0, microsecond=0)
        await self._stores.stats.add(hour, serial, sent=statuses[FINISHED], failed=failed, tries=len(changes))

    # -- leases ending --------------------------------------------------------------------------

    async def expire_leases(self) -> int:
        now = utc_now(self._clock)
        released = 0
        for summary in await self._blocks.lease_expired(now):
            released += await self._end_block_lease(summary["_id"], lambda lease: lease.until < now)
        if released:
            log.warning("%d expired leases returned to the queue", released)
        # Leases never reported (a satellite that died, a reset, a deleted mailing) leave their
        # entries here: forgotten once their lease ends, so the master's memory stays bounded.
        self._held = {rid: held for rid, held in self._held.items() if held.until >= now}
        return released

    async def release_satellite(self, serial: str, keep: Container[str] = frozenset()) -> int:
        """Return what ``serial`` holds to the queue (it went away), but for the leases in ``keep``
        (asked of each block as it comes: a ``keep`` may change while the release goes on)."""
        released = 0
        for summary in await self._blocks.held_by(serial):
            released += await self._end_block_lease(summary["_id"],
                                                    lambda lease: lease.owner == serial and lease.id not in keep)
        if released:
            log.info("%d leased recipients returned to the queue", released, extra={"satellite": serial})
        return released

    async def release_recipients(self, recipient_ids: Sequence[str]) -> int:
        """Return these leased recipients to the queue (a lease answer that could not be given)."""
        by_block: dict[int, set[int]] = {}
        for rid in recipient_ids:
            held = self._held.pop(rid, None)
            if held is not None:
                by_block.setdefault(held.block_id, set()).add(held.slot)
        released = 0
        for block_id, slots in by_block.items():
            released += await self._end_block_lease(block_id, lambda lease: True, slots)
        return released

    async def _end_block_lease(self, block_id: int, applies: Any, slots: set[int] | None = None) -> int:
        ended: list[int] = []

        def end(block: Block) -> list[Change] | None:
            ended.clear()  # an earlier decision, on a view written over since, ended nothing
            if block.lease is None or not applies(block.lease):
                return None
            ended[:] = [slot for slot in block.leased_slots() if slots is None or slot in slots]
            _end_lease(block, ended)
            return []

        await self._ledger.edit(block_id, end, utc_now(self._clock))
        if ended:
            self._blocks.forget_free()  # free again: the next lease searches for it
        return len(ended)


def _recordable(block: Block, slot: int, outcome: Outcome, serial: str, given: str | None) -> bool:
    """Whether ``serial``'s outcome for the block's ``slot`` is recorded (``given``: the lease id
    this master gave ``serial`` for that recipient and still remembers, if any).

    A slot leased to ``serial`` under the lease the outcome names (or none named): yes. One leased
    to another satellite: no, it is theirs now. One leased to ``serial`` under another of its
    leases and still pending: yes (an outcome kept across a reconnect; that lease lets go of it).
    One leased to nobody and still pending: only the outcome of the lease this master gave it
    (freed after the reconnect grace, the satellite back with its outbox), once: recording it
    forgets that lease, so a repeat (its acknowledgement lost) records nothing new, and no
    satellite records what it was never given by naming some lease."""
    lease = block.lease
    cols = block.columns
    if cols.leased[slot]:
        if lease is None or lease.owner != serial:
            return False
        if outcome.lease in (None, lease.id):
            return True
        return cols.status_of(slot) in PENDING_STATUSES
    return given is not None and outcome.lease == given and cols.status_of(slot) in PENDING_STATUSES


def _end_lease(block: Block, slots: Sequence[int] | None = None) -> None:
    """Take ``slots`` (all by default) out of the block's lease; the lease ends with its last."""
    for slot in block.leased_slots() if slots is None else slots:
        block.columns.leased[slot] = 0
    if not block.leased_slots():
        block.lease = None


def _leased_recipient(block: Block, entry: Mapping[str, Any], lease_id: str) -> dict[str, Any]:
    return {"id": entry["id"], "mailing_id": block.mailing_id, "email": entry["email"], "domain": entry["domain"],
            "contact": entry.get("contact") or {}, "test": block.test, "lease": lease_id,
            "attachments": [{"filename": a["filename"], "content_type": a["content_type"],
                             "content": base64.b64encode(a["content"]).decode("ascii")}
                            for a in entry.get("attachments") or []]}


def _attachments_size(recipient: Mapping[str, Any]) -> int:
    return sum(len(a["content"]) for a in recipient.get("attachments") or [])


def _customized_content(outcome: Outcome) -> bytes | None:
    """The message as sent, when the mailing keeps them (backup_customized_emails; checked base64)."""
    if outcome.customized_content is None:
        return None
    return base64.b64decode(outcome.customized_content)


def _groups(satellite: Mapping[str, Any]) -> list[str]:
    """A satellite serves mailings of its group; mailings without a group go to any satellite."""
    group = satellite.get("group") or ""
    return ["", group] if group else [""]
