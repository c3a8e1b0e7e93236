"""Outcomes not yet acknowledged by the master, kept on disk until they are.

An append-only JSON-lines file: ``{"outcome": {...}}`` when a delivery ends, ``{"ack": [ids]}``
when the master acknowledged them. On start the file is replayed, so a satellite that died
reports what it had delivered; the file is truncated whenever nothing is pending. Under
sustained load something is always pending, so once the file has grown past ``COMPACT_BYTES``
and to ``COMPACT_RATIO`` times what is still pending it is rewritten with only the pending
outcomes: a temporary file beside it, fsync-ed, renamed over it (``os.replace``), the directory
fsync-ed; a crash at any point leaves the old file or the new one whole. An outcome
read back is checked as the master will check it (``link_protocol.Outcome``): one that is not of
its shape is dropped with a log line rather than refused by the master at every report.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Collection, Iterable, TextIO

from cloudmailing.common.link_protocol import FrameError, Outcome
from cloudmailing.common.private_files import make_private_dir, open_private

log = logging.getLogger(__name__)

REPORT_BYTES = 16 * 1024 * 1024  # a report's size, well within the link's frame limit
COMPACT_BYTES = 16 * 1024 * 1024  # the file is not rewritten while smaller than this ...
COMPACT_RATIO = 4                 # ... nor while under this many times what is still pending


class Outbox:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._temporary = path.with_name(f".{path.name}.compact")
        self._pending: dict[str, Outcome] = {}
        self._line_bytes: dict[str, int] = {}  # recipient id → its pending outcome's line length
        self._pending_bytes = 0  # the sum of _line_bytes: what a rewritten file would hold
        self._file_bytes = 0     # written to the file (ack lines included), about
        self._retry_at = 0       # after a rewrite failed (disk full), none before the file is this big
        self._replay()
        make_private_dir(path.parent)
        # Lives as long as the outbox; mode 0600 from creation: outcomes may hold messages kept.
        self._file = self._open()
        self._end_cut_line()
        if self._temporary.exists():  # a rewrite a crash interrupted: the file itself is whole
            self._temporary.unlink()
        self._compact_if_worth_it()

    def _open(self) -> TextIO:
        return os.fdopen(open_private(self._path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")

    def _end_cut_line(self) -> None:
        """A crash can leave the file ending in part of a line: what is added next must start a
        line of its own, or it would be glued to that fragment and lost at the next replay."""
        with open(self._path, "rb") as existing:
            if existing.seek(0, os.SEEK_END) == 0:
                return
            existing.seek(-1, os.SEEK_END)
            if existing.read(1) == b"\n":
                return
        self._file.write("\n")
        self._file_bytes += 1

    def _replay(self) -> None:
        if not self._path.exists():
            return
        self._file_bytes = self._path.stat().st_size
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
                    self._hold(outcome, len(line))
                acknowledged = entry.get("ack")
                for recipient_id in acknowledged if isinstance(acknowledged, list) else []:
                    self._release(str(recipient_id))
        if dropped:
            log.warning("%d malformed outcomes in the outbox dropped", dropped)
        if self._pending:
            log.info("%d outcomes from an earlier run still to report", len(self._pending))

    def _hold(self, outcome: Outcome, line_bytes: int) -> None:
        self._release(outcome.recipient_id)
        self._pending[outcome.recipient_id] = outcome
        self._line_bytes[outcome.recipient_id] = line_bytes
        self._pending_bytes += line_bytes

    def _release(self, recipient_id: str) -> bool:
        if self._pending.pop(recipient_id, None) is None:
            return False
        self._pending_bytes -= self._line_bytes.pop(recipient_id)
        return True

    def add(self, outcome: Outcome) -> None:
        """Keep ``outcome`` until the master acknowledges it: in the file at once (a process killed
        now loses nothing: the kernel holds the write), durable on disk at the next :meth:`sync`."""
        line = _outcome_line(outcome)
        self._hold(outcome, len(line))
        self._file.write(line)
        self._file.flush()
        self._file_bytes += len(line)

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
        ids = [rid for rid in recipient_ids if self._release(rid)]
        if not self._pending:
            self._file.truncate(0)
            self._file.seek(0)
            self._file_bytes = self._retry_at = 0
        elif ids:
            line = json.dumps({"ack": ids}) + "\n"
            self._file.write(line)
            self._file_bytes += len(line)
            self._compact_if_worth_it()

    def _compact_if_worth_it(self) -> None:
        """Rewrite the file with only the pending outcomes once it has grown past COMPACT_BYTES
        and COMPACT_RATIO times them: a rewrite costs what is pending, and comes only after the
        file has grown by (COMPACT_RATIO - 1) times that since the last one."""
        if self._file_bytes < max(COMPACT_BYTES, COMPACT_RATIO * self._pending_bytes, self._retry_at):
            return
        try:
            self._file.flush()
            self._write_temporary()
            # A crash before this leaves the old file whole (and the temporary, removed at start).
            os.replace(self._temporary, self._path)
        except OSError as error:  # disk full: the file is still whole, appending to it goes on
            log.warning("the outbox could not be rewritten (%s): tried again once it doubled", error)
            self._temporary.unlink(missing_ok=True)
            self._retry_at = 2 * self._file_bytes
            return
        try:  # the rename made durable before anything is appended to the new file
            directory = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as error:
            log.warning("the outbox's directory could not be synced: %s", error)
        self._file.close()  # the old file, now unlinked
        self._file = self._open()
        self._file_bytes, self._retry_at = self._pending_bytes, 0

    def _write_temporary(self) -> None:
        """The pending outcomes, whole on disk, in the temporary file beside the outbox."""
        with os.fdopen(open_private(self._temporary, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as new:
            for outcome in self._pending.values():
                new.write(_outcome_line(outcome))
            new.flush()
            os.fsync(new.fileno())

    def leases(self) -> set[str]:
        """The leases the outcomes still to report came with."""
        return {outcome.lease for outcome in self._pending.values() if outcome.lease}

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self._file.flush()
        self._file.close()


def _outcome_line(outcome: Outcome) -> str:
    return json.dumps({"outcome": outcome.to_wire()}) + "\n"
