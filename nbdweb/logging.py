"""The JSON log formatter (`LOG_FORMAT=json`) of web, Celery and gunicorn.

It is nbdworker's (`nbdworker/logformat.py`, standard library only), so that every process of a
node writes the same fields; it lives there because nbdworker may not import the web side. This
module keeps the name `nbdweb.logging.JSONFormatter` that the logging configurations use.
"""

from __future__ import annotations

from nbdworker.logformat import JSONFormatter

__all__ = ["JSONFormatter"]
