"""The one definition of recipient and mailing statuses, shared by master and satellite."""

from __future__ import annotations

# Recipient statuses, as the API shows them.
READY = "READY"
IN_PROGRESS = "IN PROGRESS"  # shown for a READY or WARNING recipient leased to a satellite
WARNING = "WARNING"  # soft bounce: the master retries it later
FINISHED = "FINISHED"
ERROR = "ERROR"  # hard bounce
GENERAL_ERROR = "GENERAL_ERROR"  # the message could not be built or sent at all
TIMEOUT = "TIMEOUT"  # retried too long, or the mailing ended first

RECIPIENT_STATUSES = (READY, IN_PROGRESS, FINISHED, WARNING, ERROR, GENERAL_ERROR, TIMEOUT)
STORED_STATUSES = (READY, WARNING, FINISHED, ERROR, GENERAL_ERROR, TIMEOUT)  # IN PROGRESS is a lease
PENDING_STATUSES = (READY, WARNING)
ERROR_STATUSES = (ERROR, GENERAL_ERROR, TIMEOUT)
REPORTED_STATUSES = (FINISHED, WARNING, ERROR, GENERAL_ERROR)  # what a satellite may report

# Mailing statuses.
FILLING = "FILLING_RECIPIENTS"
MAILING_READY = "READY"
RUNNING = "RUNNING"
PAUSED = "PAUSED"
MAILING_FINISHED = "FINISHED"
