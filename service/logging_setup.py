"""Logging of ``carryover serve``, set up the same way in every process it runs (the serve
process and each ``--workers`` worker): one handler on the root logger writing text or JSON
lines (``--log-format``) to stderr, uvicorn's loggers propagating to it, and uvicorn's access
log off, because the app writes one access line per request itself (``service.access``).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from service.api.middleware import RequestIdLogFilter

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
# JSON: these record attributes, renamed for log shippers, plus every `extra` field of the call
# (the access line's method, route, status, duration_ms, ...).
JSON_FIELDS = ("asctime", "levelname", "name", "process", "message")
JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"}
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")


def configure_logging(log_format: LogFormat = "text", level: int = logging.INFO) -> None:
    """Replace the root logger's handlers with one stderr handler in ``log_format``; route
    uvicorn's loggers to it and silence ``uvicorn.access``. Safe to call again (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False  # the app's access line replaces it (one line per request)


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time, level, logger, pid, message, request_id and the call's
    extra fields; an exception as ``exc_info`` text."""
    return OrjsonFormatter(
        list(JSON_FIELDS),
        rename_fields=JSON_NAMES,
        # uvicorn adds an ANSI-coloured copy of its messages; not for log shippers
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
    )
