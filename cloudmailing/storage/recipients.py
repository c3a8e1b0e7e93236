"""Finding recipients by id: their block, slot and current state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from cloudmailing.storage.blocks import Block, BlockStore
from cloudmailing.storage.recipient_index import RecipientIndex


@dataclass
class FoundRecipient:
    id: str
    email: str
    block: Block
    slot: int


class RecipientLookup:
    def __init__(self, blocks: BlockStore, index: RecipientIndex) -> None:
        self._blocks = blocks
        self._index = index

    async def find(self, recipient_ids: Sequence[str]) -> dict[str, FoundRecipient]:
        """The recipients of ``recipient_ids`` that exist (block states read once per block)."""
        places = await self._index.locate(recipient_ids)
        by_block: dict[int, list[tuple[str, int]]] = {}
        for rid, place in places.items():
            by_block.setdefault(place.block_id, []).append((rid, place.slot))
        found: dict[str, FoundRecipient] = {}
        for block_id, wanted in by_block.items():
            block = await self._blocks.load(block_id)
            if block is None:
                continue
            addresses = await self._blocks.addresses(block_id, min(max(slot for _, slot in wanted) + 1,
                                                                   len(block.columns)))
            for rid, slot in wanted:
                # A generated id names its slot: it counts only if that slot holds this very id.
                if slot < len(block.columns) and slot < len(addresses) and addresses[slot][0] == rid \
                        and block.columns.status_of(slot):
                    found[rid] = FoundRecipient(rid, addresses[slot][1], block, slot)
        return found

    async def contacts(self, places: Sequence[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
        """The personalization data of each (block, slot)."""
        found: dict[tuple[int, int], dict[str, Any]] = {}
        for block_id in dict.fromkeys(block for block, _ in places):
            content = await self._blocks.content(block_id)
            for block, slot in places:
                if block == block_id and slot < len(content):
                    found[(block, slot)] = content[slot].get("contact") or {}
        return found
