"""Structured JSON logs. Every line written while a request is handled carries its request id.

Plain `logging` with a JSON formatter: one object per line, the request id taken from a context
variable that the request-id middleware sets, so log calls anywhere below a handler (domain code
included) are tagged without passing the id around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else passed with `extra=` goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and key != "request_id":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class _ContextQueueHandler(logging.handlers.QueueHandler):
    """Hands records to a background thread, stamped with the request id of the thread that
    logged them (the writer thread has no request context). Formatting and the write to the
    stream happen off the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return record


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str = "INFO", stream: Any = None, *, background: bool = False) -> None:
    """Route the root logger to one JSON handler (idempotent).

    background: format and write on a separate thread (for the server; `stop_logging` flushes).
    """
    global _listener
    stop_logging()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gateway_json", False):
            root.removeHandler(handler)
    handler: logging.Handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    if background:
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        _listener = logging.handlers.QueueListener(records, handler, respect_handler_level=True)
        _listener.start()
        handler = _ContextQueueHandler(records)
    handler._gateway_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's own access log duplicates ours; keep it quiet.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def stop_logging() -> None:
    """Write out what the background thread still holds (at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
