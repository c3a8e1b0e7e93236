"""Every store of the master, built in one place from an open database."""

from __future__ import annotations

from dataclasses import dataclass

from cloudmailing.storage.api_keys import ApiKeyStore
from cloudmailing.storage.blocks import MAX_RECIPIENTS, BlockStore
from cloudmailing.storage.database import Database
from cloudmailing.storage.ingest import DELETING, RecipientWriter
from cloudmailing.storage.kept_messages import KeptMessages
from cloudmailing.storage.ledger import Ledger
from cloudmailing.storage.mailings import MailingStore
from cloudmailing.storage.recipient_index import RecipientIndex
from cloudmailing.storage.recipients import RecipientLookup
from cloudmailing.storage.satellites import SatelliteStore
from cloudmailing.storage.statistics import HourlyStatsStore
from cloudmailing.storage.status_log import SequenceAllocator, StatusLog


@dataclass
class Stores:
    database: Database
    mailings: MailingStore
    blocks: BlockStore
    index: RecipientIndex
    status_log: StatusLog
    kept: KeptMessages
    ledger: Ledger
    writer: RecipientWriter
    lookup: RecipientLookup
    stats: HourlyStatsStore
    satellites: SatelliteStore
    api_keys: ApiKeyStore

    async def delete_mailing(self, mailing_id: int) -> None:
        """The mailing with its recipients, their log and kept messages. Recipients first, the
        mailing last: an interrupted delete can be done again. Each block goes under the locks
        its writers take (a lease or report under way would write its summary back after the
        delete, pointing at nothing)."""
        async with self.database.locks.hold(("ingest", mailing_id, False)), \
                self.database.locks.hold(("ingest", mailing_id, True)):
            # Marked under the locks every batch of recipients takes, and checks the mark under:
            # a batch waiting for them stores nothing (MailingGone), now or during the rest of the
            # delete, which need not hold them.
            await self.mailings.update(mailing_id, {DELETING: True})
            block_ids = [summary["_id"] async for summary in self.blocks.of_mailing(mailing_id)]
            for block_id in block_ids:
                async with self.blocks.lock(block_id), self.mailings.counts_lock(mailing_id):
                    await self.blocks.delete(block_id)
        await self.index.delete_mailing(mailing_id)
        await self.status_log.delete_mailing(mailing_id)
        await self.kept.delete_mailing(mailing_id)
        await self.mailings.delete(mailing_id)


async def open_stores(database: Database, block_recipients: int = MAX_RECIPIENTS,
                      writer_key: str | None = None) -> Stores:
    """The stores of ``database``; the change numbers continue after any earlier process's.
    ``block_recipients``: the most recipients a new block holds (tests use small blocks);
    ``writer_key``: a master's, which shares the database (None: the only writer)."""
    allocator = SequenceAllocator(database, writer_key)
    await allocator.start()
    mailings, blocks, index = MailingStore(database), BlockStore(database), RecipientIndex(database)
    status_log, kept = StatusLog(database, allocator), KeptMessages(database)
    return Stores(database=database, mailings=mailings, blocks=blocks, index=index, status_log=status_log,
                  kept=kept, ledger=Ledger(blocks, status_log, mailings, kept),
                  writer=RecipientWriter(database, blocks, index, mailings, block_recipients),
                  lookup=RecipientLookup(blocks, index),
                  stats=HourlyStatsStore(database), satellites=SatelliteStore(database),
                  api_keys=ApiKeyStore(database))
