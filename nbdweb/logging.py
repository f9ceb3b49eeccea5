"""A JSON log formatter (`LOG_FORMAT=json`): one object per line, standard library only.

Each line has `time` (ISO 8601, UTC), `level`, `logger`, `message`, `process`, and `exc_info` /
`stack_info` when present, plus any `extra={...}` fields the caller passed (values that are not
JSON types are written with str()).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

__all__ = ["JSONFormatter"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)
