"""JSON-lines logs (``serve --log-json``): one object a line, for a log collector to parse."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

# What every LogRecord has; anything else on a record came with ``extra=`` and is logged too.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """``{"time": ISO 8601 UTC, "level", "logger", "message", ...extra, "exception"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update((key, value) for key, value in vars(record).items()
                     if key not in _STANDARD and key not in entry)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
