"""What happened to one delivery attempt, and how the master should treat it.

A :class:`DeliveryOutcome` is the satellite's verdict for one recipient after one try. The
classification rules live here, in pure functions, so that the wire code (``smtp_client``) and
the policy code (``delivery``) share them:

* 2xx → ``FINISHED``;
* 4xx, timeouts, refused or dropped connections, temporary DNS failures → ``WARNING``
  (retryable: the master alone decides when, see ``services/dispatcher.retry_delay``);
* 5xx, permanent DNS failures (NXDOMAIN, null MX), unusable addresses → ``ERROR``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from cloudmailing.common.statuses import ERROR, FINISHED, WARNING  # noqa: F401 - the outcomes' statuses

SMTP_LOG_MAX_LINES = 20
SMTP_LOG_MAX_LINE_CHARS = 500

# RFC 3463: class "." subject "." detail, at the start of the reply text.
_ENHANCED_CODE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


@dataclass
class DeliveryOutcome:
    """The result of one delivery try for one recipient."""

    recipient_id: str
    status: str  # FINISHED, WARNING or ERROR
    reply_code: int | None
    reply_enhanced_code: str
    reply_text: str
    smtp_log: list[str] = field(default_factory=list)
    mx_host: str = ""
    retryable: bool = False
    # The verdict was the server's reply to RCPT TO: about this recipient (greylisting, a full
    # mailbox), not about the host, so the host's back-off does not count it.
    recipient_level: bool = False


def status_for_code(code: int) -> str:
    """The recipient status implied by an SMTP reply code (anything unexpected is temporary)."""
    if 200 <= code < 300:
        return FINISHED
    if 500 <= code < 600:
        return ERROR
    return WARNING


def parse_enhanced_code(code: int, text: str) -> str:
    """The RFC 3463 enhanced status code leading ``text``, or '' when absent or inconsistent.

    RFC 3463 requires the class digit to match the first digit of the reply code; a mismatch
    means the text merely looks like a code, so it is ignored.
    """
    match = _ENHANCED_CODE.match(text)
    if match is None or match.group(1) != str(code)[0]:
        return ""
    return match.group(0)


def bounded_log(lines: Iterable[str]) -> list[str]:
    """The last :data:`SMTP_LOG_MAX_LINES` lines, each cut to :data:`SMTP_LOG_MAX_LINE_CHARS`."""
    tail = deque(lines, maxlen=SMTP_LOG_MAX_LINES)
    return [line[:SMTP_LOG_MAX_LINE_CHARS] for line in tail]


def outcome_from_reply(
    recipient_id: str, code: int, text: str, smtp_log: Iterable[str], mx_host: str,
    recipient_level: bool = False,
) -> DeliveryOutcome:
    """Classify the decisive SMTP reply of a transaction (``recipient_level``: it answered RCPT TO)."""
    status = status_for_code(code)
    return DeliveryOutcome(
        recipient_id=recipient_id,
        status=status,
        reply_code=code,
        reply_enhanced_code=parse_enhanced_code(code, text),
        reply_text=text[:SMTP_LOG_MAX_LINE_CHARS],
        smtp_log=bounded_log(smtp_log),
        mx_host=mx_host,
        retryable=status == WARNING,
        recipient_level=recipient_level,
    )


def temporary_failure(
    recipient_id: str,
    reason: str,
    smtp_log: Iterable[str] = (),
    mx_host: str = "",
    reply_code: int | None = None,
) -> DeliveryOutcome:
    """A WARNING without a decisive reply: timeout, refused or lost connection, DNS trouble."""
    return _failure(WARNING, recipient_id, reason, smtp_log, mx_host, reply_code)


def permanent_failure(
    recipient_id: str, reason: str, smtp_log: Iterable[str] = (), mx_host: str = ""
) -> DeliveryOutcome:
    """An ERROR without a decisive reply: permanent DNS failure, unusable address."""
    return _failure(ERROR, recipient_id, reason, smtp_log, mx_host, None)


def _failure(
    status: str, recipient_id: str, reason: str, smtp_log: Iterable[str], mx_host: str, reply_code: int | None
) -> DeliveryOutcome:
    return DeliveryOutcome(
        recipient_id=recipient_id,
        status=status,
        reply_code=reply_code,
        reply_enhanced_code="",
        reply_text=reason[:SMTP_LOG_MAX_LINE_CHARS],
        smtp_log=bounded_log(smtp_log),
        mx_host=mx_host,
        retryable=status == WARNING,
    )
