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


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _record_request_id(record: logging.LogRecord) -> str | None:
    return getattr(record, "request_id", None) or request_id_var.get()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as exc:  # noqa: BLE001 - a broken log call must still give one JSON line
            # (logging's own fallback prints a multi-line "--- Logging error ---" report instead)
            return json.dumps({"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name,
                               "msg": repr(record.msg)[:2000], "request_id": _record_request_id(record),
                               "log_error": f"{type(exc).__name__}: {exc}"[:2000]},
                              separators=(",", ":"))

    def _format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = _record_request_id(record)
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and key != "request_id":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = json.dumps(out, default=str, separators=(",", ":"))
        for limit in (2_000, 500):  # the second pass for many long fields, or non-ASCII text
            if len(line) <= MAX_LINE_CHARS:
                break
            line = json.dumps(_shortened(out, limit), default=str, separators=(",", ":"))
        return line


# Collectors split longer lines (Docker's json-file driver at 16 KiB), and a JSON object cut in
# two parses as neither. A longer record keeps the head of each long text and the tail of the
# traceback, where its exception is.
MAX_LINE_CHARS = 16_000


def _shortened(out: dict[str, Any], limit: int) -> dict[str, Any]:
    short: dict[str, Any] = {}
    for key, value in out.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) <= limit:
            short[key] = value
        elif key == "exc":
            short[key] = f"[{len(text) - limit} characters cut]..." + text[-limit:]
        else:
            short[key] = text[:limit] + f"...[{len(text) - limit} characters cut]"
    short["truncated"] = True
    return short


# Records waiting for the writer thread. Bounded: when the stream is slower than the logging
# (a stalled pipe, a burst of errors), memory must not grow without limit; past the bound records
# are dropped and counted, and one line says how many once there is room again.
QUEUE_LIMIT = 10_000


class _ContextQueueHandler(logging.handlers.QueueHandler):
    """Hands records to a background thread, stamped with the request id of the thread that
    logged them (the writer thread has no request context). Formatting and the write to the
    stream happen off the event loop."""

    def __init__(self, records: queue.Queue) -> None:
        super().__init__(records)
        self.dropped = 0  # touched under the handler's lock (Handler.handle holds it)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return record

    def dropped_note(self) -> logging.LogRecord:
        note = logging.LogRecord("gateway.logs", logging.WARNING, __file__, 0,
                                 "%d log records dropped: the log writer fell behind", (self.dropped,), None)
        note.dropped = self.dropped
        return note

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.dropped:
            try:
                self.queue.put_nowait(self.dropped_note())
                self.dropped = 0
            except queue.Full:
                pass
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel)  # waits for room: the queue may be full at exit


_listener: logging.handlers.QueueListener | None = None
_direct: logging.Handler | None = None  # the stream handler behind the queue


def configure_logging(level: str = "INFO", stream: Any = None, *, background: bool = False) -> None:
    """Route the root logger to one JSON handler (idempotent).

    background: format and write on a separate thread (for the server; `stop_logging` flushes).
    """
    global _listener, _direct
    stop_logging()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gateway_json", False):
            root.removeHandler(handler)
    handler: logging.Handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    if background:
        records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_LIMIT)
        _listener = _Listener(records, handler, respect_handler_level=True)
        _listener.start()
        _direct = handler
        handler = _ContextQueueHandler(records)
    handler._gateway_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's own access log duplicates ours; keep it quiet.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def stop_logging() -> None:
    """Write out what the background thread still holds (at exit). Records logged afterwards
    (interpreter shutdown, threads still ending) are written directly instead of being queued
    for a thread that no longer runs."""
    global _listener, _direct
    if _listener is None:
        return
    _listener.stop()  # writes what was queued before it
    root = logging.getLogger()
    queued = [h for h in root.handlers if isinstance(h, _ContextQueueHandler)]
    if _direct is not None:
        _direct._gateway_json = True  # type: ignore[attr-defined]
        # One assignment: a record logged meanwhile on another thread sees either list, whole.
        root.handlers = [h for h in root.handlers if h not in queued] + [_direct]
        for handler in queued:  # what came in while the thread stopped, and the dropped count
            while True:
                try:
                    _direct.handle(handler.queue.get_nowait())
                except queue.Empty:
                    break
            if handler.dropped:
                _direct.handle(handler.dropped_note())
                handler.dropped = 0
    _listener = None
    _direct = None
