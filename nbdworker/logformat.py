"""Log formats (`LOG_FORMAT=plain|json`) for nbdworker and the web side: standard library only.

The one JSON formatter of the project lives here rather than in `nbdweb` because nbdworker must
never import the web side (docs/architecture.md, "Module boundaries"); `nbdweb/logging.py`
re-exports it so that web, Celery, gunicorn and nbdworker write the same fields.

Each JSON line has `time` (ISO 8601, UTC), `level`, `logger`, `message`, `process`, and
`exc_info` / `stack_info` when present, plus any `extra={...}` fields the caller passed (values
that are not JSON types are written with str()).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

__all__ = ["LOG_FORMATS", "JSONFormatter", "configure_logging", "log_format_from_env"]

LOG_FORMATS = ("plain", "json")

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


def log_format_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """`LOG_FORMAT`, normalised; ValueError (with the message the web side gives) if unknown."""
    value = environ.get("LOG_FORMAT", "plain").strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"LOG_FORMAT must be plain or json, not {value!r}")
    return value


def configure_logging(
    log_format: str, level: str, *, with_pid: bool = False, stream: TextIO | None = None
) -> None:
    """nbdworker's root logging: `log_format` lines at `level` on `stream` (stderr).

    `with_pid` adds `[pid]` after the logger name in plain lines, for when several processes
    share the stream; JSON lines always carry `process`.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s"
                + ("[%(process)d]" if with_pid else "")
                + ": %(message)s"
            )
        )
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
    # Python's own stderr writers (warnings, an uncaught exception's traceback) would put
    # non-JSON lines between the JSON ones; route them through logging instead.
    logging.captureWarnings(True)
    if log_format == "json":
        sys.excepthook = _log_uncaught


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("nbdworker").critical("uncaught exception", exc_info=(exc_type, exc, tb))
