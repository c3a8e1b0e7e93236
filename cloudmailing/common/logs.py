"""Logging set-up: one line per event, with the mailing, recipient and satellite when known."""

from __future__ import annotations

import logging
import sys
from typing import Any

from twisted.logger import STDLibLogObserver, globalLogBeginner

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"


class _ContextFilter(logging.Filter):
    """Appends ``mailing=… recipient=… satellite=…`` from a record's ``extra`` fields."""

    KEYS = ("mailing", "recipient", "satellite", "client")

    def filter(self, record: logging.LogRecord) -> bool:
        parts = [f"{k}={getattr(record, k)}" for k in self.KEYS if getattr(record, k, None) is not None]
        record.context = (" [" + " ".join(parts) + "]") if parts else ""
        return True


def setup_logging(level: str = "INFO", file: str = "") -> None:
    """Send stdlib and Twisted logs to one handler (stderr or ``file``)."""
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    observer: Any = STDLibLogObserver(name="twisted")
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
