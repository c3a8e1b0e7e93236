"""The outbox: outcomes on disk until acknowledged, reported in frames of bounded size."""

from __future__ import annotations

from cloudmailing.satellite.outbox import Outbox


def _outcome(recipient_id: str, content: str = "") -> dict:
    outcome = {"recipient_id": recipient_id, "status": "FINISHED", "reply_code": 250}
    if content:
        outcome["customized_content"] = content
    return outcome


def test_batches_are_bounded_by_count_and_by_kept_message_bytes(tmp_path):
    outbox = Outbox(tmp_path / "outbox.jsonl")
    for i in range(5):
        outbox.add(_outcome(f"r{i}"))
    assert [o["recipient_id"] for o in outbox.batch(3)] == ["r0", "r1", "r2"]
    outbox.acknowledge(["r0", "r1", "r2", "r3", "r4"])
    for i in range(4):
        outbox.add(_outcome(f"big{i}", "x" * 40_000))
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
    assert [o["recipient_id"] for o in again.batch(10)] == ["r0", "r2"]
    again.close()
