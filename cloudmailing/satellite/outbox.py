"""Outcomes not yet acknowledged by the master, kept on disk until they are.

An append-only JSON-lines file: ``{"outcome": {...}}`` when a delivery ends, ``{"ack": [ids]}``
when the master acknowledged them. On start the file is replayed, so a satellite that died
reports what it had delivered; the file is truncated whenever nothing is pending. An outcome
read back is checked as the master will check it (``link_protocol.Outcome``): one that is not of
its shape is dropped with a log line rather than refused by the master at every report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Collection, Iterable

from cloudmailing.common.link_protocol import FrameError, Outcome
from cloudmailing.common.private_files import make_private_dir, open_private

log = logging.getLogger(__name__)

REPORT_BYTES = 16 * 1024 * 1024  # a report's size, well within the link's frame limit


class Outbox:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._pending: dict[str, Outcome] = {}
        self._replay()
        make_private_dir(path.parent)
        # Lives as long as the outbox; mode 0600 from creation: outcomes may hold messages kept.
        self._file = os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")

    def _replay(self) -> None:
        if not self._path.exists():
            return
        dropped = 0
        with open(self._path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if not isinstance(entry, dict):
                    continue
                if "outcome" in entry:
                    try:
                        outcome = Outcome.from_wire(entry["outcome"])
                    except FrameError:
                        dropped += 1
                        continue
                    self._pending[outcome.recipient_id] = outcome
                for recipient_id in entry.get("ack") or []:
                    self._pending.pop(str(recipient_id), None)
        if dropped:
            log.warning("%d malformed outcomes in the outbox dropped", dropped)
        if self._pending:
            log.info("%d outcomes from an earlier run still to report", len(self._pending))

    def add(self, outcome: Outcome) -> None:
        self._pending[outcome.recipient_id] = outcome
        self._file.write(json.dumps({"outcome": outcome.to_wire()}) + "\n")

    def sync(self) -> None:
        """Make what was added durable (called before reporting it)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def batch(self, limit: int, max_bytes: int = REPORT_BYTES, skip: Collection[str] = ()) -> list[Outcome]:
        """Up to ``limit`` outcomes to report, fewer when their kept messages pass ``max_bytes``
        (each report is one link frame; at least one outcome is always in the batch); none of the
        recipients in ``skip`` (those of reports in flight)."""
        batch: list[Outcome] = []
        size = 0
        for outcome in self._pending.values():
            if outcome.recipient_id in skip:
                continue
            size += 1024 + len(outcome.customized_content or "")
            if len(batch) == limit or (batch and size > max_bytes):
                break
            batch.append(outcome)
        return batch

    def acknowledge(self, recipient_ids: Iterable[str]) -> None:
        ids = [rid for rid in recipient_ids if self._pending.pop(rid, None) is not None]
        if not self._pending:
            self._file.truncate(0)
            self._file.seek(0)
        elif ids:
            self._file.write(json.dumps({"ack": ids}) + "\n")

    def leases(self) -> set[str]:
        """The leases the outcomes still to report came with."""
        return {outcome.lease for outcome in self._pending.values() if outcome.lease}

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._file.flush()
        self._file.close()
