"""The outbox: outcomes on disk until acknowledged, reported in frames of bounded size."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloudmailing.common.link_protocol import Outcome
from cloudmailing.satellite import outbox as outbox_module
from cloudmailing.satellite.outbox import Outbox


def _outcome(recipient_id: str, content: str | None = None) -> Outcome:
    return Outcome(recipient_id, "FINISHED", 250, "2.0.0", "ok", customized_content=content)


def test_batches_are_bounded_by_count_and_by_kept_message_bytes(tmp_path):
    outbox = Outbox(tmp_path / "outbox.jsonl")
    for i in range(5):
        outbox.add(_outcome(f"r{i}"))
    assert [o.recipient_id for o in outbox.batch(3)] == ["r0", "r1", "r2"]
    outbox.acknowledge(["r0", "r1", "r2", "r3", "r4"])
    for i in range(4):
        outbox.add(_outcome(f"big{i}", "eHh4" * 10_000))
    assert len(outbox.batch(500, max_bytes=100_000)) == 2
    assert len(outbox.batch(500, max_bytes=10_000)) == 1  # one always goes, whatever its size


def test_what_was_not_acknowledged_comes_back_after_a_restart(tmp_path):
    outbox = Outbox(tmp_path / "outbox.jsonl")
    for i in range(3):
        outbox.add(_outcome(f"r{i}"))
    outbox.sync()
    outbox.acknowledge(["r1"])
    outbox.close()
    again = Outbox(tmp_path / "outbox.jsonl")
    assert [o.recipient_id for o in again.batch(10)] == ["r0", "r2"]
    again.close()


def test_outcomes_added_survive_a_kill_before_any_sync(tmp_path):
    # A satellite killed (kill -9) between a delivery and its report must not deliver it again.
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from cloudmailing.common.link_protocol import Outcome\n"
        "from cloudmailing.satellite.outbox import Outbox\n"
        "outbox = Outbox(__import__('pathlib').Path(sys.argv[1]))\n"
        "for i in range(3):\n"
        "    outbox.add(Outcome(f'r{i}', 'FINISHED', 250, '2.0.0', 'ok'))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"), str(tmp_path / "outbox.jsonl")],
        cwd=Path(__file__).parents[2], check=False)
    assert killed.returncode == -signal.SIGKILL
    again = Outbox(tmp_path / "outbox.jsonl")
    assert [o.recipient_id for o in again.batch(10)] == ["r0", "r1", "r2"]
    again.close()


def test_malformed_outcomes_read_back_are_dropped_with_one_log_line(tmp_path, caplog):
    path = tmp_path / "outbox.jsonl"
    lines = [{"outcome": {"recipient_id": "r1", "status": "SENT?"}}, {"outcome": {"recipient_id": 7}},
             {"outcome": _outcome("r2").to_wire()}, [1, 2], {"outcome": "x"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"outcome": {"recip')
    caplog.set_level(logging.INFO)
    outbox = Outbox(path)
    assert [o.recipient_id for o in outbox.batch(10)] == ["r2"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "3 malformed outcomes in the outbox dropped"]
    outbox.close()


def test_an_outcome_added_after_a_line_cut_by_a_crash_survives_the_next_crash(tmp_path):
    """kill -9 can leave part of a line at the end of the file: the next outcome starts a line of
    its own, so that a second crash before the master's answer still replays it."""
    path = tmp_path / "outbox.jsonl"
    path.write_text(json.dumps({"outcome": _outcome("r1").to_wire()}) + "\n"
                    + json.dumps({"outcome": _outcome("r2").to_wire()})[:37])
    outbox = Outbox(path)
    outbox.add(_outcome("r3"))
    outbox.sync()
    outbox.close()
    again = Outbox(path)
    assert [o.recipient_id for o in again.batch(10)] == ["r1", "r3"]
    again.close()


@pytest.mark.parametrize("acknowledged", [5, "r1", None, {"r1": 1}])
def test_an_ack_line_of_the_wrong_shape_is_skipped(tmp_path, acknowledged):
    path = tmp_path / "outbox.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [
        {"outcome": _outcome("r1").to_wire()}, {"ack": acknowledged}, {"outcome": _outcome("r2").to_wire()}]))
    outbox = Outbox(path)
    assert [o.recipient_id for o in outbox.batch(10)] == ["r1", "r2"]
    outbox.close()


def _kept(recipient_id: str) -> Outcome:
    return _outcome(recipient_id, "eHh4" * 500)  # a kept message of 2 KB


def _busy_rounds(outbox: Outbox, rounds: int, first: int = 0) -> tuple[int, list[int], set[str]]:
    """Sustained delivery: outcomes keep arriving while each report is in flight, so something is
    always pending when the master's acknowledgement comes. Returns the next id, the file's size
    after each round, and the ids acknowledged."""
    n, sizes, acknowledged = first, [], set()
    for _ in range(rounds):
        for _ in range(50):
            outbox.add(_kept(f"r{n}"))
            n += 1
        batch = [o.recipient_id for o in outbox.batch(1000)]
        for _ in range(10):  # delivered while the report was in flight
            outbox.add(_kept(f"r{n}"))
            n += 1
        outbox.sync()
        outbox.acknowledge(batch)
        acknowledged.update(batch)
        sizes.append(outbox._path.stat().st_size)
    return n, sizes, acknowledged


def test_under_sustained_load_the_file_is_compacted_to_what_is_pending(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_module, "COMPACT_BYTES", 1_000_000, raising=False)
    path = tmp_path / "outbox.jsonl"
    outbox = Outbox(path)
    n, sizes, acknowledged = _busy_rounds(outbox, 100)  # 12 MB written, never empty at an answer
    assert len(outbox) == 10 and max(sizes) < 1_300_000  # not the 12 MB of every outcome ever added
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pending = {o.recipient_id: o for o in outbox.batch(1000)}
    outbox.close()
    assert os.listdir(tmp_path) == ["outbox.jsonl"]
    again = Outbox(path)  # what a restart replays: exactly what was pending, whole
    assert {o.recipient_id: o for o in again.batch(1000)} == pending
    assert set(pending) == {f"r{i}" for i in range(n)} - acknowledged
    again.close()


class _Crash(BaseException):
    """The process dying at this point (nothing below catches it)."""


@pytest.mark.parametrize("renamed", [False, True], ids=["before-the-rename", "after-the-rename"])
def test_a_crash_while_the_file_is_rewritten_loses_no_pending_outcome(tmp_path, monkeypatch, renamed):
    monkeypatch.setattr(outbox_module, "COMPACT_BYTES", 1_000_000, raising=False)
    real_replace = os.replace

    def crash(source, destination):
        assert os.path.getsize(source) > 0  # the temporary file was written whole
        if renamed:
            real_replace(source, destination)
        raise _Crash()

    path = tmp_path / "outbox.jsonl"
    outbox = Outbox(path)
    added: set[str] = set()
    acknowledged: set[str] = set()
    monkeypatch.setattr(outbox_module.os, "replace", crash)
    with pytest.raises(_Crash):
        for round_ in range(100):
            batch = []
            for i in range(60):
                outbox.add(_kept(f"r{round_}-{i}"))
                added.add(f"r{round_}-{i}")
                if i < 50:
                    batch.append(f"r{round_}-{i}")
            outbox.sync()
            outbox.acknowledge(batch)  # the acknowledgement that crashes is in both files
            acknowledged.update(batch)
    monkeypatch.setattr(outbox_module.os, "replace", real_replace)
    # The crashed outbox is abandoned as it is (the process is gone): a new one reads the file.
    again = Outbox(path)
    assert {o.recipient_id for o in again.batch(10_000)} == added - acknowledged - set(batch)
    assert len(again) == 10 * (round_ + 1)
    assert os.listdir(tmp_path) == ["outbox.jsonl"]  # an interrupted rewrite's temporary removed
    assert all(o.customized_content == "eHh4" * 500 for o in again.batch(10_000))
    again.close()


def test_a_rewrite_refused_by_a_full_disk_leaves_the_file_in_use(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(outbox_module, "COMPACT_BYTES", 1_000_000, raising=False)

    def full(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outbox_module.os, "replace", full)
    path = tmp_path / "outbox.jsonl"
    outbox = Outbox(path)
    n, _, acknowledged = _busy_rounds(outbox, 30)  # no exception: appending goes on
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING][:1] == [
        "the outbox could not be rewritten ([Errno 28] No space left on device): tried again once it doubled"]
    outbox.close()
    assert os.listdir(tmp_path) == ["outbox.jsonl"]
    again = Outbox(path)
    assert {o.recipient_id for o in again.batch(10_000)} == {f"r{i}" for i in range(n)} - acknowledged
    again.close()
