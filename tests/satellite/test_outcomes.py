"""Classification of SMTP replies into outcomes, and the retry schedule."""

from __future__ import annotations

from cloudmailing.satellite import outcomes


def test_status_for_code() -> None:
    assert outcomes.status_for_code(250) == outcomes.FINISHED
    assert outcomes.status_for_code(451) == outcomes.WARNING
    assert outcomes.status_for_code(421) == outcomes.WARNING
    assert outcomes.status_for_code(550) == outcomes.ERROR
    assert outcomes.status_for_code(354) == outcomes.WARNING  # unexpected: not final, retry


def test_enhanced_code_parsed_when_consistent() -> None:
    assert outcomes.parse_enhanced_code(550, "5.1.1 no such user") == "5.1.1"
    assert outcomes.parse_enhanced_code(451, "4.7.1 greylisted") == "4.7.1"
    assert outcomes.parse_enhanced_code(250, "2.0.0 Ok: queued as 12") == "2.0.0"
    assert outcomes.parse_enhanced_code(550, "4.1.1 class mismatch") == ""
    assert outcomes.parse_enhanced_code(550, "no such user") == ""
    assert outcomes.parse_enhanced_code(550, "5.1.1.2 not a code") == ""


def test_outcome_from_reply() -> None:
    outcome = outcomes.outcome_from_reply("r1", 452, "4.2.2 mailbox full", ["a", "b"], "mx1")
    assert (outcome.status, outcome.reply_code, outcome.reply_enhanced_code) == ("WARNING", 452, "4.2.2")
    assert outcome.retryable and outcome.smtp_log == ["a", "b"] and outcome.mx_host == "mx1"
    assert not outcomes.outcome_from_reply("r1", 554, "5.7.1 spam", [], "").retryable
    assert not outcomes.outcome_from_reply("r1", 250, "ok", [], "").retryable


def test_smtp_log_is_bounded() -> None:
    lines = [f"line {i} " + "x" * 1000 for i in range(50)]
    log = outcomes.bounded_log(lines)
    assert len(log) == outcomes.SMTP_LOG_MAX_LINES
    assert log[-1].startswith("line 49") and log[0].startswith("line 30")
    assert all(len(line) == outcomes.SMTP_LOG_MAX_LINE_CHARS for line in log)


def test_failures_without_reply() -> None:
    soft = outcomes.temporary_failure("r", "connection refused", mx_host="mx")
    hard = outcomes.permanent_failure("r", "NXDOMAIN")
    assert (soft.status, soft.retryable, soft.reply_code) == ("WARNING", True, None)
    assert (hard.status, hard.retryable, hard.reply_text) == ("ERROR", False, "NXDOMAIN")
