"""The outbox: outcomes on disk until acknowledged, reported in frames of bounded size."""

from __future__ import annotations

import json
import logging

from cloudmailing.common.link_protocol import Outcome
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
