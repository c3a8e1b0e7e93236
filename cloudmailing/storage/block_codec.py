"""How a block of recipients is packed into documents.

A block's *content* (each recipient's id, address, personalization data and attachments) is one
zlib-compressed BSON blob, written at ingest and read whole when the block is leased. Its
*state* (status, lease flag, tries, times, and where its last change is logged) is a set of
fixed-width columns, also one compressed blob. Blobs keep the database's work per block to one
value: FerretDB v1 re-encodes every field of a document on each read and write, and a blob of a
thousand recipients costs it about what one recipient document would.
"""

from __future__ import annotations

import datetime
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable

import bson

from cloudmailing.common.statuses import STORED_STATUSES

STATUS_CODES = {status: code for code, status in enumerate(STORED_STATUSES)}
VOID = 255  # a slot whose recipient was refused after placing it (a duplicate id): never used
_EPOCH = datetime.datetime(1970, 1, 1)
# Column name -> array typecode, in blob order.
_COLUMNS = (("status", "B"), ("leased", "B"), ("tries", "H"), ("first_try", "q"), ("next_try", "q"),
            ("modified", "q"), ("last_seq", "q"), ("last_page", "q"))


def encode_content(recipients: list[dict[str, Any]]) -> bytes:
    return zlib.compress(bson.encode({"r": recipients}), 1)


def decode_content(blob: bytes) -> list[dict[str, Any]]:
    recipients: list[dict[str, Any]] = bson.decode(zlib.decompress(blob))["r"]
    return recipients


def to_millis(moment: datetime.datetime | None) -> int:
    """A naive UTC datetime as milliseconds since 1970 (0 for None)."""
    if moment is None:
        return 0
    return (moment - _EPOCH) // datetime.timedelta(milliseconds=1)


def from_millis(millis: int) -> datetime.datetime | None:
    return _EPOCH + datetime.timedelta(milliseconds=millis) if millis else None


@dataclass
class StateColumns:
    """The per-recipient delivery state of one block, one array per field, indexed by slot."""

    status: array = field(default_factory=lambda: array("B"))
    leased: array = field(default_factory=lambda: array("B"))
    tries: array = field(default_factory=lambda: array("H"))
    first_try: array = field(default_factory=lambda: array("q"))
    next_try: array = field(default_factory=lambda: array("q"))
    modified: array = field(default_factory=lambda: array("q"))
    last_seq: array = field(default_factory=lambda: array("q"))  # 0: never changed since added
    last_page: array = field(default_factory=lambda: array("q"))  # the log page of that change

    def __len__(self) -> int:
        return len(self.status)

    def extend_ready(self, count: int, now: datetime.datetime) -> None:
        """Add ``count`` READY recipients, added at ``now``."""
        for name, typecode in _COLUMNS:
            getattr(self, name).extend(array(typecode, [0]) * count)
        added = to_millis(now)
        for slot in range(len(self) - count, len(self)):
            self.modified[slot] = added

    def truncate(self, count: int) -> None:
        for name, _ in _COLUMNS:
            del getattr(self, name)[count:]

    def status_of(self, slot: int) -> str:
        """The slot's stored status ('' for a void slot)."""
        code = self.status[slot]
        return STORED_STATUSES[code] if code != VOID else ""

    def set_status(self, slot: int, status: str) -> None:
        self.status[slot] = STATUS_CODES[status]

    def counts(self) -> dict[str, int]:
        """Recipients per stored status (counted in C: this runs on every write)."""
        codes = self.status.tobytes()
        found = {status: codes.count(code) for code, status in enumerate(STORED_STATUSES)}
        return {status: count for status, count in found.items() if count}

    def slots_with(self, statuses: Iterable[str]) -> list[int]:
        codes = {STATUS_CODES[status] for status in statuses}
        return [slot for slot, code in enumerate(self.status) if code in codes]


def encode_state(columns: StateColumns) -> bytes:
    return zlib.compress(b"".join(getattr(columns, name).tobytes() for name, _ in _COLUMNS), 1)


def decode_state(blob: bytes, count: int) -> StateColumns:
    raw, offset = zlib.decompress(blob), 0
    columns: dict[str, array] = {}
    for name, typecode in _COLUMNS:
        column = array(typecode)
        size = column.itemsize * count
        column.frombytes(raw[offset:offset + size])
        columns[name] = column
        offset += size
    return StateColumns(**columns)
